"""What an update must never do, with the real RAUC (appliance/updater.py, docs/update.md):
install another file than the one checked (the bundle replaced, or its symlink pointed
elsewhere, between the check and the install), start writing a bundle whose payload is
damaged, or take a path that is no bundle file. The box, its slots and bundles are those of
test_rauc_updates.py."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import test_rauc_updates
from test_rauc_updates import (
    BUNDLE_FORMAT,
    HOST_CHECK,
    SLOT_BYTES,
    Box,
    make_bundle,
    started,
    wait_for,
)

from sdwan.appliance.bundle import BundleInfo
from sdwan.appliance.raucbus import RaucBus, RaucSetup, runtime_dir
from sdwan.appliance.raucstatus import SystemConf
from sdwan.appliance.updater import InstallRefused, Updater, inspect_bundle
from sdwan.site.config import Update

box = test_rauc_updates.box  # the fixture: two loop devices as slots, a system.conf

pytestmark = [
    pytest.mark.system,
    pytest.mark.timeout(180),
    pytest.mark.xdist_group("loop-devices"),
]


@pytest.mark.parametrize("how", ["file replaced", "symlink pointed elsewhere"])
def test_the_file_installed_is_the_file_checked(box: Box, tmp_path: Path, how: str) -> None:
    good, image = make_bundle(box.root, box.ca, "2.1.0", "checked")
    # Signed by the same signer, so RAUC itself would take it: only the check stands in the
    # way (it could carry hooks, or be an old version).
    other, other_image = make_bundle(box.root, box.ca, "6.6.6", "swapped")
    media = tmp_path / "media"
    media.mkdir()
    if how == "file replaced":
        given = media / "update.raucb"
        given.write_bytes(good.read_bytes())
    else:
        given = media / "latest.raucb"
        given.symlink_to(good)

    async def check_then_swap(bus: RaucBus, bundle: Path, conf: SystemConf,
                              compatible: str | None) -> BundleInfo:
        info = await HOST_CHECK(bus, bundle, conf, compatible)
        # Whoever can write the stick or /data swaps the bundle once it passed.
        if how == "file replaced":
            tmp = media / ".swap"
            tmp.write_bytes(other.read_bytes())
            os.replace(tmp, given)
        else:
            given.unlink()
            given.symlink_to(other)
        return info

    async def main() -> dict[str, Any]:
        up = await started(box, precheck=check_then_swap)
        try:
            return await up.install(str(given), origin="test")
        finally:
            await up.close()

    result = asyncio.run(main())
    assert result["state"] == "installed", result
    assert box.slot_bytes("B", len(other_image)) != other_image, "the swapped bundle went in"
    assert box.slot_bytes("B", len(image)) == image
    assert result["version"] == "2.1.0", result
    assert not list(box.data.glob("**/*.raucb")), "the private copy was left behind"


@pytest.mark.skipif(BUNDLE_FORMAT == "verity", reason="the host installs verity bundles")
def test_a_damaged_payload_is_refused_by_the_check_not_found_while_writing(box: Box) -> None:
    """The box's check hashes the whole payload (`rauc extract`) before `rauc install`."""
    bundle, _ = make_bundle(box.root, box.ca, "2.2.0", "damaged", fmt="verity")
    data = bytearray(bundle.read_bytes())
    data[64 * 1024] ^= 0xFF  # in the squashfs payload, far before the signature
    bundle.write_bytes(bytes(data))
    before_env = box.grubenv.read_bytes()

    async def main() -> None:
        up = await started(box, precheck=inspect_bundle)
        try:
            with pytest.raises(InstallRefused, match="payload does not match its signed hash"):
                await up.install(str(bundle))
        finally:
            await up.close()

    asyncio.run(main())
    (failed,) = box.kinds("update.failed")
    assert failed[2]["stage"] == "check", failed
    assert box.slot_bytes("B", SLOT_BYTES) == bytes(SLOT_BYTES)
    assert box.grubenv.read_bytes() == before_env


