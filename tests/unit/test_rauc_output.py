"""What the updater reads of RAUC (appliance/raucstatus.py), on output recorded from RAUC 1.8
(Debian bookworm) with its grub backend: `rauc status --detailed --output-format=json` after
an install into B, the lines `rauc install` prints for an install that worked and one whose
bundle was signed by a stranger, and a GRUB environment block as grub-editenv writes it.
Then the same read defensively (missing fields, wrong types, escape sequences), and the
tables socketctl and the console print from the updater's status, and an updater on a box
without RAUC's programs."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest

from sdwan.appliance.console import UsageError, parse
from sdwan.appliance.raucstatus import (
    BootSelection,
    install_error,
    parse_progress,
    parse_status,
)
from sdwan.appliance.updater import Health, InstallRefused, Updater
from sdwan.site.config import Update
from sdwan.site.socketctl import format_slots, format_status

# rauc status --detailed --output-format=json, booted A, B just installed (RAUC 1.8)
STATUS_AFTER_INSTALL = (
    '{"compatible":"sdwan-test","variant":"","booted":"A","boot_primary":"rootfs.1","slots":'
    '[{"rootfs.1":{"class":"rootfs","device":"/tmp/rx/slotB","type":"raw","bootname":"B",'
    '"state":"inactive","parent":null,"mountpoint":null,"boot_status":"good","slot_status":'
    '{"bundle":{"compatible":"sdwan-test","version":"1.2.3"},"checksum":{"sha256":'
    '"257ada534360b3d1438d7bc875e0f425925efae6aa9cb9afbc1160ab299852fd","size":200704},'
    '"installed":{"timestamp":"2026-12-03T07:41:14Z","count":1},"activated":{"timestamp":'
    '"2026-12-03T07:41:14Z","count":1},"status":"ok"}}},{"rootfs.0":{"class":"rootfs",'
    '"device":"/tmp/rx/slotA","type":"raw","bootname":"A","state":"booted","parent":null,'
    '"mountpoint":null,"boot_status":"good","slot_status":{"bundle":{"compatible":null}}}}]}'
)

# rauc install BUNDLE: stdout, then stderr (RAUC 1.8, the client over D-Bus)
INSTALL_OK = """\
installing
  0% Installing
  0% Determining slot states
 20% Determining slot states done.
 20% Checking bundle
 20% Verifying signature
 40% Verifying signature done.
 40% Checking bundle done.
 40% Checking manifest contents
 60% Checking manifest contents done.
 60% Determining target install group
 80% Determining target install group done.
 80% Updating slots
 80% Checking slot rootfs.1
 90% Checking slot rootfs.1 done.
 90% Copying image to rootfs.1
 99% Copying image to rootfs.1 done.
 99% Updating slots done.
100% Installing done.
Installing `/tmp/rx/b-plain.raucb` succeeded
"""

INSTALL_FOREIGN = """\
installing
  0% Installing
  0% Determining slot states
 20% Determining slot states done.
 20% Checking bundle
 20% Verifying signature
 40% Verifying signature failed.
 40% Checking bundle failed.
