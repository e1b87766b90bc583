"""flash.sh against real loop devices: images written and verified (raw, compressed, with
a bmap), every refusal with its exit status and message, a corrupted read-back and a
failing write. Corruption and write errors come from the kernel: the loop device sits on
a file of a small FUSE filesystem that flips a byte on read or fails every write."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FLASH = REPO / "flash.sh"
MiB = 1024 * 1024
EXIT_OK, EXIT_REFUSED, EXIT_WRITE, EXIT_VERIFY = 0, 1, 2, 3
# The FUSE server runs under the system Python, which has python3-fusepy from Debian.
SYSTEM_PYTHON = "/usr/bin/python3"
_TOOLS = ("losetup", "sfdisk", "partx", "mkfs.ext4", "e2fsck", "mkswap", "swapon", "swapoff",
          "mount", "umount", "blkid", "bmaptool", "xz", "gzip", "zstd", "shellcheck")

# Loop devices are the machine's, not the test's: with two pytest workers these tests would
# attach and detach them under each other, so they all run on one worker, in turn.
pytestmark = [
    pytest.mark.system,
    pytest.mark.timeout(120),
    pytest.mark.xdist_group("loop-devices"),
]


@pytest.fixture(autouse=True)
def _root_and_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("flash.sh tests need root (loop devices, mount)")
    missing = [t for t in _TOOLS if shutil.which(t) is None]
    if missing:
        # Skipping would hide a broken CI setup: scripts/setup.sh installs these.
        pytest.fail(f"tools not installed: {', '.join(missing)}", pytrace=False)


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60, **kw)


def flash(*args: str, answer: str | None = None) -> subprocess.CompletedProcess[str]:
    """Runs flash.sh; `answer` is what the operator types when asked for the device name."""
    return subprocess.run([str(FLASH), *args], input=answer, capture_output=True, text=True,
                          timeout=90, check=False)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Loop:
    device: str
    backing: Path

    def content(self) -> bytes:
        # The loop driver writes through the backing file's page cache, so the file shows
        # exactly what the device holds.
        return self.backing.read_bytes()

    def partition(self, n: int) -> str:
        return f"{self.device}p{n}"


@pytest.fixture
def make_loop(tmp_path: Path) -> Iterator[Callable[..., Loop]]:
    """Attaches loop devices on files filled with random bytes (old data the image must
    replace); detaches them, and unmounts or swaps off what they hold, even on failure."""
    loops: list[Loop] = []

    def attach(size: int = 16 * MiB, *, backing: Path | None = None, partscan: bool = False,
               read_only: bool = False, fill: bool = True) -> Loop:
        if backing is None:
            backing = tmp_path / f"disk{len(loops)}.img"
            backing.write_bytes(os.urandom(size) if fill else b"")
            if not fill:
                os.truncate(backing, size)
        args = ["losetup", "--find", "--show"]
        args += ["--partscan"] if partscan else []
        args += ["--read-only"] if read_only else []
        loop = Loop(run([*args, str(backing)]).stdout.strip(), backing)
        loops.append(loop)
        return loop

    try:
        yield attach
    finally:
        for loop in reversed(loops):
            release(loop.device)


def release(device: str) -> None:
    names = subprocess.run(["lsblk", "-nrpo", "NAME", device], capture_output=True, text=True,
                           check=False).stdout.split()
    for name in reversed(names):
        subprocess.run(["swapoff", name], capture_output=True, check=False)
        subprocess.run(["umount", "-A", name], capture_output=True, check=False)
    subprocess.run(["losetup", "-d", device], capture_output=True, check=False)


@contextlib.contextmanager
def mounted(device: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="flash-mnt-") as mnt:
        run(["mount", device, mnt])
        try:
            yield Path(mnt)
        finally:
            subprocess.run(["umount", mnt], capture_output=True, check=False)


def partition(loop: Loop) -> None:
    """Two partitions, p1 (8 MiB) and p2 (the rest). Kernels built without partition
    table parsers leave them to partx, which adds them through the BLKPG ioctl."""
    run(["sfdisk", "-q", "--wipe", "always", loop.device], input="label: gpt\n,8M,L\n,,S\n")
    if not Path(loop.partition(1)).exists():
        run(["partx", "-a", loop.device])
    for _ in range(50):
        if Path(loop.partition(2)).is_block_device():
            return
        time.sleep(0.1)
    raise AssertionError(f"partitions of {loop.device} did not appear")


def image(tmp_path: Path, size: int, name: str = "firmware.img") -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(data)
    return path, data


# --- writing and verifying -------------------------------------------------------------


def test_flash_sh_is_shellcheck_clean() -> None:
    result = subprocess.run(["shellcheck", str(FLASH)], capture_output=True, text=True,
                            check=False, timeout=60)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("size", [6 * MiB, 5_000_123], ids=["whole-sectors", "odd-size"])
def test_writes_and_verifies_a_raw_image(tmp_path: Path, make_loop: Callable[..., Loop],
                                         size: int) -> None:
    loop = make_loop()
    old = loop.content()
    path, data = image(tmp_path, size)
    result = flash("--yes", str(path), loop.device)
    assert result.returncode == EXIT_OK, result.stderr
    assert f"verified: sha256 {sha(data)}" in result.stderr
    assert "synchronous direct writes" in result.stderr
    after = loop.content()
    assert after[:size] == data
    # Nothing past the image is touched, not even the rest of its last sector.
    assert after[size:] == old[size:]


def test_operator_types_the_device_name_back(tmp_path: Path,
                                             make_loop: Callable[..., Loop]) -> None:
    loop = make_loop()
    path, data = image(tmp_path, 3 * MiB)
    result = flash(str(path), loop.device, answer=f"{loop.device}\n")
    assert result.returncode == EXIT_OK, result.stderr
    assert f"type the device name ({loop.device})" in result.stderr
    assert f"target {loop.device}: loop device backed by {loop.backing}" in result.stderr
    assert loop.content()[: len(data)] == data


@pytest.mark.parametrize("tool,suffix", [("xz", ".xz"), ("gzip", ".gz"), ("zstd", ".zst")])
def test_writes_a_compressed_image(tmp_path: Path, make_loop: Callable[..., Loop], tool: str,
                                   suffix: str) -> None:
    loop = make_loop()
    # Half random, half zeros: compressible, and still a real check of every byte.
    data = os.urandom(2 * MiB) + bytes(2 * MiB + 777)
    raw = tmp_path / "firmware.img"
    raw.write_bytes(data)
    run([tool, "-q", "-k", str(raw)])
    raw.unlink()
    compressed = raw.with_name(raw.name + suffix)
    result = flash("--yes", str(compressed), loop.device)
    assert result.returncode == EXIT_OK, result.stderr
    assert f"{tool}-compressed" in result.stderr
    assert f"verified: sha256 {sha(data)}" in result.stderr
    assert loop.content()[: len(data)] == data


def sparse_image(tmp_path: Path) -> tuple[Path, dict[int, bytes], int]:
    """A 9 MiB + 55 byte image with data in two places and holes elsewhere, and its bmap."""
    path = tmp_path / "sparse.img"
    size = 9 * MiB + 55
    chunks = {0: os.urandom(MiB + 123), 6 * MiB: os.urandom(512 * 1024)}
    with path.open("wb") as f:
        f.truncate(size)
        for offset, chunk in chunks.items():
            f.seek(offset)
            f.write(chunk)
    run(["bmaptool", "create", "-o", str(path) + ".bmap", str(path)])
    return path, chunks, size


@pytest.mark.parametrize("compressed", [False, True], ids=["raw", "xz"])
def test_writes_with_bmaptool_when_a_bmap_exists(tmp_path: Path, make_loop: Callable[..., Loop],
                                                 compressed: bool) -> None:
    loop = make_loop()
    old = loop.content()
    path, chunks, size = sparse_image(tmp_path)
    if compressed:
        # The bmap keeps the uncompressed name: fw.img.bmap next to fw.img.xz.
        run(["xz", "-q", "-T1", str(path)])
        path = path.with_name(path.name + ".xz")
    result = flash("--yes", str(path), loop.device)
    assert result.returncode == EXIT_OK, result.stderr
    assert "with bmaptool" in result.stderr
    assert "every mapped range" in result.stderr
    after = loop.content()
    for offset, chunk in chunks.items():
        assert after[offset:offset + len(chunk)] == chunk
    # Holes are not written: that is the point of a bmap.
    hole = 4 * MiB
    assert after[hole:hole + 4096] == old[hole:hole + 4096]


def test_no_bmap_writes_the_whole_image(tmp_path: Path,
                                        make_loop: Callable[..., Loop]) -> None:
    loop = make_loop()
    path, _, size = sparse_image(tmp_path)
    result = flash("--yes", "--no-bmap", str(path), loop.device)
    assert result.returncode == EXIT_OK, result.stderr
    assert "bmaptool" not in result.stderr
    assert loop.content()[:size] == path.read_bytes()


def test_dry_run_checks_and_writes_nothing(tmp_path: Path,
                                           make_loop: Callable[..., Loop]) -> None:
    loop = make_loop(partscan=True)
    partition(loop)
    run(["mkfs.ext4", "-q", "-L", "appdata", loop.partition(1)])
    before = loop.content()
    path, _ = image(tmp_path, 2 * MiB)
    result = flash("--dry-run", str(path), loop.device)
    assert result.returncode == EXIT_OK, result.stderr
    assert f'it holds {loop.partition(1)}: ext4, label "appdata"' in result.stderr
    assert "nothing was written" in result.stderr
    assert loop.content() == before


# --- refusals ---------------------------------------------------------------------------


def assert_refused(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == EXIT_REFUSED, result.stderr
    assert "flash: refused: " in result.stderr
    assert message in result.stderr, result.stderr


def test_refuses_a_mounted_device(tmp_path: Path, make_loop: Callable[..., Loop]) -> None:
    loop = make_loop()
    run(["mkfs.ext4", "-q", loop.device])
    path, data = image(tmp_path, MiB)
    with mounted(loop.device) as mnt:
        (mnt / "keep").write_text("still here")
        result = flash("--yes", str(path), loop.device)
        assert_refused(result, f"{loop.device} is mounted on {mnt}")
        assert (mnt / "keep").read_text() == "still here"
    # The filesystem rewrites its own superblock on unmount, so compare with the image.
    assert loop.content()[:MiB] != data
    run(["e2fsck", "-fn", loop.device])


def test_refuses_a_disk_with_a_mounted_partition(tmp_path: Path,
                                                 make_loop: Callable[..., Loop]) -> None:
    loop = make_loop(partscan=True)
    partition(loop)
    run(["mkfs.ext4", "-q", loop.partition(1)])
    path, _ = image(tmp_path, MiB)
    with mounted(loop.partition(1)) as mnt:
        result = flash("--yes", str(path), loop.device)
        assert_refused(result, f"{loop.partition(1)} is mounted on {mnt}")


def test_refuses_a_disk_with_active_swap(tmp_path: Path,
                                         make_loop: Callable[..., Loop]) -> None:
    loop = make_loop(partscan=True)
    partition(loop)
    run(["mkswap", "-q", loop.partition(2)])
    run(["swapon", loop.partition(2)])
    try:
        path, _ = image(tmp_path, MiB)
        result = flash("--yes", str(path), loop.device)
        assert_refused(result, f"{loop.partition(2)} is active swap")
    finally:
        subprocess.run(["swapoff", loop.partition(2)], capture_output=True, check=False)


def test_refuses_a_partition(tmp_path: Path, make_loop: Callable[..., Loop]) -> None:
    loop = make_loop(partscan=True)
    partition(loop)
    before = loop.content()
    path, _ = image(tmp_path, MiB)
    result = flash("--yes", str(path), loop.partition(1))
    assert_refused(result, f"{loop.partition(1)} is a partition of {loop.device}, not a whole "
                           f"disk; flash {loop.device} instead")
    assert loop.content() == before


def test_refuses_a_regular_file(tmp_path: Path) -> None:
    target = tmp_path / "disk.img"
    target.write_bytes(b"old" * 1000)
    path, _ = image(tmp_path, MiB)
    result = flash("--yes", str(path), str(target))
    assert_refused(result, f"{target} is a regular file, not a block device")
    assert target.read_bytes() == b"old" * 1000


def test_refuses_a_character_device(tmp_path: Path) -> None:
    path, _ = image(tmp_path, MiB)
    assert_refused(flash("--yes", str(path), "/dev/null"),
                   "/dev/null is a character device, not a block device")


def test_refuses_a_nonexistent_device(tmp_path: Path) -> None:
    path, _ = image(tmp_path, MiB)
    assert_refused(flash("--yes", str(path), "/dev/no-such-disk"),
                   "device /dev/no-such-disk does not exist")


def test_refuses_a_read_only_device(tmp_path: Path, make_loop: Callable[..., Loop]) -> None:
    loop = make_loop(read_only=True)
    path, _ = image(tmp_path, MiB)
    assert_refused(flash("--yes", str(path), loop.device), f"{loop.device} is read-only")


def test_refuses_an_image_larger_than_the_device(tmp_path: Path,
                                                 make_loop: Callable[..., Loop]) -> None:
    loop = make_loop(4 * MiB)
    before = loop.content()
    path, _ = image(tmp_path, 4 * MiB + 1)
    result = flash("--yes", str(path), loop.device)
    assert_refused(result, f"image is {4 * MiB + 1} bytes (4.0MiB) but {loop.device} holds "
                           f"only {4 * MiB} bytes (4.0MiB)")
    assert loop.content() == before


def test_refuses_the_loop_devices_own_backing_file(make_loop: Callable[..., Loop]) -> None:
    loop = make_loop()
    result = flash("--yes", str(loop.backing), loop.device)
    assert_refused(result, f"image {loop.backing} is the backing file of {loop.device} itself")


def test_refuses_a_missing_empty_or_broken_image(tmp_path: Path,
                                                 make_loop: Callable[..., Loop]) -> None:
    loop = make_loop()
    before = loop.content()
    assert_refused(flash("--yes", str(tmp_path / "nope.img"), loop.device),
                   f"image {tmp_path / 'nope.img'} does not exist")
    empty = tmp_path / "empty.img"
    empty.touch()
    assert_refused(flash("--yes", str(empty), loop.device), f"image {empty} is empty")
    # A truncated download: found before the device is touched.
    raw, _ = image(tmp_path, 2 * MiB)
    run(["xz", "-q", str(raw)])
    broken = raw.with_name(raw.name + ".xz")
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    result = flash("--yes", str(broken), loop.device)
    assert_refused(result, f"cannot read {broken}")
    assert "xz:" in result.stderr
    assert loop.content() == before


def test_refuses_without_the_right_confirmation(tmp_path: Path,
                                                make_loop: Callable[..., Loop]) -> None:
    loop = make_loop()
    before = loop.content()
    path, _ = image(tmp_path, MiB)
    result = flash(str(path), loop.device, answer="/dev/sda\n")
    assert_refused(result, f"'/dev/sda' is not {loop.device}; nothing was written")
    result = flash(str(path), loop.device, answer="")
    assert_refused(result, "no confirmation given")
    assert loop.content() == before


def test_usage_errors(tmp_path: Path) -> None:
    result = flash("only-one-argument")
    assert result.returncode == EXIT_REFUSED
    assert "expected IMAGE and DEVICE, got 1 argument(s)" in result.stderr
    result = flash("--frobnicate", "a", "b")
    assert result.returncode == EXIT_REFUSED
    assert "unknown option: --frobnicate" in result.stderr
    result = flash("--help")
    assert result.returncode == EXIT_OK
    assert "Exit status:" in result.stdout


def root_disk() -> str | None:
    """The disk holding /, found independently of flash.sh: via sysfs from the device
    number of /. None when / is not on a block device (overlay, tmpfs)."""
    dev = os.stat("/").st_dev
    sysdev = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not sysdev.exists():
        return None
    node = sysdev.resolve()
    if (node / "partition").exists():
        node = node.parent
    if (node / "dm").exists():
        return None  # LVM or LUKS root: flash.sh handles it, this finder does not
    return f"/dev/{node.name}"


def test_refuses_the_disk_of_the_running_root(tmp_path: Path) -> None:
    disk = root_disk()
    if disk is None or not Path(disk).is_block_device():
        pytest.skip("/ is not on a plain disk or partition here")
    # Belt and braces on the machine running the tests: a dry run, with an image that
    # does not exist, so that even a broken check could not write anything.
    result = flash("--dry-run", "--yes", str(tmp_path / "absent.img"), disk)
    assert_refused(result, f"{disk} holds the running root filesystem")


# --- corrupted read-back and failing writes, from a FUSE-backed loop device -----------

# A filesystem with one file, "disk", stored in STORE: writes land unchanged (or fail
# with EIO, or take WRITE_DELAY seconds each), reads of byte CORRUPT_AT come back
# inverted. direct_io makes every read reach the server, so the page cache cannot hide
# the corruption.
FUSE_SERVER = r"""
import errno, os, stat, sys, time
from fusepy import FUSE, FuseOSError, Operations