@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "empty"])
def test_what_is_no_bundle_file_is_refused_at_once(box: Box, tmp_path: Path,
                                                   kind: str) -> None:
    path = tmp_path / f"x {kind} -n.raucb"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "directory":
        path.mkdir()
    else:
        path.touch()

    async def main() -> None:
        up = await started(box, precheck=inspect_bundle)
        try:
            with pytest.raises(InstallRefused):
                await asyncio.wait_for(up.install(str(path)), 20)
            assert not up._installing
        finally:
            await up.close()

    asyncio.run(main())
    assert box.slot_bytes("B", SLOT_BYTES) == bytes(SLOT_BYTES)


@pytest.mark.parametrize("typed", ["reboot\nyes\n", "factory-reset\nyes\n"])
def test_the_console_does_not_reboot_while_an_update_is_installed(
    box: Box, tmp_path: Path, typed: str,
) -> None:
    """The console runs its reboot command itself: it must ask socketd first."""
    from sdwan.common.control import ControlServer

    bundle, image = make_bundle(box.root, box.ca, "2.3.0", "console-reboot")
    sock = box.runtime / "control.sock"
    rebooted = tmp_path / "rebooted"
    console_data = tmp_path / "console-data"
    release = asyncio.Event()

    async def slow_check(bus: RaucBus, bundle: Path, conf: SystemConf,
                         compatible: str | None) -> BundleInfo:
        await release.wait()  # the install is under way (checking) until the console is done
        return await HOST_CHECK(bus, bundle, conf, compatible)

    async def main() -> tuple[str, dict[str, Any]]:
        up = await started(box, precheck=slow_check)
        server = ControlServer(sock, up.handlers())
        await server.start()
        try:
            begun = asyncio.create_task(up.handlers()["update"]({"bundle": str(bundle)}))
            await asyncio.sleep(0.2)
            assert up.install_state.state == "checking"
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sdwan.appliance.console", "--socket", str(sock),
                "--data", str(console_data), "--reboot-command", f"touch {rebooted}",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            login = "admin\nadmin\nnew-password-1\nnew-password-1\n"
            out, _ = await asyncio.wait_for(proc.communicate(
                (login + typed + "exit\n").encode()), 60)
            release.set()
            await begun
            await wait_for(lambda: up.install_state.state not in ("checking", "installing"))
            return out.decode(), up.install_state.to_json()
        finally:
            release.set()
            await server.close()
            await up.close()

    out, state = asyncio.run(main())
    assert not rebooted.exists(), out
    assert "an update is being installed" in out, out
    assert state["state"] == "installed", state
    assert box.slot_bytes("B", len(image)) == image


def test_the_bus_never_uses_a_stand_in_directory_someone_else_made(tmp_path: Path) -> None:
    """A control socket deep in a folder puts the bus under the temporary directory, at a
    name anyone can guess: one made there first by another user is not used."""
    deep = tmp_path / ("d" * 120) / "control-update"
    stand_in = runtime_dir(deep)
    assert stand_in != deep and stand_in.parent == Path(tempfile.gettempdir())
    nobody = pwd.getpwnam("nobody")
    stand_in.mkdir(mode=0o777)
    os.chown(stand_in, nobody.pw_uid, nobody.pw_gid)
    records: list[str] = []

    async def main() -> tuple[str, str | None]:
        bus = RaucBus(RaucSetup(tmp_path / "system.conf", stand_in), lambda t, d: records.append(t))
        bus.bus.start()
        try:
            await asyncio.sleep(1.5)
            return bus.bus.st.state, bus.bus.st.error
        finally:
            await bus.close()

    try:
        state, error = asyncio.run(main())
        assert state != "running", (state, error)
        assert error and "not putting the update bus there" in error, error
        assert not (stand_in / "bus.conf").exists()
        assert stand_in.exists(), "another user's directory was removed"
    finally:
        shutil.rmtree(stand_in, ignore_errors=True)


@pytest.mark.parametrize("which", ["bus", "service"])
def test_the_bus_and_rauc_service_are_started_again_when_they_die(box: Box, which: str) -> None:
    import signal

    bundle, image = make_bundle(box.root, box.ca, "2.4.0", f"after-{which}")

    async def main() -> dict[str, Any]:
        up = await started(box)
        pids: list[int | None] = []
        try:
            child = up.bus.bus if which == "bus" else up.bus.service
            pid = child.st.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            await wait_for(lambda: child.st.pid not in (None, pid), timeout=30)
            assert await up.bus.wait_ready(30) is None
            result = await up.install(str(bundle))
            pids = [c.st.pid for c in (up.bus.bus, up.bus.service)]
            return result
        finally:
            await up.close()
            for p in pids:
                assert p is not None and not os.path.exists(f"/proc/{p}"), "left running"

    assert asyncio.run(main())["state"] == "installed"
    assert box.slot_bytes("B", len(image)) == image


