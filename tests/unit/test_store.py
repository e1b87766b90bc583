"""The SQLite store: round trips, event order and retention, upload bookkeeping, migrations,
refusal of newer files, corrupt files moved aside, and SIGKILL at random moments.

Everything runs against real database files in a temporary folder.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdwan.common import store as store_mod
from sdwan.common.store import (
    DB_NAME,
    EVENT_STORE_RESET,
    LATEST_VERSION,
    MAX_TEXT,
    Doc,
    Event,
    NatEntry,
    Store,
    StoreError,
    StoreVersionError,
    UploadedEvent,
    quarantine,
)

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware"


class FakeClock:
    """A settable wall clock, so stored times are exact and can even go backwards."""

    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "data" / DB_NAME


@pytest.fixture
def st(db: Path, clock: FakeClock) -> Iterator[Store]:
    s = Store(db, clock=clock)
    yield s
    s.close()


def corrupt_copies(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if ".corrupt-" in p.name and not p.name.endswith(("-wal", "-shm", "-journal"))
    )


# ---------------------------------------------------------------------------- open / close


def test_creates_file_in_data_dir_with_wal_and_private_mode(tmp_path: Path) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    with Store(data_dir) as s:
        assert s.path == data_dir / DB_NAME
        assert s.schema_version == LATEST_VERSION
        assert s.recovered is None
        assert len(s.instance_id) == 32
        assert s._conn is not None
        assert s._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert s._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert s._conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0
        assert (s.path.stat().st_mode & 0o777) == 0o600
        other = sqlite3.connect(s.path)
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        other.close()


def test_creates_missing_parent_folders(tmp_path: Path) -> None:
    with Store(tmp_path / "a" / "b" / DB_NAME) as s:
        s.add_event("t", "x")
    assert (tmp_path / "a" / "b" / DB_NAME).exists()


def test_a_data_dir_that_does_not_exist_yet(tmp_path: Path) -> None:
    with Store(tmp_path / "lib" / "socketd") as s:
        assert s.path == tmp_path / "lib" / "socketd" / DB_NAME
    assert (tmp_path / "lib" / "socketd").is_dir()


def test_instance_id_is_kept_across_reopen(db: Path) -> None:
    with Store(db) as s:
        first = s.instance_id
    with Store(db) as s:
        assert s.instance_id == first


def test_closed_store_raises_and_close_twice_is_harmless(db: Path) -> None:
    s = Store(db)
    s.close()
    s.close()
    assert s.closed
    with pytest.raises(StoreError, match="closed"):
        s.add_event("t", "x")
    with pytest.raises(StoreError, match="closed"):
        s.get_doc("config")


def test_unwritable_location_is_a_store_error_not_a_crash(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match=str(blocker)):
        Store(blocker / DB_NAME)


def test_usable_from_a_coroutine(db: Path) -> None:
    async def main() -> list[str]:
        with Store(db) as s:
            for i in range(3):
                s.add_event("tick", f"t{i}")
                await asyncio.sleep(0)
            return [e.text for e in s.events()]

    assert asyncio.run(main()) == ["t2", "t1", "t0"]


# ---------------------------------------------------------------------------- documents


def test_doc_round_trip_with_stored_time(st: Store, clock: FakeClock, db: Path) -> None:
    value = {"site": {"id": 1, "name": "brañch-1"}, "peers": [{"id": 2, "subnets": ["10.2/24"]}]}
    assert st.get_doc("config") is None
    assert st.put_doc("config", value) is True
    assert st.get_doc("config") == Doc("config", value, clock.t)

    clock.t += 60
    assert st.put_doc("config", value) is False  # same content: not a change
    assert st.get_doc("config") == Doc("config", value, clock.t)  # but the time moves
    assert st.put_doc("config", {**value, "rev": 2}) is True
    st.put_doc("directory", {"sites": []})
    assert st.doc_names() == ["config", "directory"]

    st.close()
    with Store(db) as again:
        doc = again.get_doc("config")
        assert doc is not None and doc.value["rev"] == 2
        assert again.delete_doc("config") is True
        assert again.delete_doc("config") is False
        assert again.get_doc("config") is None


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("", {}),
        ("has space", {}),
        ("config", ["not", "a", "dict"]),
        ("config", {"x": object()}),
        ("config", {"x": float("nan")}),
    ],
)
def test_bad_docs_are_refused_and_nothing_is_written(st: Store, name: str, value: object) -> None:
    with pytest.raises(ValueError):
        st.put_doc(name, value)  # type: ignore[arg-type]
    assert st.doc_names() == []


# ---------------------------------------------------------------------------- events


def test_event_round_trip(st: Store, clock: FakeClock) -> None:
    ev = st.add_event("pop.connected", "PoP connected over wan1", site_id=7, data={"link": "wan1"})
    assert ev == Event(1, clock.t, "pop.connected", "PoP connected over wan1", 7, {"link": "wan1"})
    assert st.events() == [ev]
    assert ev.to_dict() == {
        "seq": 1, "ts": clock.t, "kind": "pop.connected", "text": "PoP connected over wan1",
        "site_id": 7, "data": {"link": "wan1"},
    }
    assert st.last_seq() == 1


def test_events_newest_first_by_sequence_even_if_the_clock_goes_back(
    st: Store, clock: FakeClock
) -> None:
    for i in range(5):
        clock.t -= 10  # a box that booted with a wrong clock and corrected it
        st.add_event("tunnel.up" if i % 2 else "tunnel.down", f"e{i}")
    assert [e.text for e in st.events()] == ["e4", "e3", "e2", "e1", "e0"]
    assert [e.seq for e in st.events()] == [5, 4, 3, 2, 1]
    assert [e.text for e in st.events(limit=2)] == ["e4", "e3"]
    assert st.events(limit=0) == []
    assert [e.text for e in st.events(since_seq=3)] == ["e4", "e3"]
    assert [e.text for e in st.events(kind="tunnel.up")] == ["e3", "e1"]
    assert [e.text for e in st.events(kind="tunnel.up", since_seq=2, limit=1)] == ["e3"]


def test_event_validation(st: Store) -> None:
    for kind in ("", "has space", "x" * 65):
        with pytest.raises(ValueError, match="kind"):
            st.add_event(kind, "t")
    with pytest.raises(ValueError, match="site_id"):
        st.add_event("k", "t", site_id=0)
    with pytest.raises(ValueError, match="data"):
        st.add_event("k", "t", data={"blob": "x" * (store_mod.MAX_DATA_BYTES + 1)})
    with pytest.raises(ValueError, match="limit"):
        st.events(limit=-1)
    assert st.events() == []
    long = st.add_event("k", "y" * (MAX_TEXT + 500))
    assert len(long.text) == MAX_TEXT and long.text.endswith("…")
    assert st.events()[0].text == long.text


def test_retention_keeps_the_newest_and_never_reuses_a_sequence(db: Path) -> None:
    with Store(db, max_events=10) as s:
        for i in range(1, 26):
            s.add_event("tick", f"e{i}")
        assert [e.seq for e in s.events(limit=100)] == list(range(25, 15, -1))
    with Store(db, max_events=10) as s:
        assert s.add_event("tick", "after reopen").seq == 26
        assert len(s.events(limit=100)) == 10


def test_retention_keeps_the_file_bounded(db: Path) -> None:
    with Store(db, max_events=50) as s:
        for i in range(150):
            s.add_event("tick", f"{i:04d} " + "x" * 400)
        s._db().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size_150 = db.stat().st_size
        for i in range(150, 450):
            s.add_event("tick", f"{i:04d} " + "x" * 400)
        s._db().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        # Deleted rows' pages are reused: the file stops growing once retention kicks in.
        assert db.stat().st_size <= size_150 + 4 * 4096


# ---------------------------------------------------------------------------- upload bookkeeping


def test_upload_bookkeeping(db: Path) -> None:
    with Store(db) as s:
        assert s.pending_upload() == []
        for i in range(1, 8):
            s.add_event("tick", f"e{i}")
        assert [e.seq for e in s.pending_upload(limit=3)] == [1, 2, 3]  # oldest first
        assert s.mark_uploaded(3) == 3
        assert [e.seq for e in s.pending_upload()] == [4, 5, 6, 7]
        assert s.mark_uploaded(2) == 3  # a late acknowledgement does not move back
        assert s.mark_uploaded(1000) == 7  # never past the last event given out
        assert s.pending_upload() == []
        s.add_event("tick", "e8")
        assert [e.text for e in s.pending_upload()] == ["e8"]
    with Store(db) as s:
        assert s.uploaded_seq() == 7
        assert [e.seq for e in s.pending_upload()] == [8]


def test_retention_drops_unuploaded_events_too(db: Path) -> None:
    # An unreachable PoP must not let the log grow without bound; the PoP sees the seq gap.
    with Store(db, max_events=5) as s:
        for i in range(12):
            s.add_event("tick", f"e{i}")
        assert [e.seq for e in s.pending_upload()] == [8, 9, 10, 11, 12]
        with pytest.raises(ValueError):
            s.mark_uploaded(-1)


# ---------------------------------------------------------------------------- NAT data


def test_nat_round_trip(db: Path, clock: FakeClock) -> None:
    with Store(db, clock=clock) as s:
        assert s.nat(2, "wan1") is None
        a = s.put_nat(2, "wan1", 4800, "198.51.100.7:40123", ("203.0.113.2", 4800), at=1000.5)
        assert a == NatEntry(2, "wan1", 4800, "198.51.100.7:40123", "203.0.113.2:4800", 1000.5)
        b = s.put_nat(2, "wan2", 4801, ("2001:db8::1", 5000), "[2001:db8::2]:6000")
        assert b.local_public == "[2001:db8::1]:5000" and b.at == clock.t
        assert b.peer_public_endpoint == ("2001:db8::2", 6000)
        c = s.put_nat(3, "wan1", 4800, "198.51.100.7:40200", "192.0.2.9:4800")
        # Replacing the entry for the same (peer, link): the newest punch wins.
        a2 = s.put_nat(2, "wan1", 4800, "198.51.100.7:40999", "203.0.113.2:4800", at=2000)
        assert s.nat(2, "wan1") == a2
        assert s.nat_all() == [a2, b, c]
    with Store(db) as s:
        assert s.nat_all() == [a2, b, c]
        assert s.forget_nat(2, "wan1") == 1
        assert s.forget_nat(2, "wan1") == 0
        assert s.nat_all() == [b, c]
        assert s.forget_nat(2) == 1
        assert s.nat_all() == [c]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, "wan1", 4800, "1.2.3.4:5", "1.2.3.4:6"), "peer_id"),
        ((2, "WAN1", 4800, "1.2.3.4:5", "1.2.3.4:6"), "link"),
        ((2, "wan1", 0, "1.2.3.4:5", "1.2.3.4:6"), "local_port"),
        ((2, "wan1", 4800, "host:5", "1.2.3.4:6"), "local_public"),
        ((2, "wan1", 4800, "1.2.3.4:5", "::1:6"), "peer_public"),
    ],
)
def test_nat_validation(st: Store, args: tuple[object, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        st.put_nat(*args)  # type: ignore[arg-type]
    assert st.nat_all() == []


# ---------------------------------------------------------------------------- migrations

# What a version 1 file looks like in the field. Frozen here on purpose: if someone edits
# migration 1 in store.py instead of adding a new version, this test still checks against
# the files that were actually written.
V1_SCHEMA = (
    "CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value NOT NULL)",
    "CREATE TABLE docs (name TEXT PRIMARY KEY, value TEXT NOT NULL, stored_at REAL NOT NULL)",
    """CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL,
        kind TEXT NOT NULL, site_id INTEGER, text TEXT NOT NULL, data TEXT)""",
    "CREATE INDEX events_kind ON events (kind, seq)",
    "INSERT INTO schema_version VALUES (1, 1600000000.0)",
    "INSERT INTO meta VALUES ('instance_id', 'v1instance'), ('uploaded_seq', 1)",
    """INSERT INTO docs VALUES ('config', '{"rev":1}', 1600000001.0)""",
    """INSERT INTO events (ts, kind, site_id, text, data) VALUES
        (1600000002.0, 'pop.connected', NULL, 'up', NULL),
        (1600000003.0, 'tunnel.up', 2, 'tunnel to 2 up', '{"link":"wan1"}')""",
    "PRAGMA user_version = 1",
)


def make_v1(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN")
    for sql in V1_SCHEMA:
        conn.execute(sql)
    conn.execute("COMMIT")
    conn.close()


def test_v1_file_is_upgraded_keeping_its_data(db: Path) -> None:
    make_v1(db)
    with Store(db) as s:
        assert s.schema_version == LATEST_VERSION == 4
        assert s.recovered is None
        assert s.instance_id == "v1instance"
        assert s.get_doc("config") == Doc("config", {"rev": 1}, 1600000001.0)
        assert [e.text for e in s.events()] == ["tunnel to 2 up", "up"]
        assert s.events()[0].data == {"link": "wan1"}
        assert [e.seq for e in s.pending_upload()] == [2]
        assert s.add_event("t", "new").seq == 3
        s.put_nat(2, "wan1", 4800, "1.2.3.4:5", "5.6.7.8:9", how="local")
        assert [e.how for e in s.nat_all()] == ["local"]
    conn = sqlite3.connect(db)
    versions = [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY 1")]
    assert versions == [1, 2, 3, 4]
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 4
    conn.close()


def test_file_from_newer_firmware_is_refused_and_left_alone(db: Path) -> None:
    with Store(db) as s:
        s.add_event("t", "precious")
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO schema_version VALUES (99, 0)")
    conn.commit()
    conn.close()
    before = db.read_bytes()
    with pytest.raises(StoreVersionError) as info:
        Store(db)
    message = str(info.value)
    assert str(db) in message and "99" in message and str(LATEST_VERSION) in message
    assert "newer firmware" in message
    assert info.value.found == 99 and info.value.supported == LATEST_VERSION
    assert db.read_bytes() == before
    assert corrupt_copies(db.parent) == []


def test_failing_migration_rolls_back_and_keeps_the_file(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Store(db) as s:
        s.add_event("t", "keep me")
    broken = ("CREATE TABLE x (a)", "INSERT INTO nope VALUES (1)")
    monkeypatch.setitem(store_mod.MIGRATIONS, 5, broken)
    monkeypatch.setattr(store_mod, "LATEST_VERSION", 5)
    with pytest.raises(StoreError, match="nope"):
        Store(db)
    assert corrupt_copies(db.parent) == []
    monkeypatch.undo()
    with Store(db) as s:
        assert s.schema_version == 4
        assert [e.text for e in s.events()] == ["keep me"]
        assert "x" not in {r[0] for r in s._read("SELECT name FROM sqlite_master")}


def test_busy_database_is_an_error_not_corruption(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Store(db).close()
    monkeypatch.setattr(store_mod, "BUSY_TIMEOUT_S", 0.2)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("PRAGMA locking_mode = EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("INSERT INTO events (ts, kind, text) VALUES (0, 'x', 'x')")
    try:
        with pytest.raises(StoreError, match="locked"):
            Store(db)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert corrupt_copies(db.parent) == []


# ---------------------------------------------------------------------------- corruption


def populated(db: Path, n: int = 300) -> bytes:
    with Store(db) as s:
        s.put_doc("config", {"rev": 1})
        for i in range(n):
            s.add_event("tick", f"{i:05d} " + "z" * 200)
    return db.read_bytes()


def garbage(db: Path) -> None:
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_bytes(random.Random(1).randbytes(8192))


def text_file(db: Path) -> None:
    db.parent.mkdir(parents=True, exist_ok=True)
    db.write_text("this is not a database\n" * 200)


def truncated_half(db: Path) -> None:
    data = populated(db)
    db.write_bytes(data[: len(data) // 2])


def truncated_header(db: Path) -> None:
    data = populated(db)
    db.write_bytes(data[:60])


def damaged_page(db: Path) -> None:
    data = bytearray(populated(db))
    page = 4096
    data[5 * page : 6 * page] = random.Random(2).randbytes(page)
    db.write_bytes(bytes(data))


def foreign_db(db: Path) -> None:
    db.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE something_else (x)")
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    "damage", [garbage, text_file, truncated_half, truncated_header, damaged_page, foreign_db]
)
def test_unusable_file_is_moved_aside_and_a_fresh_store_works(
    db: Path, clock: FakeClock, damage: object
) -> None:
    damage(db)  # type: ignore[operator]
    bad = db.read_bytes()
    with Store(db, clock=clock) as s:
        assert s.recovered is not None
        moved = s.recovered.moved_to
        assert moved.parent == db.parent
        assert moved.name.startswith(f"{DB_NAME}.corrupt-2023")
        assert moved.read_bytes() == bad
        assert corrupt_copies(db.parent) == [moved]

        (ev,) = s.events()
        assert ev.kind == EVENT_STORE_RESET and ev.seq == 1
        assert moved.name in ev.text and s.recovered.reason in ev.text
        assert ev.data == {"reason": s.recovered.reason, "moved_to": str(moved)}

        assert s.get_doc("config") is None
        s.put_doc("config", {"rev": 2})
        s.add_event("t", "works")
    with Store(db) as s:  # no loop: the fresh file is fine on the next boot
        assert s.recovered is None
        assert [e.text for e in s.events()][0] == "works"
    assert len(corrupt_copies(db.parent)) == 1


def test_nothing_of_a_stale_wal_reaches_the_fresh_file(db: Path) -> None:
    # A WAL that was committed to a good file, left next to a damaged copy of that file.
    populated(db, 50)
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("INSERT INTO events (ts, kind, text) VALUES (0, 'stale', 'from the wal')")
    wal = Path(f"{db}-wal").read_bytes()
    conn.close()
    damaged_page(db)
    Path(f"{db}-wal").write_bytes(wal)
    with Store(db) as s:
        assert s.recovered is not None
        assert [e.kind for e in s.events()] == [EVENT_STORE_RESET]


def test_quarantine_moves_every_companion_file(tmp_path: Path) -> None:
    db = tmp_path / DB_NAME
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{db}{suffix}").write_text(suffix or "main")
    moved = quarantine(db, now=0)
    assert moved == tmp_path / f"{DB_NAME}.corrupt-19700101T000000Z"
    for suffix in ("", "-wal", "-shm", "-journal"):
        assert not Path(f"{db}{suffix}").exists()
        assert Path(f"{moved}{suffix}").read_text() == (suffix or "main")


def test_only_the_newest_corrupt_copies_are_kept(db: Path, clock: FakeClock) -> None:
    for _ in range(5):
        clock.t += 1
        garbage(db)
        for s in ("-wal", "-shm"):
            Path(f"{db}{s}").unlink(missing_ok=True)
        Store(db, clock=clock, keep_corrupt=3).close()
    kept = corrupt_copies(db.parent)
    assert len(kept) == 3
    assert [p.name[-3:] for p in kept] == ["23Z", "24Z", "25Z"]  # the three newest seconds
    assert {p for p in db.parent.iterdir() if ".corrupt-" in p.name} == set(kept)


def test_two_corruptions_in_the_same_second_get_distinct_names(db: Path, clock: FakeClock) -> None:
    for _ in range(2):
        garbage(db)
        for s in ("-wal", "-shm"):
            Path(f"{db}{s}").unlink(missing_ok=True)
        Store(db, clock=clock).close()
    names = [p.name for p in corrupt_copies(db.parent)]
    assert len(names) == 2 and names[1] == names[0] + "-1"


# ---------------------------------------------------------------------------- SIGKILL at random


# The writer: each event's text and data are a function of its sequence number, so a torn or
# half-written event shows up as a mismatch. It prints each seq only once add_event returned.
WRITER = textwrap.dedent(
    """
    import hashlib, sys
    from sdwan.common.store import Store

    def blob(n):
        return hashlib.sha256(str(n).encode()).hexdigest() * 12

    s = Store(sys.argv[1], max_events=int(sys.argv[2]))
    print("open", flush=True)
    while True:
        n = s.last_seq() + 1
        ev = s.add_event(
            "tick", f"{n} {blob(n)}", site_id=n % 65535 + 1, data={"n": n, "b": blob(n)}
        )
        assert ev.seq == n, (ev.seq, n)
        if n % 3 == 0:
            s.put_doc("config", {"gen": n, "b": blob(n)})
        print(n, flush=True)
    """
)


def blob(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest() * 12


def test_sigkill_at_random_moments_leaves_a_sound_prefix(tmp_path: Path) -> None:
    db = tmp_path / DB_NAME
    retention = 150
    seed = int(os.environ.get("STORE_KILL_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": str(FIRMWARE)}
    acked_total = 0
    for run in range(20):
        # The first runs die early, often while the file is created or migrated.
        delay = rng.uniform(0.0, 0.15) if run < 4 else rng.uniform(0.05, 0.6)
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), str(retention)],
            stdout=subprocess.PIPE, env=env, text=True,
        )
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
        acked = [int(line) for line in out.split() if line.isdigit()]
        where = f"(seed {seed}, run {run}, delay {delay:.3f}s, acked {acked[-1:] or 'none'})"

        with Store(db, max_events=retention) as s:
            assert s.recovered is None, f"file was moved aside {where}: {s.recovered}"
            check = s._read("PRAGMA quick_check")
            assert check == [("ok",)], where
            last = s.last_seq()
            # Everything acknowledged is there; at most the one in flight got in unreported.
            if acked:
                assert acked[-1] <= last <= acked[-1] + 1, where
            else:
                assert acked_total <= last <= acked_total + 1, where
            events = s.events(limit=retention + 10)
            assert [e.seq for e in events] == list(
                range(last, max(0, last - retention), -1)
            ), where
            for e in events:
                assert e.text == f"{e.seq} {blob(e.seq)}", where
                assert e.data == {"n": e.seq, "b": blob(e.seq)}, where
                assert e.site_id == e.seq % 65535 + 1, where
            doc = s.get_doc("config")
            # The doc is written in its own transaction after every third event.
            if last >= 4:
                assert doc is not None, where
            if doc is not None:
                gen = doc.value["gen"]
                assert doc.value == {"gen": gen, "b": blob(gen)}, where
                assert gen % 3 == 0 and last - 3 <= gen <= last, where
            acked_total = last
    assert acked_total > 0, f"no event was ever written (seed {seed})"


def test_events_about_one_site(db: Path) -> None:
    with Store(db) as st:
        st.add_event("pop.connected", "site 1 up", site_id=1)
        st.add_event("pop.connected", "site 2 up", site_id=2)
        st.add_event("pop.disconnected", "site 1 down", site_id=1)
        st.add_event("config.updated", "no site")
        assert [e.text for e in st.events(site_id=1)] == ["site 1 down", "site 1 up"]
        assert [e.text for e in st.events(site_id=2, kind="pop.connected")] == ["site 2 up"]
        assert st.events(site_id=3) == []


def test_uploaded_batch_is_one_transaction_with_its_own_retention(db: Path) -> None:
    with Store(db, max_events=5) as s:
        for i in range(3):
            s.add_event("own", f"own {i}")
        batch = [UploadedEvent("site.x", f"site 7 #{i}", 7) for i in range(8)]
        result = s.add_events(batch, 7, keep=4, doc=("site.7.events", {"up_to": 8}))
        assert (result.stored, result.malformed, result.evicted) == (8, 0, 4)
        s.add_events([UploadedEvent("site.x", "site 9", 9)], 9, keep=4)
        # Site 7's flood evicted only its own oldest: the owner's and site 9's stay.
        assert s.count_events(7) == 4 and s.count_events(9) == 1 and s.count_events(own=True) == 3
        assert [e.text for e in s.events(site_id=7)] == [f"site 7 #{i}" for i in (7, 6, 5, 4)]
        assert s.get_doc("site.7.events").value == {"up_to": 8}
        # The owner's retention counts the owner's events alone.
        for i in range(3, 9):
            s.add_event("own", f"own {i}")
        assert s.count_events(own=True) == 5 and s.count_events(7) == 4


def test_uploaded_batch_skips_malformed_events_and_a_failure_writes_nothing(db: Path) -> None:
    with Store(db) as s:
        result = s.add_events(
            [UploadedEvent("bad kind!", "x"), UploadedEvent("ok", "fine", 3)], 3, keep=10
        )
        assert (result.stored, result.malformed) == (1, 1)
        with pytest.raises(ValueError):
            s.add_events([UploadedEvent("ok", "x")], 3, keep=10, doc=("bad name!", {}))
        assert s.count_events(3) == 1


def test_own_batch_is_one_transaction_within_max_events(db: Path) -> None:
    with Store(db, max_events=3) as s:
        s.add_events([UploadedEvent("site.x", "theirs", 4)], 4, keep=10)
        result = s.add_events([UploadedEvent("own", f"own {i}") for i in range(5)])
        assert (result.stored, result.evicted) == (5, 2)
        assert [e.text for e in s.events()] == ["own 4", "own 3", "own 2", "theirs"]
