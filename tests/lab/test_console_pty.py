"""The serial console as a field engineer uses it: socket-console on a real pseudo-terminal
(so readline edits and completes), against a real socketd in a lab namespace.

What is checked is what the engineer sees on the terminal and what the box then does: the
first login forces a new password; `show` prints socketd's tables; `set link wan1 static`
changes the address of the real device (seen with `ip addr` in the site's namespace), and it
is still there after socketd restarts; `set link wan1 dhcp` takes a lease from a real DHCP
server (busybox udhcpd in the router's namespace); ping goes out through the link; bad input
gets a one-line error and the usage; factory-reset empties the data directory and runs the
reboot command.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from labwait import wait_for

from sdwan.appliance.console import fail_delay
from sdwan.lab import netns
from sdwan.lab.topology import Lab, Site

NEW_PASSWORD = "field-eng-2026"
_ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|[=>])|[\r\x07]")
FIRMWARE = Path(__file__).resolve().parents[2] / "firmware"


def _controlling_tty() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    # As getty starts it: Ctrl-C's SIGINT neither ignored nor blocked, whatever the test
    # process (a worker of the suite) inherited or left behind.
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


class ConsolePty:
    """socket-console on the slave side of a pty; the test types on the master side."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        self.fd = master
        self.text = ""  # everything read, escape sequences removed
        self.pos = 0  # how far expect() has consumed
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=env,
                start_new_session=True,
                preexec_fn=_controlling_tty,
            )
        finally:
            os.close(slave)

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: the console has exited
            data = b""
        if not data:
            return False
        self.text += _ANSI.sub("", data.decode(errors="replace"))
        return True

    def expect(self, pattern: str, timeout: float = 45.0) -> re.Match[str]:
        """Wait for pattern in the output after what earlier expects consumed.

        The bound is generous: on a loaded machine an fsync of the console's audit event can
        take seconds. A failure says which step it was (the transcript's tail) and whether the
        console was still running.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.text, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0 or (not self._read(min(left, 0.5)) and self.proc.poll() is not None):
                if m := regex.search(self.text, self.pos):
                    self.pos = m.end()
                    return m
                state = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
                pytest.fail(
                    f"console never showed {pattern!r} in {timeout:.0f} s (console {state});"
                    f" after the last match it showed:\n{self.text[self.pos :]}\n"
                    f"--- the transcript's last 1500 characters ---\n{self.text[-1500:]}",
                    pytrace=False,
                )

    def output_until_prompt(self, prompt: str = "> ", timeout: float = 45.0) -> str:
        start = self.pos
        m = self.expect(re.escape(prompt), timeout)
        return self.text[start : m.start()]

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def line(self, text: str) -> None:
        self.send(text + "\r")  # Enter on a terminal; the tty turns it into a newline

    def command(self, text: str, prompt: str = "> ", timeout: float = 45.0) -> str:
        """Type a command at the prompt; its output up to the next prompt."""
        self.line(text)
        self.expect(re.escape(text))
        return self.output_until_prompt(prompt, timeout)

    def wait_exit(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.2)
        rc = self.proc.poll()
        if rc is None:
            pytest.fail(f"console did not exit; it showed:\n{self.text[self.pos :]}")
        return rc

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        with contextlib.suppress(OSError):
            os.close(self.fd)


@contextlib.contextmanager
def console(
    ns: str | None, sock: Path, data: Path, reboot: str = "false", idle_s: float = 120
) -> Iterator[ConsolePty]:
    argv = [sys.executable, "-m", "sdwan.appliance.console", "--socket", str(sock),
            "--data", str(data)]
    argv += ["--reboot-command", reboot, "--idle-logout", str(idle_s)]
    if ns is not None:
        argv = ["ip", "netns", "exec", ns, *argv]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(FIRMWARE) + (
        os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else ""
    )
    env["TERM"] = "vt100"
    c = ConsolePty(argv, env)
    try:
        yield c
    finally:
        c.close()


def first_login(c: ConsolePty) -> None:
    """admin/admin, then the forced change (one refused try first)."""
    c.expect("login: ")
    c.line("admin")
    c.expect("Password: ")
    c.line("admin")
    c.expect("must be changed")
    c.expect("New password: ")
    c.line("short")
    c.expect("Retype new password: ")
    c.line("short")
    c.expect(r"password not changed: too short: at least 8 characters")
    c.expect("New password: ")
    c.line(NEW_PASSWORD)
    c.expect("Retype new password: ")
    c.line(NEW_PASSWORD)
    c.expect("Password changed.")
    c.expect("> ")


def wan_addresses(site: Site) -> list[str]:
    out = netns.run(site.ns, ["ip", "-4", "-o", "addr", "show", "dev", site.wan_dev]).stdout
    return re.findall(r"inet (\S+)", out)


def default_route(site: Site) -> str:
    return netns.run(site.ns, ["ip", "-4", "route", "show", "default"]).stdout.strip()


@pytest.fixture(autouse=True)
def _console_tools() -> None:
    # Not a skip: a CI machine without them is a broken setup (scripts/setup.sh installs them).
    missing = [t for t in ("busybox", "traceroute", "ping") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"console test tools not installed: {', '.join(missing)}", pytrace=False)


def start_site(lab: Lab) -> Site:
    lab.add_inet()
    lab.add_router(1)
    site = lab.add_site(1)
    lab.write_site_config(site)
    lab.start_socketd(site)
    return site


def test_static_address_from_the_console_is_applied_and_survives_a_restart(lab: Lab) -> None:
    site = start_site(lab)
    with console(site.ns, site.control_socket, site.data_dir) as c:
        first_login(c)

        # Tab completion: the command, then the topic.
        c.send("sh\t")
        c.expect("show ")
        c.send("sta\t")
        c.expect("status ")
        c.line("")
        out = c.output_until_prompt()
        assert "site     1 (site-1)" in out, out
        assert re.search(r"wan1\s+wan1\s+4800", out), out

        out = c.command("show links")
        assert re.search(
            r"wan1\s+wan1\s+up\s+(?:\S+\s+)*?none\s+100\.64\.1\.2/24\s+100\.64\.1\.1", out
        ), out

        # Completion of link names comes from socketd.
        c.send("set link w\t")
        c.expect("set link wan1 ")
        c.send("\x15")  # Ctrl-U: the line is abandoned
        c.line("")
        c.expect("> ")

        # Bad input: one line saying why, then the usage; never a traceback.
        for line, error in [
            ("bogus", r"error: unknown command 'bogus'; type help"),
            ("show", r"error: show what\?"),
            ("show everything", r"error: cannot show 'everything'"),
            ("ping", r"error: ping needs a host"),
            ("ping -c 0 100.64.1.1", r"error: the count must be a number 1\.\.100, got '0'"),
            ("ping -x 100.64.1.1", r"error: unknown option '-x'"),
            ("traceroute -c 3 100.64.1.1", r"error: traceroute has no option -c"),
            ("set link wan1 static 100.64.1.20 100.64.1.1", r"error: expected an address with"),
            (
                "set link wan1 static 100.64.1.20/24 100.64.2.1",
                r"error: gateway 100\.64\.2\.1 is not inside 100\.64\.1\.0/24",
            ),
            (
                "set link wan1 static 100.64.1.20/24 2001:db8::1",
                r"error: gateway 2001:db8::1 is IPv6 but the address 100\.64\.1\.20/24 is IPv4",
            ),
            ("set link wan1 static 100.64.1.0/24 100.64.1.1", r"is the network address"),
            ("set link wan1 bridge", r"error: mode must be static or dhcp, got 'bridge'"),
            ("set route x", r"error: only links can be set"),
            ("help frobnicate", r"error: no command 'frobnicate'"),
            ("exit now", r"error: exit takes no arguments"),
        ]:
            out = c.command(line)
            assert re.search(error, out), f"{line!r} gave:\n{out}"
            assert "usage: " in out or "type help" in out, out
            assert "Traceback" not in out, out
        out = c.command("set link wan9 dhcp")
        assert "error: set-link: no link 'wan9' (links: wan1)" in out, out
        out = c.command("ping via wan9 100.64.1.1")
        assert "error: no link 'wan9' (links: wan1)" in out, out
        out = c.command("help set")
        assert "usage: set link LINK static ADDR/PREFIX GATEWAY | set link LINK dhcp" in out, out
        assert wan_addresses(site) == ["100.64.1.2/24"]

        # Ctrl-C abandons the line being typed; nothing runs.
        c.send("set link wan1 dhcp")
        c.expect("set link wan1 dhcp")  # typed ahead, the tty would flush it on Ctrl-C
        # Python's readline waits in select() and looks at signals only when it is
        # interrupted: a SIGINT that lands just before it re-enters select (it has just
        # echoed the last key) waits for the next key. A person never types that fast.
        time.sleep(0.3)
        c.send("\x03")
        c.expect("> ")
        out = c.command("show links")
        assert re.search(r"wan1\s+wan1\s+up\s+(?:\S+\s+)*?none", out), out

        out = c.command("set link wan1 static 100.64.1.20/24 100.64.1.1")
        assert re.search(
            r"wan1\s+wan1\s+up\s+(?:\S+\s+)*?static\s+100\.64\.1\.20/24\s+100\.64\.1\.1", out
        ), out
        assert wan_addresses(site) == ["100.64.1.20/24"]
        assert re.search(r"default via 100\.64\.1\.1 dev wan1", default_route(site))

        out = c.command("ping -c 2 via wan1 100.64.1.1")
        assert "2 packets transmitted, 2 received" in out, out
        out = c.command("traceroute via wan1 198.51.100.1", timeout=60)
        assert re.search(r"\n\s*1\s+100\.64\.1\.1\b", out), out
        assert re.search(r"\n\s*2\s+198\.51\.100\.1\b", out), out

        out = c.command("show events")
        assert "link.addressing" in out and "static 100.64.1.20/24 via 100.64.1.1" in out, out
        assert "set by the console (admin)" in out, out
        assert "console.login" in out and "console.password_changed" in out, out
        c.line("exit")
        assert c.wait_exit() == 0

    # The setting is in the data directory: a restarted socketd puts it back.
    lab.stop_socketd(site)
    netns.run(site.ns, ["ip", "addr", "flush", "dev", site.wan_dev])
    netns.run(site.ns, ["ip", "addr", "add", "100.64.1.2/24", "dev", site.wan_dev])
    lab.start_socketd(site)
    wait_for("stored address back on wan1", lambda: wan_addresses(site) == ["100.64.1.20/24"])
    wait_for("default route back", lambda: "via 100.64.1.1 dev wan1" in default_route(site))
    link = lab.socketctl(site, "links")["links"][0]
    assert link["addressing"] == "static" and link["source"] == "stored", link
    assert link["static"] == {"address": "100.64.1.20/24", "gateway": "100.64.1.1"}, link

    # The new password holds; the default no longer opens the console.
    with console(site.ns, site.control_socket, site.data_dir) as c:
        c.expect("login: ")
        c.line("admin")
        c.expect("Password: ")
        t0 = time.monotonic()
        c.line("admin")
        c.expect("Login incorrect")
        assert time.monotonic() - t0 >= 0.9, "a failed login is answered after a delay"
        c.expect("login: ")
        c.line("admin")
        c.expect("Password: ")
        c.line(NEW_PASSWORD)
        c.expect("1 failed login attempt")
        c.expect("> ")
        c.send("\x04")  # Ctrl-D logs out
        assert c.wait_exit() == 0
    events = lab.socketctl(site, "events", "--kind", "console.login_failed")["events"]
    assert events and events[0]["data"]["user"] == "admin", events


def test_dhcp_from_the_console_takes_a_lease_from_the_router(lab: Lab) -> None:
    site = start_site(lab)
    router = site.router
    assert router.ns is not None
    conf = lab.workdir / "udhcpd.conf"
    leases = lab.workdir / "udhcpd.leases"
    leases.touch()
    conf.write_text(
        "start 100.64.1.100\nend 100.64.1.110\n"
        f"interface site{site.n}\nlease_file {leases}\npidfile {lab.workdir}/udhcpd.pid\n"
        "option subnet 255.255.255.0\noption router 100.64.1.1\noption lease 600\n"
    )
    lab.spawn(router.ns, ["busybox", "udhcpd", "-f", str(conf)], "udhcpd", max_lifetime_s=300)

    pool = ipaddress.ip_network("100.64.1.96/28")

    def leased() -> list[str]:
        return [a for a in wan_addresses(site) if ipaddress.ip_interface(a).ip in pool]

    with console(site.ns, site.control_socket, site.data_dir) as c:
        first_login(c)
        out = c.command("set link wan1 dhcp")
        assert re.search(r"wan1\s+wan1\s+up\s+(?:\S+\s+)*?dhcp", out), out
        got = wait_for("a lease from udhcpd on wan1", leased, timeout=30)
        assert wan_addresses(site) == got, "the static address was replaced, not kept"
        assert got[0].endswith("/24")
        wait_for(
            "default route via the DHCP router",
            lambda: "via 100.64.1.1 dev wan1" in default_route(site),
        )
        wait_for(
            "socketd reports the lease",
            lambda: lab.socketctl(site, "links")["links"][0]["dhcp"]["state"] == "bound",
        )
        out = c.command("show links")
        assert re.search(
            rf"wan1\s+wan1\s+up\s+(?:\S+\s+)*?dhcp\s+{re.escape(got[0])}\s+100\.64\.1\.1\s+1\s+"
            r"dhcp bound from 100\.64\.1\.1, lease 10m00s",
            out,
        ), out
        out = c.command("ping -c 1 via wan1 198.51.100.1")
        assert "1 packets transmitted, 1 received" in out, out
        out = c.command("show events 5")
        assert f"DHCP lease {got[0]} via 100.64.1.1" in out, out
        c.line("logout")
        assert c.wait_exit() == 0


def test_a_failed_logins_delay_cannot_be_skipped_and_grows(tmp_path: Path) -> None:
    """Ctrl-C and Ctrl-\\ on the terminal during the delay after a failed login change nothing;
    a console killed during its delay leaves the rest of it, and the count, to the next."""
    if os.geteuid() != 0:
        pytest.skip("the console's terminal tests run with the lab tests, as root")
    from sdwan.appliance.console import Credentials, CredentialStore

    data = tmp_path / "data"
    store = CredentialStore(data)
    store.save(Credentials.make("admin", NEW_PASSWORD))
    gone = tmp_path / "nothing-here.sock"

    def stored_failures(n: int) -> bool:
        return store.load().failed == n

    with console(None, gone, data) as c:
        c.expect("login: ")
        c.line("admin")
        c.expect("Password: ")
        c.line("wrong")
        wait_for("the failure stored", lambda: stored_failures(1))  # before it is answered
        t0 = time.monotonic()
        c.send("\x03")  # Ctrl-C
        c.send("\x1c")  # Ctrl-\, whose default action would end the console at once
        c.expect("Login incorrect")
        # t0 is taken after the poll saw the failure stored, up to a poll (0.1 s) and a load's
        # worth into the delay: a skipped delay would end almost at once.
        assert time.monotonic() - t0 >= fail_delay(1) - 0.4, "the delay was cut short"
        c.expect("login: ")
        assert c.proc.poll() is None, "Ctrl-C ended the console"
        c.line("admin")
        c.expect("Password: ")
        c.line("wrong again")
        wait_for("the second failure stored", lambda: stored_failures(2))
        os.killpg(c.proc.pid, signal.SIGKILL)  # a hang-up or a kill in the middle of the delay
        c.wait_exit()

    owed_until = (store.load().failed_at or 0.0) + fail_delay(2)
    with console(None, gone, data) as c:
        c.expect(r"2 failed login\(s\) in a row: the next login in [12] s")
        c.expect("login: ")
        assert time.time() >= owed_until, "the next console did not wait out the delay"
        c.line("admin")
        c.expect("Password: ")
        c.line(NEW_PASSWORD)
        c.expect(r"2 failed login attempt\(s\) since the last successful login")
        c.expect("> ")
        c.send("\x04")
        assert c.wait_exit() == 0
    assert store.load().failed == 0


def test_without_socketd_the_console_still_works_and_factory_reset_wipes(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the console's factory reset test runs with the lab tests, as root")
    from sdwan.common.store import Store

    data = tmp_path / "data"
    data.mkdir()
    with Store(data) as store:  # a real store, with an event in it
        store.add_event("test.before", "before the reset")
    (data / "nat").mkdir()
    (data / "nat" / "x").write_text("x")
    marker = tmp_path / "rebooted"
    reboot = f"sh -c 'echo called >> {marker}'"
    gone = tmp_path / "nothing-here.sock"

    with console(None, gone, data, reboot) as c:
        first_login(c)
        out = c.command("show status")
        assert f"socketd is not running: cannot connect to {gone}: is socketd running?" in out
        out = c.command("ping via wan1 127.0.0.1")
        assert "socketd is not running" in out and "via wan1 needs socketd" in out, out
        out = c.command("ping -c 1 127.0.0.1")
        assert "1 packets transmitted, 1 received" in out, out
        out = c.command("help")
        assert "factory-reset" in out and "traceroute [via LINK] HOST" in out, out

        out = c.command("reboot", prompt="confirm: ")
        c.line("no")
        assert "cancelled" in c.output_until_prompt()
        out = c.command("factory-reset", prompt="confirm: ")
        assert f"This erases everything in {data}" in out, out
        c.line("sure")
        assert "cancelled" in c.output_until_prompt()
        assert not marker.exists()
        assert (data / "console-credentials.json").exists()

        c.command("factory-reset", prompt="confirm: ")
        c.line("factory-reset")
        c.expect(r"erased \d+ entries")
        c.expect("rebooting")
        assert c.wait_exit() == 0
    assert marker.read_text() == "called\n"
    assert data.is_dir() and list(data.iterdir()) == []

    # After the reset the default credential is back, and must be changed again. A console
    # left alone at the prompt logs itself out.
    with console(None, gone, data, reboot, idle_s=2) as c:
        first_login(c)
        c.send("show sta")  # a half-typed line does not count as activity
        t0 = time.monotonic()
        c.expect("idle for 2 s: logged out", timeout=10)
        assert c.wait_exit() == 0
        assert 1.5 <= time.monotonic() - t0 < 8