def test_update_with_reboot_says_so_when_the_reboot_command_fails(
    box: Box, capsys: pytest.CaptureFixture[str],
) -> None:
    from sdwan.common.control import ControlServer
    from sdwan.site import socketctl

    bundle, image = make_bundle(box.root, box.ca, "2.5.0", "reboot-fails")
    sock = box.runtime / "control.sock"

    async def main() -> tuple[int, str, str, dict[str, Any]]:
        up = Updater(
            Update(system_conf=box.conf, commit_grace_s=300, reboot_command=("false",)),
            box.data, box.runtime, lambda k, t, d: box.events.append((k, t, d)),
            lambda: box.health, boot_slot="A", precheck=HOST_CHECK,
            boot_env=box.boot)
        up.start()
        await up.ready()
        server = ControlServer(sock, up.handlers())
        await server.start()
        try:
            capsys.readouterr()
            rc = await asyncio.to_thread(socketctl.main, ["--socket", str(sock), "update",
                                                          "--reboot", str(bundle)])
            out = capsys.readouterr()
            return rc, out.out, out.err, up.status()
        finally:
            await server.close()
            await up.close()

    rc, out, err, status = asyncio.run(main())
    assert box.slot_bytes("B", len(image)) == image
    assert "rebooting into it" not in out, out
    assert rc == socketctl.EXIT_COMMAND_FAILED, (out, err)
    assert "reboot command exited with status 1" in err, err
    assert status["install"]["state"] == "installed", status
    assert status["rebooting"] is None, status
    assert status["reboot_needed"] == {"slot": "rootfs.1", "version": "2.5.0"}, status


def test_an_overlong_output_line_of_rauc_does_not_wedge_the_updater(
    box: Box, tmp_path: Path,
) -> None:
    """The real rauc, with one line longer than a stream reader's limit before its own
    output: the install goes on, and the updater is not left busy for good."""
    real = shutil.which("rauc")
    wrapper = tmp_path / "rauc-noisy"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = install ]; then head -c 70000 /dev/zero | tr "\\\\0" x; echo; fi\n'
        f'exec {real} "$@"\n')
    wrapper.chmod(0o755)
    bundle, image = make_bundle(box.root, box.ca, "2.6.0", "noisy")

    async def main() -> tuple[dict[str, Any], bool, str]:
        up = Updater(
            Update(system_conf=box.conf, commit_grace_s=300, reboot_command=("true",)),
            box.data, box.runtime, lambda k, t, d: box.events.append((k, t, d)),
            lambda: box.health, rauc=str(wrapper), boot_slot="A", precheck=HOST_CHECK,
            boot_env=box.boot)
        up.start()
        await up.ready()
        try:
            try:
                result = await asyncio.wait_for(up.install(str(bundle)), 60)
            except Exception as e:  # noqa: BLE001 (the updater must not raise anything else)
                result = {"raised": repr(e)}
            return result, up._installing, up.install_state.state
        finally:
            await up.close()

    result, busy, state = asyncio.run(main())
    assert not busy and state == "installed", (result, state)
    assert box.slot_bytes("B", len(image)) == image


def test_an_install_cut_off_over_a_slot_waiting_for_its_reboot_is_no_rollback(
    box: Box,
) -> None:
    """RAUC marks the target bad before writing it and leaves it first in ORDER when the
    install ends early (a failure, or socketd stopped with rauc service): that slot was
    never booted, so the box did not fall back from it."""
    from test_rauc_updates import EVENT_ROLLED_BACK, InstallFailed

    first, _ = make_bundle(box.root, box.ca, "3.2.0", "first")
    too_big, _ = make_bundle(box.root, box.ca, "3.3.0", "cut-off", blob=SLOT_BYTES + (1 << 20))

    async def main() -> dict[str, Any]:
        up = await started(box)
        try:
            await up.install(str(first))
            with pytest.raises(InstallFailed):
                await up.install(str(too_big))
        finally:
            await up.close()
        up = await started(box)  # socketd started again, without a reboot
        try:
            return up.status()
        finally:
            await up.close()

    status = asyncio.run(main())
    env = box.env()
    assert env["B_OK"] == "0" and env["B_TRY"] == "0", env
    assert not box.kinds(EVENT_ROLLED_BACK), box.kinds(EVENT_ROLLED_BACK)
    assert status["rollback"] is None, status


