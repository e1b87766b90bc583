"""socketd, the site's supervisor process: its entry point (`socketd`, `python -m
sdwan.site.socketd`). The supervisor itself is supervisor.py.

Kept apart so that the start-up can begin before the supervisor's modules load: the netcfg
worker (common/netcfg.py, a second Python process that imports pyroute2) is started first
and loads side by side with them, then applies the tunnel device's first plan. A restart's
reconnect from NAT data waits for that plan; on a box's two cores this takes about a quarter
of a second off it (docs/mesh.md, "Reconnecting").
"""

from __future__ import annotations

import sys

from sdwan.common.netcfg import Worker


def main(argv: list[str] | None = None) -> int:
    try:
        worker: Worker | None = Worker()
    except OSError:
        worker = None  # the supervisor starts its own when it has the plan
    try:
        from sdwan.common.daemon import run_service
        from sdwan.site.config import SiteConfig, load_config
        from sdwan.site.supervisor import Supervisor

        def make(cfg: SiteConfig) -> Supervisor:
            return Supervisor(cfg, netcfg_worker=worker)

        return run_service("socketd", "SD-WAN appliance supervisor", load_config, make, argv)
    finally:
        if worker is not None:
            worker.close()  # one never handed its plan (a bad config, a failed start)


if __name__ == "__main__":
    sys.exit(main())
