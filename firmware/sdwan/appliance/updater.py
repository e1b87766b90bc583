"""A/B updates on the box (docs/update.md): a bundle installed into the slot not running,
the new slot committed (marked good) only once the box is healthy on it, a fall back to the
old slot noticed and recorded, and both slots in status.

RAUC does the writing and the boot loader's bookkeeping (appliance/raucbus.py runs it);
this module decides when. socketd passes in a `health()` of its own parts and never learns
anything else of RAUC. Nothing here reboots the box unless asked to (`reboot`, or `update`
with `reboot` set): an install leaves the new slot to the next boot, whenever that is.

What it keeps in the data directory, `update.json` (written atomically): the install of
this boot waiting for a reboot, the last thing a pending slot was waiting for (the reason
given when GRUB later falls back from it), and the rollbacks already recorded, so a socketd
started again does not record one twice."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import stat
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdwan.appliance import bootenv
from sdwan.appliance import bundle as bundle_check
from sdwan.appliance.bundle import BundleInfo
from sdwan.appliance.raucbus import RaucBus, RaucSetup
from sdwan.appliance.raucstatus import (
    BootSelection,
    Progress,
    Slot,
    SystemConf,
    SystemStatus,
    install_error,
    parse_progress,
    parse_status,
    read_system_conf,
)
from sdwan.appliance.watchdog import boot_id
from sdwan.common.durable import write_json_atomic
from sdwan.common.visible import visible
from sdwan.site.config import Update

log = logging.getLogger(__name__)

EVENT_INSTALLED = "update.installed"
EVENT_FAILED = "update.failed"
EVENT_COMMITTED = "update.committed"
EVENT_ROLLED_BACK = "update.rolled_back"
EVENT_REBOOT = "update.reboot"
EVENT_ERROR = "update.error"
STATE_FILE = "update.json"
# Written by the image's commit-deadline (init) when it reboots a slot that was not committed.
DEADLINE_FILE = "commit-deadline.json"
# Read by commit-deadline: commit_deadline_s as socketd understood it.
DEADLINE_SETTING = "commit-deadline-s"
# In the data directory, root's only: the copy of the bundle being checked and installed.
STAGE_DIR = "update-bundle"
STAGED_BUNDLE = "bundle.raucb"
READY_TIMEOUT_S = 60.0  # for the bus and rauc service to answer at start
COMMIT_POLL_S = 1.0
MARK_RETRY_S = 10.0
# socketd's own parts healthy this long in a row: the committed slot stayed up (_settle_step)
SETTLE_S = 120.0
RETRY_MAX_S = 60.0  # RAUC asked again at most this far apart while it fails
RETRY_FAST = 5  # failures in a row retried after COMMIT_POLL_S before the delay doubles
PROGRESS_KEPT = 200
ROLLBACKS_KEPT = 16

Record = Callable[[str, str, dict[str, Any]], None]


@dataclass(frozen=True)
class Health:
    """socketd's parts as the commit needs them: each None when healthy, else why not."""

    fastpath: str | None
    control: str | None
    cloud_up: bool
    cloud_configured: bool


class InstallRefused(Exception):
    """Nothing was written: the bundle, the box or another install stands in the way."""


class InstallFailed(Exception):
    """RAUC's install failed; the message is RAUC's."""


Precheck = Callable[[RaucBus, Path, SystemConf, str | None], Awaitable[BundleInfo]]


async def inspect_bundle(bus: RaucBus, bundle: Path, conf: SystemConf,
                         compatible: str | None) -> BundleInfo:
    """The box's check before anything is written (appliance/bundle.py): the signature
    against the keyring, for code signing only; a verity bundle; this board's compatible;
    every block of the payload against its signed hash, extracted beside the bundle (the
    updater's private copy of it, in the data directory)."""
    if conf.keyring is None or compatible is None:
        raise InstallRefused(f"{bus.setup.system_conf} names no keyring or compatible:"
                             " bundles cannot be checked")
    try:
        return await asyncio.to_thread(bundle_check.inspect, bundle, conf.keyring, compatible,
                                       check_payload=True, scratch=bundle.parent)
    except bundle_check.BundleError as e:
        raise InstallRefused(f"bundle refused: {visible(e)}") from None


async def check_with_system_conf(bus: RaucBus, bundle: Path, conf: SystemConf,
                                 compatible: str | None) -> BundleInfo:
    """`rauc info` under the system's own system.conf (its keyring, purpose and formats)
    and its compatible: the check for a system.conf that takes other formats than the
    box's, such as a test host whose kernel cannot mount verity bundles."""
    run = await bus.run("info", "--output-format=json", f"--conf={bus.setup.system_conf}",
                        str(bundle), timeout=300.0)
    if run.status != 0:
        raise InstallRefused(f"bundle refused: {install_error(run.lines) or 'rauc info failed'}")
    doc: Any = None
    for line in run.lines:
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                doc = json.loads(line)
    if not isinstance(doc, dict):
        raise InstallRefused("bundle refused: rauc info printed no description of it")
    got = doc.get("compatible")
    if compatible is not None and got != compatible:
        raise InstallRefused(f"bundle refused: it is for {visible(got)!r}, this box is"
                             f" {visible(compatible)!r}")
    version = doc.get("version")
    return BundleInfo(path=bundle, compatible=str(got), version=str(version),
                      description=None, build=None, images=(), signer=None,
                      payload_checked=False)