def default_sigint() -> None:
    """In the child: SIGINT as a shell leaves it for a command, neither ignored nor blocked,
    whatever the test process (a worker of the suite) inherited or left behind."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def test_ctrl_c_in_socketctl_update_says_the_install_goes_on(box: Box) -> None:
    import signal

    from sdwan.common.control import ControlServer

    bundle, image = make_bundle(box.root, box.ca, "2.7.0", "ctrl-c")
    sock = box.runtime / "control.sock"
    release = asyncio.Event()

    async def slow_check(bus: RaucBus, bundle: Path, conf: SystemConf,
                         compatible: str | None) -> BundleInfo:
        await release.wait()
        return await HOST_CHECK(bus, bundle, conf, compatible)

    async def main() -> tuple[int, str, str]:
        up = await started(box, precheck=slow_check)
        server = ControlServer(sock, up.handlers())
        await server.start()
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sdwan.site.socketctl", "--socket", str(sock), "update",
                str(bundle), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                preexec_fn=default_sigint)
            # Generous bounds: a loaded machine (QEMU beside) starts socketctl and runs the
            # whole install slowly; only an install that never ends should fail here.
            await wait_for(lambda: up.install_state.state == "checking", timeout=60)
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGINT)
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            release.set()
            await wait_for(lambda: up.install_state.state not in ("checking", "installing"),
                           timeout=120)
            return proc.returncode or 0, out.decode(), err.decode()
        finally:
            release.set()
            await server.close()
            await up.close()

    rc, out, err = asyncio.run(main())
    assert "Traceback" not in err, err
    assert "the install goes on in socketd" in err, err
    assert rc == 130, (rc, out, err)
    assert box.slot_bytes("B", len(image)) == image


def test_no_install_starts_once_a_reboot_is_under_way(box: Box) -> None:
    bundle, _ = make_bundle(box.root, box.ca, "2.8.0", "during-reboot")

    async def main() -> None:
        up = Updater(
            Update(system_conf=box.conf, commit_grace_s=300, reboot_command=("sleep", "2")),
            box.data, box.runtime, lambda k, t, d: box.events.append((k, t, d)),
            lambda: box.health, boot_slot="A", precheck=HOST_CHECK,
            boot_env=box.boot)
        up.start()
        await up.ready()
        try:
            rebooting = asyncio.create_task(up.reboot(origin="test"))
            await asyncio.sleep(0.5)  # the reboot command runs: the box is going down
            with pytest.raises(InstallRefused, match="rebooting"):
                await up.install(str(bundle))
            await rebooting
            with pytest.raises(InstallRefused, match="rebooting"):
                await up.install(str(bundle))
        finally:
            await up.close()

    asyncio.run(main())
    assert box.slot_bytes("B", SLOT_BYTES) == bytes(SLOT_BYTES)
    assert not box.kinds("update.failed"), box.events


def test_a_client_following_an_install_that_socketd_dropped_says_so(
    box: Box, tmp_path: Path,
) -> None:
    """socketd restarted during the install (which stopped it): the client must not take the
    new socketd's state, idle or another install, for the end of its own."""
    import io
    import threading

    from sdwan.common.control import ControlServer
    from sdwan.site.socketctl import follow_update

    real = shutil.which("rauc")
    slow = tmp_path / "rauc-slow"
    slow.write_text("#!/bin/sh\n"
                    f'if [ "$1" = install ]; then sleep 3; fi\nexec {real} "$@"\n')
    slow.chmod(0o755)
    bundle, _ = make_bundle(box.root, box.ca, "2.9.0", "dropped")
    sock = box.runtime / "control.sock"

    def updater() -> Updater:
        return Updater(
            Update(system_conf=box.conf, commit_grace_s=300, reboot_command=("true",)),
            box.data, box.runtime, lambda k, t, d: box.events.append((k, t, d)),
            lambda: box.health, rauc=str(slow), boot_slot="A", precheck=HOST_CHECK,
            boot_env=box.boot)

    async def main() -> tuple[dict[str, Any], str]:
        up = updater()
        up.start()
        await up.ready()
        server = ControlServer(sock, up.handlers())
        await server.start()
        out = io.StringIO()
        result: dict[str, Any] = {}

        def follow() -> None:
            # Polling seldom: the restart falls between two polls (a client polling more
            # often finds socketd unreachable meanwhile, and says that).
            result.update(follow_update(str(sock), str(bundle), False, out, poll_s=4.0))

        follower = threading.Thread(target=follow)
        follower.start()
        try:
            await wait_for(lambda: up.install_state.state == "installing")
            await asyncio.sleep(1.0)
            await server.close()
            await up.close()  # socketd stops: its install with it
            up = updater()
            up.start()
            await up.ready()
            server = ControlServer(sock, up.handlers())
            await server.start()
            await wait_for(lambda: not follower.is_alive(), timeout=30)
            return result, out.getvalue()
        finally:
            await server.close()
            await up.close()
            follower.join(5)

    result, out = asyncio.run(main())
    assert result.get("state") == "failed", (result, out)
    assert "socketd was restarted" in (result.get("error") or ""), result


