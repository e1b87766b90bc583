"""What WAN addressing (appliance/wanaddr.py) asks of the netcfg worker for each link's own
routing table (docs/links.md, "Routing tables"), with the worker replaced by a list: the link
id in every plan, a link left to the system followed from its device without touching it, and
what a stop removes. The kernel's side is tests/lab/test_link_tables.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from sdwan.appliance import wanaddr
from sdwan.appliance.wanaddr import WanAddressing, route_metric
from sdwan.common.addressing import Addressing
from sdwan.common.netcfg import (
    AddrPlan,
    NetcfgError,
    Teardown,
    link_rule_priorities,
    link_table,
)
from sdwan.site.config import Link

LINKS = [
    Link("wan1", "eth0", 4800, addressing=Addressing.static("100.64.1.2/24", "100.64.1.1")),
    Link("wan2", "eth1", 4801, precedence=2, vlan=10),
    Link("lte", "wwan0", 4802, precedence=3, vlan=7, vlan_device="lte7"),
]


def test_the_numbers_are_per_link_id() -> None:
    assert [link_table(n) for n in (1, 2, 3, 4)] == [101, 102, 103, 104]
    assert link_rule_priorities(2) == (902, 1002)


class Kernel:
    """The netcfg worker's stand-in: records the plans; the devices' addresses and gateways
    are what `observe` would read."""

    def __init__(self) -> None:
        self.plans: list[AddrPlan] = []
        self.teardowns: list[Teardown] = []
        self.devices: dict[str, tuple[str | None, str | None]] = {}
        self.fail: str | None = None

    def apply(self, plan: AddrPlan) -> None:
        if self.fail:
            raise NetcfgError(self.fail)
        self.plans.append(plan)

    def teardown(self, plan: Teardown) -> None:
        self.teardowns.append(plan)


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Kernel:
    k = Kernel()
    monkeypatch.setattr(wanaddr, "_ipv4", lambda dev: k.devices.get(dev, (None, None))[0])
    monkeypatch.setattr(wanaddr, "_gateway", lambda dev: k.devices.get(dev, (None, None))[1])
    return k


def make(tmp_path: Path, kernel: Kernel, clock: list[float]) -> WanAddressing:
    return WanAddressing(
        LINKS,
        None,
        tmp_path / "control.sock",
        lambda *a: None,
        clock=lambda: clock[0],
        apply_worker=kernel.apply,
        teardown_worker=kernel.teardown,
    )


def test_each_plan_names_the_link_and_its_device(tmp_path: Path, kernel: Kernel) -> None:
    kernel.devices["eth1.10"] = ("100.64.11.2/24", "100.64.11.1")
    wan = make(tmp_path, kernel, [0.0])
    asyncio.run(wan.apply_all())
    static, left = kernel.plans[0], kernel.plans[1]
    assert static == AddrPlan(
        "eth0", 4, ["100.64.1.2/24"], "100.64.1.1", route_metric(0), link_id=1
    )
    # A VLAN link left to the system: its table from what is on its VLAN device, which is
    # not touched.
    assert left == AddrPlan(
        "eth1.10", 4, ["100.64.11.2/24"], "100.64.11.1", route_metric(1), link_id=2,
        keep_device=True,
    )
    # No address on the third: a plan that leaves it nothing of its table.
    assert kernel.plans[2] == AddrPlan(
        "lte7", 4, [], None, route_metric(2), link_id=3, keep_device=True
    )
    shown = {ln["name"]: ln for ln in asyncio.run(wan.handlers()["links"]({}))["links"]}
    assert shown["wan2"]["interface"] == "eth1.10"
    assert shown["wan2"]["vlan"] == {"id": 10, "on": "eth1"}
    assert shown["wan1"]["vlan"] is None
    assert (shown["lte"]["table"], shown["lte"]["rule_priorities"]) == (103, [903, 1003])


def test_a_link_left_alone_is_followed_only_when_its_device_changes(
    tmp_path: Path, kernel: Kernel
) -> None:
    clock = [0.0]
    wan = make(tmp_path, kernel, clock)
    st = wan.links["wan2"]
    kernel.devices["eth1.10"] = ("100.64.11.2/24", "100.64.11.1")

    async def follow() -> None:
        await wan._follow_left_alone(st)

    asyncio.run(follow())
    asyncio.run(follow())
    assert len(kernel.plans) == 1, "nothing changed: no second worker"
    kernel.devices["eth1.10"] = ("100.64.11.9/24", "100.64.11.1")
    asyncio.run(follow())
    assert kernel.plans[-1].addresses == ["100.64.11.9/24"] and len(kernel.plans) == 2
    # An IPv6 gateway is not one for the link's IPv4 table.
    kernel.devices["eth1.10"] = ("100.64.11.9/24", "fe80::1")
    asyncio.run(follow())
    assert kernel.plans[-1].gateway is None

    # A failure is shown, and tried again after a while, not at every look.
    kernel.fail = "cannot route default via 100.64.11.1 in table 102 of eth1.10: boom"
    kernel.devices["eth1.10"] = ("100.64.11.9/24", "100.64.11.1")
    asyncio.run(follow())
    assert st.error == (
        "routing table 102: cannot route default via 100.64.11.1 in table 102 of eth1.10: boom"
    )
    kernel.fail = None
    clock[0] += wanaddr.LEFT_ALONE_RETRY_S - 1
    asyncio.run(follow())
    assert st.error is not None and len(kernel.plans) == 3  # the failed one is not recorded
    clock[0] += 1
    asyncio.run(follow())
    assert st.error is None and len(kernel.plans) == 4


def test_stop_removes_the_tables_and_vlans_only_once_started(
    tmp_path: Path, kernel: Kernel
) -> None:
    wan = make(tmp_path, kernel, [0.0])
    asyncio.run(wan.close())
    assert kernel.teardowns == [], "never started: nothing of ours in the kernel"

    async def run() -> None:
        wan = make(tmp_path, kernel, [0.0])
        wan.start()
        await asyncio.sleep(0)
        await wan.close()

    asyncio.run(run())
    assert kernel.teardowns == [Teardown(link_ids=[1, 2, 3], vlans=["eth1.10", "lte7"])]


def test_a_lease_lost_clears_the_links_table(tmp_path: Path, kernel: Kernel) -> None:
    dhcp = [Link("wan1", "eth0", 4800, addressing=Addressing("dhcp"))]
    wan = WanAddressing(
        dhcp, None, tmp_path / "c.sock", lambda *a: None, apply_worker=kernel.apply
    )
    st = wan.links["wan1"]
    st.dhcp = wanaddr._Dhcp(generation=1, state="bound")
    lease: dict[str, Any] = {"link": "wan1", "generation": 1}
    handler = wan.handlers()["dhcp-lease"]
    asyncio.run(handler({**lease, "event": "bound", "ip": "100.64.1.100",
                         "mask": "24", "router": "100.64.1.1", "serverid": "100.64.1.1"}))
    asyncio.run(handler({**lease, "event": "deconfig"}))
    assert [(p.addresses, p.gateway, p.link_id) for p in kernel.plans] == [
        (["100.64.1.100/24"], "100.64.1.1", 1),
        ([], None, 1),
    ]
