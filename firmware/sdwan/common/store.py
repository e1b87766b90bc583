"""The persistent store of socketd: one SQLite file for documents, events and NAT data.

`Store(path)` owns `<data_dir>/socketd.db`: `path` is the data directory, or the database file
itself if its name ends in ".db". It holds:

* documents: named JSON objects with the time they were stored, for what the PoP sends
  ("config", "directory") so a socket that boots without the PoP starts from the last known state;
* events: an append-only log (wall-clock time plus a sequence number that only grows), read newest
  first, uploaded to the PoP oldest first, bounded to the newest `max_events`;
* NAT data: for each (peer, link) the punched endpoints, so a restart reconnects without the PoP.

It also owns the file's lifecycle: the schema version and forward migrations, refusing a file
written by newer firmware, and moving an unreadable file aside (with an event saying why) instead
of failing at every boot. Every write is one transaction on a WAL database with synchronous=FULL.
Calls are short and synchronous, so asyncio code calls them directly. The schema, the durability
choices and the corruption handling are documented in docs/store.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdwan.common.durable import fsync_dir
from sdwan.common.tomlcheck import format_endpoint, parse_endpoint

__all__ = [
    "DB_NAME",
    "DEFAULT_MAX_EVENTS",
    "EVENT_STORE_RESET",
    "LATEST_VERSION",
    "MIGRATIONS",
    "Doc",
    "Event",
    "NatEntry",
    "Recovery",
    "Store",
    "StoreError",
    "StoreVersionError",
    "UploadResult",
    "UploadedEvent",
    "quarantine",
]

DB_NAME = "socketd.db"
DEFAULT_MAX_EVENTS = 10_000
DEFAULT_KEEP_CORRUPT = 3
CACHE_KIB = 256
BUSY_TIMEOUT_S = 5.0
# Bounds the WAL file left on disk after a checkpoint; /data on the appliance is small.
JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024

MAX_TEXT = 2000
MAX_DATA_BYTES = 16 * 1024

EVENT_STORE_RESET = "store.reset"

_KIND_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_DOC_NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_LINK_NAME_RE = re.compile(r"[a-z0-9_-]{1,15}")

# Forward migrations: version N is reached by running MIGRATIONS[N] on a version N-1 file, all in
# one transaction together with its schema_version row. A released step is never edited: what is
# in the field is what it ran. New needs get a new version at the end.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE meta (
            key   TEXT PRIMARY KEY,
            value NOT NULL
        )""",
        """CREATE TABLE docs (
            name      TEXT PRIMARY KEY,
            value     TEXT NOT NULL,
            stored_at REAL NOT NULL
        )""",
        # AUTOINCREMENT: a sequence number is never reused, even once retention deleted the
        # newest rows' predecessors, so (instance_id, seq) names an event for the PoP for good.
        """CREATE TABLE events (
            seq     INTEGER PRIMARY KEY AUTOINCREMENT,
            ts      REAL NOT NULL,
            kind    TEXT NOT NULL,
            site_id INTEGER,
            text    TEXT NOT NULL,
            data    TEXT
        )""",
        "CREATE INDEX events_kind ON events (kind, seq)",
    ),
    2: (
        """CREATE TABLE nat (
            peer_id      INTEGER NOT NULL CHECK (peer_id BETWEEN 1 AND 65535),
            link         TEXT NOT NULL,
            local_port   INTEGER NOT NULL CHECK (local_port BETWEEN 1 AND 65535),
            local_public TEXT NOT NULL,
            peer_public  TEXT NOT NULL,
            at           REAL NOT NULL,
            PRIMARY KEY (peer_id, link)
        ) WITHOUT ROWID""",
    ),
    # How each path was found (docs/mesh.md): window, birthday, local, static.
    3: ("ALTER TABLE nat ADD COLUMN how TEXT NOT NULL DEFAULT 'window'",),
    # Who put an event in (docs/store.md, "Events of others"): NULL for the store's owner's
    # own, else the site that uploaded it to the PoP. Each origin has its own retention, so
    # one site's flood never evicts another's events or the owner's.
    4: (
        "ALTER TABLE events ADD COLUMN origin INTEGER",
        "CREATE INDEX events_origin ON events (origin, seq)",
    ),
}
LATEST_VERSION = max(MIGRATIONS)