def test_a_fall_back_is_recorded_even_when_raucs_first_status_fails(
    box: Box, tmp_path: Path,
) -> None:
    """The start-up checks are tried again until they ran, not given up at one failure."""
    from test_rauc_updates import EVENT_ROLLED_BACK

    bundle, _ = make_bundle(box.root, box.ca, "3.4.0", "abandoned")

    async def install() -> None:
        up = await started(box)
        try:
            await up.install(str(bundle))
        finally:
            await up.close()

    asyncio.run(install())
    box.set_env(ORDER="B A", B_OK="1", B_TRY="3", B_COMMITTED="0", A_OK="1", A_TRY="0")
    real = shutil.which("rauc")
    once, twice = tmp_path / "failed-once", tmp_path / "failed-twice"
    flaky = tmp_path / "rauc-flaky"
    # the first two status calls fail: the second retry comes a second later
    flaky.write_text(
        "#!/bin/sh\n"
        f'if [ "$1 $2" = "status --detailed" ] && [ ! -e {twice} ]; then\n'
        f"  if [ -e {once} ]; then touch {twice}; else touch {once}; fi\n"
        "  echo 'LastError: D-Bus timeout' >&2; exit 1\nfi\n"
        f'exec {real} "$@"\n')
    flaky.chmod(0o755)

    async def main() -> dict[str, Any]:
        up = Updater(
            Update(system_conf=box.conf, commit_grace_s=300, reboot_command=("true",)),
            box.data, box.runtime, lambda k, t, d: box.events.append((k, t, d)),
            lambda: box.health, rauc=str(flaky), boot_slot="A", precheck=HOST_CHECK,
            boot_env=box.boot)
        up.start()
        await up.ready()
        try:
            # before the fall back is noticed, no install may make B primary again
            with pytest.raises(InstallRefused, match="has not been read since socketd started"):
                await up.install(str(bundle))
            await wait_for(lambda: bool(box.kinds(EVENT_ROLLED_BACK)), timeout=15)
            await wait_for(lambda: box.env()["ORDER"].split()[0] == "A")
            return up.status()
        finally:
            await up.close()

    status = asyncio.run(main())
    assert twice.exists()
    (event,) = box.kinds(EVENT_ROLLED_BACK)
    assert event[2]["slot"] == "rootfs.1", event
    assert status["rollback"]["slot"] == "rootfs.1", status
    assert box.env()["B_OK"] == "0", box.env()


