"""GRUB's boot selection, kept in grubenv on the ESP (docs/update.md, "Boot selection").

This module owns that file on the running box. RAUC reaches it as its custom bootloader
backend (`bootloader=custom` in system.conf runs `bootenv get-primary`, `set-primary X`,
`get-state X`, `set-state X good|bad`); rcS repairs it at every boot (`bootenv repair`); the
commit deadline asks whether the booted slot is committed (`bootenv is-committed X`); the
updater reads it (`load`) and, with init's commit deadline, tells it when the booted
slot stayed up (`bootenv settle X`). GRUB itself reads it and writes two counters
(board/boardlib.py grub_cfg).

The variables, per slot X (RAUC's bootname, A or B) and ORDER, the order GRUB tries them in:

  X_OK=1         the slot may be booted (RAUC's grub backend's meaning)
  X_TRY=n        boots of the slot not yet committed; GRUB passes it over at the board's
                 boot_tries
  X_COMMITTED=1  socketd found itself healthy on the slot once (`rauc status mark-good`):
                 GRUB boots it without counting, so power cuts or watchdog resets of a
                 committed slot never send the box back to an older version. Cleared when
                 RAUC marks the slot bad, which it does before writing it.
  X_LOADFAIL=1   GRUB could not load the slot's kernel or initramfs (twice) and went on to
                 the next slot; cleared by any mark of the slot.
  X_LOOPS=n      boots of the committed slot in a row that have not stayed up yet: GRUB
                 counts each one, `settle` clears it once socketd is healthy or the box has
                 been up for the commit deadline. At BOOT_LOOPS GRUB passes the slot over (a
                 reboot loop: a crash or hang the watchdog resets, a kernel that panics)
                 while another slot can be booted; with none, every count starts again.
  BOOT_TRIES=n   the tries grub.cfg gives a slot on trial, written by the image build: a
                 bundle never changes the ESP, so this is GRUB's number, not the running
                 slot's board.toml.
  BOOT_LOOPS=n   likewise, the boots in a row a committed slot may end before it stays up.
                 An ESP made before GRUB counted them has a grub.cfg that counts nothing,
                 so nothing is passed over (this module still writes X_LOOPS=0 there).
  SDWAN_END=1    always the last variable: a block without it was torn, and is not used.

Why not grub-editenv, which RAUC's grub backend runs: it truncates the file and writes it
again, so the FAT and the directory holding GRUB's own loader change at every mark, and a
power cut in between can leave the firmware without a loader or GRUB without grubenv. Here
the 1024-byte block is always rewritten in place (as GRUB's save_env does), so the file never
moves, and there are two copies, `grubenv` and `grubenv2`, written one after the other, each
synced: a torn write leaves the other one whole, and GRUB and this module read the copy when
the first is not a valid block."""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import hashlib
import mmap
import os
import re
import struct
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_GRUBENV = Path("/boot/efi/EFI/BOOT/grubenv")
DEFAULT_SYSTEM_CONF = Path("/etc/rauc/system.conf")
DEFAULT_BOARD = Path("/etc/sdwan/board.toml")
DEFAULT_LOCK = Path("/run/sdwan-bootenv.lock")
LOCK_WAIT_S = 30.0  # a holder stuck longer (its I/O hung) is reported, not waited for
COPY_SUFFIX = "2"  # grubenv -> grubenv2, beside it
SIZE = 1024
HEADER = b"# GRUB Environment Block\n"
END = "SDWAN_END"  # boardlib.GRUBENV_END
DEFAULT_MAX_TRIES = 3
DEFAULT_MAX_LOOPS = 10  # boardlib.DEFAULT_BOOT_LOOPS
SLOT_VARS = ("OK", "TRY", "COMMITTED", "LOADFAIL", "LOOPS")
_BOOTNAME = re.compile(r"^[A-Za-z0-9_]{1,16}$")
_VALUE = re.compile(r"^[ -~]*$")  # printable ASCII: GRUB escapes nothing we write


class BootEnvError(Exception):
    """grubenv cannot be read or written, or a request is wrong; the message says which."""


