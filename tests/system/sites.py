"""Helpers shared by the system tests that run appliances as sites: the field console
(login, one command), a site's configuration and certificates handed over through fw_cfg,
a VM wired into a namespace lab with tap devices, the test hook, and a front-panel LED
controller played by the test on the VM's second serial port (docs/leds.md).

Wiring of `LabVM` (one per site, n = site id):

    inet br0 ── v<n>w ══ vw (bridge bw, ns vm<n>) ── tw (tap) ── guest eth0 (WAN)
    lan<n> eth0 ══ vl (bridge bl, ns vm<n>) ── tl (tap) ── guest eth1 (LAN)

QEMU runs inside the vm<n> namespace so it can open its two taps by name; the Lab tears the
namespaces down (taps and veths go with them) and the VM is always powered off.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdwan.lab import netns
from sdwan.lab.topology import INET_BRIDGE, POP_IP, Lab, dhcp_client, public_ip
from sdwan.lab.vm import VM, VMError, VMOptions

# Bounds for software emulation (TCG), sized for a host three times slower than a busy
# 2-core machine (two TCG guests on two loaded cores: socketd took over 30 s to start there).
# Only a failure waits one out: every wait ends as soon as its condition is met.
BOOT_S = 300.0  # power-on or a reset to `boot: ready`
SOCKETD_S = 300.0  # `boot: ready` to socketd's control socket and the login prompt
SHUTDOWN_S = 240.0  # `reboot` confirmed to /data unmounted
FIRMWARE_S = 180.0  # /data unmounted, or a reset, to the firmware starting the kernel
CONSOLE_S = 90.0  # one step on the console: a prompt, a command's output
ECHO_S = 60.0  # the console echoing a line typed into it
SETTLE_S = 240.0  # a state socketd reaches over time, polled (an address applied, a peer up)
NEW_PASSWORD = "field-pass-42"
TEST_HOOK = "opt/sdwan/test-hook"


# ------------------------------------------------------------------ the console


def login(vm: VM, password: str, first: bool = False, new_password: str = NEW_PASSWORD) -> None:
    """Logs in as admin once "login: " has been seen; on a first login (the default
    credential) the password must be replaced by new_password."""
    vm.sendline("admin")
    vm.expect("Password: ", CONSOLE_S)
    vm.sendline(password)
    if first:
        vm.expect("New password: ", CONSOLE_S, "the forced password change")
        vm.sendline(new_password)
        vm.expect("Retype new password: ", CONSOLE_S)
        vm.sendline(new_password)
        vm.expect("Password changed.", CONSOLE_S)
    vm.expect(r"\S+> ", CONSOLE_S, "the console's command prompt")


def command(vm: VM, line: str, timeout: float = CONSOLE_S) -> str:
    """Runs one console command; returns what it printed up to the next prompt."""
    vm.sendline(line)
    vm.expect(re.escape(line), ECHO_S, f"the echo of {line!r}")
    # \A: the output starts at the cursor; unanchored, the lazy group made every search
    # quadratic in the output's length (seconds for `show log 200` on a slow host).
    m = vm.expect(re.compile(r"(?s)\A(.*?)\n(\S+)> "), timeout, f"the prompt after {line!r}")
    return m.group(1).replace("\r", "")


def poll_command(vm: VM, line: str, ok: re.Pattern[str], timeout: float,
                 what: str) -> str:
    """Repeats a console command until its output matches ok (the state settles over
    seconds: registration, directory pushes)."""
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out = command(vm, line)
        if ok.search(out):
            return out
        time.sleep(3)
    raise AssertionError(f"{what}: `{line}` never matched {ok.pattern!r} within "
                         f"{timeout:.0f} s; last output:\n{out}\nconsole tail:\n{vm.tail()}")


# ------------------------------------------------------------------ site files


@dataclass
class SiteSpec:
    site_id: int
    wan_address: str | None = None  # "ADDR/PREFIX": static WAN from the config
    wan_gateway: str | None = None
    lan_interface: str | None = None
    lan_address: str | None = None  # "ADDR/PREFIX": socketd addresses the LAN port
    # With lan_address: socketd's DHCP server leases 10.n.0.100-199, and these (MAC, IP).
    lan_dhcp: bool = False
    lan_static: tuple[tuple[str, str], ...] = ()
    pop_endpoint: str | None = None
    watchdog: bool = True

    @property
    def lan_subnet(self) -> str:
        return f"10.{self.site_id}.0.0/24"


def site_config(spec: SiteSpec) -> str:
    sid = spec.site_id
    parts = [
        f'[site]\nid = {sid}\nname = "branch-{sid}"\n',
        f'[pki]\nca = "pki/ca.pem"\ncert = "pki/site-{sid}.pem"\nkey = "pki/site-{sid}.key"\n',
        f'[lan]\nsubnets = ["{spec.lan_subnet}"]\n'
        + (f'interface = "{spec.lan_interface}"\n' if spec.lan_interface else "")
        + (f'address = "{spec.lan_address}"\n' if spec.lan_address else "")
        + (f'\n[lan.dhcp]\nrange = ["10.{sid}.0.100", "10.{sid}.0.199"]\n' if spec.lan_dhcp else "")
        + "".join(f'\n[[lan.dhcp.static]]\nmac = "{mac}"\nip = "{ip}"\n'
                  for mac, ip in spec.lan_static),
        '[[links]]\nname = "wan1"\ninterface = "eth0"\nport = 4800\n'
        + (f'addressing = {{ mode = "static", address = "{spec.wan_address}", '
           f'gateway = "{spec.wan_gateway}" }}\n' if spec.wan_address else ""),
    ]
    if spec.pop_endpoint:
        parts.append(f'[[pops]]\nid = 1\nendpoint = "{spec.pop_endpoint}"\n')
    parts.append('[appliance]\nwatchdog = "/dev/watchdog"\n' if spec.watchdog
                 else "[appliance]\nwatchdog = false\n")
    return "\n".join(parts)


def site_fw_cfg(lab: Lab, spec: SiteSpec, workdir: Path) -> dict[str, Path]:
    """fw_cfg files (name under /data -> host file): the config and the lab CA's
    certificates for the site."""
    pki = lab.setup_pki()
    cert, key = lab.issue(spec.site_id, pki)
    cfg = workdir / f"socketd-{spec.site_id}.toml"
    cfg.write_text(site_config(spec))
    return {"socketd.toml": cfg, "pki/ca.pem": pki.ca_cert,
            f"pki/site-{spec.site_id}.pem": cert, f"pki/site-{spec.site_id}.key": key}


def hook_args(workdir: Path, name: str, script: str) -> list[str]:
    """QEMU arguments giving the guest a test-hook script (run once by init, see
    board/common/rootfs/usr/libexec/sdwan/test-hook)."""
    path = workdir / f"{name}.sh"
    path.write_text(script)
    return ["-fw_cfg", f"name={TEST_HOOK},file={path}"]


# ------------------------------------------------------------------ VMs in the lab


class NetnsVM(VM):
    """A VM whose QEMU runs inside a network namespace (to open the taps there)."""

    def __init__(self, ns: str, *args: object, **kwargs: object) -> None:
        self.ns = ns
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def command(self) -> list[str]:
        cmd = super().command()
        # start() checks only the first word, `ip`: QEMU itself is checked here.
        if shutil.which(cmd[0]) is None:
            raise VMError(f"{cmd[0]} is not installed (run `make setup`)")
        return ["ip", "netns", "exec", self.ns, *cmd]


@dataclass
class LabSite:
    n: int
    vm_ns: str
    lan_ns: str
    wan_ip: str
    lan_gw: str
    lan_host_ip: str
    lan_host_mac: str


def wire_site(lab: Lab, n: int, lan_dhcp: bool = False) -> tuple[LabSite, list[str]]:
    """Namespaces, bridges and taps for site n's VM; returns the site and QEMU's -netdev
    arguments (guest eth0 = WAN on the inet bridge, eth1 = LAN toward the lan<n> host). With
    lan_dhcp the LAN host is left unaddressed: it asks the VM (`lan_dhcp_client`) for
    lan_host_ip, a static lease for lan_host_mac."""
    inet = lab.add_inet()
    vm_ns = lab.new_ns(f"vm{n}")
    lan_ns = lab.new_ns(f"lan{n}")
    for tap, br in (("tw", "bw"), ("tl", "bl")):
        netns.run(vm_ns, ["ip", "tuntap", "add", "dev", tap, "mode", "tap"])
        netns.bridge(vm_ns, br)
        netns.enslave(vm_ns, tap, br)
        netns.link_up(vm_ns, tap)
    netns.veth(vm_ns, "vw", inet, f"v{n}w")
    netns.enslave(vm_ns, "vw", "bw")
    netns.enslave(inet, f"v{n}w", INET_BRIDGE)
    netns.veth(vm_ns, "vl", lan_ns, "eth0")
    netns.enslave(vm_ns, "vl", "bl")
    lan_gw, lan_host = f"10.{n}.0.1", f"10.{n}.0.2"
    if not lan_dhcp:
        netns.addr_add(lan_ns, "eth0", f"{lan_host}/24")
        netns.route_add(lan_ns, "default", via=lan_gw)
    args = []
    for i, tap in enumerate(("tw", "tl")):
        args += ["-netdev", f"tap,id=n{i},ifname={tap},script=no,downscript=no",
                 "-device", f"virtio-net-pci,netdev=n{i},mac=52:54:00:5d:{n:02x}:{i:02x}"]
    return (LabSite(n, vm_ns, lan_ns, public_ip(n), lan_gw, lan_host, f"02:00:00:5e:{n:02x}:02"),
            args)


def lan_dhcp_client(lab: Lab, site: LabSite, timeout: float) -> str:
    """The LAN host asks the VM's DHCP server (socketd's, on the LAN port it addressed from
    `[lan] address`) for its address, with its static lease's MAC."""
    return dhcp_client(site.lan_ns, "eth0", lab.workdir, site.lan_host_mac, timeout)


