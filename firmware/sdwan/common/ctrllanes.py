"""The control lanes' status as socketctl and popctl show it: one line for the
"control_lanes" JSON object (docs/socketctl.md, docs/popd.md), without the fast path."""

from __future__ import annotations


def describe_lanes(lanes: object) -> str:
    """One line of socketctl and popctl status for the "control_lanes" JSON object."""
    if not isinstance(lanes, dict):
        return "-"

    def n(key: str) -> str:
        v = lanes.get(key)
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else "?"

    return (
        f"known {n('known_len')}/{n('known_cap')} (queued {n('known_queued')},"
        f" full {n('known_full')}), unknown {n('unknown_len')}/{n('unknown_cap')}"
        f" (queued {n('unknown_queued')}, full {n('unknown_full')});"
        f" rate-limited {n('rate_limited')} (per source {n('rate_limited_source')},"
        f" all unknown {n('rate_limited_global')}); sources {n('sources')}/{n('sources_cap')}"
        f" (evicted {n('evictions')}), known addresses {n('known_addrs')}"
    )