@dataclass(frozen=True)
class Paths:
    grubenv: Path = DEFAULT_GRUBENV
    system_conf: Path = DEFAULT_SYSTEM_CONF
    board: Path = DEFAULT_BOARD

    @property
    def copy(self) -> Path:
        return self.grubenv.with_name(self.grubenv.name + COPY_SUFFIX)

    @property
    def lock(self) -> Path:
        """Held while the block is read and written back: RAUC's marks, socketd's and
        init's settle and rcS's repair are separate processes. Never beside grubenv (the
        ESP is mounted read-only); one per grubenv however its path is spelt."""
        if self.grubenv == DEFAULT_GRUBENV:
            return DEFAULT_LOCK
        key = hashlib.sha256(str(self.grubenv.resolve()).encode()).hexdigest()[:16]
        folder = DEFAULT_LOCK.parent
        if not os.access(folder, os.W_OK):  # a lab run by a user
            folder = Path(tempfile.gettempdir())
        return folder / f"sdwan-bootenv-{key}.lock"

    @classmethod
    def from_environ(cls) -> Paths:
        """The box's paths; a lab or test points them elsewhere with SDWAN_GRUBENV,
        SDWAN_RAUC_CONF and SDWAN_BOARD (RAUC passes its environment on to the backend)."""
        env = os.environ
        return cls(Path(env.get("SDWAN_GRUBENV", DEFAULT_GRUBENV)),
                   Path(env.get("SDWAN_RAUC_CONF", DEFAULT_SYSTEM_CONF)),
                   Path(env.get("SDWAN_BOARD", DEFAULT_BOARD)))


def render(values: dict[str, str]) -> bytes:
    """A GRUB environment block of values, the end marker last, padded with '#' to SIZE
    bytes."""
    values = {**{k: v for k, v in values.items() if k != END}, END: "1"}
    for k, v in values.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", k):
            raise BootEnvError(f"not a grubenv variable name: {k!r}")
        if not _VALUE.match(v) or "\\" in v:
            raise BootEnvError(f"{k}: not a value grubenv can hold as is: {v!r}")
    data = HEADER + "".join(f"{k}={v}\n" for k, v in values.items()).encode()
    if len(data) > SIZE:
        raise BootEnvError(f"{len(data)} bytes of variables do not fit a {SIZE}-byte grubenv")
    return data + b"#" * (SIZE - len(data))


def parse(data: bytes) -> dict[str, str]:
    """The variables of a block; BootEnvError unless it is exactly a valid block."""
    if len(data) != SIZE:
        raise BootEnvError(f"{len(data)} bytes, not {SIZE}")
    if not data.startswith(HEADER):
        raise BootEnvError("no GRUB environment block header")
    values: dict[str, str] = {}
    body = data[len(HEADER):]
    end = len(body.rstrip(b"#"))
    if end and body[end - 1:end] != b"\n":
        raise BootEnvError("the padding does not follow a whole line (damaged)")
    for raw in body[:end].split(b"\n"):
        if not raw:
            continue
        key, sep, value = raw.partition(b"=")
        try:
            k, v = key.decode("ascii"), value.decode("ascii")
        except UnicodeDecodeError:
            raise BootEnvError("a variable that is not ASCII (damaged)") from None
        if not sep or not re.fullmatch(r"[A-Za-z0-9_]+", k):
            raise BootEnvError(f"a line that is no variable: {raw[:40]!r} (damaged)")
        values[k] = v
    if values.get(END) != "1":
        raise BootEnvError(f"no {END}=1 after the variables (torn)")
    return values


def _read_one(path: Path) -> dict[str, str]:
    try:
        data = _raw(path).read() if _on_read_only_fs(path) else _read_file(path)
    except OSError as e:
        raise BootEnvError(f"{path}: {e.strerror or e}") from None
    try:
        return parse(data)
    except BootEnvError as e:
        raise BootEnvError(f"{path}: {e}") from None


def _read_file(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(SIZE + 1)


# ------------------------------------------------------------------ the file's own sectors

FIBMAP = 1  # linux/fs.h: a file's block -> the file system's block
FIGETBSZ = 2


def _on_read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path.parent).f_flag & os.ST_RDONLY)
    except OSError:
        return False


