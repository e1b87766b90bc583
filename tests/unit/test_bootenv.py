"""GRUB's boot selection as the box keeps it (sdwan.appliance.bootenv): the block written in
place in both copies, the copy read when the first is damaged, RAUC's custom backend
commands run as RAUC runs them (a program with the slot as argument), the committed mark,
and rcS's repair."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdwan.appliance import bootenv

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware"
CONF = """[system]
compatible=sdwan-test
bootloader=custom
[slot.rootfs.0]
device=/dev/disk/by-partlabel/root-a
bootname=A
[slot.rootfs.1]
device=/dev/disk/by-partlabel/root-b
bootname=B
"""
FACTORY = {"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "A_COMMITTED": "1", "A_LOADFAIL": "0",
           "A_LOOPS": "0", "B_OK": "0", "B_TRY": "0", "B_COMMITTED": "0", "B_LOADFAIL": "0",
           "B_LOOPS": "0", "BOOT_TRIES": "3", "BOOT_LOOPS": "10", "SDWAN_END": "1"}
LIMITS = bootenv.Limits(3, 10)


@pytest.fixture
def paths(tmp_path: Path) -> bootenv.Paths:
    conf = tmp_path / "system.conf"
    conf.write_text(CONF)
    board = tmp_path / "board.toml"
    board.write_text("[update]\nboot_tries = 3\n")
    p = bootenv.Paths(tmp_path / "grubenv", conf, board)
    bootenv.save(p, FACTORY)
    return p


def cli(paths: bootenv.Paths, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(FIRMWARE), "SDWAN_GRUBENV": str(paths.grubenv),
           "SDWAN_RAUC_CONF": str(paths.system_conf), "SDWAN_BOARD": str(paths.board)}
    return subprocess.run([sys.executable, "-m", "sdwan.appliance.bootenv", *args], env=env,
                          capture_output=True, text=True, timeout=30)


def both(paths: bootenv.Paths) -> dict[str, str]:
    first = bootenv.parse(paths.grubenv.read_bytes())
    assert bootenv.parse(paths.copy.read_bytes()) == first
    return first


def test_a_write_rewrites_the_block_in_place_in_both_copies(paths: bootenv.Paths) -> None:
    inodes = [p.stat().st_ino for p in (paths.grubenv, paths.copy)]
    # a reader holding the file open sees the new block through the same file: never replaced
    with paths.grubenv.open("rb") as held:
        assert cli(paths, "set-state", "B", "bad").returncode == 0
        held.seek(0)
        assert bootenv.parse(held.read()) == both(paths)
    assert [p.stat().st_ino for p in (paths.grubenv, paths.copy)] == inodes
    assert [p.stat().st_size for p in (paths.grubenv, paths.copy)] == [1024, 1024]


def test_rauc_install_then_boot_then_commit(paths: bootenv.Paths) -> None:
    """What RAUC runs for an install into B, then GRUB's try, then socketd's mark-good."""
    assert cli(paths, "get-primary").stdout == "A\n"
    assert cli(paths, "get-state", "A").stdout == "good\n"
    # before writing B: B bad, and not committed whatever it was
    assert cli(paths, "set-state", "B", "bad").returncode == 0
    assert cli(paths, "get-state", "B").stdout == "bad\n"
    # written: B first and given to GRUB untried; A stays committed as the way back
    assert cli(paths, "set-primary", "B").returncode == 0
    env = both(paths)
    assert env == {**FACTORY, "ORDER": "B A", "B_OK": "1"}
    assert cli(paths, "get-primary").stdout == "B\n"
    assert cli(paths, "get-state", "B").stdout == "good\n"  # waiting for its reboot
    no = cli(paths, "is-committed", "B")
    assert (no.returncode, no.stdout) == (1, "no\n")
    # GRUB counted a try: booted but not committed is bad until socketd marks it
    bootenv.save(paths, {**env, "B_TRY": "1"})
    assert cli(paths, "get-state", "B").stdout == "bad\n"
    assert cli(paths, "set-state", "B", "good").returncode == 0
    assert both(paths)["B_COMMITTED"] == "1" and both(paths)["B_TRY"] == "0"
    yes = cli(paths, "is-committed", "B")
    assert (yes.returncode, yes.stdout) == (0, "yes\n")
    assert cli(paths, "is-committed", "A").returncode == 0


def test_tries_used_up_pass_a_slot_over_unless_committed(paths: bootenv.Paths) -> None:
    names = ["A", "B"]
    env = {**FACTORY, "ORDER": "B A", "B_OK": "1", "B_TRY": "3"}
    assert bootenv.primary(env, names, LIMITS) == "A"
    assert bootenv.primary(env, names, bootenv.Limits(4, 10)) == "B"
    assert bootenv.primary({**env, "B_COMMITTED": "1"}, names, LIMITS) == "B"
    assert bootenv.primary({**env, "A_OK": "0"}, names, LIMITS) is None
    # a slot missing from ORDER still counts, after the ones listed
    assert bootenv.order({"ORDER": "B"}, names) == ["B", "A"]
    assert bootenv.order({"ORDER": "C B"}, names) == ["B", "A"]


def test_the_copy_stands_in_for_a_damaged_grubenv(paths: bootenv.Paths) -> None:
    with paths.grubenv.open("r+b") as f:  # a torn write: half a block
        f.write(b"\0" * 300)
    assert cli(paths, "get-primary").stdout == "A\n"
    loaded = bootenv.load(paths)
    assert loaded.source == paths.copy and loaded.values == FACTORY
    assert "no GRUB environment block header" in loaded.problems[0]
    # a write makes both whole again
    assert cli(paths, "set-primary", "A").returncode == 0
    assert both(paths) == FACTORY


@pytest.mark.parametrize("damage", [b"", b"# GRUB Environment Block\nORDER=A B\n",
                                    b"# GRUB Environment Block\n\xff\xfe=1\n" + b"#" * 998])
def test_neither_copy_valid_is_an_error_not_a_guess(paths: bootenv.Paths, damage: bytes) -> None:
    for p in (paths.grubenv, paths.copy):
        p.write_bytes(damage)
    done = cli(paths, "set-state", "B", "good")
    assert done.returncode == 1 and "no valid grubenv" in done.stderr, done
    assert paths.grubenv.read_bytes() == damage
    unknown = cli(paths, "is-committed", "A")
    assert unknown.returncode == 2 and unknown.stdout.startswith("unknown: no valid grubenv")


def test_bad_requests_are_refused(paths: bootenv.Paths) -> None:
    before = paths.grubenv.read_bytes()
    for args, why in ((["set-state", "C", "good"], "no slot 'C' (slots: A B)"),
                      (["set-state", "B", "fine"], "set-state SLOT good|bad"),
                      (["set-primary"], "a slot's bootname is missing")):
        done = cli(paths, *args)
        assert done.returncode == 1 and why in done.stderr, done
    assert cli(paths, "frobnicate").returncode == 2
    assert paths.grubenv.read_bytes() == before
    with pytest.raises(bootenv.BootEnvError):
        bootenv.render({"ORDER": "A\nB_OK=1"})
    with pytest.raises(bootenv.BootEnvError):
        bootenv.render({"X": "y" * 1024})


def test_repair_at_boot(paths: bootenv.Paths, tmp_path: Path) -> None:
    assert bootenv.repair(paths, "A") is None
    # one copy damaged: written again from the other
    paths.copy.write_bytes(b"garbage")
    assert "rewritten from" in (bootenv.repair(paths, "A") or "")
    assert both(paths) == FACTORY
    paths.grubenv.unlink()
    assert "rewritten from" in (bootenv.repair(paths, "A") or "")
    assert both(paths) == FACTORY
    # the copies differ (a power cut between the two writes): the first one wins
    bootenv._write_in_place(paths.grubenv, bootenv.render({**FACTORY, "A_TRY": "1"}))
    bootenv.repair(paths, "A")
    assert both(paths)["A_TRY"] == "1"
    # neither valid: the slot that booted is all there is to go by
    for p in (paths.grubenv, paths.copy):
        p.write_bytes(b"")
    done = bootenv.repair(paths, "B")
    assert done and "made anew" in done
    assert both(paths) == {"ORDER": "B A", "A_OK": "0", "A_TRY": "0", "A_COMMITTED": "0",
                           "A_LOADFAIL": "0", "A_LOOPS": "0", "B_OK": "1", "B_TRY": "0",
                           "B_COMMITTED": "1", "B_LOADFAIL": "0", "B_LOOPS": "0",
                           "BOOT_TRIES": "3", "BOOT_LOOPS": "10", "SDWAN_END": "1"}
    for p in (paths.grubenv, paths.copy):
        p.write_bytes(b"")
    with pytest.raises(bootenv.BootEnvError, match="booted slot is unknown"):
        bootenv.repair(paths, None)


def test_the_boards_boot_tries(paths: bootenv.Paths) -> None:
    assert bootenv.max_tries(paths) == 3
    paths.board.write_text("[update]\nboot_tries = 5\n")
    assert bootenv.max_tries(paths) == 5
    paths.board.write_text("not toml [")
    assert bootenv.max_tries(paths) == bootenv.DEFAULT_MAX_TRIES


def test_a_torn_block_is_not_used(paths: bootenv.Paths) -> None:
    """A write torn inside its sector: the variables end before the end marker, or the
    padding after them is damaged. GRUB would read what came before the damage; the copy
    is used instead, by GRUB (grub.cfg checks SDWAN_END) and here."""
    block = paths.grubenv.read_bytes()
    cut = block.index(b"B_OK")
    for torn in (block[:cut] + b"#" * (1024 - cut),
                 block[:-40] + b"\xff" * 40,
                 block.replace(b"SDWAN_END=1\n", b"SDWAN_END=1\n\x00", 1)[:1024]):
        paths.grubenv.write_bytes(torn)
        assert bootenv.load(paths).source == paths.copy, torn
    assert bootenv.render(FACTORY).rstrip(b"#").endswith(b"\nSDWAN_END=1\n")
    # whatever order a caller gives, the end marker goes last
    assert bootenv.render({"SDWAN_END": "1", "ORDER": "A"}).startswith(
        b"# GRUB Environment Block\nORDER=A\nSDWAN_END=1\n#")


def test_a_slot_grub_could_not_load(paths: bootenv.Paths) -> None:
    names = ["A", "B"]
    env = {**FACTORY, "ORDER": "B A", "B_OK": "1", "B_COMMITTED": "1", "B_TRY": "3",
           "B_LOADFAIL": "1"}
    assert not bootenv.good(env, "B", LIMITS) and not bootenv.bootable(env, "B", LIMITS)
    assert bootenv.primary(env, names, LIMITS) == "A"
    # any mark of it clears the mark GRUB left
    assert bootenv.set_state(env, "B", True)["B_LOADFAIL"] == "0"
    assert bootenv.set_primary(env, "B", names)["B_LOADFAIL"] == "0"


def test_the_booted_slot_is_good_only_once_committed(paths: bootenv.Paths) -> None:
    # untried and given to GRUB: good for a slot waiting for its reboot, never for the
    # one running (`mark-active booted` after GRUB gave every slot its tries back)
    env = {**FACTORY, "A_COMMITTED": "0"}
    assert bootenv.good(env, "A", LIMITS) and not bootenv.good(env, "A", LIMITS, booted="A")
    assert bootenv.good(FACTORY, "A", LIMITS, booted="A")


def test_grub_s_boot_tries_come_from_grubenv(paths: bootenv.Paths) -> None:
    paths.board.write_text("[update]\nboot_tries = 5\n")
    assert bootenv.max_tries(paths, {"BOOT_TRIES": "3"}) == 3
    assert bootenv.max_tries(paths, {}) == 5
    assert cli(paths, "get-primary").stdout == "A\n"


def test_a_committed_slot_in_a_reboot_loop_is_passed_over(paths: bootenv.Paths) -> None:
    """GRUB counts a committed slot's boots in X_LOOPS; at BOOT_LOOPS in a row that did not
    stay up it passes the slot over while another one can be booted."""
    names = ["A", "B"]
    env = {**FACTORY, "B_OK": "1", "B_COMMITTED": "1", "A_LOOPS": "9"}
    assert bootenv.primary(env, names, LIMITS) == "A"
    looping = {**env, "A_LOOPS": "10"}
    assert bootenv.looping(looping, "A", LIMITS) and not bootenv.looping(env, "A", LIMITS)
    assert bootenv.primary(looping, names, LIMITS) == "B"
    assert not bootenv.good(looping, "A", LIMITS)
    # ... except while it runs: its last boot before GRUB gives it up
    assert bootenv.good(looping, "A", LIMITS, booted="A")
    # a slot not committed is counted in tries, never in loops
    assert not bootenv.looping({**looping, "A_COMMITTED": "0"}, "A", LIMITS)
    # any mark of the slot starts the count again
    assert bootenv.set_state(looping, "A", True)["A_LOOPS"] == "0"
    assert bootenv.set_state(looping, "A", False)["A_LOOPS"] == "0"
    assert bootenv.set_primary(looping, "A", names)["A_LOOPS"] == "0"
    # BOOT_LOOPS is GRUB's number; without it (an ESP older than the count), the board's
    assert bootenv.max_loops(paths, {"BOOT_LOOPS": "4"}) == 4
    paths.board.write_text("[update]\nboot_loops = 6\n")
    assert bootenv.max_loops(paths, {}) == 6
    assert bootenv.max_loops(paths, {"BOOT_LOOPS": "x"}) == 6
    paths.board.write_text("")
    assert bootenv.max_loops(paths, {}) == bootenv.DEFAULT_MAX_LOOPS


def test_settle_clears_the_count_of_the_slot_that_stayed_up(paths: bootenv.Paths) -> None:
    bootenv.save(paths, {**FACTORY, "A_LOOPS": "1"})
    run = cli(paths, "settle", "A")
    # the count of this boot: nothing to say
    assert (run.returncode, run.stdout, run.stderr) == (0, "", "")
    assert both(paths) == FACTORY
    # nothing counted: nothing written
    before = paths.grubenv.stat().st_mtime_ns
    assert cli(paths, "settle", "A").stdout == ""
    assert paths.grubenv.stat().st_mtime_ns == before
    bootenv.save(paths, {**FACTORY, "A_LOOPS": "4"})
    assert cli(paths, "settle", "A").stdout == (
        "bootenv: slot A stayed up after 3 boots in a row that did not\n")
    assert both(paths)["A_LOOPS"] == "0"
    bad = cli(paths, "settle", "C")
    assert bad.returncode == 1 and "no slot 'C'" in bad.stderr
    # a reboot asked for on purpose clears it too, best effort
    bootenv.save(paths, {**FACTORY, "A_LOOPS": "2"})
    assert bootenv.settle_for_reboot(paths, "A") is None
    assert both(paths)["A_LOOPS"] == "0"
    why = bootenv.settle_for_reboot(paths, "C")
    assert why and why.startswith("the boot count of slot C was not cleared"), why


def test_marks_read_the_block_under_the_lock(paths: bootenv.Paths) -> None:
    """RAUC's mark and a settle are separate processes: the second one waits for the lock and
    reads what the first one wrote, instead of writing back a block read before it."""
    import fcntl
    import threading

    bootenv.save(paths, {**FACTORY, "B_OK": "1", "A_LOOPS": "2"})
    # never beside grubenv (a read-only ESP); the same lock however grubenv's path is spelt
    assert paths.lock.parent != paths.grubenv.parent
    odd = bootenv.Paths(paths.grubenv.parent / "." / "grubenv", paths.system_conf, paths.board)
    assert odd.lock == paths.lock
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    settled: list[int] = []
    t = threading.Thread(target=lambda: settled.append(bootenv.settle(paths, "A")))
    t.start()
    t.join(0.5)
    assert t.is_alive(), "settle did not wait for the lock"
    # what RAUC does meanwhile, holding the lock: B marked bad before it is written
    bootenv.save(paths, bootenv.canonical(bootenv.set_state(both(paths), "B", False), ["A", "B"]))
    os.close(fd)
    t.join(10)
    assert settled == [2]
    env = both(paths)
    assert (env["A_LOOPS"], env["B_OK"]) == ("0", "0"), env


def test_a_lock_held_too_long_is_an_error_not_a_hang(paths: bootenv.Paths,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    monkeypatch.setattr(bootenv, "LOCK_WAIT_S", 0.3)
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(bootenv.BootEnvError, match="being changed by another process"):
            bootenv.settle(paths, "A")
    finally:
        os.close(fd)


def test_on_trial_names_the_booted_slot_not_committed(paths: bootenv.Paths,
                                                     tmp_path: Path) -> None:
    """What the console warns of before a factory reset."""
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 rauc.slot=B sdwan.root=root-b sdwan.trial=1\n")
    bootenv.save(paths, {**FACTORY, "ORDER": "B A", "B_OK": "1", "B_TRY": "1"})
    assert bootenv.on_trial(paths, cmdline) == "B"
    bootenv.save(paths, {**FACTORY, "ORDER": "B A", "B_OK": "1", "B_COMMITTED": "1"})
    assert bootenv.on_trial(paths, cmdline) is None
    cmdline.write_text("console=ttyS0\n")  # not a box
    assert bootenv.on_trial(paths, cmdline) is None
    cmdline.write_text("rauc.slot=B\n")
    paths.grubenv.write_bytes(b"")
    paths.copy.write_bytes(b"")
    assert bootenv.on_trial(paths, cmdline) is None  # grubenv cannot tell