_SCHEMA_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version    INTEGER PRIMARY KEY,
    applied_at REAL NOT NULL
)"""

# Result codes meaning "the bytes of this file are not a sound database". Anything else (disk
# full, read-only, I/O error, locked) is about the environment, and moving a good file aside
# because of it would throw away the configuration for nothing.
_CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}


class StoreError(Exception):
    """The store cannot be opened or a read/write failed; the message names the file."""


class StoreVersionError(StoreError):
    """The file was written by newer firmware (schema version above LATEST_VERSION)."""

    def __init__(self, path: Path, found: int, supported: int) -> None:
        super().__init__(
            f"{path}: database schema version {found} is newer than this firmware supports"
            f" ({supported}); it was written by newer firmware. Refusing to open it rather than"
            " lose data: upgrade the firmware again, or move the file aside to start empty."
        )
        self.path = path
        self.found = found
        self.supported = supported


class _Unusable(Exception):
    """The file is not a sound socketd database; the caller moves it aside."""


@dataclass(frozen=True)
class Doc:
    name: str
    value: dict[str, Any]
    stored_at: float


@dataclass(frozen=True)
class Event:
    seq: int
    ts: float
    kind: str
    text: str
    site_id: int | None = None
    data: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ts": self.ts,
            "kind": self.kind,
            "text": self.text,
            "site_id": self.site_id,
            "data": self.data,
        }


@dataclass(frozen=True)
class UploadedEvent:
    """One event of a batch for Store.add_events."""

    kind: str
    text: str
    site_id: int | None = None
    data: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class UploadResult:
    stored: int
    malformed: int  # not stored: a kind, text or data add_event would refuse
    evicted: int  # older events of the same origin deleted by its retention


@dataclass(frozen=True)
class NatEntry:
    peer_id: int
    link: str
    local_port: int
    local_public: str
    peer_public: str
    at: float
    how: str = "window"

    @property
    def local_public_endpoint(self) -> tuple[str, int]:
        return parse_endpoint(self.local_public)

    @property
    def peer_public_endpoint(self) -> tuple[str, int]:
        return parse_endpoint(self.peer_public)

    def to_dict(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "link": self.link,
            "local_port": self.local_port,
            "local_public": self.local_public,
            "peer_public": self.peer_public,
            "at": self.at,
        }


@dataclass(frozen=True)
class Recovery:
    """What happened when the file found at open was unusable."""

    reason: str
    moved_to: Path


# SQLite keeps a database's state in up to three files; a WAL left next to a fresh file would be
# replayed into it, so they always move together.
_COMPANIONS = ("", "-wal", "-shm", "-journal")


def quarantine(db_path: str | os.PathLike[str], *, keep: int = DEFAULT_KEEP_CORRUPT,
               now: float | None = None) -> Path:
    """Move `db_path` and its -wal/-shm/-journal aside to `<name>.corrupt-<UTC time>[-N]`.

    The copies keep SQLite's naming so `sqlite3 socketd.db.corrupt-...` opens them with their WAL
    for a post-mortem. Only the newest `keep` quarantined copies are kept, so a disk that keeps
    corrupting files does not fill up. Returns the new path of the main file.
    """
    db = Path(db_path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    base = db.with_name(f"{db.name}.corrupt-{stamp}")
    target, n = base, 0
    while any(Path(f"{target}{s}").exists() for s in _COMPANIONS):
        n += 1
        target = base.with_name(f"{base.name}-{n}")
    for suffix in _COMPANIONS:
        src = Path(f"{db}{suffix}")
        if src.exists():
            os.replace(src, f"{target}{suffix}")
    fsync_dir(db.parent)
    _prune_quarantined(db, keep)
    return target


def _prune_quarantined(db: Path, keep: int) -> None:
    prefix = f"{db.name}.corrupt-"
    mains = sorted(
        p for p in db.parent.iterdir()
        if p.name.startswith(prefix) and not p.name.endswith(("-wal", "-shm", "-journal"))
    )
    for old in mains[: max(0, len(mains) - keep)]:
        for suffix in _COMPANIONS:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{old}{suffix}")


def _errcode(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    # Extended result codes carry the primary code in their low byte.
    return None if code is None else code & 0xFF


def _is_corruption(exc: sqlite3.Error) -> bool:
    return _errcode(exc) in _CORRUPT_CODES


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer {lo}..{hi}, got {value!r}")
    return value


def _check_time(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    return float(value)


def _encode_object(name: str, value: object, limit: int | None = None) -> str:
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a dict, got {type(value).__name__}")
    try:
        text = json.dumps(dict(value), separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} is not JSON-serialisable: {exc}") from None
    if limit is not None and len(text.encode()) > limit:
        raise ValueError(f"{name} is {len(text.encode())} bytes as JSON; at most {limit}")
    return text


def _normalise_endpoint(name: str, value: str | tuple[str, int]) -> str:
    text = format_endpoint(value) if isinstance(value, tuple) else value
    if not isinstance(text, str):
        raise ValueError(f"{name} must be 'IPv4:port', '[IPv6]:port' or (host, port)")
    try:
        return format_endpoint(parse_endpoint(text))
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


class Store:
    """The open database. Not thread-safe: use it from one thread (the asyncio loop's)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        keep_corrupt: int = DEFAULT_KEEP_CORRUPT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        p = Path(path)
        # A data directory may not exist yet on first boot, so the name decides, not the disk.
        self.path: Path = p if p.suffix == ".db" else p / DB_NAME
        self.max_events = _check_int("max_events", max_events, 1, 10_000_000)
        self.keep_corrupt = _check_int("keep_corrupt", keep_corrupt, 1, 1000)
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        self.recovered: Recovery | None = None
        self.schema_version = 0
        self.instance_id = ""
        self._open()

    # ------------------------------------------------------------------ lifecycle

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                conn = self._connect_checked()
            except _Unusable as exc:
                reason = str(exc)
                moved = quarantine(self.path, keep=self.keep_corrupt, now=self._clock())
                try:
                    conn = self._connect_checked()
                except _Unusable as again:
                    # Not a file problem after all: stop here rather than move files in a loop.
                    raise StoreError(
                        f"{self.path}: a fresh database is unusable too: {again}"
                    ) from None
                self.recovered = Recovery(reason, moved)
        except OSError as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        self._conn = conn
        self.instance_id = str(self._scalar("SELECT value FROM meta WHERE key = 'instance_id'"))
        if self.recovered is not None:
            try:
                self._record_reset(self.recovered)
            except BaseException:
                self.close()
                raise

    def _record_reset(self, recovered: Recovery) -> None:
        self.add_event(
            EVENT_STORE_RESET,
            f"{self.path.name} was unreadable ({recovered.reason}); moved aside to"
            f" {recovered.moved_to.name}, started with an empty store",
            data={"reason": recovered.reason, "moved_to": str(recovered.moved_to)},
        )

    def _connect_checked(self) -> sqlite3.Connection:
        """Open, verify and migrate the file; _Unusable if its bytes are bad."""
        if not self.path.exists():
            # Created here rather than by SQLite so the mode does not depend on the umask;
            # SQLite gives the -wal and -shm files the mode of the main file.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            fsync_dir(self.path.parent)
        try:
            conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=True
            )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open: {exc}") from None
        try:
            self._configure(conn)
            # Judged before anything is written, so a refused or moved-aside file keeps the
            # bytes it had.
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise _Unusable("quick_check: " + "; ".join(problems))
            version = self._version(conn)
            if version > LATEST_VERSION:
                raise StoreVersionError(self.path, version, LATEST_VERSION)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: cannot use WAL journal mode (got {mode!r})")
            self._migrate(conn, version)
        except _Unusable:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            if _is_corruption(exc):
                raise _Unusable(str(exc)) from None
            raise StoreError(f"{self.path}: {exc}") from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _configure(self, conn: sqlite3.Connection) -> None:
        """Per-connection settings; none of them writes to the file."""
        # FULL in WAL mode fsyncs the WAL at every commit: an event the caller was told about
        # survives a power cut, not only a crash.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        # Catches a damaged page when it is read instead of acting on garbage.
        conn.execute("PRAGMA cell_size_check = ON")
        # The default 2 MB page cache is most of a small box's budget for a
        # database of a few hundred kilobytes read now and then.
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")

    def _migrate(self, conn: sqlite3.Connection, version: int) -> None:
        for target in range(version + 1, LATEST_VERSION + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                # Re-read under the write lock: another process may have migrated meanwhile.
                if self._version(conn) >= target:
                    conn.execute("COMMIT")
                    continue
                conn.execute(_SCHEMA_TABLE)
                for step in MIGRATIONS[target]:
                    conn.execute(step)
                conn.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (target, self._clock()),
                )
                if target == 1:
                    conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('instance_id', ?),"
                        " ('uploaded_seq', 0)",
                        (uuid.uuid4().hex,),
                    )
                conn.execute(f"PRAGMA user_version = {target}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        self.schema_version = LATEST_VERSION

    def _version(self, conn: sqlite3.Connection) -> int:
        tables = {
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        }
        if "schema_version" not in tables:
            if tables:
                raise _Unusable(
                    "not a socketd database (no schema_version table; has "
                    + ", ".join(sorted(tables))
                    + ")"
                )
            return 0
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    def close(self) -> None:
        """Close the file; later calls raise StoreError. Closing twice is harmless."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA optimize")
            conn.close()

    @property
    def closed(self) -> bool:
        return self._conn is None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"{self.path}: store is closed")
        return self._conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction; the write lock is taken at BEGIN so it cannot fail half-way on BUSY."""
        conn = self._db()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                # Some errors (SQLITE_FULL, SQLITE_IOERR) already rolled back.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._db().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc

    def _scalar(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        rows = self._read(sql, params)
        return rows[0][0] if rows else None

    # ------------------------------------------------------------------ documents

    def put_doc(self, name: str, value: Mapping[str, Any]) -> bool:
        """Store `value` under `name` (replacing it); True if it differs from what was stored."""
        if not isinstance(name, str) or not _DOC_NAME_RE.fullmatch(name):
            raise ValueError(f"document name must be 1..64 of [A-Za-z0-9_.:-], got {name!r}")
        text = _encode_object(f"document {name!r}", value)
        with self._write() as conn:
            row = conn.execute("SELECT value FROM docs WHERE name = ?", (name,)).fetchone()
            conn.execute(
                "INSERT INTO docs (name, value, stored_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value,"
                " stored_at = excluded.stored_at",
                (name, text, self._clock()),
            )
        return row is None or json.loads(row[0]) != json.loads(text)

    def get_doc(self, name: str) -> Doc | None:
        rows = self._read("SELECT value, stored_at FROM docs WHERE name = ?", (name,))
        if not rows:
            return None
        try:
            value = json.loads(rows[0][0])
        except ValueError as e:
            # A document written by this module is valid JSON; one that is not was damaged.
            raise StoreError(f"{self.path}: document {name!r} is not valid JSON: {e}") from e
        if not isinstance(value, dict):
            raise StoreError(f"{self.path}: document {name!r} is not a JSON object")
        return Doc(name, value, float(rows[0][1]))

    def delete_doc(self, name: str) -> bool:
        with self._write() as conn:
            return conn.execute("DELETE FROM docs WHERE name = ?", (name,)).rowcount > 0

    def doc_names(self) -> list[str]:
        return [row[0] for row in self._read("SELECT name FROM docs ORDER BY name")]

    # ------------------------------------------------------------------ events

    def add_event(
        self,
        kind: str,
        text: str,
        site_id: int | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> Event:
        """Append an event; drops the oldest beyond `max_events` in the same transaction.

        `text` longer than MAX_TEXT is shortened (an event is never lost for being verbose);
        `data` must be a JSON object of at most MAX_DATA_BYTES.
        """
        if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
            raise ValueError(f"event kind must be 1..64 of [A-Za-z0-9_.:-], got {kind!r}")
        if not isinstance(text, str):
            raise ValueError(f"event text must be a string, got {type(text).__name__}")
        if len(text) > MAX_TEXT:
            text = text[: MAX_TEXT - 1] + "…"
        if site_id is not None:
            _check_int("site_id", site_id, 1, 65535)
        data_text = None if data is None else _encode_object("event data", data, MAX_DATA_BYTES)
        ts = self._clock()
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO events (ts, kind, site_id, text, data) VALUES (?, ?, ?, ?, ?)",
                (ts, kind, site_id, text, data_text),
            )
            seq = int(cur.lastrowid or 0)
            self._retain(conn, None, self.max_events)
        stored_data = None if data_text is None else json.loads(data_text)
        return Event(seq, ts, kind, text, site_id, stored_data)

    @staticmethod
    def _retain(conn: sqlite3.Connection, origin: int | None, keep: int) -> int:
        """Delete the oldest events of one origin (None: the owner's own) beyond the newest
        `keep`; how many. Other origins' events are never touched."""
        match = "origin IS NULL" if origin is None else "origin = ?"
        params: tuple[Any, ...] = () if origin is None else (origin,)
        row = conn.execute(
            f"SELECT seq FROM events WHERE {match} ORDER BY seq DESC LIMIT 1 OFFSET ?",
            (*params, keep),
        ).fetchone()
        if row is None:
            return 0
        cur = conn.execute(f"DELETE FROM events WHERE {match} AND seq <= ?", (*params, row[0]))
        return cur.rowcount

    def add_events(
        self,
        events: Sequence[UploadedEvent],
        origin: int | None = None,
        keep: int | None = None,
        doc: tuple[str, Mapping[str, Any]] | None = None,
    ) -> UploadResult:
        """Store a batch in one transaction: the owner's own events (`origin` None), or a
        batch another party uploaded (a site's events at the PoP, `origin` its id). With
        them the retention of that origin alone (its newest `keep`, the owner's
        `max_events` by default, stay; other origins' events are never evicted by it), and
        `doc` (name, value), the uploader's mark, so the mark never runs ahead of the events.

        Each event is checked as add_event checks it; a malformed one is skipped and counted
        in the result, never stored.
        """
        if origin is not None:
            _check_int("origin", origin, 1, 2**31 - 1)
        keep = self.max_events if keep is None else keep
        _check_int("keep", keep, 1, 10_000_000)
        rows = []
        malformed = 0
        ts = self._clock()
        for ev in events:
            try:
                if not isinstance(ev.kind, str) or not _KIND_RE.fullmatch(ev.kind):
                    raise ValueError("kind")
                if not isinstance(ev.text, str):
                    raise ValueError("text")
                text = ev.text if len(ev.text) <= MAX_TEXT else ev.text[: MAX_TEXT - 1] + "…"
                if ev.site_id is not None:
                    _check_int("site_id", ev.site_id, 1, 65535)
                data_text = (
                    None if ev.data is None
                    else _encode_object("event data", ev.data, MAX_DATA_BYTES)
                )
            except ValueError:
                malformed += 1
                continue
            rows.append((ts, ev.kind, ev.site_id, text, data_text, origin))
        doc_text = None
        if doc is not None:
            if not _DOC_NAME_RE.fullmatch(doc[0]):
                raise ValueError(f"document name must be 1..64 of [A-Za-z0-9_.:-], got {doc[0]!r}")
            doc_text = _encode_object(f"document {doc[0]!r}", doc[1])
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO events (ts, kind, site_id, text, data, origin)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
            evicted = self._retain(conn, origin, keep) if rows else 0
            if doc_text is not None:
                conn.execute(
                    "INSERT INTO docs (name, value, stored_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET value = excluded.value,"
                    " stored_at = excluded.stored_at",
                    (doc[0], doc_text, ts),  # type: ignore[index]
                )
        return UploadResult(stored=len(rows), malformed=malformed, evicted=evicted)

    def count_events(self, origin: int | None = None, own: bool = False) -> int:
        """How many events are stored: of one origin, or the owner's own (`own`), or all."""
        if own:
            return int(self._scalar("SELECT count(*) FROM events WHERE origin IS NULL") or 0)
        if origin is not None:
            return int(self._scalar("SELECT count(*) FROM events WHERE origin = ?", (origin,)) or 0)
        return int(self._scalar("SELECT count(*) FROM events") or 0)

    @staticmethod
    def _event(row: tuple[Any, ...]) -> Event:
        seq, ts, kind, site_id, text, data = row
        return Event(seq, ts, kind, text, site_id, None if data is None else json.loads(data))

    _EVENT_COLS = "seq, ts, kind, site_id, text, data"

    def events(
        self,
        limit: int = 100,
        since_seq: int | None = None,
        kind: str | None = None,
        site_id: int | None = None,
    ) -> list[Event]:
        """Newest first: at most `limit` events with seq > `since_seq`, of `kind` and
        about `site_id` if given."""
        _check_int("limit", limit, 0, 1_000_000)
        where, params = [], []
        if site_id is not None:
            where.append("site_id = ?")
            params.append(site_id)
        if since_seq is not None:
            where.append("seq > ?")
            params.append(since_seq)
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = self._read(
            f"SELECT {self._EVENT_COLS} FROM events{clause} ORDER BY seq DESC LIMIT ?",
            (*params, limit),
        )
        return [self._event(r) for r in rows]

    def last_seq(self) -> int:
        """The highest sequence number ever given out (0 before the first event)."""
        return int(self._scalar("SELECT seq FROM sqlite_sequence WHERE name = 'events'") or 0)

    def uploaded_seq(self) -> int:
        return int(self._scalar("SELECT value FROM meta WHERE key = 'uploaded_seq'") or 0)

    def mark_uploaded(self, up_to_seq: int) -> int:
        """Record that every event with seq <= `up_to_seq` reached the PoP; returns the mark.

        The mark never moves back (a late acknowledgement is harmless) and never passes the last
        sequence given out (so events added later are not skipped).
        """
        _check_int("up_to_seq", up_to_seq, 0, 2**63 - 1)
        with self._write() as conn:
            last = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
            current = conn.execute("SELECT value FROM meta WHERE key = 'uploaded_seq'").fetchone()
            mark = max(int(current[0]), min(up_to_seq, int(last[0]) if last else 0))
            conn.execute("UPDATE meta SET value = ? WHERE key = 'uploaded_seq'", (mark,))
        return mark

    def pending_upload(self, limit: int = 100) -> list[Event]:
        """Oldest first: events not yet acknowledged by the PoP (those retention kept)."""
        _check_int("limit", limit, 0, 1_000_000)
        rows = self._read(
            f"SELECT {self._EVENT_COLS} FROM events"
            " WHERE seq > (SELECT value FROM meta WHERE key = 'uploaded_seq')"
            " ORDER BY seq ASC LIMIT ?",
            (limit,),
        )
        return [self._event(r) for r in rows]

    # ------------------------------------------------------------------ NAT data

    def put_nat(
        self,
        peer_id: int,
        link: str,
        local_port: int,
        local_public: str | tuple[str, int],
        peer_public: str | tuple[str, int],
        at: float | None = None,
        how: str = "window",
    ) -> NatEntry:
        """Record (replacing) the punched path to `peer_id` over `link`; `at` defaults to now."""
        _check_int("peer_id", peer_id, 1, 65535)
        if not isinstance(link, str) or not _LINK_NAME_RE.fullmatch(link):
            raise ValueError(f"link must be 1..15 of [a-z0-9_-], got {link!r}")
        _check_int("local_port", local_port, 1, 65535)
        if not isinstance(how, str) or not _LINK_NAME_RE.fullmatch(how):
            raise ValueError(f"how must be 1..15 of [a-z0-9_-], got {how!r}")
        entry = NatEntry(
            peer_id,
            link,
            local_port,
            _normalise_endpoint("local_public", local_public),
            _normalise_endpoint("peer_public", peer_public),
            self._clock() if at is None else _check_time("at", at),
            how,
        )
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO nat"
                " (peer_id, link, local_port, local_public, peer_public, at, how)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (entry.peer_id, entry.link, entry.local_port, entry.local_public,
                 entry.peer_public, entry.at, entry.how),
            )
        return entry

    _NAT_COLS = "peer_id, link, local_port, local_public, peer_public, at, how"

    def nat(self, peer_id: int, link: str) -> NatEntry | None:
        rows = self._read(
            f"SELECT {self._NAT_COLS} FROM nat WHERE peer_id = ? AND link = ?", (peer_id, link)
        )
        return NatEntry(*rows[0]) if rows else None

    def nat_all(self) -> list[NatEntry]:
        return [NatEntry(*r) for r in self._read(f"SELECT {self._NAT_COLS} FROM nat ORDER BY 1, 2")]

    def forget_nat(self, peer_id: int, link: str | None = None) -> int:
        """Drop the entry for (peer, link), or every link's entry for the peer; returns how many."""
        with self._write() as conn:
            if link is None:
                cur = conn.execute("DELETE FROM nat WHERE peer_id = ?", (peer_id,))
            else:
                cur = conn.execute(
                    "DELETE FROM nat WHERE peer_id = ? AND link = ?", (peer_id, link)
                )
            return cur.rowcount
