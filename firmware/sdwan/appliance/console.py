"""socket-console: the field engineer's shell on the serial port (docs/console.md).

It owns the console's login (one local credential in the data directory, hashed with scrypt,
written atomically; the default admin/admin must be changed at the first login), the command
language (`show`, `ping`, `traceroute`, `set link`, `update`, `factory-reset`, `reboot`, `help`,
`exit`:
parsing, usage errors and tab completion) and running those commands. Everything about socketd
goes over the same control socket as socketctl, and the tables are socketctl's. It is not a Unix
shell: nothing typed reaches one. With a terminal on stdin it edits lines with `readline`;
otherwise it reads plain lines (scripts, tests).

The appliance runs it from getty (`getty -n -l /usr/bin/socket-console 115200 ttyS0`), so it is
the login program: it asks for the login itself and exits on logout, and getty starts it again.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from sdwan.appliance import bootenv
from sdwan.common.addressing import parse_static
from sdwan.common.control import CommandFailed, ControlError, ControlUnreachable, request
from sdwan.common.visible import visible
from sdwan.site.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_CONTROL_SOCKET,
    DEFAULT_DATA_DIR,
    ConfigError,
)
from sdwan.site.socketctl import FORMATTERS, follow_update, format_set_link

__all__ = [
    "COMMANDS",
    "Command",
    "CredentialError",
    "CredentialStore",
    "Credentials",
    "UsageError",
    "check_new_password",
    "completions",
    "main",
    "parse",
]

# --------------------------------------------------------------------------- credentials

DEFAULT_USER = "admin"
DEFAULT_PASSWORD = "admin"
CREDENTIALS_FILE = "console-credentials.json"
MIN_PASSWORD = 8
MAX_PASSWORD = 128
# scrypt with 16 MiB of memory: about 50 ms on a small box, per guess.
SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_LEN = 2**14, 8, 1, 32
MAX_LOGIN_TRIES = 5  # then the console exits and getty starts a fresh one
# A failed login is answered after fail_delay(N), N the failures in a row stored in the
# credential file (so a new console, after getty restarted it, goes on where the last one
# stopped): 1 s, doubled with each failure, at most FAIL_DELAY_MAX_S. The delay cannot be
# skipped: Ctrl-C, Ctrl-\ and Ctrl-Z are ignored while it runs, and a console that dies during
# it (a hang-up, a kill) leaves the rest of it to the next console.
FAIL_DELAY_S = 1.0
FAIL_DELAY_MAX_S = 60.0
_UNINTERRUPTIBLE = (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP)
MAX_PASSWORD_TRIES = 3
IDLE_LOGOUT_S = 900  # a console left logged in on site is an open door


class CredentialError(Exception):
    """The credential file cannot be read or written; the message names it and says why."""


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode(), salt=salt, n=n, r=r, p=p, maxmem=128 * r * n * 2, dklen=SCRYPT_LEN
    )


@dataclass(frozen=True)
class Credentials:
    """The console's one local account. `must_change` holds until the default is replaced;
    `failed` counts failed logins since the last successful one, the last at `failed_at`
    (Unix time)."""

    user: str
    salt: bytes
    hash: bytes
    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P
    must_change: bool = False
    failed: int = 0
    changed_at: float | None = None
    failed_at: float | None = None

    @classmethod
    def make(cls, user: str, password: str, *, must_change: bool = False) -> Credentials:
        salt = secrets.token_bytes(16)
        return cls(
            user,
            salt,
            _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P),
            must_change=must_change,
            changed_at=None if must_change else time.time(),
        )

    @classmethod
    def default(cls) -> Credentials:
        return cls.make(DEFAULT_USER, DEFAULT_PASSWORD, must_change=True)

    def verify(self, user: str, password: str) -> bool:
        # The hash is computed for a wrong user too, so timing does not tell which was wrong.
        digest = _scrypt(password, self.salt, self.n, self.r, self.p)
        return hmac.compare_digest(digest, self.hash) & hmac.compare_digest(
            user.encode(), self.user.encode()
        )

    def with_password(self, password: str) -> Credentials:
        fresh = Credentials.make(self.user, password)
        return replace(fresh, failed=self.failed, failed_at=self.failed_at)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "user": self.user,
            "scrypt": {"n": self.n, "r": self.r, "p": self.p},
            "salt": self.salt.hex(),
            "hash": self.hash.hex(),
            "must_change": self.must_change,
            "failed": self.failed,
            "failed_at": self.failed_at,
            "changed_at": self.changed_at,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Credentials:
        """ValueError says what is wrong with a stored document."""
        if not isinstance(doc, dict) or doc.get("version") != 1:
            raise ValueError("not a version 1 credential document")
        try:
            params = doc["scrypt"]
            creds = cls(
                user=str(doc["user"]),
                salt=bytes.fromhex(doc["salt"]),
                hash=bytes.fromhex(doc["hash"]),
                n=int(params["n"]),
                r=int(params["r"]),
                p=int(params["p"]),
                must_change=bool(doc["must_change"]),
                failed=int(doc.get("failed", 0)),
                changed_at=doc.get("changed_at"),
                failed_at=_time_or_none(doc.get("failed_at")),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"missing or malformed field: {e}") from None
        if creds.failed < 0:
            raise ValueError("negative failure count")
        if not creds.user or len(creds.salt) < 8 or len(creds.hash) != SCRYPT_LEN:
            raise ValueError("empty user, short salt or wrong hash length")
        if creds.n < 2 or creds.n & (creds.n - 1) or not 1 <= creds.r <= 64 or creds.p < 1:
            raise ValueError("scrypt parameters out of range")
        return creds


def _time_or_none(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ValueError(f"failed_at is not a time: {value!r}")
    return float(value)


class CredentialStore:
    """The credential file `<data_dir>/console-credentials.json` (mode 0600)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / CREDENTIALS_FILE

    def load(self) -> Credentials:
        """The stored credential; the default (to be changed) when there is none yet."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return Credentials.default()
        except OSError as e:
            raise CredentialError(f"cannot read {self.path}: {e.strerror or e}") from e
        try:
            return Credentials.from_json(json.loads(text))
        except (ValueError, UnicodeDecodeError) as e:
            # Never fall back to the default: a damaged file must not reopen admin/admin.
            raise CredentialError(f"{self.path} is damaged: {e}") from e

    def save(self, creds: Credentials) -> None:
        """Write-rename-fsync: a power cut leaves the old file or the new one, never half."""
        directory = self.path.parent
        tmp = directory / f".{self.path.name}.tmp"
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(creds.to_json(), f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise CredentialError(f"cannot write {self.path}: {e.strerror or e}") from e


def check_new_password(new: str, again: str, creds: Credentials) -> None:
    """The rules for a new password; ValueError says which one is broken."""
    if new != again:
        raise ValueError("the two passwords differ")
    if len(new) < MIN_PASSWORD:
        raise ValueError(f"too short: at least {MIN_PASSWORD} characters")
    if len(new) > MAX_PASSWORD:
        raise ValueError(f"too long: at most {MAX_PASSWORD} characters")
    if not new.isprintable():
        raise ValueError("only printable characters")
    if new == DEFAULT_PASSWORD or new.lower() == creds.user.lower():
        raise ValueError("not the default password or the user name")
    if creds.verify(creds.user, new):
        raise ValueError("not the current password")


def fail_delay(failures: int) -> float:
    """The answer to the N-th failed login in a row waits this long: 1, 2, 4, 8, 16, 32, then
    60 s for every further one until a login succeeds."""
    if failures <= 0:
        return 0.0
    return min(FAIL_DELAY_S * 2 ** min(failures - 1, 16), FAIL_DELAY_MAX_S)


def delay_left(creds: Credentials, now: float) -> float:
    """How much of the delay owed for the stored failures is still to be waited: a console
    that died during its delay leaves the rest to the next one. Never more than the whole
    delay, so a clock set back (a box without a battery-backed clock) cannot lock the console."""
    if creds.failed <= 0 or creds.failed_at is None:
        return 0.0
    delay = fail_delay(creds.failed)
    return min(max(creds.failed_at + delay - now, 0.0), delay)


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """Ctrl-C, Ctrl-\\ and Ctrl-Z do nothing inside: a login being checked, and the delay after a
    failure, run to their end."""
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _UNINTERRUPTIBLE}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- command language

SHOW_TOPICS = (
    "status", "links", "lan", "pop", "peers", "mesh", "rules", "recovery", "firewall", "events",
    "log", "slots",
)
EVENTS_DEFAULT = 20
# The appliance logs to busybox syslogd's ring in RAM (rcS: syslogd -C); logread prints it.
LOG_COMMAND = ("logread",)
PING_COUNT_DEFAULT = 4
PING_COUNT_MAX = 100
CONFIRM_RESET = ("factory-reset", "yes")

_LINK_RE = re.compile(r"[a-z0-9_-]{1,15}")
# Host names and IPv4/IPv6 literals; never starting with "-", so a host is never an option.
_HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.:-]{0,252}")
# A bundle on the box: an absolute path of printable characters, no spaces (a USB stick's
# mount point or /data).
_BUNDLE_RE = re.compile(r"/[^\s]{1,1023}")


@dataclass(frozen=True)
class Help:
    usage: str
    text: str


COMMANDS: dict[str, Help] = {
    "show": Help(
        "show status|links|lan|pop|peers|mesh|rules|recovery|firewall|slots|events [N]|log [N]",
        "what socketd is doing: the site and its links' counters, WAN addressing, the LAN port"
        " (its address, DHCP server and leases), the PoP"
        " sessions, the other sites (and their mesh paths), the mesh paths alone, the off-cloud"
        " transport rules (hits, where their traffic goes now), WAN recovery"
        " (active or not, where each site's traffic goes and why), the LAN firewall's rules and"
        " counters, the A/B slots (versions, booted, good, primary, a commit pending and why),"
        " the latest N events (20), the last N lines of the log (20)",
    ),
    "ping": Help(
        "ping [-c N] [via LINK] HOST",
        f"ping HOST (N times, {PING_COUNT_DEFAULT} by default), out of LINK's device if given",
    ),
    "traceroute": Help(
        "traceroute [via LINK] HOST", "the routers on the way to HOST, out of LINK's device"
    ),
    "set": Help(
        "set link LINK static ADDR/PREFIX GATEWAY | set link LINK dhcp",
        "how LINK gets its address; saved in the data directory and applied at once",
    ),
    "update": Help(
        "update BUNDLE",
        "install the update bundle at BUNDLE, a file on the box (a USB stick mounted on it, or"
        " /data; an absolute path), into the slot not running, showing its progress; it starts"
        " at the next reboot, which is asked for once it is installed",
    ),
    "factory-reset": Help(
        "factory-reset",
        "erase every setting, credential and event in the data directory, then reboot"
        " (asks to confirm)",
    ),
    "reboot": Help("reboot", "restart the appliance (asks to confirm)"),
    "help": Help("help [COMMAND]", "the commands, or one command's usage"),
    "exit": Help("exit", "log out (Ctrl-D too)"),
    "logout": Help("logout", "log out (Ctrl-D too)"),
}


class UsageError(Exception):
    """A command line that cannot run: `message` says why, `usage` how it is written."""

    def __init__(self, message: str, usage: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.usage = usage


@dataclass(frozen=True)
class Command:
    name: str  # show, ping, traceroute, set-link, factory-reset, reboot, help, exit
    args: dict[str, Any] = field(default_factory=dict)


def _usage(name: str) -> str:
    return COMMANDS[name].usage


def _int_arg(text: str, what: str, lo: int, hi: int, usage: str) -> int:
    if not text.isascii() or not text.isdigit() or not lo <= int(text) <= hi:
        raise UsageError(f"{what} must be a number {lo}..{hi}, got {text!r}", usage)
    return int(text)


def _link_arg(text: str, usage: str) -> str:
    if not _LINK_RE.fullmatch(text):
        raise UsageError(f"not a link name: {text!r} (links are named like wan1)", usage)
    return text


def _host_arg(text: str, usage: str) -> str:
    if not _HOST_RE.fullmatch(text):
        raise UsageError(f"not a host name or address: {text!r}", usage)
    return text


def _probe_args(name: str, words: list[str]) -> dict[str, Any]:
    """ping and traceroute: [-c N] (ping only) and [via LINK] in any order, then HOST."""
    usage = _usage(name)
    args: dict[str, Any] = {"link": None, "host": None}
    if name == "ping":
        args["count"] = PING_COUNT_DEFAULT
    i = 0
    while i < len(words):
        word = words[i]
        if word in ("-c", "via"):
            if i + 1 >= len(words):
                what = "a count" if word == "-c" else "a link name"
                raise UsageError(f"{word} needs {what}", usage)
            if word == "-c":
                if name != "ping":
                    raise UsageError(f"{name} has no option -c", usage)
                args["count"] = _int_arg(words[i + 1], "the count", 1, PING_COUNT_MAX, usage)
            else:
                if args["link"] is not None:
                    raise UsageError("via given twice", usage)
                args["link"] = _link_arg(words[i + 1], usage)
            i += 2
            continue
        if word.startswith("-"):
            raise UsageError(f"unknown option {word!r}", usage)
        if args["host"] is not None:
            raise UsageError(f"one host only, got {args['host']!r} and {word!r}", usage)
        args["host"] = _host_arg(word, usage)
        i += 1
    if args["host"] is None:
        raise UsageError(f"{name} needs a host", usage)
    return args


def parse(line: str) -> Command | None:
    """One command line; None for an empty line; UsageError for anything that cannot run."""
    if any(not c.isprintable() and c != "\t" for c in line):
        raise UsageError("the line holds control characters")
    words = line.split()
    if not words:
        return None
    name, rest = words[0], words[1:]
    if name not in COMMANDS:
        close = [c for c in COMMANDS if c.startswith(name[:2])] if len(name) >= 2 else []
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise UsageError(f"unknown command {name!r}{hint}; type help for the commands")
    usage = _usage(name)
    if name == "show":
        if not rest:
            raise UsageError(f"show what? one of {', '.join(SHOW_TOPICS)}", usage)
        topic = rest[0]
        if topic not in SHOW_TOPICS:
            raise UsageError(f"cannot show {topic!r}: one of {', '.join(SHOW_TOPICS)}", usage)
        if topic in ("events", "log"):
            if len(rest) > 2:
                raise UsageError(f"show {topic} takes at most a count", usage)
            limit = _int_arg(rest[1], "the count", 1, 10000, usage) if len(rest) == 2 else None
            return Command("show", {"topic": topic, "limit": limit or EVENTS_DEFAULT})
        if len(rest) > 1:
            raise UsageError(f"show {topic} takes nothing more, got {' '.join(rest[1:])!r}", usage)
        return Command("show", {"topic": topic})
    if name in ("ping", "traceroute"):
        return Command(name, _probe_args(name, rest))
    if name == "set":
        if not rest or rest[0] != "link":
            raise UsageError("only links can be set: set link ...", usage)
        if len(rest) < 3:
            raise UsageError("set link needs a link name and static or dhcp", usage)
        link, mode, values = _link_arg(rest[1], usage), rest[2], rest[3:]
        if mode == "dhcp":
            if values:
                raise UsageError(f"set link {link} dhcp takes nothing more", usage)
            return Command("set-link", {"link": link, "mode": "dhcp"})
        if mode != "static":
            raise UsageError(f"mode must be static or dhcp, got {mode!r}", usage)
        if len(values) != 2:
            raise UsageError("static needs ADDR/PREFIX and GATEWAY", usage)
        try:
            iface, gw = parse_static(values[0], values[1])
        except ValueError as e:
            raise UsageError(str(e), usage) from None
        return Command(
            "set-link", {"link": link, "mode": "static", "address": str(iface), "gateway": str(gw)}
        )
    if name == "update":
        if len(rest) != 1:
            raise UsageError("update needs one bundle path", usage)
        if not _BUNDLE_RE.fullmatch(rest[0]):
            raise UsageError(f"not an absolute path on the box: {rest[0]!r}", usage)
        return Command("update", {"bundle": rest[0]})
    if name == "help":
        if len(rest) > 1:
            raise UsageError("help takes at most one command", usage)
        if rest and rest[0] not in COMMANDS:
            raise UsageError(f"no command {rest[0]!r}; type help for the commands", usage)
        return Command("help", {"topic": rest[0] if rest else None})
    if rest:
        raise UsageError(f"{name} takes no arguments, got {' '.join(rest)!r}", usage)
    return Command("exit" if name == "logout" else name)


def completions(line: str, links: Sequence[str] = ()) -> list[str]:
    """Candidates for the word being typed at the end of `line` (the text before the cursor)."""
    words = line.split()
    prefix = words.pop() if line and not line[-1].isspace() and words else ""
    n = len(words)
    options: Sequence[str] = ()
    if n == 0:
        options = list(COMMANDS)
    elif words[0] == "show" and n == 1:
        options = SHOW_TOPICS
    elif words[0] == "help" and n == 1:
        options = list(COMMANDS)
    elif words[0] == "set":
        if n == 1:
            options = ("link",)
        elif n == 2 and words[1] == "link":
            options = links
        elif n == 3 and words[1] == "link":
            options = ("static", "dhcp")
    elif words[0] in ("ping", "traceroute"):
        if words[-1] == "via":
            options = links
        elif words[-1] != "-c":
            opts = ["via"] if "via" not in words else []
            if words[0] == "ping" and "-c" not in words:
                opts.append("-c")
            options = opts
    return sorted(o for o in options if o.startswith(prefix))


# --------------------------------------------------------------------------- terminal


class IdleTimeout(Exception):
    """Nothing was typed at a prompt for the idle time."""


def _on_alarm(_signum: int, _frame: object) -> None:
    raise IdleTimeout


class Terminal:
    """Prompts and line input: readline editing on a terminal, plain lines otherwise.
    Every read raises IdleTimeout after `idle_s` seconds without a line (0: never)."""

    def __init__(self, stdin: TextIO, stdout: TextIO, idle_s: float = 0) -> None:
        self.stdin = stdin
        self.out = stdout
        self.idle_s = idle_s
        try:
            self.fd: int | None = stdin.fileno()
        except (OSError, ValueError):
            self.fd = None
        self.tty = self.fd is not None and os.isatty(self.fd)
        self._readline: Any = None
        if self.tty:
            try:
                import readline
            except ImportError:  # a Python built without it still gets a usable console
                readline = None  # type: ignore[assignment]
            self._readline = readline

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def setup_completion(self, complete: Callable[[str], list[str]]) -> None:
        rl = self._readline
        if rl is None:
            return
        matches: list[str] = []

        def completer(_text: str, state: int) -> str | None:
            nonlocal matches
            if state == 0:
                try:
                    # Python's readline appends nothing to a completed word; the space
                    # here lets the next word follow at once, as in a shell.
                    matches = [m + " " for m in complete(rl.get_line_buffer()[: rl.get_endidx()])]
                except Exception:  # completion must never break the line being typed
                    matches = []
            return matches[state] if state < len(matches) else None

        rl.set_completer_delims(" \t")
        rl.set_completer(completer)
        rl.parse_and_bind("tab: complete")

    @contextlib.contextmanager
    def _idle_timer(self) -> Any:
        if self.idle_s <= 0:
            yield
            return
        # SIGALRM interrupts the blocking read (readline's too); the handler raises.
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, self.idle_s)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    def discard_typeahead(self) -> None:
        """Drop what was typed during a login's delay: guesses typed ahead wait like any other."""
        if self.tty and self.fd is not None:
            import termios

            with contextlib.suppress(termios.error, OSError):
                termios.tcflush(self.fd, termios.TCIFLUSH)

    def read_command(self, prompt: str) -> str:
        """A command line; EOFError on Ctrl-D, KeyboardInterrupt on Ctrl-C."""
        if self._readline is not None:
            with self._idle_timer():
                return input(prompt)
        return self.read_line(prompt)

    def read_line(self, prompt: str, echo: bool = True) -> str:
        """A line without editing or history (logins, passwords, confirmations)."""
        with self._idle_timer():
            return self._read_line(prompt, echo)

    def _read_line(self, prompt: str, echo: bool) -> str:
        if not self.tty:
            self.write(prompt)
            line = self.stdin.readline()
            if not line:
                raise EOFError
            if not echo:
                self.write("\n")
            return line.rstrip("\r\n")
        assert self.fd is not None
        import termios

        old = termios.tcgetattr(self.fd)
        if not echo:
            new = termios.tcgetattr(self.fd)
            new[3] &= ~termios.ECHO
            termios.tcsetattr(self.fd, termios.TCSANOW, new)
        try:
            self.write(prompt)
            data = b""
            # Canonical mode hands over one line per read; a read of nothing is Ctrl-D.
            while not data.endswith(b"\n"):
                chunk = os.read(self.fd, 1024)
                if not chunk:
                    if data:
                        break
                    raise EOFError
                data += chunk
        finally:
            if not echo:
                termios.tcsetattr(self.fd, termios.TCSANOW, old)
                self.write("\n")
        return data.decode(errors="replace").rstrip("\r\n")