def test_a_bundle_named_with_spaces_and_a_leading_dash_installs(box: Box, tmp_path: Path) -> None:
    bundle, image = make_bundle(box.root, box.ca, "2.9.5", "odd-name")
    odd = tmp_path / "my stick" / "-n --force update.raucb"
    odd.parent.mkdir()
    odd.write_bytes(bundle.read_bytes())

    async def main() -> dict[str, Any]:
        up = await started(box)
        try:
            return await up.install(str(odd))
        finally:
            await up.close()

    result = asyncio.run(main())
    assert result["state"] == "installed" and result["bundle"] == str(odd), result
    assert box.slot_bytes("B", len(image)) == image


def test_the_consoles_reboot_after_its_update_waits_for_an_install_begun_meanwhile(
    box: Box, tmp_path: Path,
) -> None:
    """While the console asks whether to reboot, someone else starts an install (socketctl):
    the yes that follows must not cut it off."""
    from sdwan.common.control import ControlServer

    first, _ = make_bundle(box.root, box.ca, "4.2.0", "console-first")
    second, _ = make_bundle(box.root, box.ca, "4.3.0", "console-second")
    sock = box.runtime / "control.sock"
    rebooted = tmp_path / "rebooted"
    release = asyncio.Event()
    checks = 0

    async def check(bus: RaucBus, bundle: Path, conf: SystemConf,
                    compatible: str | None) -> BundleInfo:
        nonlocal checks
        checks += 1
        if checks == 2:  # the other install: under way until the console is done
            await release.wait()
        return await HOST_CHECK(bus, bundle, conf, compatible)

    async def main() -> str:
        up = await started(box, precheck=check)
        server = ControlServer(sock, up.handlers())
        await server.start()
        other: asyncio.Task[dict[str, Any]] | None = None
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sdwan.appliance.console", "--socket", str(sock),
                "--data", str(tmp_path / "console-data"), "--reboot-command",
                f"touch {rebooted}", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(f"admin\nadmin\nnew-password-1\nnew-password-1\nupdate {first}\n"
                             .encode())
            await proc.stdin.drain()
            seen = b""
            while b"Reboot now into it?" not in seen:
                chunk = await asyncio.wait_for(proc.stdout.read(4096), 60)
                assert chunk, seen.decode()
                seen += chunk
            other = asyncio.create_task(up.handlers()["update"]({"bundle": str(second)}))
            await wait_for(lambda: up.install_state.state == "checking")
            proc.stdin.write(b"yes\nexit\n")
            await proc.stdin.drain()
            rest, _ = await asyncio.wait_for(proc.communicate(), 60)
            return (seen + rest).decode()
        finally:
            release.set()
            if other is not None:
                await other
                await wait_for(lambda: up.install_state.state not in ("checking", "installing"))
            await server.close()
            await up.close()

    out = asyncio.run(main())
    assert not rebooted.exists(), out
    assert "an update is being installed" in out, out


def test_rauc_failing_at_every_status_is_asked_less_and_less_often(
    box: Box, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A disk where RAUC finds no slots (an image without the A/B layout) fails every
    status: after five retries a second apart it is asked again after 2, 4, 8 ... s, and
    the reason is logged once."""
    real = shutil.which("rauc")
    calls = tmp_path / "status-calls"
    failing = tmp_path / "rauc-failing"
    failing.write_text(
        "#!/bin/sh\n"
        f'if [ "$1 $2" = "status --detailed" ]; then\n'
        f"  echo x >> {calls}; echo 'LastError: Bootname or device of booted slot not found'"
        " >&2; exit 1\nfi\n"
        f'exec {real} "$@"\n')
    failing.chmod(0o755)

    async def main() -> None:
        up = Updater(
            Update(system_conf=box.conf, commit_grace_s=300, reboot_command=("true",)),
            box.data, box.runtime, lambda k, t, d: box.events.append((k, t, d)),
            lambda: box.health, rauc=str(failing), boot_slot="A", precheck=HOST_CHECK,
            boot_env=box.boot)
        up.start()
        await up.ready()
        try:
            await asyncio.sleep(20)
        finally:
            await up.close()

    with caplog.at_level("ERROR", logger="sdwan.appliance.updater"):
        asyncio.run(main())
    n = len(calls.read_text().splitlines())
    # Every second would be about 20; at 0, 1, 2, 3, 4, 5, 7, 11, 19 s it is about 9.
    assert 4 <= n <= 12, n
    said = [r for r in caplog.records if "start-up checks failed" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]