POP_ENDPOINT = f"{POP_IP}:4800"


# ------------------------------------------------------------------ the front panel


@dataclass
class PanelPlayer:
    """Plays the front-panel controller on the VM's panel socket: says HELLO, answers
    every command OK, and records (monotonic time, line) of everything received."""

    path: Path
    model: str = "TP-1"
    firmware: str = "1.0"
    lines: list[tuple[float, str]] = field(default_factory=list)
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def start(self, timeout: float = 30.0) -> PanelPlayer:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise VMError(f"no panel socket at {self.path} after {timeout:.0f} s") \
                        from None
                time.sleep(0.1)
        self._sock = s
        s.sendall(f"HELLO {self.model} {self.firmware}\n".encode())
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        assert self._sock is not None
        self._sock.settimeout(0.5)
        buf = b""
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                raw, buf = buf.split(b"\n", 1)
                line = raw.decode(errors="replace").strip()
                if not line:
                    continue
                with self._cond:
                    self.lines.append((time.monotonic(), line))
                    self._cond.notify_all()
                with contextlib.suppress(OSError):
                    self._sock.sendall(b"OK\n")

    def hello(self, firmware: str | None = None) -> None:
        """Says HELLO again, as a panel that restarted (and forgot its LEDs) does."""
        assert self._sock is not None
        self._sock.sendall(f"HELLO {self.model} {firmware or self.firmware}\n".encode())

    def shown(self) -> list[tuple[str, dict[int, str]]]:
        """Every pattern received, in order, with the LED states that followed it."""
        out: list[tuple[str, dict[int, str]]] = []
        with self._cond:
            for _, line in self.lines:
                words = line.split()
                if words[0] == "PATTERN" and len(words) == 2:
                    out.append((words[1], {}))
                elif words[0] == "LED" and len(words) >= 3 and out:
                    out[-1][1][int(words[1])] = " ".join(words[2:])
        return out

    def patterns(self) -> list[str]:
        with self._cond:
            return [line.split(None, 1)[1] for _, line in self.lines
                    if line.startswith("PATTERN ")]

    def wait_pattern(self, name: str, timeout: float, leds: int = 0) -> None:
        """Waits for PATTERN name followed by the lines of `leds` LEDs (the whole pattern
        drawn)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(p == name and len(states) >= leds for p, states in self.shown()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"the panel never got PATTERN {name} within {timeout:.0f} s; "
                        f"it got: {[ln for _, ln in self.lines][-30:]}")
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        self._stop.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def vm_options(**kw: object) -> VMOptions:
    return VMOptions(**kw)  # type: ignore[arg-type]