# --------------------------------------------------------------------------- the console


def _tool(name: str) -> list[str] | None:
    """A system tool, else busybox's applet of that name (the image has busybox only)."""
    found = shutil.which(name)
    if found:
        return [found]
    bb = shutil.which("busybox")
    return [bb, name] if bb else None


@dataclass
class Options:
    socket: Path
    data_dir: Path
    reboot_command: list[str]
    user: str | None = None
    idle_logout_s: float = IDLE_LOGOUT_S


class Console:
    """One login session on the console, from "login: " to logout."""

    def __init__(self, term: Terminal, opts: Options) -> None:
        self.term = term
        self.opts = opts
        self.creds = CredentialStore(opts.data_dir)
        self.user = ""
        self._links: list[str] = []
        self._links_at = -1e9

    # ---------------------------------------------------------------- helpers

    def say(self, text: str = "") -> None:
        self.term.write(text + "\n")

    def ask(self, method: str, **args: Any) -> dict[str, Any] | None:
        """A socketd command's result, or None after saying why there is none."""
        timeout = float(args.pop("timeout", 5.0))
        try:
            return request(self.opts.socket, method, timeout=timeout, **args)
        except ControlUnreachable as e:
            self.say(f"socketd is not running: {visible(e)}")
        except CommandFailed as e:
            self.say(f"error: {visible(e)}")
        except ControlError as e:
            self.say(f"error: {visible(e)}")
        return None

    def record(self, kind: str, text: str, data: dict[str, Any]) -> None:
        """An event in socketd's store, if there is one (the console works without it)."""
        from sdwan.common.store import DB_NAME, Store

        if not (self.opts.data_dir / DB_NAME).exists():
            return
        with contextlib.suppress(Exception), Store(self.opts.data_dir) as store:
            store.add_event(kind, text, data=data)

    def link_names(self) -> list[str]:
        # Completion asks often; socketd is asked at most every few seconds.
        now = time.monotonic()
        if now - self._links_at > 5:
            self._links_at = now
            try:
                result = request(self.opts.socket, "links", timeout=1.0)
                # Only names that can be typed: completion puts them into the line.
                names = [x.get("name") for x in result.get("links", [])]
                self._links = [n for n in names if isinstance(n, str) and _LINK_RE.fullmatch(n)]
            except ControlError:
                self._links = []
        return self._links

    def prompt(self) -> str:
        name = None
        with contextlib.suppress(ControlError):
            name = request(self.opts.socket, "status", timeout=2.0).get("name")
        if not isinstance(name, str) or not name.isprintable() or not name:
            name = socket.gethostname() or "socket"
        return f"{name}> "

    def confirm(self, question: str, accepted: Sequence[str]) -> bool:
        try:
            answer = self.term.read_line(question).strip()
        except (EOFError, KeyboardInterrupt):
            self.say()
            answer = ""
        if answer in accepted:
            return True
        self.say("cancelled")
        return False

    # ---------------------------------------------------------------- login

    def login(self) -> bool:
        """Ask for the login until it is right; False to end (Ctrl-D, too many failures)."""
        failures = 0
        user = self.opts.user
        while True:
            self.wait_out_delay()
            try:
                if user is None:
                    user = self.term.read_line("login: ").strip() or None
                    if user is None:
                        continue  # an empty line asks for the login again, as getty does
                password = self.term.read_line("Password: ", echo=False)
            except EOFError:
                return False
            except KeyboardInterrupt:
                self.say()
                user = None
                continue
            with uninterruptible():
                creds = self.check_login(user, password)
            if creds is None:
                return False
            if creds is not False:
                break
            failures += 1
            user = None
            if failures >= MAX_LOGIN_TRIES:
                self.say(f"{failures} failed logins; try again later")
                return False
        self.user = creds.user
        self.record("console.login", f"console: {creds.user} logged in", {"user": creds.user})
        if creds.must_change:
            return self.force_new_password(creds)
        return True

    def check_login(self, user: str, password: str) -> Credentials | bool | None:
        """One login attempt, run to its end (uninterruptible): the credential on success,
        False after a failure and its delay, None when no login is possible at all.

        The attempt is stored as a failure before the password is checked, and the count put
        back on success: whatever ends the console meanwhile (a hang-up, a kill), the attempt
        stays counted and the next console waits out its delay (`wait_out_delay`)."""
        try:
            creds = self.creds.load()
        except CredentialError as e:
            self.say(f"console: {e}")
            self.say("console: login impossible; a factory reset needs the image re-flashed")
            return None
        failed = creds.failed + 1
        # A data directory that cannot be written must not lock the engineer out: the delay
        # in this console still applies, only a new console would not know of it.
        with contextlib.suppress(CredentialError):
            self.creds.save(replace(creds, failed=failed, failed_at=time.time()))
        if creds.verify(user, password):
            if creds.failed:
                self.say(f"{creds.failed} failed login attempt(s) since the last successful login")
            creds = replace(creds, failed=0, failed_at=None)
            with contextlib.suppress(CredentialError):
                self.creds.save(creds)
            return creds
        shown = user if user.isprintable() and len(user) <= 32 else "?"
        self.record(
            "console.login_failed",
            f"console: failed login as {shown!r} ({failed} since the last login)",
            {"user": shown, "failed": failed},
        )
        time.sleep(fail_delay(failed))
        self.term.discard_typeahead()
        self.say("Login incorrect")
        return False

    def wait_out_delay(self) -> None:
        """Before a login prompt: the rest of a failure's delay that an earlier console did not
        live to wait (getty started this one after a hang-up or a kill)."""
        try:
            creds = self.creds.load()
        except CredentialError:
            return  # check_login says so
        left = delay_left(creds, time.time())
        if left <= 0:
            return
        self.say(f"{creds.failed} failed login(s) in a row: the next login in {math.ceil(left)} s")
        with uninterruptible():
            time.sleep(left)
            self.term.discard_typeahead()

    def force_new_password(self, creds: Credentials) -> bool:
        self.say("The default password must be changed before the first command.")
        self.say(f"Rules: at least {MIN_PASSWORD} characters, not the default password.")
        for _ in range(MAX_PASSWORD_TRIES):
            try:
                new = self.term.read_line("New password: ", echo=False)
                again = self.term.read_line("Retype new password: ", echo=False)
            except (EOFError, KeyboardInterrupt):
                self.say()
                return False
            try:
                check_new_password(new, again, creds)
            except ValueError as e:
                self.say(f"password not changed: {e}")
                continue
            try:
                self.creds.save(creds.with_password(new))
            except CredentialError as e:
                self.say(f"password not changed: {e}")
                return False
            self.say("Password changed.")
            self.record(
                "console.password_changed",
                f"console: password of {creds.user} changed",
                {"user": creds.user},
            )
            return True
        self.say("password not changed; logging out")
        return False

    # ---------------------------------------------------------------- commands

    def run_command(self, cmd: Command) -> bool:
        """Run one command; False ends the session."""
        handler = getattr(self, "cmd_" + cmd.name.replace("-", "_"))
        return handler(**cmd.args) is not False

    def cmd_exit(self) -> bool:
        return False

    def cmd_help(self, topic: str | None) -> None:
        if topic is not None:
            self.say(f"usage: {COMMANDS[topic].usage}")
            self.say(f"  {COMMANDS[topic].text}")
            return
        for name, h in COMMANDS.items():
            if name != "logout":
                self.say(f"  {h.usage}")
                self.say(f"      {h.text}")
        self.say("Tab completes commands and link names; Ctrl-C cancels a line; Ctrl-D logs out.")

    def cmd_show(self, topic: str, limit: int | None = None) -> None:
        if topic == "log":
            self._show_log(limit or EVENTS_DEFAULT)
            return
        args: dict[str, Any] = {"limit": limit} if topic == "events" else {}
        result = self.ask(topic, **args)
        if result is not None:
            FORMATTERS[topic](result, self.term.out)
            self.term.out.flush()
        if topic == "peers" and result is not None:
            # A field engineer asking for the peers wants the mesh paths with them.
            mesh = self.ask("mesh")
            if mesh is not None and mesh.get("enabled"):
                self.term.out.write("\nmesh paths:\n")
                FORMATTERS["mesh"](mesh, self.term.out)
                self.term.out.flush()

    def _show_log(self, lines: int) -> None:
        """The tail of the RAM log ring: socketd's and the system's messages since boot."""
        try:
            cp = subprocess.run(
                LOG_COMMAND, capture_output=True, text=True, errors="replace", timeout=10
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            why = getattr(e, "strerror", None) or e
            self.say(f"no log ring on this system ({LOG_COMMAND[0]}: {why})")
            return
        if cp.returncode != 0:
            why = (cp.stderr.strip().splitlines() or [f"exit status {cp.returncode}"])[-1]
            self.say(f"no log ring on this system ({LOG_COMMAND[0]}: {why})")
            return
        for line in cp.stdout.splitlines()[-lines:]:
            self.say(visible(line))  # log lines carry text from the network

    def _device_of(self, link: str | None) -> tuple[bool, str | None]:
        if link is None:
            return True, None
        result = self.ask("links")
        if result is None:
            self.say(f"(via {link} needs socketd to find the link's device)")
            return False, None
        for entry in result.get("links", []):
            if entry.get("name") == link:
                return True, str(entry.get("interface"))
        names = ", ".join(visible(e.get("name")) for e in result.get("links", [])) or "none"
        self.say(f"error: no link {link!r} (links: {names})")
        return False, None

    def _run_tool(self, argv: list[str]) -> None:
        self.term.out.flush()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        except OSError as e:
            self.say(f"error: cannot run {argv[0]}: {e.strerror or e}")
            return
        try:
            proc.wait()
        except KeyboardInterrupt:
            # The tool got the same Ctrl-C from the terminal; let it print its summary.
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self.say()

    def cmd_ping(self, host: str, link: str | None, count: int) -> None:
        ok, dev = self._device_of(link)
        tool = _tool("ping")
        if not ok:
            return
        if tool is None:
            self.say("error: no ping on this system")
            return
        self._run_tool([*tool, "-c", str(count), "-W", "2", *(["-I", dev] if dev else []), host])

    def cmd_traceroute(self, host: str, link: str | None) -> None:
        ok, dev = self._device_of(link)
        tool = _tool("traceroute")
        if not ok:
            return
        if tool is None:
            self.say("error: no traceroute on this system")
            return
        argv = [*tool, "-n", "-w", "2", "-q", "1", "-m", "20"]
        self._run_tool([*argv, *(["-i", dev] if dev else []), host])

    def cmd_set_link(self, link: str, mode: str, **values: str) -> None:
        what = f"static {values['address']} via {values['gateway']}" if mode == "static" else mode
        self.say(f"applying {what} to {link} ...")
        result = self.ask(
            "set-link",
            timeout=45.0,
            link=link,
            mode=mode,
            origin=f"the console ({self.user})",
            **values,
        )
        if result is not None:
            format_set_link(result, self.term.out)
            self.term.out.flush()
            if mode == "dhcp":
                self.say("the lease is applied when a DHCP server answers: see show links")

    def cmd_update(self, bundle: str) -> bool:
        """An A/B update from a file on the box; socketd installs it, the console follows it.
        The new slot starts only after a reboot the engineer confirms."""
        self.say(f"checking {bundle} ...")
        try:
            st = follow_update(self.opts.socket, bundle, False, self.term.out,
                               origin=f"the console ({self.user})")
        except ControlUnreachable as e:
            self.say(f"socketd is not running: {visible(e)}")
            return True
        except ControlError as e:
            self.say(f"error: {visible(e)}")
            return True
        except KeyboardInterrupt:
            self.say("\nthe install goes on in socketd: show slots tells how it ends")
            return True
        if st.get("state") != "installed":
            self.say(f"error: update failed: {visible(st.get('error') or st.get('state'))}")
            return True
        self.say(f"installed {visible(st.get('version'))} into {visible(st.get('slot'))}:"
                 " it starts at the next reboot")
        if not self.confirm("Reboot now into it? Type yes to confirm: ", ("yes",)):
            self.say("not rebooting: reboot starts it later")
            return True
        # Another install may have begun while the question waited for its answer.
        if self.refuse_reboot_while_installing():
            return True
        self.record("console.reboot", f"console: reboot by {self.user} after an update",
                    {"user": self.user})
        return not self.reboot()

    def installing(self) -> str | None:
        """An update socketd is checking or installing now, which a reboot would cut off (the
        console runs its reboot command itself, so it asks first); None when there is none, or
        no socketd to ask (its rauc service stopped with it)."""
        try:
            st = request(self.opts.socket, "update-status", timeout=5.0)
        except ControlError:
            return None
        if st.get("state") not in ("checking", "installing"):
            return None
        percent = st.get("percent") if isinstance(st.get("percent"), int) else 0
        return f"an update is being installed ({visible(st.get('bundle'))}, {percent}%)"

    def refuse_reboot_while_installing(self) -> bool:
        busy = self.installing()
        if busy is not None:
            self.say(f"error: not rebooting: {busy}; show slots tells how it ends")
        return busy is not None

    def cmd_reboot(self) -> bool:
        if self.refuse_reboot_while_installing():
            return True
        if not self.confirm("Reboot now? Type yes to confirm: ", ("yes",)):
            return True
        self.record("console.reboot", f"console: reboot by {self.user}", {"user": self.user})
        return not self.reboot()

    def reboot(self) -> bool:
        """Run the reboot command; True if it ran (the session ends)."""
        self.say("rebooting ...")
        why = bootenv.settle_for_reboot()
        if why is not None:
            self.say(f"warning: {why}")
        try:
            cp = subprocess.run(self.opts.reboot_command, stdin=subprocess.DEVNULL, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            self.say(f"error: reboot command {self.opts.reboot_command[0]!r} failed: {e}")
            return False
        if cp.returncode != 0:
            self.say(f"error: reboot command exited with status {cp.returncode}")
            return False
        return True

    def cmd_factory_reset(self) -> bool:
        data = self.opts.data_dir
        real = data.resolve()
        if real == Path("/") or (real.exists() and not real.is_dir()):
            self.say(f"error: refusing to erase {data}: not a data directory")
            return True
        if self.refuse_reboot_while_installing():
            return True
        self.say(f"This erases everything in {data}: WAN settings, the console password (back")
        self.say("to the default), events and the stored cloud configuration; then it reboots.")
        trial = bootenv.on_trial()
        if trial is not None:
            self.say(f"warning: the running version (slot {trial}) is on trial, not committed:"
                     " without a configuration")
            self.say("socketd cannot commit it, and the box goes back to the previous version"
                     " after its")
            self.say("boot tries. Wait for the commit (show slots) to keep this version.")
        question = "Type factory-reset (or yes) to confirm: "
        if not self.confirm(question, CONFIRM_RESET):
            return True
        removed, failed = 0, 0
        entries = sorted(real.iterdir()) if real.is_dir() else []
        self.say(f"erasing {len(entries)} entries in {data} ...")
        for entry in entries:
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed += 1
            except OSError as e:
                failed += 1
                self.say(f"error: cannot remove {entry}: {e.strerror or e}")
        os.sync()
        not_removed = f", {failed} could not be removed" if failed else ""
        self.say(f"erased {removed} entries{not_removed}")
        return not self.reboot()

    # ---------------------------------------------------------------- the session

    def run(self) -> int:
        try:
            return self._run()
        except IdleTimeout:
            self.say(f"\nidle for {self.opts.idle_logout_s:g} s: logged out")
            return 0

    def _run(self) -> int:
        if not self.login():
            return 0
        self.term.setup_completion(lambda line: completions(line, self.link_names()))
        prompt = self.prompt()
        self.say("Type help for the commands.")
        while True:
            try:
                line = self.term.read_command(prompt)
            except KeyboardInterrupt:
                self.say("^C" if not self.term.tty else "")
                continue
            except EOFError:
                self.say("logout")
                return 0
            try:
                cmd = parse(line)
            except UsageError as e:
                self.say(f"error: {e.message}")
                if e.usage:
                    self.say(f"usage: {e.usage}")
                continue
            if cmd is None:
                continue
            try:
                if not self.run_command(cmd):
                    return 0
            except KeyboardInterrupt:
                self.say("\ninterrupted")
            except IdleTimeout:
                raise
            except Exception as e:  # the console must outlive any bug of one command
                self.say(f"error: {cmd.name} failed: {type(e).__name__}: {e}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="socket-console",
        description="The field engineer's shell on the serial console (login, then commands).",
    )
    parser.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG_PATH),
        metavar="PATH",
        help="socketd's config, where the defaults of --socket and --data are read from"
        f" ([paths]; default {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "--socket",
        default=None,
        metavar="PATH",
        help=f"socketd's control socket (default paths.control_socket, {DEFAULT_CONTROL_SOCKET})",
    )
    parser.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="data directory: credential file, socketd's store (default paths.data_dir,"
        f" {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--reboot-command",
        default="reboot",
        metavar="CMD",
        help="command that reboots the box (default: reboot)",
    )
    parser.add_argument(
        "--idle-logout",
        type=float,
        default=IDLE_LOGOUT_S,
        metavar="S",
        help=f"log out after S seconds without input, 0 never (default {IDLE_LOGOUT_S})",
    )
    # getty runs its login program as `login -- [USER]`.
    parser.add_argument("user", nargs="?", help=argparse.SUPPRESS)
    return parser