100% Installing failed.
LastError: signature verification failed: Verify error: self-signed certificate
Installing `/tmp/rx/evil.raucb` failed
"""

INSTALL_NO_DM = """\
100% Installing failed.
LastError: Failed mounting bundle: Failed to open /dev/mapper/control: No such file or directory
Installing `/tmp/rx/b-verity.raucb` failed
"""

# grub-editenv grubenv create; set ORDER="B A" A_OK=1 A_TRY=0 B_OK=1 B_TRY=3
# GRUB's variables after B was tried three times without a commit
GRUBENV = {"ORDER": "B A", "A_OK": "1", "A_TRY": "0", "A_COMMITTED": "1",
           "B_OK": "1", "B_TRY": "3", "B_COMMITTED": "0"}


def test_status_after_an_install() -> None:
    st = parse_status(STATUS_AFTER_INSTALL)
    assert (st.compatible, st.booted, st.primary) == ("sdwan-test", "A", "rootfs.1")
    a, b = st.slots
    assert (a.name, a.bootname, a.state, a.boot_status, a.primary) == (
        "rootfs.0", "A", "booted", "good", False)
    assert a.booted and a.good and a.version is None and a.installed_at is None
    assert (b.name, b.device, b.version, b.compatible, b.primary) == (
        "rootfs.1", "/tmp/rx/slotB", "1.2.3", "sdwan-test", True)
    assert (b.installed_at, b.install_count, b.status) == ("2026-12-03T07:41:14Z", 1, "ok")
    assert st.booted_slot is a
    assert st.others() == [b]
    assert b.to_json()["good"] is True and b.to_json()["booted"] is False


def test_status_read_defensively() -> None:
    doc = json.loads(STATUS_AFTER_INSTALL)
    b = doc["slots"][0]["rootfs.1"]
    b["slot_status"]["bundle"]["version"] = "9.9\x1b[2J\x1b]0;owned\x07"
    b["slot_status"]["installed"] = {"timestamp": 7, "count": "many"}
    b["bootname"] = ["B"]
    doc["slots"].append("junk")
    doc["slots"].append({"rootfs.2": "not an object"})
    doc["boot_primary"] = None
    st = parse_status(json.dumps(doc))
    b_slot = st.slot("rootfs.1")
    assert b_slot is not None
    assert b_slot.version == "9.9\\x1b[2J\\x1b]0;owned\\x07"
    assert b_slot.installed_at is None and b_slot.install_count is None
    assert b_slot.bootname is None and not b_slot.primary
    assert [s.name for s in st.slots] == ["rootfs.0", "rootfs.1"]
    assert st.primary is None


@pytest.mark.parametrize("text", ["", "rauc: error", "[]", '{"slots": 3}', "{"])
def test_what_is_not_rauc_status_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_status(text)


def test_progress_of_an_install_that_worked() -> None:
    lines = INSTALL_OK.splitlines()
    steps = [p for p in map(parse_progress, lines) if p is not None]
    assert steps[0].percent == 0 and steps[0].message == "Installing"
    assert steps[-1].percent == 100 and steps[-1].message == "Installing done."
    assert [p.percent for p in steps] == sorted(p.percent for p in steps)
    assert len(steps) == len(lines) - 2  # not "installing" nor the closing sentence
    assert parse_progress("installing") is None
    assert parse_progress("250% nonsense") is None
    assert parse_progress(" 40% bad\x1b[31m").message == "bad\\x1b[31m"


def test_why_an_install_failed_is_raucs_own_message() -> None:
    assert install_error(INSTALL_FOREIGN.splitlines()) == (
        "signature verification failed: Verify error: self-signed certificate")
    assert install_error(INSTALL_NO_DM.splitlines()) == (
        "Failed mounting bundle: Failed to open /dev/mapper/control: No such file or directory")
    assert install_error(["", "rauc: cannot connect", ""]) == "rauc: cannot connect"
    assert install_error([]) is None


def test_grub_boot_selection() -> None:
    env = GRUBENV
    sel = BootSelection.from_env(env)
    assert sel.first == "B" and sel.order == ("B", "A")
    assert sel.abandoned("B") and not sel.abandoned("A")
    assert not BootSelection.from_env({**env, "B_TRY": "1"}).abandoned("B")
    assert BootSelection.from_env({**env, "B_TRY": "0", "B_OK": "0"}).abandoned("B")
    # committed: never out of tries; not loadable: given up all the same
    assert not BootSelection.from_env({**env, "B_COMMITTED": "1"}).abandoned("B")
    assert BootSelection.from_env({**env, "B_COMMITTED": "1", "B_LOADFAIL": "1"}).abandoned("B")
    # committed, but in a reboot loop: its boots in a row that did not stay up, at the limit
    looping = BootSelection.from_env({**env, "B_COMMITTED": "1", "B_LOOPS": "4"}, loop_limit=4)
    assert looping.looping("B") and looping.abandoned("B") and looping.loops == {"B": 4}
    assert not BootSelection.from_env({**env, "B_COMMITTED": "1", "B_LOOPS": "3"},
                                      loop_limit=4).abandoned("B")
    # a slot not committed counts tries, not loops
    assert not BootSelection.from_env({**env, "B_TRY": "0", "B_LOOPS": "9"},
                                      loop_limit=4).looping("B")


def _status(**over: object) -> dict:
    st = parse_status(STATUS_AFTER_INSTALL)
    doc = {
        "enabled": True, "error": None, "read_error": None, "booted": "rootfs.0",
        "primary": "rootfs.1", "slots": [s.to_json() for s in st.slots],
        "commit": {"state": "committed", "slot": "rootfs.0", "waiting_for": None},
        "reboot_needed": {"slot": "rootfs.1", "version": "1.2.3"},
        "install": {"state": "installed", "bundle": "/data/u.raucb", "version": "1.2.3",
                    "slot": "rootfs.1", "percent": 100, "message": "Installing done.",
                    "error": None},
        "rollback": None,
    }
    doc.update(over)
    return doc


def test_slots_table() -> None:
    out = io.StringIO()
    format_slots(_status(), out)
    text = out.getvalue()
    lines = text.splitlines()
    assert lines[0].split() == ["SLOT", "BOOT", "STATE", "STATUS", "PRIMARY", "VERSION",
                                "INSTALLED", "DEVICE"]
    assert lines[1].split() == ["rootfs.0", "A", "booted", "good", "-", "-", "-",
                                "/tmp/rx/slotA"]
    assert lines[2].split()[:6] == ["rootfs.1", "B", "inactive", "good", "yes", "1.2.3"]
    assert "reboot   needed: 1.2.3 is installed into rootfs.1" in text
    out = io.StringIO()
    pending = {"state": "pending", "slot": "rootfs.0",
               "waiting_for": "the cloud (a PoP session up) or 4m10s more of health",
               "deadline_s": 900}
    format_slots(_status(commit=pending, reboot_needed=None,
                         rollback={"slot": "rootfs.1", "version": "2.0\x1b[2J",
                                   "why": "its boot tries were used up"}), out)
    text = out.getvalue()
    assert ("commit   pending: rootfs.0 is marked good once healthy, waiting for the cloud"
            " (a PoP session up) or 4m10s more of health; else rebooted 900 s after boot (the"
            " commit deadline)") in text
    assert "rollback rootfs.1 (version 2.0\\x1b[2J) was abandoned" in text
    assert "\x1b" not in text
    out = io.StringIO()
    format_slots({"enabled": False, "error": "no A/B updates on this box"}, out)
    assert out.getvalue() == "no A/B updates (no A/B updates on this box)\n"


def test_status_has_a_slots_line() -> None:
    out = io.StringIO()
    pending = {"state": "pending", "slot": "rootfs.0", "waiting_for": "the cloud"}
    format_status({"site_id": 1, "name": "b", "links": [],
                   "slots": _status(commit=pending, reboot_needed=None)}, out)
    line = next(ln for ln in out.getvalue().splitlines() if ln.startswith("slots"))
    assert line == ("slots    A booted good -, B inactive good 1.2.3 (primary);"
                    " pending commit: waiting for the cloud")


def test_console_update_takes_one_absolute_path() -> None:
    cmd = parse("update /media/usb/sdwan-2.0.raucb")
    assert cmd is not None and cmd.name == "update"
    assert cmd.args == {"bundle": "/media/usb/sdwan-2.0.raucb"}
    for bad in ("update", "update u.raucb", "update /a /b"):
        with pytest.raises(UsageError):
            parse(bad)
    show = parse("show slots")
    assert show is not None and show.args == {"topic": "slots"}


def test_an_updater_without_rauc_says_so_and_refuses_installs(tmp_path: Path) -> None:
    conf = tmp_path / "system.conf"
    conf.write_text("[system]\ncompatible=sdwan-test\nbootloader=grub\n")
    events: list[tuple[str, str]] = []
    up = Updater(Update(system_conf=conf), tmp_path / "data", tmp_path / "run",
                 lambda k, t, d: events.append((k, t)),
                 lambda: Health(None, None, True, True),
                 rauc=str(tmp_path / "no-rauc"), dbus_daemon=str(tmp_path / "no-dbus"))

    async def main() -> dict:
        up.start()
        try:
            await up.ready(timeout=10)
            with pytest.raises(InstallRefused, match="updates are not available"):
                await up.install(str(conf))
            return up.status()
        finally:
            await up.close()

    status = asyncio.run(main())
    assert "not installed" in status["error"], status
    assert status["service"]["bus"]["state"] == "failed", status
    assert [k for k, _ in events].count("update.error") >= 1, events
    assert any(t.startswith("updates unavailable: rauc service does not answer")
               for _, t in events), events