@dataclass(frozen=True)
class _Raw:
    """A file of a read-only mounted file system, reached through its device: the box's ESP
    is mounted read-only, since writing a file through vfat also rewrites its directory
    entry (the modification time, in the sector that holds GRUB's own entry) and marks the
    volume dirty in its boot sector. Writing the file's own sectors on the device, as GRUB's
    save_env does, changes nothing else. Reads go to the device too: the mount's cache of
    the file is stale once the device was written."""

    device: str
    offsets: tuple[int, ...]  # byte offsets on the device of the file's blocks, in order
    block: int

    def _io(self, write: bytes | None) -> bytes:
        n = len(self.offsets)
        buf = mmap.mmap(-1, max(n * self.block, mmap.PAGESIZE))  # page-aligned: O_DIRECT
        mode = os.O_RDWR if write is not None else os.O_RDONLY
        fd = os.open(self.device, mode | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
        try:
            view = memoryview(buf)
            for i, off in enumerate(self.offsets):
                if os.preadv(fd, [view[i * self.block:(i + 1) * self.block]], off) != self.block:
                    raise OSError(f"short read from {self.device}")
            if write is None:
                return bytes(view[:SIZE])
            # the blocks' bytes past the file's SIZE (cluster slack) are written back as read
            view[:SIZE] = write
            for i, off in enumerate(self.offsets):
                if os.pwritev(fd, [view[i * self.block:(i + 1) * self.block]], off) != self.block:
                    raise OSError(f"short write to {self.device}")
            os.fsync(fd)  # O_DIRECT skips the page cache, not the disk's own cache
            return b""
        finally:
            os.close(fd)
            view.release()
            buf.close()

    def read(self) -> bytes:
        return self._io(None)

    def write(self, block: bytes) -> None:
        self._io(block)


def _raw(path: Path) -> _Raw:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if st.st_size != SIZE:
            raise OSError(f"{st.st_size} bytes, not {SIZE}: not rewritten in place")
        bsz = struct.unpack("i", fcntl.ioctl(fd, FIGETBSZ, struct.pack("i", 0)))[0]
        if bsz <= 0 or bsz % 512:
            raise OSError(f"block size {bsz}")
        blocks = [struct.unpack("i", fcntl.ioctl(fd, FIBMAP, struct.pack("i", i)))[0]
                  for i in range((SIZE + bsz - 1) // bsz)]
    finally:
        os.close(fd)
    if not all(b > 0 for b in blocks):
        raise OSError("the file has a block without a place on the disk")
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    try:
        uevent = Path(f"/sys/dev/block/{major}:{minor}/uevent").read_text()
    except OSError as e:
        raise OSError(f"no block device {major}:{minor}: {e.strerror or e}") from None
    name = next((ln.split("=", 1)[1] for ln in uevent.splitlines()
                 if ln.startswith("DEVNAME=")), None)
    if not name:
        raise OSError(f"no device name for {major}:{minor}")
    return _Raw(f"/dev/{name}", tuple(b * bsz for b in blocks), bsz)


@dataclass(frozen=True)
class Loaded:
    values: dict[str, str]
    source: Path  # the copy the values came from
    problems: tuple[str, ...]  # a copy that is not a valid block, and why


def load(paths: Paths) -> Loaded:
    """The first valid copy, as GRUB reads them; BootEnvError when neither is."""
    problems: list[str] = []
    for path in (paths.grubenv, paths.copy):
        try:
            return Loaded(_read_one(path), path, tuple(problems))
        except BootEnvError as e:
            problems.append(str(e))
    raise BootEnvError("no valid grubenv: " + "; ".join(problems))


def _write_in_place(path: Path, block: bytes) -> None:
    """The block over the file's first SIZE bytes, never truncating it: a file of SIZE bytes
    keeps its clusters. On a read-only mount (the box's ESP) through the device, into the
    file's own sectors (_Raw); elsewhere (a lab, the tests) through the file, where a missing
    or wrongly sized file is written whole."""
    if _on_read_only_fs(path):
        _raw(path).write(block)
        return
    flags = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        size = -1
    if size != SIZE:
        flags |= os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600)
    try:
        if os.pwrite(fd, block, 0) != SIZE:
            raise OSError(f"short write to {path}")
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(paths: Paths) -> Iterator[None]:
    """Every read-modify-write of the block under one lock: without it a settle racing
    RAUC's mark of the slot it is about to write could write the slot's old OK back."""
    try:
        fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as e:
        raise BootEnvError(f"{paths.lock}: {e.strerror or e}") from None
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BootEnvError(f"grubenv is being changed by another process: its lock"
                                       f" {paths.lock} was held for {LOCK_WAIT_S:g} s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def save(paths: Paths, values: dict[str, str]) -> None:
    """values into both copies, the first one first, each synced before the next."""
    block = render(values)
    for path in (paths.grubenv, paths.copy):
        try:
            _write_in_place(path, block)
        except OSError as e:
            raise BootEnvError(f"{path}: {e.strerror or e}") from None


# ------------------------------------------------------------------ what the variables mean


def bootnames(paths: Paths) -> list[str]:
    """The slots' bootnames, in system.conf's order (A, B)."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(paths.system_conf.read_text(), source=str(paths.system_conf))
    except (OSError, configparser.Error) as e:
        raise BootEnvError(f"{paths.system_conf}: {e}") from None
    names = [parser[s]["bootname"] for s in parser.sections()
             if s.startswith("slot.") and parser[s].get("bootname")]
    bad = [n for n in names if not _BOOTNAME.match(n)]
    if bad or not names:
        raise BootEnvError(f"{paths.system_conf}: no usable bootnames ({names})")
    return names


def _grub_number(paths: Paths, values: dict[str, str] | None, var: str, key: str,
                 low: int, high: int, default: int) -> int:
    """One of GRUB's built-in counts: `var` of grubenv (what grub.cfg was built with: a
    bundle never changes the ESP), else [update] `key` of the board, else the default."""
    raw = (values or {}).get(var, "")
    if raw.isdigit() and low <= int(raw) <= high:
        return int(raw)
    try:
        found = tomllib.loads(paths.board.read_text()).get("update", {}).get(key)
    except (OSError, tomllib.TOMLDecodeError):
        return default
    return found if isinstance(found, int) and low <= found <= high else default


def max_tries(paths: Paths, values: dict[str, str] | None = None) -> int:
    """The boots GRUB gives a slot not yet committed (BOOT_TRIES, boot_tries)."""
    return _grub_number(paths, values, "BOOT_TRIES", "boot_tries", 1, 9, DEFAULT_MAX_TRIES)


def max_loops(paths: Paths, values: dict[str, str] | None = None) -> int:
    """The boots in a row GRUB lets a committed slot end before it stays up (BOOT_LOOPS,
    boot_loops; the board allows 2 to 20)."""
    return _grub_number(paths, values, "BOOT_LOOPS", "boot_loops", 2, 20, DEFAULT_MAX_LOOPS)


@dataclass(frozen=True)
class Limits:
    """What grub.cfg counts to: tries of a slot on trial, boots in a row of a committed one
    that did not stay up."""

    tries: int = DEFAULT_MAX_TRIES
    loops: int = DEFAULT_MAX_LOOPS

    @classmethod
    def of(cls, paths: Paths, values: dict[str, str]) -> Limits:
        return cls(max_tries(paths, values), max_loops(paths, values))


def _flag(values: dict[str, str], key: str) -> bool:
    return values.get(key, "").strip() == "1"


def tries(values: dict[str, str], name: str) -> int:
    raw = values.get(f"{name}_TRY", "").strip()
    return int(raw) if raw.isdigit() else 0


def loops(values: dict[str, str], name: str) -> int:
    raw = values.get(f"{name}_LOOPS", "").strip()
    return int(raw) if raw.isdigit() else 0


def committed(values: dict[str, str], name: str) -> bool:
    return _flag(values, f"{name}_OK") and _flag(values, f"{name}_COMMITTED")


def looping(values: dict[str, str], name: str, limits: Limits) -> bool:
    """Committed, but its last limits.loops boots all ended before it stayed up."""
    return committed(values, name) and loops(values, name) >= limits.loops


def load_failed(values: dict[str, str], name: str) -> bool:
    return _flag(values, f"{name}_LOADFAIL")


def good(values: dict[str, str], name: str, limits: Limits, booted: str | None = None) -> bool:
    """RAUC's boot status: a committed slot not in a reboot loop, or one given to GRUB and
    not tried yet (an install waiting for its reboot; never the booted slot, which GRUB has
    tried). A slot booted and not committed is 'bad' until socketd marks it good; so is one
    GRUB could not load, or passes over for its loop."""
    if load_failed(values, name):
        return False
    if committed(values, name):
        # the booted slot is up on its last boot before GRUB passes it over
        return name == booted or not looping(values, name, limits)
    return name != booted and _flag(values, f"{name}_OK") and tries(values, name) == 0


def bootable(values: dict[str, str], name: str, limits: Limits) -> bool:
    """Whether GRUB would start it now (a slot it could not load is tried, but fails)."""
    if load_failed(values, name):
        return False
    if committed(values, name):
        return not looping(values, name, limits)
    return _flag(values, f"{name}_OK") and tries(values, name) < limits.tries


def order(values: dict[str, str], names: list[str]) -> list[str]:
    listed = [w for w in values.get("ORDER", "").split() if w in names]
    return list(dict.fromkeys(listed)) + [n for n in names if n not in listed]


def primary(values: dict[str, str], names: list[str], limits: Limits) -> str | None:
    """The slot GRUB starts at the next boot."""
    return next((n for n in order(values, names) if bootable(values, n, limits)), None)


def set_state(values: dict[str, str], name: str, is_good: bool) -> dict[str, str]:
    out = dict(values)
    out[f"{name}_OK"] = "1" if is_good else "0"
    out[f"{name}_TRY"] = "0"
    out[f"{name}_COMMITTED"] = "1" if is_good else "0"
    out[f"{name}_LOADFAIL"] = "0"
    out[f"{name}_LOOPS"] = "0"
    return out


def set_primary(values: dict[str, str], name: str, names: list[str]) -> dict[str, str]:
    """name first, the others after in their order; name may be booted, untried. Its
    committed mark stays as it is: a slot RAUC just wrote was marked bad before."""
    out = dict(values)
    out["ORDER"] = " ".join([name] + [n for n in order(values, names) if n != name])
    out[f"{name}_OK"] = "1"
    out[f"{name}_TRY"] = "0"
    out[f"{name}_LOADFAIL"] = "0"
    out[f"{name}_LOOPS"] = "0"
    return out


def settle(paths: Paths, name: str) -> int:
    """The booted slot stayed up: its count of boots in a row that did not is cleared.
    Returns the count it had; nothing is written when it was 0."""
    names = bootnames(paths)
    _slot_arg([name], names)
    with locked(paths):
        values = load(paths).values
        had = loops(values, name)
        if had:
            save(paths, canonical({**values, f"{name}_LOOPS": "0"}, names))
    return had


def on_trial(paths: Paths | None = None,
             cmdline: Path = Path("/proc/cmdline")) -> str | None:
    """The booted slot when it is not committed yet (None off a box, or when grubenv cannot
    tell): what the console warns of before a factory reset, which erases the configuration
    socketd needs to commit it."""
    name = booted_slot(cmdline)
    if name is None:
        return None
    try:
        values = load(paths or Paths.from_environ()).values
    except (BootEnvError, OSError):
        return None
    return None if committed(values, name) else name


def settle_for_reboot(paths: Paths | None = None, name: str | None = None) -> str | None:
    """A reboot asked for on purpose (the console's, socketd's) is no boot that failed to
    stay up: the booted slot's count is cleared first, so an operator rebooting a box that
    never stays up long does not send it back to the other slot. Best effort: returns why
    it could not, or None (also off a box, where no slot is booted)."""
    name = name or booted_slot()
    if name is None:
        return None
    try:
        settle(paths or Paths.from_environ(), name)
    except (BootEnvError, OSError) as e:
        return f"the boot count of slot {name} was not cleared before the reboot: {e}"
    return None


def canonical(values: dict[str, str], names: list[str]) -> dict[str, str]:
    """ORDER first, then each slot's variables, then anything else as it was, the end
    marker last: the block always lists the same variables in the same order."""
    out = {"ORDER": " ".join(order(values, names))}
    for n in names:
        for k in SLOT_VARS:
            out[f"{n}_{k}"] = values.get(f"{n}_{k}", "0")
    out.update({k: v for k, v in values.items() if k not in out and k != END})
    out[END] = "1"
    return out


def booted_slot(cmdline: Path = Path("/proc/cmdline")) -> str | None:
    try:
        words = cmdline.read_text().split()
    except OSError:
        return None
    return next((w.split("=", 1)[1] for w in words if w.startswith("rauc.slot=")), None)


def repair(paths: Paths, booted: str | None) -> str | None:
    """At boot: both copies made valid and equal. A damaged copy is written from the other;
    with neither valid (GRUB booted by its defaults), the running slot is all there is to go
    by: it becomes the committed first slot and the others not bootable until an install,
    so the box neither loops nor falls back to a slot nobody vouched for. Returns what was
    done, or None when nothing was needed."""
    names = bootnames(paths)
    try:
        first = _read_one(paths.grubenv)
    except BootEnvError as e:
        first, why_first = None, str(e)
    try:
        second = _read_one(paths.copy)
    except BootEnvError as e:
        second, why_second = None, str(e)
    if first is not None:
        if first == second:
            return None
        save(paths, canonical(first, names))
        return (f"{paths.copy} rewritten from {paths.grubenv}"
                + ("" if second is not None else f" ({why_second})"))
    if second is not None:
        save(paths, canonical(second, names))
        return f"{paths.grubenv} rewritten from {paths.copy} ({why_first})"
    if booted not in names:
        raise BootEnvError(f"no valid grubenv ({why_first}; {why_second}) and the booted slot"
                           f" is unknown ({booted!r}): left as it is")
    values = {"ORDER": " ".join([booted] + [n for n in names if n != booted])}
    for n in names:
        values.update({f"{n}_OK": "1" if n == booted else "0", f"{n}_TRY": "0",
                       f"{n}_COMMITTED": "1" if n == booted else "0"})
    values["BOOT_TRIES"] = str(max_tries(paths))
    values["BOOT_LOOPS"] = str(max_loops(paths))
    save(paths, canonical(values, names))
    return (f"no valid grubenv ({why_first}; {why_second}): made anew with the booted slot"
            f" {booted} committed and first, the others not bootable")


# ------------------------------------------------------------------ the command line

USAGE = """usage: bootenv COMMAND
  get-primary              the slot GRUB starts next (RAUC's custom backend)
  set-primary SLOT         SLOT first in ORDER, bootable, untried
  get-state SLOT           good or bad
  set-state SLOT good|bad  good also commits it; bad also clears its commit
  is-committed SLOT        yes (exit 0), no (exit 1), or unknown: why (exit 2)
  settle SLOT              SLOT stayed up: its count of boots that did not is cleared
  list                     the variables of the valid copy
  repair                   at boot: both copies valid and equal
"""


def _slot_arg(args: list[str], names: list[str]) -> str:
    if not args:
        raise BootEnvError("a slot's bootname is missing")
    if args[0] not in names:
        raise BootEnvError(f"no slot {args[0]!r} (slots: {' '.join(names)})")
    return args[0]


def run(argv: list[str], paths: Paths) -> int:
    if not argv:
        sys.stderr.write(USAGE)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "repair":
        with locked(paths):
            done = repair(paths, booted_slot())
        if done:
            print(f"bootenv: {done}")
        return 0
    names = bootnames(paths)
    if cmd == "list":
        loaded = load(paths)
        for k, v in loaded.values.items():
            print(f"{k}={v}")
        return 0
    if cmd == "get-current":  # RAUC 1.9 and later ask; the kernel command line says
        current = booted_slot()
        if current is None:
            raise BootEnvError("no rauc.slot= on the kernel command line")
        print(current)
        return 0
    if cmd == "settle":
        name = _slot_arg(args, names)
        had = settle(paths, name)
        if had > 1:
            print(f"bootenv: slot {name} stayed up after {had - 1} boot{'s' if had > 2 else ''}"
                  " in a row that did not")
        return 0
    values = load(paths).values
    limits = Limits.of(paths, values)
    if cmd == "get-primary":
        found = primary(values, names, limits)
        if found is None:
            raise BootEnvError("no slot is bootable")
        print(found)
        return 0
    if cmd == "get-state":
        print("good" if good(values, _slot_arg(args, names), limits, booted_slot()) else "bad")
        return 0
    if cmd == "is-committed":
        yes = committed(values, _slot_arg(args, names))
        print("yes" if yes else "no")
        return 0 if yes else 1
    if cmd == "set-state":
        name = _slot_arg(args, names)
        if args[1:] not in (["good"], ["bad"]):
            raise BootEnvError("set-state SLOT good|bad")
        with locked(paths):
            values = load(paths).values  # what it is now, under the lock
            save(paths, canonical(set_state(values, name, args[1] == "good"), names))
        return 0
    if cmd == "set-primary":
        name = _slot_arg(args, names)
        with locked(paths):
            values = load(paths).values
            save(paths, canonical(set_primary(values, name, names), names))
        return 0
    sys.stderr.write(USAGE)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(argv, Paths.from_environ())
    except BootEnvError as e:
        if argv[:1] == ["is-committed"]:
            # the commit deadline tells this from a slot where bootenv cannot run at all
            print(f"unknown: {e}")
            return 2
        print(f"bootenv: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
