"""One appliance VM in QEMU, as the system tests and bench/boot drive it.

Owns starting QEMU the way the board boots on hardware (UEFI firmware with a private copy
of its variable store, the board's disk image behind a per-VM copy-on-write overlay), the
serial console on a Unix socket that a test reads and types into, the QMP socket, bounded
waits whose failures quote the last console output, and always killing QEMU and removing
the VM's files. Board facts (QEMU binary, machine, firmware, extra devices) come from
board/<name>/board.toml, the same file the image builder reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parents[3]
BOARDS = REPO / "board"
IMAGES = REPO / "build" / "images"
CONSOLE_TAIL = 3000  # characters of console output quoted in a failure


class VMError(Exception):
    """QEMU could not start, or the guest did not do what was awaited in time."""


def image_path(board: str) -> Path:
    return IMAGES / f"{board}.img"


def board_config(board: str) -> dict:
    path = BOARDS / board / "board.toml"
    if not path.is_file():
        raise VMError(f"no board {board!r} ({path} is missing)")
    return tomllib.loads(path.read_text())


def default_accel() -> str:
    """TCG unless SDWAN_VM_ACCEL says otherwise: KVM is not usable everywhere /dev/kvm exists
    (nested virtualisation may fail inside the UEFI firmware), and bench/boot wants TCG."""
    return os.environ.get("SDWAN_VM_ACCEL", "tcg")


@dataclass
class VMOptions:
    memory_mib: int | None = None  # None: the board's [qemu] memory_mib, else 256
    cpus: int = 1
    accel: str = field(default_factory=default_accel)
    # -fw_cfg files: name (under opt/sdwan/data/ the guest copies them into /data) -> file
    fw_cfg: dict[str, Path] = field(default_factory=dict)
    # network: QEMU -nic/-netdev arguments; by default one user-mode NIC that reaches nothing
    net_args: list[str] = field(
        default_factory=lambda: ["-nic", "user,model=virtio-net-pci,restrict=on"])
    panel: bool = False  # a Unix socket for the front-panel serial port (x86 boards)
    # The disk's size as the guest sees it (None: the image's): /data grows to the end of a
    # bigger disk at its first boot, as on a box, and an update needs room there.
    disk_mib: int | None = None
    extra_args: list[str] = field(default_factory=list)


class VM:
    """A booted (or booting) appliance. Use as a context manager; stop() is idempotent."""

    def __init__(self, board: str, image: Path | None = None,
                 options: VMOptions | None = None, workdir: Path | None = None) -> None:
        self.board = board
        self.cfg = board_config(board)
        self.image = image or image_path(board)
        if not self.image.is_file():
            raise VMError(f"no image at {self.image}: run `make image BOARD={board}`")
        self.opts = options or VMOptions()
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix=f"vm-{board}-"))
        self.console_sock = self.dir / "console.sock"
        self.qmp_sock = self.dir / "qmp.sock"
        self.panel_sock = self.dir / "panel.sock"
        self.console_log = self.dir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._con: socket.socket | None = None
        self._buf = bytearray()
        self._cursor = 0
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._closed = False
        self.started_at = 0.0  # monotonic time the guest was powered on

    # ------------------------------------------------------------------ lifecycle

    def command(self) -> list[str]:
        q = self.cfg["qemu"]
        code = Path(q["firmware_code"])
        vars_src = Path(q["firmware_vars"])
        for f in (code, vars_src):
            if not f.is_file():
                raise VMError(f"UEFI firmware {f} is missing (run `make setup`)")
        # The variable store and the disk overlay outlive a power-off: start() again is the
        # same box powered on again.
        vars_copy = self.dir / "efivars.fd"
        if not vars_copy.exists():
            shutil.copyfile(vars_src, vars_copy)
        overlay = self.dir / "disk.qcow2"
        if not overlay.exists():
            self._check(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw",
                         "-b", str(self.image.resolve()), str(overlay),
                         *([f"{self.opts.disk_mib}M"] if self.opts.disk_mib else [])])
        cmd = [
            q["binary"], "-name", f"sdwan-{self.board}", "-nodefaults", "-no-user-config",
            "-display", "none", "-machine", q["machine"], "-cpu", q.get("cpu", "max"),
            "-accel", self.opts.accel, "-m", str(self.memory_mib),
            "-smp", str(self.opts.cpus),
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
            "-drive", f"if=none,id=disk0,format=qcow2,file={overlay}",
            "-device", "virtio-blk-pci,drive=disk0,bootindex=0",
            # wait=on: the guest starts only once the console is connected, so no output
            # is lost and power-on time is known.
            "-chardev", f"socket,id=con0,path={self.console_sock},server=on,wait=on,"
                        f"logfile={self.console_log}",
            "-serial", "chardev:con0",
            "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
            "-device", "virtio-rng-pci",
            *q.get("extra", []), *self.opts.net_args,
        ]
        if self.opts.panel:
            cmd += ["-chardev", f"socket,id=panel0,path={self.panel_sock},server=on,wait=off",
                    "-serial", "chardev:panel0"]
        for name, path in sorted(self.opts.fw_cfg.items()):
            cmd += ["-fw_cfg", f"name=opt/sdwan/data/{name},file={path}"]
        return cmd + self.opts.extra_args

    @property
    def memory_mib(self) -> int:
        return self.opts.memory_mib or int(self.cfg["qemu"].get("memory_mib", 256))

    def start(self, timeout: float = 60.0) -> VM:
        """Powers the VM on; the console is connected before the guest runs."""
        if self.proc is not None and self.proc.poll() is None:
            raise VMError("the VM is already running")
        self.console_sock.unlink(missing_ok=True)
        with self._cond:
            self._buf.clear()
            self._cursor = 0
            self._closed = False
        cmd = self.command()
        binary = shutil.which(cmd[0])
        if binary is None:
            raise VMError(f"{cmd[0]} is not installed (run `make setup`)")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
                raise VMError(f"QEMU exited with {self.proc.returncode}: {out.strip()[-2000:]}")
            if self.console_sock.exists():
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(str(self.console_sock))
                    break
                except OSError:
                    s.close()
            if time.monotonic() > deadline:
                self.stop()
                raise VMError(f"QEMU did not open its console socket within {timeout:.0f} s")
            time.sleep(0.02)
        self.started_at = time.monotonic()
        self._con = s
        self._reader = threading.Thread(target=self._read_console, daemon=True)
        self._reader.start()
        return self

    def _read_console(self) -> None:
        assert self._con is not None
        while True:
            try:
                data = self._con.recv(65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._closed = True
                    self._cond.notify_all()
                    return
                self._buf += data
                self._cond.notify_all()

    def stop(self, timeout: float = 10.0) -> None:
        """Power off and remove the VM's files."""
        try:
            self.poweroff(timeout)
        finally:
            if self._own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)

    def poweroff(self, timeout: float = 10.0) -> None:
        """Pulls the plug (QMP quit, SIGKILL if QEMU lingers); the disk stays for start()."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError, VMError):
                self.qmp("quit", timeout=3.0)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._con is not None:
            with contextlib.suppress(OSError):
                self._con.close()
            self._con = None
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None
        self.proc = None

    def kill(self) -> None:
        """A power cut: SIGKILL, so QEMU flushes nothing of its own either; the disk stays
        for start()."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.poweroff()

    def __enter__(self) -> VM:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------------ QMP

    def qmp(self, command: str, timeout: float = 10.0, **arguments: object) -> object:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.qmp_sock))
            f = s.makefile("rwb")
            json.loads(f.readline())  # greeting
            for cmd in ({"execute": "qmp_capabilities"},
                        {"execute": command, **({"arguments": arguments} if arguments else {})}):
                f.write(json.dumps(cmd).encode() + b"\n")
                f.flush()
                while True:
                    line = f.readline()
                    if not line:
                        if command == "quit":
                            return None
                        raise VMError(f"QMP closed during {command}")
                    reply = json.loads(line)
                    if "return" in reply:
                        break
                    if "error" in reply:
                        raise VMError(f"QMP {command}: {reply['error'].get('desc')}")
            return reply["return"]

    # ------------------------------------------------------------------ console

    def output(self) -> str:
        with self._cond:
            return self._buf.decode(errors="replace")

    def tail(self, n: int = CONSOLE_TAIL) -> str:
        text = self.output()[-n:]
        return re.sub(r"\x1b\[[0-9;=?]*[A-Za-z]", "", text)

    def uptime(self) -> float:
        """Seconds since power-on (the moment QEMU started the guest)."""
        return time.monotonic() - self.started_at

    def _unread(self) -> tuple[str, bool, int]:
        """(console text after the cursor, console closed, bytes received so far)."""
        with self._cond:
            return self._buf[self._cursor:].decode(errors="replace"), self._closed, len(self._buf)

    def _consume(self, text: str, end: int) -> None:
        with self._cond:
            self._cursor += len(text[:end].encode())

    def _wait_more(self, seen: int, left: float) -> None:
        with self._cond:
            if len(self._buf) == seen and not self._closed:
                self._cond.wait(min(left, 0.5))

    # Patterns are searched outside the lock: the reader thread must never wait for a regex,
    # or QEMU's socket fills and the guest's console stalls in the middle of a long output.

    def expect(self, pattern: str | re.Pattern[str], timeout: float,
               what: str | None = None) -> re.Match[str]:
        """Waits for pattern in the console output after the last match; returns the match."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            text, closed, seen = self._unread()
            m = rx.search(text)
            if m:
                self._consume(text, m.end())
                return m
            left = deadline - time.monotonic()
            if left <= 0 or closed:
                why = "the console closed (QEMU exited)" if closed else \
                    f"not seen within {timeout:.0f} s"
                raise VMError(f"{self.board}: {what or rx.pattern!r} {why}; "
                              f"last console output:\n{self.tail()}")
            self._wait_more(seen, left)

    def expect_all(self, patterns: list[str], timeout: float,
                   what: str | None = None) -> list[re.Match[str]]:
        """Waits until every pattern has appeared after the last match, in any order (boot
        messages and prompts of different processes interleave); the next search starts
        after the last of them."""
        rxs = [re.compile(p) for p in patterns]
        deadline = time.monotonic() + timeout
        while True:
            text, closed, seen = self._unread()
            found = [rx.search(text) for rx in rxs]
            if all(found):
                self._consume(text, max(m.end() for m in found if m))
                return [m for m in found if m]
            left = deadline - time.monotonic()
            if left <= 0 or closed:
                missing = [rx.pattern for rx, m in zip(rxs, found, strict=True) if not m]
                why = "the console closed (QEMU exited)" if closed else \
                    f"not seen within {timeout:.0f} s"
                raise VMError(f"{self.board}: {what or missing!r} {why}; "
                              f"last console output:\n{self.tail()}")
            self._wait_more(seen, left)

    def send(self, text: str) -> None:
        if self._con is None:
            raise VMError("the VM is not running")
        self._con.sendall(text.encode())

    def sendline(self, text: str = "") -> None:
        self.send(text + "\r")

    def shell(self, command: str, timeout: float = 30.0) -> tuple[int, str]:
        """Runs a command in a logged-in shell (`sh`) on the console: (exit status, output)."""
        tag = f"rc{time.monotonic_ns() % 10**9}"
        self.sendline(f"{command}; echo {tag}=$?=")
        self.expect(re.escape(f"{tag}=$?="), 60.0, f"the echo of `{command}`")
        # \A: one start position; unanchored, the lazy group made each search quadratic in
        # the output's length.
        m = self.expect(re.compile(rf"(?s)\A(.*?){tag}=(\d+)="), timeout, f"`{command}`")
        out = m.group(1).replace("\r", "").removeprefix("\n")
        return int(m.group(2)), out

    @staticmethod
    def _check(cmd: list[str]) -> None:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except FileNotFoundError as e:
            raise VMError(f"{cmd[0]} is not installed (run `make setup`)") from e
        if proc.returncode != 0:
            raise VMError(f"{' '.join(cmd[:3])} failed: {proc.stderr.strip()}")
