"""The durable on-disk spool between the export worker and the shipper.

Every finished trace is written here (write-ahead) before anything is sent to the tracking
store, and deleted only once the store has it. One sqlite file in WAL mode per process, so
forked or parallel workers never contend for it; the process holds an exclusive ``flock`` on
the file's ``.lock`` companion for its whole life. A spool whose lock can be taken belongs to a
dead process: :func:`adopt` hands it to the caller, which ships what is left.

Past the size budget new traces are refused: each refusal is counted in the spool itself, so
``tracewire spool status`` (another process) can report it. A trace the store refuses outright
(a 4xx: it can never succeed as it is) is set aside in the same file, so it cannot hold up the
traces behind it, and waits there for ``tracewire spool replay``.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

FORMAT_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS traces (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    trace_id TEXT NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS rejected (
    seq INTEGER PRIMARY KEY,
    trace_id TEXT NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    payload BLOB NOT NULL
);
"""


class SpoolError(RuntimeError):
    """A spool file tracewire cannot use (for example a newer format version)."""


@dataclass(frozen=True)
class Entry:
    seq: int
    trace_id: str
    payload: bytes


@dataclass(frozen=True)
class FeedbackEntry:
    seq: int
    created: float
    payload: bytes


@dataclass(frozen=True)
class Status:
    path: Path
    pending: int
    bytes: int
    dropped: int
    oldest: float | None
    live: bool  # its process is still running
    feedback_pending: int
    feedback_dropped: int
    rejected: int  # refused by the store, waiting for `tracewire spool replay`


