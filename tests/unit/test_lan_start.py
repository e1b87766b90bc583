"""The LAN address goes on before socketd's own start, and stays when that start fails: the
box stays reachable from the LAN; a failure to apply it never stops the start."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_lan_config import BASE, write

from sdwan.appliance.lanport import LanPort
from sdwan.common.daemon import StartupError
from sdwan.common.netcfg import AddrPlan, NetcfgError
from sdwan.site.config import load_config
from sdwan.site.supervisor import Supervisor


def failing_start(tmp_path: Path, apply: object) -> tuple[Supervisor, list[str]]:
    cfg = load_config(write(tmp_path, BASE))
    sup = Supervisor(cfg)
    sup.lan = LanPort(cfg.lan, tmp_path / "data", tmp_path / "run", lambda *_: None,
                      apply_worker=apply)  # type: ignore[arg-type]
    ended: list[str] = []

    def start_appliance() -> None:
        sup.guard = SimpleNamespace(end=ended.append)  # type: ignore[assignment]

    def open_fails() -> None:
        raise StartupError("links[0]: device eth0 does not exist")

    sup._start_appliance = start_appliance  # type: ignore[method-assign]
    sup._open = open_fails  # type: ignore[method-assign]
    return sup, ended


def test_the_lan_address_is_on_when_the_start_fails(tmp_path: Path) -> None:
    applied: list[AddrPlan] = []
    sup, ended = failing_start(tmp_path, applied.append)
    with pytest.raises(StartupError):
        asyncio.run(sup.run())
    assert applied == [AddrPlan("lan0", 4, ["10.1.0.1/24"], None, 0)]
    assert ended == ["start failed: links[0]: device eth0 does not exist"]


def test_a_lan_address_that_fails_early_does_not_stop_the_start(tmp_path: Path) -> None:
    def fail(_plan: AddrPlan) -> None:
        raise NetcfgError("device lan0 does not exist")

    sup, ended = failing_start(tmp_path, fail)
    with pytest.raises(StartupError):  # _open's, not the LAN's
        asyncio.run(sup.run())
    assert ended == ["start failed: links[0]: device eth0 does not exist"]
