"""Two appliance images booted as two sites, a PoP (popd) in a namespace, wired with tap
devices: each VM addresses its LAN port from `[lan] address` and leases its LAN host its
address (a static lease by MAC) from its DHCP server, both register with the PoP, their LAN
hosts ping each other through the tunnel,
the console shows the PoP session and the peer, and the front-panel controller on site 1's
second serial port gets the LED patterns for booting and cloud up (docs/leds.md)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from sites import (
    BOOT_S,
    CONSOLE_S,
    POP_ENDPOINT,
    SETTLE_S,
    SOCKETD_S,
    NetnsVM,
    PanelPlayer,
    SiteSpec,
    command,
    lan_dhcp_client,
    login,
    poll_command,
    site_fw_cfg,
    vm_options,
    wire_site,
)

from sdwan.appliance.leds import BOOT_GRACE_S
from sdwan.lab.topology import Lab
from sdwan.lab.vm import VM

pytestmark = [pytest.mark.system, pytest.mark.timeout(1500)]

GRACE_MARGIN_S = 5.0  # from socketd's start to its first pattern on the panel
CLOUD_UP_S = 360.0  # both sites registered: DTLS handshakes on two emulated CPUs
PING_S = SETTLE_S


def test_two_sites_and_a_pop(appliance_image: Callable[[str], Path], lab: Lab,
                             tmp_path: Path) -> None:
    board = "qemu-x86_64"
    image = appliance_image(board)
    pop = lab.add_pop(1)
    lab.write_pop_config(pop, sites=[
        {"id": n, "name": f"branch-{n}", "subnets": [f"10.{n}.0.0/24"]} for n in (1, 2)])
    lab.start_popd(pop)

    vms: list[VM] = []
    panel: PanelPlayer | None = None
    try:
        sites = []
        for n in (1, 2):
            site, net_args = wire_site(lab, n, lan_dhcp=True)
            spec = SiteSpec(n, wan_address=f"{site.wan_ip}/24", wan_gateway="198.51.100.1",
                            lan_interface="eth1", lan_address=f"{site.lan_gw}/24",
                            lan_dhcp=True,
                            lan_static=((site.lan_host_mac, site.lan_host_ip),),
                            pop_endpoint=POP_ENDPOINT)
            opts = vm_options(fw_cfg=site_fw_cfg(lab, spec, tmp_path), net_args=net_args,
                              panel=(n == 1))
            vm = NetnsVM(site.vm_ns, board, image, opts)
            vms.append(vm)
            sites.append(site)
        # One VM after the other is powered on; both boot at once (two TCG guests on a
        # busy machine: the bounds are generous).
        for vm in vms:
            vm.start()
        panel = PanelPlayer(vms[0].panel_sock).start()
        for vm, site in zip(vms, sites, strict=True):
            vm.expect(rf"boot: ready: site-{site.n}, /data on /dev/vda4", BOOT_S)
            vm.expect_all([r"socketd running \(pid \d+", "login: "], SOCKETD_S,
                          "socketd and the login prompt")
        # Each LAN host's own DHCP client asks the VM: socketd put the LAN port's address
        # on eth1 and runs the image's udhcpd there.
        for vm, site in zip(vms, sites, strict=True):
            leased = lan_dhcp_client(lab, site, SETTLE_S)
            assert leased == site.lan_host_ip, (leased, vm.tail())

        # The panel shows booting while socketd starts, cloud_up once registered.
        panel.wait_pattern("booting", CONSOLE_S)
        panel.wait_pattern("cloud_up", CLOUD_UP_S, leds=4)
        shown = panel.shown()
        names = [name for name, _ in shown]
        assert names.index("booting") < names.index("cloud_up"), names
        # Nothing else during socketd's booting grace: links and sessions coming up must not
        # flash a fault. After it, a slow host may still be reaching the PoP and cloud_down is
        # the truth (docs/leds.md). The grace starts as socketd starts, a moment before it
        # draws its first pattern (under a second here, also on a loaded host): only patterns
        # surely inside it are judged.
        timed = [(t, line.split()[1]) for t, line in panel.lines if line.startswith("PATTERN ")]
        booted_at = next(t for t, name in timed if name == "booting")
        up_at = next(t for t, name in timed if name == "cloud_up")
        grace_end = booted_at + BOOT_GRACE_S - GRACE_MARGIN_S
        early = [name for t, name in timed if t < min(up_at, grace_end)]
        assert set(early) == {"booting"}, \
            (names, [(round(t - booted_at, 1), name) for t, name in timed])
        up = next(leds for name, leds in shown if name == "cloud_up")
        # board/qemu-x86_64/leds.toml: status 0, cloud 1, wan1 2
        assert (up.get(0), up.get(1), up.get(2)) == ("on", "on", "on"), shown

        # LAN to LAN through the tunnel: the inet namespace drops private space, so an
        # answer proves the packets travelled encapsulated.
        assert lab.wait_ping(sites[0].lan_ns, sites[1].lan_host_ip, timeout=PING_S), \
            (f"lan1 -> lan2 ({sites[1].lan_host_ip}) never answered; popctl sites: "
             f"{lab.popctl(pop, 'sites')}\nsite 1 console:\n{vms[0].tail()}")
        assert lab.wait_ping(sites[1].lan_ns, sites[0].lan_host_ip, timeout=CONSOLE_S)

        # What the field engineer sees on site 1's console.
        vm = vms[0]
        login(vm, "admin", first=True)
        out = poll_command(vm, "show pop", re.compile(r"(?m)^cloud\s+up\b"), SETTLE_S,
                           "site 1's PoP session")
        assert re.search(r"(?m)^1\s.*203\.0\.113\.10:4800\s.*connected", out), out
        poll_command(vm, "show peers", re.compile(r"(?m)^2\s+up\b"), SETTLE_S,
                     "site 2 up in site 1's peers")
        out = command(vm, "show status")
        assert re.search(r"site\s+1 \(branch-1\)", out), out
        assert re.search(r"(?m)^lan\s+10\.1\.0\.1/24 on eth1, DHCP running", out), out
        out = command(vm, "show lan")
        assert re.search(r"(?m)^dhcp\s+running, pid \d+", out), out
        mac = re.escape(sites[0].lan_host_mac)
        assert re.search(rf"(?m)^10\.1\.0\.2\s+{mac}\s+\S+\s+static\s+\d", out), out
        out = command(vm, "show events 50")
        assert "pop.connected" in out, out
    finally:
        if panel is not None:
            panel.close()
        for vm in vms:
            vm.stop()