class Spool:
    """One spool file. The app process that writes it holds its lock (``lock_fd``); its shipper
    process opens the same file without the lock (``lock_fd=None``) to ship and acknowledge."""

    def __init__(self, path: Path, lock_fd: int | None, budget_bytes: int,
                 destination: str | None = None) -> None:
        self.path = path
        self._lock_fd = lock_fd
        self.budget_bytes = budget_bytes
        self._mutex = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash (kill -9); only an OS crash can lose the
        # last transactions, which is the trade every WAL-mode queue makes for speed.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        version = self._meta("format_version")
        if version is None:
            self._db.execute("INSERT INTO meta VALUES ('format_version', ?)", (str(FORMAT_VERSION),))
            self._db.execute("INSERT INTO meta VALUES ('dropped', '0')")
            self._db.execute("INSERT INTO meta VALUES ('feedback_dropped', '0')")
            # Where its traces go: only a process with the same destination adopts it.
            self._db.execute("INSERT INTO meta VALUES ('destination', ?)", (destination or "",))
        elif int(version) > FORMAT_VERSION:
            raise SpoolError(f"{path} has spool format {version}; this tracewire reads up to "
                             f"{FORMAT_VERSION}: upgrade tracewire to ship it")
        self.destination = self._meta("destination") or ""
        self._bytes = self._used_bytes()

    @classmethod
    def create(cls, directory: Path, budget_bytes: int, destination: str) -> "Spool":
        directory.mkdir(parents=True, exist_ok=True)
        stem = f"spool-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        lock_fd = _lock(directory / f"{stem}.lock")
        if lock_fd is None:  # cannot happen for a fresh name, but never share a spool
            raise SpoolError(f"could not lock a new spool in {directory}")
        return cls(directory / f"{stem}.db", lock_fd, budget_bytes, destination)

    def _used_bytes(self) -> int:
        return self._db.execute("SELECT (SELECT COALESCE(SUM(size), 0) FROM traces) + "
                                "(SELECT COALESCE(SUM(size), 0) FROM rejected)").fetchone()[0]

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, trace_id: str, payload: bytes) -> bool:
        """Append one trace; False (and counted) if the size budget is used up."""
        with self._mutex:
            if self._bytes + len(payload) > self.budget_bytes:
                # Acknowledgements may come from the shipper process: count again first.
                self._bytes = self._used_bytes()
            if self._bytes + len(payload) > self.budget_bytes:
                self._db.execute(
                    "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'dropped'")
                return False
            self._db.execute("INSERT INTO traces (trace_id, created, size, payload) "
                             "VALUES (?, ?, ?, ?)", (trace_id, time.time(), len(payload), payload))
            self._bytes += len(payload)
            return True

    def take(self, limit: int) -> list[Entry]:
        """The oldest ``limit`` entries, in order, without removing them."""
        with self._mutex:
            rows = self._db.execute("SELECT seq, trace_id, payload FROM traces ORDER BY seq "
                                    "LIMIT ?", (limit,)).fetchall()
        return [Entry(*row) for row in rows]

    def ack(self, entries: list[Entry]) -> None:
        """The store has these: forget them."""
        if not entries:
            return
        with self._mutex:
            self._db.execute(
                f"DELETE FROM traces WHERE seq IN ({','.join('?' * len(entries))})",
                [e.seq for e in entries])
            self._bytes = self._used_bytes()

    def reject(self, entry: Entry, reason: str) -> None:
        """The store refused this trace: set it aside (kept, counted) so the rest can go on."""
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT OR IGNORE INTO rejected SELECT seq, trace_id, created, size, "
                             "payload, ? FROM traces WHERE seq = ?", (reason, entry.seq))
            self._db.execute("DELETE FROM traces WHERE seq = ?", (entry.seq,))
            self._db.execute("COMMIT")

    def put_feedback(self, payload: bytes) -> bool:
        with self._mutex:
            self._db.execute("INSERT INTO feedback (created, payload) VALUES (?, ?)",
                             (time.time(), payload))
        return True

    def take_feedback(self, limit: int) -> list[FeedbackEntry]:
        with self._mutex:
            rows = self._db.execute("SELECT seq, created, payload FROM feedback ORDER BY seq "
                                    "LIMIT ?", (limit,)).fetchall()
        return [FeedbackEntry(*row) for row in rows]

    def ack_feedback(self, entry: FeedbackEntry, expired: bool = False) -> None:
        """Applied to its trace, or (``expired``) its trace never appeared: counted as dropped."""
        with self._mutex:
            self._db.execute("DELETE FROM feedback WHERE seq = ?", (entry.seq,))
            if expired:
                self._db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 "
                                 "WHERE key = 'feedback_dropped'")

    def pending(self, feedback: bool = False) -> int:
        with self._mutex:
            table = "feedback" if feedback else "traces"
            return self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    @property
    def dropped(self) -> int:
        with self._mutex:
            return int(self._meta("dropped") or 0)

    def close(self, remove_if_empty: bool = True) -> None:
        with self._mutex:
            empty = self._db.execute(
                "SELECT (SELECT COUNT(*) FROM traces) + (SELECT COUNT(*) FROM feedback) + "
                "(SELECT COUNT(*) FROM rejected)").fetchone()[0] == 0
            dropped = int(self._meta("dropped") or 0)
            self._db.close()
        if self._lock_fd is None:
            return  # not ours to remove
        if remove_if_empty and empty and not dropped:
            for suffix in ("", "-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            self.path.with_suffix(".lock").unlink(missing_ok=True)
        os.close(self._lock_fd)


def _lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _held(lock_path: Path) -> bool:
    """Whether a live process holds this lock (checked without creating the file)."""
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def adopt(directory: Path, budget_bytes: int, destination: str) -> Iterator[Spool]:
    """Spools left by dead processes for ``destination``, each locked for the caller while it
    ships them."""
    if not directory.is_dir():
        return
    for lock_path in sorted(directory.glob("spool-*.lock")):
        db_path = lock_path.with_suffix(".db")
        fd = _lock(lock_path)
        if fd is None:
            continue  # its process is alive (or another process adopted it first)
        if not db_path.exists():
            lock_path.unlink(missing_ok=True)
            os.close(fd)
            continue
        spool = Spool(db_path, fd, budget_bytes)
        if spool.destination != destination:
            spool.close(remove_if_empty=False)  # another app's: leave it for that app
            continue
        yield spool


def status(directory: Path) -> list[Status]:
    """Every spool in ``directory``, read without taking it over."""
    found = []
    if not directory.is_dir():
        return found
    for db_path in sorted(directory.glob("spool-*.db")):
        live = _held(db_path.with_suffix(".lock"))
        try:
            db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
            try:
                pending, size, oldest = db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(created) FROM traces").fetchone()
                meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
                feedback = db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]
                rejected = _count_rejected(db)
            finally:
                db.close()
                if not db_path.exists():  # removed meanwhile: our reader left its -shm behind
                    for suffix in ("-wal", "-shm"):
                        Path(str(db_path) + suffix).unlink(missing_ok=True)
        except sqlite3.Error:
            continue  # being created or removed right now: not a spool to report yet
        found.append(Status(db_path, pending, size, int(meta.get("dropped", 0)), oldest, live,
                            feedback, int(meta.get("feedback_dropped", 0)), rejected))
    return found


def _count_rejected(db: sqlite3.Connection) -> int:
    try:
        return db.execute("SELECT COUNT(*) FROM rejected").fetchone()[0]
    except sqlite3.OperationalError:  # written by a tracewire from before the table existed
        return 0


def replay(directory: Path) -> int:
    """Queue every trace the store refused again, at the end of its spool; how many."""
    moved = 0
    if not directory.is_dir():
        return moved
    for db_path in sorted(directory.glob("spool-*.db")):
        db = sqlite3.connect(db_path, isolation_level=None, timeout=30)
        try:
            if not _count_rejected(db):
                continue
            db.execute("BEGIN IMMEDIATE")
            moved += db.execute("INSERT INTO traces (trace_id, created, size, payload) "
                                "SELECT trace_id, created, size, payload FROM rejected "
                                "ORDER BY seq").rowcount
            db.execute("DELETE FROM rejected")
            db.execute("COMMIT")
        finally:
            db.close()
    return moved
