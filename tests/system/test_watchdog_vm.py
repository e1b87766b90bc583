"""The hardware watchdog in QEMU (i6300esb, `-action watchdog=reset`): socketd stopped with
SIGSTOP inside the VM stops petting it, the VM resets by itself within the timeout, and the
next boot records why (`watchdog.reset`, docs/watchdog.md)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sites import (
    BOOT_S,
    SOCKETD_S,
    SiteSpec,
    command,
    hook_args,
    login,
    site_fw_cfg,
    vm_options,
)

from sdwan.lab.topology import Lab
from sdwan.lab.vm import VM

pytestmark = [pytest.mark.system, pytest.mark.timeout(1200)]

WATCHDOG_TIMEOUT_S = 15  # socketd's default watchdog_timeout_s
WATCHDOG_STARTUP_S = 300  # and watchdog_startup_s, in force until socketd's loop runs
# From SIGSTOP to the firmware starting again: one timeout, plus the i6300esb's second
# stage and TCG slowness; generous, it only has to catch a watchdog that never bites, but
# well short of the start-up timeout: the running timeout must be the one that bites.
RESET_BOUND_S = 150.0
assert RESET_BOUND_S < WATCHDOG_STARTUP_S

# Run once by init (test hook): waits until socketd runs with its running timeout (it is
# armed with the start-up one until its loop has ticked) and has petted the watchdog from
# its loop twice, then stops it. A marker in /data keeps the reboot from doing it again
# (the fw_cfg item is still there after a reset). Every wait is on a condition, bounded.
STOP_SOCKETD = r"""
[ -e /data/watchdog-test-done ] && { echo "already done on an earlier boot"; exit 0; }
want=@TIMEOUT@
watchdog() {
    socketctl status --json 2>/dev/null | python3 -c '
import json, sys
wd = json.load(sys.stdin)["appliance"]["watchdog"]
print(wd["timeout_s"], wd["pets"])'
}
i=0
while [ $i -lt 900 ]; do
    set -- $(watchdog)
    # the pet at open, at the switch, and two from the loop
    [ "$1" = "$want" ] && [ "${2:-0}" -ge 4 ] && break
    sleep 1; i=$((i + 1))
done
[ "$1" = "$want" ] || { echo "socketd never ran with the running timeout: $*"; exit 1; }
pid=""
for p in /proc/[0-9]*; do
    case "$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)" in
        *"socketd --config"*) pid=${p#/proc/} ;;
    esac
done
[ -n "$pid" ] || { echo "socketd not found"; exit 1; }
: > /data/watchdog-test-done
sync
kill -STOP "$pid"
echo "socketd (pid $pid) stopped with SIGSTOP at $(cut -d' ' -f1 /proc/uptime) s," \
    "watchdog timeout $1 s after $2 pets"
""".replace("@TIMEOUT@", str(WATCHDOG_TIMEOUT_S))


def test_sigstopped_socketd_is_reset_by_the_watchdog_and_the_reason_recorded(
    appliance_image: Callable[[str], Path], lab: Lab, tmp_path: Path,
) -> None:
    board = "qemu-x86_64"
    spec = SiteSpec(6, watchdog=True)
    vm = VM(board, appliance_image(board),
            vm_options(fw_cfg=site_fw_cfg(lab, spec, tmp_path),
                       extra_args=hook_args(tmp_path, "stop-socketd", STOP_SOCKETD)))
    try:
        vm.start()
        vm.expect(r"boot: ready: site-6, /data on /dev/vda4", BOOT_S)
        vm.expect(r"socketd running \(pid \d+", SOCKETD_S)
        m = vm.expect(r"test-hook: socketd \(pid (\d+)\) stopped with SIGSTOP.*"
                      rf"watchdog timeout {WATCHDOG_TIMEOUT_S} s", SOCKETD_S,
                      "the test hook stopping socketd")
        stopped_at = time.monotonic()
        # Nothing but the watchdog restarts the box: no shutdown, straight to the firmware.
        reset = vm.expect(r"grub: slot |shutdown: ", RESET_BOUND_S, "the watchdog's reset")
        took = time.monotonic() - stopped_at
        assert reset.group(0) == "grub: slot ", \
            f"the box went through an orderly shutdown, not a watchdog reset:\n{vm.tail()}"
        assert took >= WATCHDOG_TIMEOUT_S * 0.5, \
            f"reset {took:.0f} s after SIGSTOP: sooner than the watchdog timeout"
        vm.expect(r"boot: ready: site-6, /data on /dev/vda4", BOOT_S)
        vm.expect_all([r"socketd running \(pid \d+", "login: ",
                       "test-hook: already done on an earlier boot"], SOCKETD_S)
        login(vm, "admin", first=True)
        out = command(vm, "show events 50")
        assert re.search(r"watchdog\.reset\s+rebooted by the watchdog", out), \
            f"no watchdog.reset event after the reset (socketd {m.group(1)} was stopped):\n{out}"
        assert f"socketd pid {m.group(1)} was running" in out, out
    finally:
        vm.stop()