def config_paths(path: str) -> tuple[Path, Path]:
    """(control socket, data directory) from socketd's config [paths], else the defaults.

    getty starts the console without arguments, so it finds socketd the way socketd does.
    Only [paths] is read: the console must start even when the rest of the file is wrong."""
    from sdwan.common.tomlcheck import read_toml

    sock, data = DEFAULT_CONTROL_SOCKET, DEFAULT_DATA_DIR
    try:
        source, _text, doc = read_toml(path)
    except ConfigError:
        return sock, data
    paths = doc.get("paths")
    if isinstance(paths, dict):
        for key, value in paths.items():
            if isinstance(value, str) and value and "\0" not in value:
                resolved = Path(os.path.normpath(source.parent / value))
                if key == "control_socket":
                    sock = resolved
                elif key == "data_dir":
                    data = resolved
    return sock, data


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sock, data = config_paths(args.config)
    try:
        reboot = shlex.split(args.reboot_command)
    except ValueError as e:
        print(f"socket-console: --reboot-command: {e}", file=sys.stderr)
        return 2
    if not reboot:
        print("socket-console: --reboot-command is empty", file=sys.stderr)
        return 2
    if args.idle_logout < 0:
        print("socket-console: --idle-logout must be 0 (never) or more seconds", file=sys.stderr)
        return 2
    opts = Options(
        Path(args.socket) if args.socket else sock,
        Path(args.data) if args.data else data,
        reboot,
        args.user or None,
        args.idle_logout,
    )
    console = Console(Terminal(sys.stdin, sys.stdout, args.idle_logout), opts)
    try:
        return console.run()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