mountpoint, store = sys.argv[1], sys.argv[2]
corrupt_at, fail_writes, write_delay = int(sys.argv[3]), sys.argv[4] == "1", float(sys.argv[5])

class Disk(Operations):
    def __init__(self):
        self.fd = os.open(store, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size

    def getattr(self, path, fh=None):
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        if path == "/disk":
            return {"st_mode": stat.S_IFREG | 0o600, "st_nlink": 1, "st_size": self.size}
        raise FuseOSError(errno.ENOENT)

    def readdir(self, path, fh):
        return [".", "..", "disk"]

    def open(self, path, flags):
        return 0

    def read(self, path, size, offset, fh):
        data = bytearray(os.pread(self.fd, size, offset))
        if offset <= corrupt_at < offset + len(data):
            data[corrupt_at - offset] ^= 0xFF
        return bytes(data)

    def write(self, path, data, offset, fh):
        if fail_writes:
            raise FuseOSError(errno.EIO)
        time.sleep(write_delay)
        return os.pwrite(self.fd, data, offset)

    def truncate(self, path, length, fh=None):
        raise FuseOSError(errno.EPERM)

    def fsync(self, path, datasync, fh):
        os.fsync(self.fd)
        return 0

    def flush(self, path, fh):
        return 0

FUSE(Disk(), mountpoint, foreground=True, direct_io=True)
"""


@dataclass
class FaultyDisk:
    loop: Loop
    store: Path


@pytest.fixture
def faulty_disk(tmp_path: Path,
                make_loop: Callable[..., Loop]) -> Iterator[Callable[..., FaultyDisk]]:
    if not Path("/dev/fuse").exists():
        pytest.skip("no /dev/fuse: this kernel has no FUSE to build a faulty disk from")
    has_fusepy = subprocess.run([SYSTEM_PYTHON, "-c", "import fusepy"], capture_output=True,
                                check=False, timeout=30).returncode == 0
    if not has_fusepy:
        pytest.fail("python3-fusepy is not installed (scripts/setup.sh installs it)",
                    pytrace=False)
    servers: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(*, corrupt_at: int = -1, fail_writes: bool = False, write_delay: float = 0.0,
              size: int = 16 * MiB) -> FaultyDisk:
        n = len(servers)
        store, mnt = tmp_path / f"store{n}", tmp_path / f"fuse{n}"
        store.write_bytes(os.urandom(size))
        mnt.mkdir()
        server = subprocess.Popen(
            [SYSTEM_PYTHON, "-c", FUSE_SERVER, str(mnt), str(store), str(corrupt_at),
             "1" if fail_writes else "0", str(write_delay)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        servers.append((server, mnt))
        deadline = time.monotonic() + 15
        while not os.path.ismount(mnt):
            if server.poll() is not None or time.monotonic() > deadline:
                err = server.stderr.read().decode() if server.poll() is not None else ""
                raise AssertionError(f"FUSE disk did not mount: {err}")
            time.sleep(0.05)
        return FaultyDisk(make_loop(backing=mnt / "disk"), store)

    try:
        yield start
    finally:
        # Loop devices first (make_loop's own teardown runs after this one, harmlessly),
        # then the mounts, then the servers.
        for server, mnt in servers:
            for line in subprocess.run(["losetup", "-nO", "NAME,BACK-FILE"],
                                       capture_output=True, text=True,
                                       check=False).stdout.splitlines():
                name, _, back = line.partition(" ")
                if back.strip() == str(mnt / "disk"):
                    release(name)
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=10)


def test_a_corrupted_read_back_fails_verification(tmp_path: Path,
                                                  faulty_disk: Callable[..., FaultyDisk]) -> None:
    disk = faulty_disk(corrupt_at=3 * MiB + 17)
    path, data = image(tmp_path, 5 * MiB + 99)
    result = flash("--yes", str(path), disk.loop.device)
    assert result.returncode == EXIT_VERIFY, result.stderr
    assert "VERIFY FAILED" in result.stderr
    assert f"the image has {sha(data)}" in result.stderr
    assert "do not use it" in result.stderr
    # The write itself went through; only reading it back shows the fault.
    assert disk.store.read_bytes()[: len(data)] == data


def test_a_corrupted_mapped_range_fails_verification(tmp_path: Path,
                                                     faulty_disk: Callable[..., FaultyDisk]
                                                     ) -> None:
    path, chunks, _ = sparse_image(tmp_path)
    # A byte inside the second data chunk, so inside the bmap's second range.
    disk = faulty_disk(corrupt_at=6 * MiB + 1000)
    result = flash("--yes", str(path), disk.loop.device)
    assert result.returncode == EXIT_VERIFY, result.stderr
    assert "VERIFY FAILED: range 2 of 2" in result.stderr


def test_a_failing_write_is_reported(tmp_path: Path,
                                     faulty_disk: Callable[..., FaultyDisk]) -> None:
    disk = faulty_disk(fail_writes=True)
    path, _ = image(tmp_path, 2 * MiB)
    result = flash("--yes", str(path), disk.loop.device)
    assert result.returncode == EXIT_WRITE, result.stderr
    assert "write failed" in result.stderr
    assert "holds a partial image" in result.stderr


def test_an_interrupted_write_stops_the_writer_and_says_so(
        tmp_path: Path, faulty_disk: Callable[..., FaultyDisk]) -> None:
    # 0.1 s per 128 KiB write: about 3 s per 4 MiB block, long enough to interrupt.
    disk = faulty_disk(write_delay=0.1)
    path, _ = image(tmp_path, 12 * MiB)
    proc = subprocess.Popen([str(FLASH), "--yes", str(path), disk.loop.device],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("flash: writing"):
                break
        else:
            raise AssertionError("flash.sh never started writing: " + "".join(seen))
        time.sleep(0.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=30) == EXIT_WRITE, rest
        # The trap waits for the block in flight (at most a few seconds), not the whole image.
        assert time.monotonic() - started < 8
        assert f"interrupted while writing: {disk.loop.device} holds a partial image" in rest
        writers = [p for p in Path("/proc").glob("[0-9]*/cmdline")
                   if f"of={disk.loop.device}".encode() in _read(p)]
        assert writers == [], "a writer outlived flash.sh"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""  # the process exited while the list was read
