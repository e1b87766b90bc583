"""The front-panel LED controller on the VM's second serial port (ttyS1), played by the
test through QEMU's socket (docs/leds.md): the booting pattern while socketd starts, then
cloud_down when the configured PoP cannot be reached, and the pattern drawn again when the
panel restarts (a new HELLO). Cloud up is checked with a reachable PoP in
test_two_sites.py, which plays the same panel on its site 1."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sites import (
    BOOT_S,
    CONSOLE_S,
    POP_ENDPOINT,
    SETTLE_S,
    SOCKETD_S,
    PanelPlayer,
    SiteSpec,
    site_fw_cfg,
    vm_options,
)

from sdwan.lab.topology import Lab
from sdwan.lab.vm import VM

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

# board/qemu-x86_64/leds.toml: the panel's LED numbers
STATUS, CLOUD, WAN1 = 0, 1, 2
PANEL_LEDS = 4  # status, cloud, wan1, wan2
# socketd leaves `booting` at most 30 s after its start (docs/leds.md); TCG margin on top
CLOUD_DOWN_S = SETTLE_S


def test_panel_gets_booting_then_cloud_down_and_a_restarted_panel_is_redrawn(
    appliance_image: Callable[[str], Path], lab: Lab, tmp_path: Path,
) -> None:
    board = "qemu-x86_64"
    # The PoP is in the lab's documentation range, which the VM's restricted user-mode NIC
    # cannot reach: PoPs configured, none reached.
    spec = SiteSpec(4, wan_address="10.0.2.15/24", wan_gateway="10.0.2.2",
                    pop_endpoint=POP_ENDPOINT, watchdog=False)
    vm = VM(board, appliance_image(board),
            vm_options(fw_cfg=site_fw_cfg(lab, spec, tmp_path), panel=True))
    panel: PanelPlayer | None = None
    try:
        vm.start()
        panel = PanelPlayer(vm.panel_sock).start()
        vm.expect(r"boot: ready: site-4, /data on /dev/vda4", BOOT_S)
        vm.expect(r"socketd running \(pid \d+", SOCKETD_S)
        panel.wait_pattern("booting", CONSOLE_S, leds=PANEL_LEDS)
        panel.wait_pattern("cloud_down", CLOUD_DOWN_S, leds=PANEL_LEDS)
        shown = panel.shown()
        names = [name for name, _ in shown]
        assert names.index("booting") < names.index("cloud_down"), names
        assert "cloud_up" not in names, names
        # A PATTERN without its LED lines is a draw the driver gave up and began again (the
        # panel did not answer in time under load, or greeted in the middle of it): the
        # pattern's states are those of its first whole drawing.
        drawn = [(name, leds) for name, leds in shown if len(leds) == PANEL_LEDS]
        booting = next(leds for name, leds in drawn if name == "booting")
        assert booting.get(STATUS) == "blink 500 500", shown
        assert booting.get(CLOUD) == "off", shown
        down = next(leds for name, leds in drawn if name == "cloud_down")
        assert down.get(STATUS) == "on" and down.get(CLOUD) == "off", shown
        assert down.get(WAN1) == "on", f"wan1 is up, its LED should be on: {shown}"

        # A panel that restarts says HELLO again and gets the current pattern again.
        before = names.count("cloud_down")
        panel.hello("1.1")
        deadline = time.monotonic() + CONSOLE_S
        while [n for n, leds in panel.shown()
               if len(leds) == PANEL_LEDS].count("cloud_down") <= before:
            assert time.monotonic() < deadline, \
                f"the pattern was not drawn again after a new HELLO: {panel.shown()}"
            time.sleep(0.5)
    except BaseException:
        print(vm.tail(6000))
        raise
    finally:
        if panel is not None:
            panel.close()
        vm.stop()
