"""What socketd and popd share as long-running services: the command line
(--config, --log-level), logging, and turning a bad config or a failed start
into a clear message and an exit status (2: the config, 1: the start, or a fault the
running service could not mend: ServiceFailed)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

from sdwan.common.tomlcheck import ConfigError

C = TypeVar("C")


class StartupError(Exception):
    """The service cannot start; the message says what to fix."""


class ServiceFailed(Exception):
    """The running service met a fault it cannot mend in place and ended: exit status 1, so
    that init starts it again (a fresh process sets up what it needs anew)."""


class Service(Protocol):
    def run(self) -> Coroutine[Any, Any, None]: ...

    def close(self) -> None: ...


def _say(prog: str, error: Exception) -> None:
    for line in str(error).splitlines():
        print(f"{prog}: {line}", file=sys.stderr)


def run_service(
    prog: str,
    description: str,
    load: Callable[[str], C],
    make: Callable[[C], Service],
    argv: list[str] | None = None,
) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="configuration file (TOML)")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        cfg = load(args.config)
    except ConfigError as e:
        _say(prog, e)
        return 2
    service = make(cfg)
    try:
        asyncio.run(service.run())
    except StartupError as e:
        service.close()
        _say(prog, e)
        return 1
    except ServiceFailed as e:
        service.close()
        _say(prog, e)
        return 1
    return 0