@dataclass
class InstallState:
    state: str = "idle"  # idle, checking, installing, installed, failed
    bundle: str | None = None
    version: str | None = None
    slot: str | None = None  # written into
    percent: int | None = None
    message: str | None = None
    error: str | None = None
    origin: str | None = None
    reboot: bool = False  # asked to reboot once installed
    started_at: float | None = None  # Unix time
    ended_at: float | None = None
    progress: deque[tuple[int, Progress]] = field(
        default_factory=lambda: deque(maxlen=PROGRESS_KEPT))
    seq: int = 0  # of the last progress line

    def to_json(self, since: int = 0) -> dict[str, Any]:
        return {
            "state": self.state, "bundle": self.bundle, "version": self.version,
            "slot": self.slot, "percent": self.percent, "message": self.message,
            "error": self.error, "origin": self.origin, "reboot": self.reboot,
            "started_at": self.started_at, "ended_at": self.ended_at, "seq": self.seq,
            "progress": [{"seq": n, "percent": p.percent, "message": p.message}
                         for n, p in self.progress if n > since],
        }


def _stage(src: Path, stage_dir: Path) -> Path:
    """A copy of the bundle at src in stage_dir (made anew, root's only): the file that is
    checked and then installed. Whoever can write src (a USB stick, /data) can replace it or
    point its symlink elsewhere after the check; the copy no one else can touch. src is opened
    once, without waiting (a FIFO), and must be a regular file that is not empty."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise InstallRefused(f"cannot open {visible(src)}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InstallRefused(f"{visible(src)} is not a regular file")
        if st.st_size == 0:
            raise InstallRefused(f"{visible(src)} is empty: not a bundle")
        shutil.rmtree(stage_dir, ignore_errors=True)
        stage_dir.mkdir(mode=0o700, parents=True)
        os.chmod(stage_dir, 0o700)
        free = shutil.disk_usage(stage_dir).free
        if free < st.st_size + bundle_check.SCRATCH_RESERVE:
            raise InstallRefused(
                f"no room for a copy of the bundle in {stage_dir}: it needs"
                f" {(st.st_size + bundle_check.SCRATCH_RESERVE) >> 20} MiB with a reserve,"
                f" {free >> 20} MiB are free")
        dst = stage_dir / STAGED_BUNDLE
        out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600)
        try:
            while chunk := os.read(fd, 1 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
        finally:
            os.close(out)
        return dst
    except OSError as e:
        shutil.rmtree(stage_dir, ignore_errors=True)
        raise InstallRefused(f"cannot copy {visible(src)} to check it: {e.strerror or e}") \
            from None
    except InstallRefused:
        shutil.rmtree(stage_dir, ignore_errors=True)
        raise
    finally:
        os.close(fd)


def _install_key(slot: Slot) -> str:
    """One install into one slot: a rollback is recorded once per install, not per slot."""
    return f"{slot.name}@{slot.installed_at or '-'}"


def _seconds(s: float) -> str:
    s = max(0, round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Updater:
    """See the module docstring. `record(kind, text, data)` stores an event; `health()` is
    socketd's view of its own parts, asked while a commit is pending."""

    def __init__(
        self, cfg: Update, data_dir: Path, runtime_dir: Path, record: Record,
        health: Callable[[], Health], *,
        rauc: str = "rauc", dbus_daemon: str = "dbus-daemon", boot_slot: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        this_boot: Callable[[], str] = boot_id,
        precheck: Precheck = inspect_bundle,
        boot_env: bootenv.Paths | None = None,
    ) -> None:
        if cfg.system_conf is None:
            raise ValueError("no RAUC system.conf: nothing to update")
        self.cfg = cfg
        self.system_conf = cfg.system_conf
        self.data_dir = Path(data_dir)
        self.state_path = self.data_dir / STATE_FILE
        self.stage_dir = self.data_dir / STAGE_DIR
        self.record = record
        self.health = health
        self.clock = clock
        self.boot = this_boot()  # the boot this socketd runs in: it does not change
        self.precheck = precheck
        # grubenv as RAUC's custom backend reaches it, with the slots of our system.conf
        self.boot_env = boot_env or dataclasses.replace(bootenv.Paths.from_environ(),
                                                        system_conf=cfg.system_conf)
        self.bus = RaucBus(
            RaucSetup(cfg.system_conf, Path(runtime_dir), rauc=rauc, dbus_daemon=dbus_daemon,
                      boot_slot=boot_slot),
            lambda text, data: self._event(EVENT_ERROR, text, data), clock=clock)
        self.status_: SystemStatus | None = None
        self.selection: BootSelection | None = None
        self.read_error: str | None = None
        self._failures = 0  # RAUC calls failed in a row (_retry_delay)
        self._checked = False  # the start-up checks (a fall back noticed) have run
        self._said_error: str | None = None
        self.ready_error: str | None = "starting"
        self.install_state = InstallState()
        self._installing = False
        self.commit: dict[str, Any] = {"state": "unknown", "waiting_for": "RAUC's status"}
        self._healthy_since: float | None = None
        self._mark_after = 0.0
        self._settled = False  # this boot's count cleared, or none to clear (_settle_step)
        self._settle_after = 0.0
        self._settle_error: str | None = None
        self._up_since: float | None = None  # socketd's own parts healthy since
        self.rollback: dict[str, Any] | None = None
        self._doc: dict[str, Any] = {}  # update.json (the module docstring)
        self.rebooting: str | None = None  # the reboot command ran: the box goes down
        self._reboot_running: str | None = None  # it runs now
        self._task: asyncio.Task[None] | None = None
        self._install_task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- running

    def start(self) -> None:
        self.bus.start()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        for task in (self._install_task, self._task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self.bus.close()

    async def ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until the start-up checks (rollback, commit state) have run: for tests."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.ready_error == "starting" and loop.time() < end:
            await asyncio.sleep(0.05)

    async def _run(self) -> None:
        self._doc = await asyncio.to_thread(self._load_state)
        await asyncio.to_thread(self._publish_deadline)
        # A copy left by a socketd that stopped during an install.
        await asyncio.to_thread(shutil.rmtree, self.stage_dir, True)
        said = False
        while (why := await self.bus.wait_ready(READY_TIMEOUT_S)) is not None:
            self.ready_error = f"rauc service does not answer: {why}"
            self.commit = {"state": "unknown", "waiting_for": self.ready_error}
            if not said:
                log.error("updates: %s", self.ready_error)
                self._event(EVENT_ERROR, f"updates unavailable: {self.ready_error}",
                            {"error": why})
                said = True
            if "failed" in (self.bus.bus.st.state, self.bus.service.st.state):
                return  # a program that is not there: Child does not try it again either
        checked = self._checked = await self._start_checks()
        self.ready_error = None
        while True:
            # A fall back not recorded because RAUC did not answer at the start would never
            # be: the start-up checks are tried again until they ran.
            if not checked:
                checked = self._checked = await self._start_checks()
                if not checked:
                    # Not before: a pending mark of this slot would replace what the slot
                    # fallen back from was waiting for, the reason its rollback gives.
                    await asyncio.sleep(self._retry_delay())
                    continue
            try:
                await self._commit_step()
            except Exception:
                log.exception("updates: commit check failed")
            await asyncio.sleep(COMMIT_POLL_S if self.read_error is None
                                else self._retry_delay())

    def _retry_delay(self) -> float:
        """How long until RAUC is asked again after it failed: every second for the first
        few failures (a loaded box's rauc service answering late at start), then doubling
        up to a minute, so that a box whose slots RAUC cannot find (a disk without the A/B
        layout) does not spend a core and fill the log ring asking every second."""
        self._failures += 1
        doubling = max(0, self._failures - RETRY_FAST)
        return min(RETRY_MAX_S, COMMIT_POLL_S * 2 ** min(doubling, 6))

    async def _start_checks(self) -> bool:
        """A fall back to notice, once RAUC's status is read; True when they ran."""
        try:
            await self.refresh()
            await self._detect_rollback()
        except OSError as e:
            # The same reason again is not news: said once until it changes.
            if str(e) != self._said_error:
                log.error("updates: the start-up checks failed (tried again): %s", e)
                self._said_error = str(e)
            return False
        except Exception:
            log.exception("updates: the start-up checks failed (tried again)")
            return False
        self._said_error = None
        return True

    def _event(self, kind: str, text: str, data: dict[str, Any]) -> None:
        try:
            self.record(kind, text, data)
        except Exception:
            log.exception("updates: event not recorded")

    # ---------------------------------------------------------------- what RAUC says

    async def refresh(self) -> SystemStatus:
        """Both slots as RAUC has them now, and GRUB's boot selection where it is readable."""
        run = await self.bus.run("status", "--detailed", "--output-format=json")
        if run.status != 0:
            self.read_error = f"rauc status failed: {install_error(run.lines) or run.status}"
            raise OSError(self.read_error)
        text = next((ln for ln in run.lines if ln.lstrip().startswith("{")), run.text)
        try:
            st = parse_status(text)
        except ValueError as e:
            self.read_error = str(e)
            raise OSError(self.read_error) from None
        self.status_, self.read_error = st, None
        self._failures = 0
        self.selection = await asyncio.to_thread(self._read_selection)
        return st

    def _read_selection(self) -> BootSelection | None:
        try:
            conf = read_system_conf(self.system_conf)
            if conf.bootloader != "custom":
                return None
            loaded = bootenv.load(self.boot_env)
            limits = bootenv.Limits.of(self.boot_env, loaded.values)
            return BootSelection.from_env(loaded.values, limits.tries, limits.loops)
        except (OSError, ValueError, bootenv.BootEnvError) as e:
            log.warning("updates: GRUB's boot selection unreadable: %s", e)
            return None

    async def slots(self) -> list[Slot]:
        return list((await self.refresh()).slots)

    def _load_state(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def _state(self) -> dict[str, Any]:
        """A copy of update.json as last read or written (read once, at the start)."""
        return json.loads(json.dumps(self._doc))

    async def _save_state(self, doc: dict[str, Any]) -> None:
        self._doc = doc

        def write() -> None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.state_path, doc)

        try:
            # fsync on the box's flash: never on the loop.
            await asyncio.to_thread(write)
        except OSError as e:
            log.error("updates: %s not written: %s", self.state_path, e)

    # ---------------------------------------------------------------- rollback

    async def _detect_rollback(self) -> None:
        """The box runs a slot other than the one it was told to boot, and that one is
        passed over now (its tries used up, or marked bad): GRUB fell back from it."""
        st = self.status_
        if st is None:
            return
        booted = st.booted_slot
        if booted is None:
            return
        sel = self.selection
        if sel is not None and sel.first is not None:
            wanted = st.by_bootname(sel.first)
            # Tried at least once: RAUC marks a slot bad (_OK=0, _TRY=0) before it writes it
            # and leaves it first when the install ends early; never booted, nothing fell back.
            fell_back = (wanted is not None and sel.abandoned(sel.first)
                         and (sel.tries.get(sel.first, 0) >= 1 or sel.looping(sel.first)))
        else:
            wanted = st.slot(st.primary) if st.primary else None
            fell_back = wanted is not None and not wanted.good
        if wanted is None or wanted.name == booted.name or not fell_back:
            return
        why = self._why_abandoned(wanted, sel)
        text = (f"rolled back to {booted.name} ({booted.bootname}"
                f"{', ' + booted.version if booted.version else ''}): {wanted.name}"
                f" ({wanted.bootname}, version {wanted.version or 'unknown'}) was abandoned:"
                f" {why}")
        self.rollback = {"slot": wanted.name, "bootname": wanted.bootname,
                         "version": wanted.version, "booted": booted.name, "why": why,
                         "at": time.time()}
        doc = self._state()
        seen = [k for k in doc.get("rolled_back", []) if isinstance(k, str)]
        key = _install_key(wanted)
        if key not in seen:
            log.warning("updates: %s", text)
            self._event(EVENT_ROLLED_BACK, text, dict(self.rollback))
            doc["rolled_back"] = [*seen, key][-ROLLBACKS_KEPT:]
            doc["last_rollback"] = self.rollback
            doc.pop("pending", None)
            await self._save_state(doc)
            self._forget_deadline()
        elif isinstance(doc.get("last_rollback"), dict):
            self.rollback = doc["last_rollback"]
        # Idempotent both: after a restart of socketd they are simply done again.
        for args in (("mark-bad", wanted.name), ("mark-active", "booted")):
            try:
                run = await self.bus.run("status", *args)
                if run.status != 0:
                    log.error("updates: rauc status %s failed: %s", " ".join(args),
                              install_error(run.lines))
            except OSError as e:
                log.error("updates: rauc status %s failed: %s", " ".join(args), e)
        with contextlib.suppress(OSError):
            await self.refresh()

    def _why_abandoned(self, slot: Slot, sel: BootSelection | None) -> str:
        parts: list[str] = []
        if sel is not None and slot.bootname is not None and sel.looping(slot.bootname):
            return (f"it was committed, but its last {sel.loops.get(slot.bootname)} boots in a"
                    " row ended before it stayed up (socketd healthy, or up for the commit"
                    " deadline): a reboot loop (a crash or hang the watchdog reset, a kernel"
                    " panic, or the power)")
        if sel is not None and slot.bootname is not None:
            if slot.bootname in sel.load_failed:
                parts.append("GRUB could not load its kernel or initramfs (the slot is damaged)")
            elif sel.ok.get(slot.bootname) is False:
                parts.append("it was marked bad")
            else:
                tries = sel.tries.get(slot.bootname)
                parts.append(f"its boot tries were used up ({tries} tried) without it being"
                             " marked good")
        else:
            parts.append("it was never marked good")
        deadline = self._deadline_reboots(slot)
        if deadline:
            parts.append(deadline)
        pending = self._state().get("pending")
        if isinstance(pending, dict) and pending.get("slot") == slot.name:
            parts.append(f"socketd there was last waiting for {pending.get('waiting_for')}"
                         " (unhealthy, or the watchdog reset the box)")
        else:
            parts.append("socketd never reported from it (it did not start, or the box was"
                         " reset before)")
        return "; ".join(parts)

    def _deadline_reboots(self, slot: Slot) -> str | None:
        """What the commit deadline did to the slot, from the file it left in /data."""
        try:
            doc = json.loads((self.data_dir / DEADLINE_FILE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("slot") != slot.bootname:
            return None
        n, limit = doc.get("reboots"), doc.get("deadline_s")
        if not isinstance(n, int) or not isinstance(limit, int):
            return None
        return (f"the commit deadline rebooted it {n} time{'s' if n != 1 else ''}, each"
                f" {limit} s after boot")

    def _publish_deadline(self) -> None:
        """commit_deadline_s as this socketd read it, for init's commit-deadline, which
        reads it before socketd.toml (its awk knows little TOML) and also when a new slot's
        socketd never starts."""
        try:
            path = self.data_dir / DEADLINE_SETTING
            if path.is_file() and path.read_text().strip() == str(self.cfg.commit_deadline_s):
                return
            self.data_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(f"{self.cfg.commit_deadline_s}\n")
            os.replace(tmp, path)
        except OSError as e:
            log.error("updates: the commit deadline for init not written: %s", e)

    def _forget_deadline(self) -> None:
        """The trial it counted is over: the next one counts from 0."""
        with contextlib.suppress(OSError):
            (self.data_dir / DEADLINE_FILE).unlink()

    # ---------------------------------------------------------------- commit

    async def _commit_step(self) -> None:
        st = self.status_
        booted = st.booted_slot if st is not None else None
        if booted is None:
            self.commit = {"state": "unknown", "slot": None,
                           "waiting_for": self.read_error or "RAUC does not know the booted slot"}
            with contextlib.suppress(OSError):
                await self.refresh()
            return
        if booted.good:
            if self.commit.get("state") != "committed":
                self.commit = {"state": "committed", "slot": booted.name, "waiting_for": None}
            await self._settle_step(booted)
            return
        why_now, waits, grace_left, h = self._verdict()
        now = self.clock()
        if why_now is None:
            grace = (f"{_seconds(grace_left)} more of health" if grace_left is not None
                     else f"{self.cfg.commit_grace_s} s of health")
            final = (f"the cloud (a PoP session up) or {grace}" if h.cloud_configured
                     else f"{grace} (no cloud configured)")
            waiting = f"{', '.join(waits)}, then {final}" if waits else final
            self.commit = {"state": "pending", "slot": booted.name, "waiting_for": waiting,
                           "grace_left_s": None if grace_left is None
                           else round(max(0.0, grace_left), 1),
                           "deadline_s": self.cfg.commit_deadline_s}
            await self._remember_pending(booted, ", ".join(waits) or (
                "the cloud (a PoP session up)" if h.cloud_configured else "its grace time"))
            return
        if now < self._mark_after:
            return
        run = await self.bus.run("status", "mark-good", "booted")
        if run.status != 0:
            err = install_error(run.lines) or f"status {run.status}"
            self._mark_after = now + MARK_RETRY_S
            self.commit = {"state": "pending", "slot": booted.name,
                           "waiting_for": f"rauc status mark-good (failed: {err})"}
            log.error("updates: marking %s good failed: %s", booted.name, err)
            return
        text = (f"committed {booted.name} ({booted.bootname}, version"
                f" {booted.version or 'unknown'}): marked good, {why_now}")
        log.info("updates: %s", text)
        self._event(EVENT_COMMITTED, text, {"slot": booted.name, "bootname": booted.bootname,
                                            "version": booted.version, "why": why_now})
        doc = self._state()
        doc.pop("pending", None)
        await self._save_state(doc)
        self._forget_deadline()
        self.commit = {"state": "committed", "slot": booted.name, "waiting_for": None}
        with contextlib.suppress(OSError):
            await self.refresh()
        sel = self.selection
        if sel is not None and booted.bootname and sel.first != booted.bootname:
            # Committed but not first (GRUB gave every slot its tries back, or a copy of
            # grubenv older than the other was restored): the next boot must not start an
            # older slot.
            with contextlib.suppress(OSError):
                run = await self.bus.run("status", "mark-active", "booted")
                if run.status != 0:
                    log.error("updates: rauc status mark-active booted failed: %s",
                              install_error(run.lines))
                await self.refresh()

    def _verdict(self) -> tuple[str | None, list[str], float | None, Health]:
        """Whether the box is healthy enough to commit its slot now: (why it is, or None;
        what it waits for; the grace time left once its own parts are up; socketd's view)."""
        h = self.health()
        waits: list[str] = []
        if h.fastpath is not None:
            waits.append(f"the fast path ({h.fastpath})")
        if h.control is not None:
            waits.append(f"the control socket ({h.control})")
        now = self.clock()
        if waits:
            self._healthy_since = None
        elif self._healthy_since is None:
            self._healthy_since = now
        grace_left = (None if self._healthy_since is None
                      else self.cfg.commit_grace_s - (now - self._healthy_since))
        why_now: str | None = None
        if not waits and h.cloud_up:
            why_now = "the fast path forwards, the control socket is up and the cloud is reached"
        elif grace_left is not None and grace_left <= 0:
            why_now = (f"the fast path forwards and the control socket is up; "
                       f"{'no PoP session' if h.cloud_configured else 'no cloud configured'}"
                       f" within {self.cfg.commit_grace_s} s")
        return why_now, waits, grace_left, h

    async def _settle_step(self, booted: Slot) -> None:
        """A committed slot stayed up once socketd's own parts (the fast path forwarding, the
        control socket) have been healthy for SETTLE_S in a row: GRUB's count of its boots
        in a row that did not (bootenv's X_LOOPS) is cleared, so that only a reboot loop,
        never a run of power cuts of a working box, makes GRUB pass it over. The cloud is
        not asked: PoPs out of reach are no reboot loop. Init's commit deadline clears the
        count too, once the box has been up that long."""
        if self._settled or self.clock() < self._settle_after:
            return
        sel = self.selection
        name = booted.bootname
        if sel is None or name is None:
            return  # grubenv unreadable now: asked again at the next step
        if not sel.loops.get(name):
            self._settled = True  # nothing counted (a slot or ESP older than the count)
            return
        h = self.health()
        now = self.clock()
        if h.fastpath is not None or h.control is not None:
            self._up_since = None
            return
        if self._up_since is None:
            self._up_since = now
        if now - self._up_since < SETTLE_S:
            return
        try:
            had = await asyncio.to_thread(bootenv.settle, self.boot_env, name)
        except bootenv.BootEnvError as e:
            self._settle_after = self.clock() + MARK_RETRY_S
            if str(e) != self._settle_error:  # the same reason again is not news
                log.error("updates: clearing the boot count of %s failed (tried again): %s",
                          booted.name, e)
                self._settle_error = str(e)
            return
        self._settled = True
        if had > 1:
            log.warning("updates: %s (%s) stayed up after %d boots in a row that did not",
                        booted.name, name, had - 1)
        with contextlib.suppress(OSError):
            await self.refresh()

    def settle_for_reboot(self) -> None:
        st = self.status_
        name = st.booted_slot.bootname if st is not None and st.booted_slot else None
        why = bootenv.settle_for_reboot(self.boot_env, name)
        if why is not None:
            log.warning("updates: %s", why)

    async def _remember_pending(self, booted: Slot, waiting_for: str) -> None:
        """For the boot that falls back later: what this slot's socketd last waited for."""
        doc = self._state()
        wanted = {"slot": booted.name, "version": booted.version, "waiting_for": waiting_for}
        old = doc.get("pending")
        if isinstance(old, dict) and {k: old.get(k) for k in wanted} == wanted:
            return
        doc["pending"] = {**wanted, "at": time.time()}
        await self._save_state(doc)

    # ---------------------------------------------------------------- install

    def _check_box(self, st: SystemStatus) -> Slot:
        """The slot an install would write, or why there is none."""
        booted = st.booted_slot
        if booted is None:
            # Every slot would look inactive: the running one must never be the target.
            raise InstallRefused("RAUC does not know which slot is running (no rauc.slot= on"
                                 " the kernel command line?): not installing")
        if not booted.good:
            raise InstallRefused(
                f"the running slot {booted.name} is not committed yet"
                f" ({self.commit.get('waiting_for') or 'not marked good'}): installing now"
                " would overwrite the slot the box falls back to")
        others = st.others()
        if not others:
            raise InstallRefused("no inactive slot to install into (RAUC lists only the"
                                 " booted one)")
        writable = [s for s in others if s.device and os.path.exists(s.device)]
        if not writable:
            devices = ", ".join(f"{s.name} {s.device}" for s in others)
            raise InstallRefused(f"no inactive slot RAUC can write: {devices} missing")
        return writable[0]

    async def _take_and_prepare(self, bundle: str, origin: str,
                                reboot: bool) -> tuple[Path, Slot, BundleInfo]:
        """The one install at a time taken, then the checks; a refusal gives it back."""
        self._take(bundle)
        try:
            return await self._prepare(bundle, origin, reboot)
        except BaseException:
            self._installing = False
            raise

    async def begin(self, bundle: str, *, origin: str, reboot: bool = False) -> dict[str, Any]:
        """The checks of `install`, then the install itself in the background: for the
        control socket, whose clients follow it with `update-status`."""
        path, target, info = await self._take_and_prepare(bundle, origin, reboot)
        self._install_task = asyncio.get_running_loop().create_task(
            self._install_then(path, target, info, None))
        return self.install_state.to_json()

    async def install(self, bundle: str, progress_cb: Callable[[Progress], None] | None = None,
                      *, origin: str = "socketd", reboot: bool = False) -> dict[str, Any]:
        """Check the bundle and the box, install, and return the install's state; raises
        InstallRefused (nothing written) or InstallFailed (RAUC's message)."""
        path, target, info = await self._take_and_prepare(bundle, origin, reboot)
        await self._install_then(path, target, info, progress_cb)
        if self.install_state.state != "installed":
            raise InstallFailed(self.install_state.error or "install failed")
        return self.install_state.to_json()

    def _take(self, bundle: str) -> None:
        """One install at a time, and none once a reboot is under way: the reboot would cut
        it off."""
        if self._installing:
            raise InstallRefused(self._busy())
        going = self._reboot_running or self.rebooting
        if going is not None:
            raise InstallRefused(f"not installing {visible(bundle)}: the box is rebooting"
                                 f" (asked by {visible(going)})")
        self._installing = True

    def _busy(self) -> str:
        s = self.install_state
        return (f"an update is already being installed ({visible(s.bundle)},"
                f" {s.percent if s.percent is not None else 0}%)")

    async def _prepare(self, bundle: str, origin: str,
                       reboot: bool) -> tuple[Path, Slot, BundleInfo]:
        if self.ready_error is not None:
            raise InstallRefused(f"updates are not available: {self.ready_error}")
        if not self._checked:
            # An install now would make the slot fallen back from primary again: the
            # rollback would never be noticed, nor the slot's event written.
            raise InstallRefused("RAUC's status has not been read since socketd started (a fall"
                                 f" back to notice first): {self.read_error or 'not yet'};"
                                 " try again shortly")
        path = Path(bundle)
        if not path.is_absolute():
            raise InstallRefused(f"the bundle's path must be absolute, got {visible(bundle)}")
        if not await asyncio.to_thread(path.is_file):
            raise InstallRefused(f"no bundle at {visible(bundle)}")
        self.install_state = s = InstallState(
            state="checking", bundle=str(path), origin=origin, reboot=reboot,
            started_at=time.time())
        try:
            st = await self.refresh()
            target = self._check_box(st)
            conf = await asyncio.to_thread(read_system_conf, self.system_conf)
            # Checked and installed: the private copy, never the path given (docs/update.md).
            staged = await asyncio.to_thread(_stage, path, self.stage_dir)
            info = await self.precheck(self.bus, staged, conf, conf.compatible or st.compatible)
            if info.path.resolve() != staged.resolve():
                raise InstallRefused(f"the check described {visible(info.path)}, not the copy"
                                     " of the bundle it was given")
        except InstallRefused as e:
            await self._unstage()
            self._ended("failed", str(e))
            self._event(EVENT_FAILED, f"update from {visible(path)} refused: {e}",
                        {"bundle": str(path), "error": str(e), "origin": origin,
                         "stage": "check"})
            raise
        except (OSError, ValueError) as e:
            await self._unstage()
            self._ended("failed", str(e))
            raise InstallRefused(f"cannot check the box: {e}") from None
        s.version, s.slot = visible(info.version), target.name
        return path, target, info

    async def _unstage(self) -> None:
        await asyncio.to_thread(shutil.rmtree, self.stage_dir, True)

    def _ended(self, state: str, error: str | None) -> None:
        s = self.install_state
        s.state, s.error, s.ended_at = state, error, time.time()
        self._installing = False

    async def _install_then(self, path: Path, target: Slot, info: BundleInfo,
                            progress_cb: Callable[[Progress], None] | None) -> None:
        try:
            await self._install(path, target, info, progress_cb)
        except Exception as e:
            # Whatever went wrong, the updater must not stay busy for good (no install, no
            # reboot until socketd restarts) with clients following an install that ended.
            log.exception("updates: the install of %s ended unexpectedly", path)
            if self._installing:
                self._ended("failed", f"the install ended unexpectedly: {visible(e)}")
                await self._unstage()

    async def _install(self, path: Path, target: Slot, info: BundleInfo,
                       progress_cb: Callable[[Progress], None] | None) -> None:
        s = self.install_state
        s.state = "installing"

        def on_line(line: str) -> None:
            p = parse_progress(line)
            if p is None:
                return
            s.seq += 1
            s.progress.append((s.seq, p))
            s.percent, s.message = p.percent, p.message
            if progress_cb is not None:
                try:
                    progress_cb(p)
                except Exception:
                    log.exception("updates: progress callback failed")

        try:
            # The file the check read (BundleInfo.path): `path` may be another one by now.
            run = await self.bus.run("install", str(info.path), timeout=None, on_line=on_line)
        except OSError as e:
            run = None
            error: str | None = str(e)
        else:
            error = None if run.status == 0 else (install_error(run.lines)
                                                  or f"rauc install exited with {run.status}")
        await self._unstage()
        if error is not None:
            self._ended("failed", error)
            text = f"update from {visible(path)} failed: {error}"
            log.error("updates: %s", text)
            self._event(EVENT_FAILED, text, {"bundle": str(path), "error": error,
                                             "origin": s.origin, "stage": "install"})
            return
        with contextlib.suppress(OSError):
            st = await self.refresh()
            primary = st.slot(st.primary) if st.primary else None
            if primary is not None and not primary.booted:
                target = primary
                s.version = primary.version or s.version
        s.slot = target.name
        text = (f"update {s.version or 'of unknown version'} installed into {target.name}"
                f" ({target.bootname}) from {visible(path)}: it starts at the next reboot")
        log.info("updates: %s", text)
        self._event(EVENT_INSTALLED, text, {"bundle": str(path), "slot": target.name,
                                            "bootname": target.bootname, "version": s.version,
                                            "origin": s.origin})
        doc = self._state()
        doc["installed"] = {"slot": target.name, "version": s.version, "boot_id":
                            self.boot, "at": time.time()}
        await self._save_state(doc)
        error = None
        if s.reboot:
            # Still "installing" until it ran: a client that sees "installed" with reboot set
            # and no error may say the box reboots.
            try:
                await self._reboot(origin=f"{s.origin}, after the update")
            except OSError as e:
                error = f"installed, but not rebooted: {e}"
                log.error("updates: %s", error)
                self._event(EVENT_ERROR, f"update {s.version} {error}",
                            {"error": str(e), "origin": s.origin})
        self._ended("installed", error)

    # ---------------------------------------------------------------- reboot

    async def reboot(self, *, origin: str) -> dict[str, Any]:
        if self._installing:
            raise InstallRefused(f"not rebooting: {self._busy()}")
        return await self._reboot(origin=origin)

    async def _reboot(self, *, origin: str) -> dict[str, Any]:
        argv = list(self.cfg.reboot_command)
        text = f"reboot asked by {origin}"
        log.warning("updates: %s", text)
        self._event(EVENT_REBOOT, text, {"origin": origin, "command": argv})
        await asyncio.to_thread(self.settle_for_reboot)
        self._reboot_running = origin
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(proc.communicate(), 60.0)
        except (OSError, TimeoutError) as e:
            raise OSError(f"reboot command {argv[0]!r} failed: {e}") from None
        finally:
            self._reboot_running = None
        if proc.returncode != 0:
            last = out.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise OSError(f"reboot command exited with status {proc.returncode}"
                          f"{': ' + visible(last[0]) if last[0] else ''}")
        self.rebooting = origin
        return {"state": "rebooting", "origin": origin}

    # ---------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        st = self.status_
        installed = self._state().get("installed")
        awaiting = None
        if (isinstance(installed, dict) and installed.get("boot_id") == self.boot
                and st is not None and st.primary == installed.get("slot")
                and not (st.booted_slot and st.booted_slot.name == st.primary)):
            awaiting = {"slot": installed.get("slot"), "version": installed.get("version")}
        sel = self.selection
        return {
            "enabled": True,
            "error": self.ready_error if self.ready_error != "starting" else None,
            "read_error": self.read_error,
            "compatible": st.compatible if st else None,
            "booted": st.booted_slot.name if st and st.booted_slot else None,
            "primary": st.primary if st else None,
            "slots": [s.to_json() for s in st.slots] if st else [],
            "boot_selection": None if sel is None else {
                "order": list(sel.order), "ok": sel.ok, "tries": sel.tries,
                "committed": sel.committed, "boot_tries": sel.limit, "loops": sel.loops,
                "boot_loops": sel.loop_limit},
            "commit": dict(self.commit),
            "reboot_needed": awaiting,
            "install": self.install_state.to_json(since=self.install_state.seq),
            "rollback": self.rollback,
            "rebooting": self.rebooting,
            "service": {"bus": self.bus.bus.status(), "rauc": self.bus.service.status()},
        }

    def summary(self) -> dict[str, Any]:
        full = self.status()
        return {k: full[k] for k in ("enabled", "error", "booted", "primary", "slots",
                                     "commit", "reboot_needed", "rollback")} | {
            "install": {k: full["install"][k] for k in ("state", "version", "slot",
                                                        "percent", "error")}}

    # ---------------------------------------------------------------- control socket

    def handlers(self) -> dict[str, Callable[[dict], Any]]:
        async def slots(_req: dict) -> dict:
            with contextlib.suppress(OSError):
                await self.refresh()
            return self.status()

        async def update(req: dict) -> dict:
            bundle = req.get("bundle")
            if not isinstance(bundle, str) or not bundle or "\0" in bundle:
                raise ValueError("bundle must be the bundle's absolute path")
            reboot = req.get("reboot", False)
            if not isinstance(reboot, bool):
                raise ValueError("reboot must be true or false")
            origin = req.get("origin", "socketctl")
            if not isinstance(origin, str) or not origin.isprintable() or len(origin) > 80:
                origin = "socketctl"
            try:
                return await self.begin(bundle, origin=origin, reboot=reboot)
            except InstallRefused as e:
                raise ValueError(str(e)) from None

        async def update_status(req: dict) -> dict:
            since = req.get("since", 0)
            if not isinstance(since, int) or isinstance(since, bool) or since < 0:
                raise ValueError("since must be a progress line's seq (an integer >= 0)")
            return self.install_state.to_json(since=since)

        async def reboot(req: dict) -> dict:
            origin = req.get("origin", "socketctl")
            if not isinstance(origin, str) or not origin.isprintable() or len(origin) > 80:
                origin = "socketctl"
            try:
                return await self.reboot(origin=origin)
            except InstallRefused as e:
                raise ValueError(str(e)) from None

        return {"slots": slots, "update": update, "update-status": update_status,
                "reboot": reboot}


__all__ = [
    "EVENT_COMMITTED",
    "EVENT_INSTALLED",
    "EVENT_ROLLED_BACK",
    "Health",
    "InstallFailed",
    "InstallRefused",
    "InstallState",
    "Updater",
    "check_with_system_conf",
    "inspect_bundle",
]
