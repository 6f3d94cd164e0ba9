"""The durable on-disk spool between the export worker and the shipper.

Every finished trace is written here (write-ahead) before anything is sent to the tracking
store, and deleted only once the store has it. One sqlite file in WAL mode per process, so
forked or parallel workers never contend for it; the process holds an exclusive ``flock`` on
the file's ``.lock`` companion for its whole life. A spool whose lock can be taken belongs to a
dead process: :func:`adopt` hands it to the caller, which ships what is left.

Every trace that does not make it in is counted beside the spool, by reason (``DROP_REASONS``),
so ``tracewire spool status`` (another process) can report it: past the size budget, on a full or
unwritable disk, unencodable, or refused by a full in-memory queue. The counts, and what the
shipper process says it is doing, live in the spool's ``.lock`` file: a small block allocated
when the spool is made and rewritten in place (:class:`_Block`), so both land even on a full
disk, which is one of the reasons traces are dropped. A trace the
store refuses outright (a 4xx: it can never succeed as it is) is set aside in the same file, so
it cannot hold up the traces behind it, and waits there for ``tracewire spool replay``.

Into a tracking server a trace is stored from its spans alone, many per request; its client
request id, which no span can carry, is stamped on afterwards (one ``start_trace`` each). The
trace's acknowledgement queues that stamp in the same transaction (table ``stamps``), so it
survives a crash as the trace did.

A file in the directory that is not a spool tracewire can read (garbage, a truncated copy) is
renamed ``<name>.unreadable`` when a shipper comes across it, so it never stops shipping; one of
a newer format is left in place for the tracewire that wrote it. ``status`` lists both.

The spool holds the app's prompts: its directory is this user's and no one else's (0700), every
file in it is made 0600 whatever the umask (sqlite gives ``-wal``/``-shm`` the database's
mode), and tracewire opens only regular files of its own user with one name: a symbolic link, a
hard link or another user's file named like a spool is never opened (an attacker's link would
make the shipper, perhaps root, rewrite or create a file elsewhere); ``status`` lists it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import stat
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracewire.core import scrub

logger = logging.getLogger("tracewire")

# 2: traces are written as the app captured them (export/records.py), and a spool of version 1
# (MLflow's span records) still ships.
FORMAT_VERSION = 2

# Why a trace was not kept: past the size budget, the disk full or unwritable, a payload that
# could not be encoded, the in-memory queue full (the worker fell behind the app).
DROP_REASONS = ("budget", "disk", "encoding", "queue")
# Why feedback was not applied: pushed out of the pending-feedback budget by newer feedback, its
# trace not stored within the retention period, or the trace's owner is someone else.
FEEDBACK_DROP_REASONS = ("budget", "expired", "refused")
UNREADABLE_SUFFIX = ".unreadable"

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
    payload BLOB NOT NULL,
    tries INTEGER NOT NULL DEFAULT 0,  -- look-ups that found no trace yet
    due REAL NOT NULL DEFAULT 0  -- when to look again
);
CREATE TABLE IF NOT EXISTS stamps (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    trace_id TEXT NOT NULL,
    size INTEGER NOT NULL,
    payload BLOB NOT NULL
);
"""
_TABLES = ("traces", "feedback", "stamps")


class SpoolError(RuntimeError):
    """A spool file this tracewire cannot use: one of a newer format version."""


class UnsafeFileError(SpoolError):
    """A spool file tracewire must not open: a link, or another user's (see the module doc)."""


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
    tries: int = 0


@dataclass(frozen=True)
class Status:
    path: Path
    pending: int
    bytes: int
    oldest: float | None
    live: bool  # its process is still running
    feedback_pending: int
    rejected: int  # refused by the store, waiting for `tracewire spool replay`
    stamps: int = 0  # stored traces whose client request id is still to be written
    incomplete: int = 0  # stored incomplete: still open at TRACEWIRE_TRACE_TIMEOUT
    drops: dict[str, int] = field(default_factory=dict)  # by reason (DROP_REASONS)
    problem: str | None = None  # set for a file that cannot be shipped (then nothing else is)
    feedback_bytes: int = 0
    destination: str = ""  # where its traces go (export/destination.py), without credentials
    feedback_drops: dict[str, int] = field(default_factory=dict)  # by FEEDBACK_DROP_REASONS

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    @property
    def feedback_dropped(self) -> int:
        return sum(self.feedback_drops.values())


def _is_disk_error(exc: sqlite3.Error) -> bool:
    """The disk is full or the file cannot be written (read-only remount, quota): the trace
    is counted as dropped; anything else is a bug."""
    return isinstance(exc, sqlite3.OperationalError) and any(
        text in str(exc) for text in ("disk is full", "disk I/O error", "readonly database")
    )


class Spool:
    """One spool file. The app process that writes it holds its lock (``lock_fd``); its shipper
    process opens the same file without the lock (``lock_fd=None``) to ship and acknowledge."""

    def __init__(
        self, path: Path, lock_fd: int | None, budget_bytes: int, destination: str | None = None
    ) -> None:
        self.path = path
        self._lock_fd = lock_fd
        self.budget_bytes = budget_bytes
        self._mutex = threading.Lock()
        if destination is None and (problem := unsafe(path)) is not None:
            raise UnsafeFileError(problem)
        self._drops: Counter[str] = Counter(_Block.read(path.with_suffix(".lock"), _Block.DROPS))
        self.incomplete = 0
        # Only the app that owns a spool creates it: anyone else opening a path that is gone
        # (the app removed it, empty, as it stopped) must not make an empty one there.
        mode = "rwc" if destination is not None else "rw"
        self._db = sqlite3.connect(
            _uri(path, mode), uri=True, check_same_thread=False, isolation_level=None, timeout=30
        )
        try:
            # Before anything is written to a file that may not be ours.
            _check_format(self._db, path, existing=destination is None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a process crash (kill -9); only an OS crash can lose
            # the last transactions, which is the trade every WAL-mode queue makes for speed.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            _add_feedback_retries(self._db)
            if self._meta("format_version") is None:
                self._db.execute(
                    "INSERT INTO meta VALUES ('format_version', ?)", (str(FORMAT_VERSION),)
                )
                # Where its traces go: only a process with the same destination adopts it.
                self._db.execute("INSERT INTO meta VALUES ('destination', ?)", (destination or "",))
            self.destination = self._meta("destination") or ""
            self._bytes = self._used_bytes()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def create(cls, directory: Path, budget_bytes: int, destination: str) -> Spool:
        """A new spool in ``directory`` (made private first: see :func:`private_directory`)."""
        private_directory(directory)
        stem = f"spool-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        lock_fd = _lock(directory / f"{stem}.lock", create=True)
        if lock_fd is None:  # cannot happen for a fresh name, but never share a spool
            raise SpoolError(f"could not lock a new spool in {directory}")
        os.pwrite(lock_fd, b" " * _Block.SIZE, 0)  # the block, allocated now
        db_path = directory / f"{stem}.db"
        # Made here, not by sqlite (0644 under the usual umask): its -wal and -shm, which hold
        # the prompts too, get the same mode.
        os.close(_create_private(db_path))
        return cls(db_path, lock_fd, budget_bytes, destination)

    def _used_bytes(self) -> int:
        return self._db.execute(
            "SELECT (SELECT COALESCE(SUM(size), 0) FROM traces) + "
            "(SELECT COALESCE(SUM(size), 0) FROM rejected) + "
            "(SELECT COALESCE(SUM(size), 0) FROM stamps)"
        ).fetchone()[0]

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, trace_id: str, payload: bytes) -> bool:
        """Append one trace; False if it was dropped (counted: over the budget, or the disk is
        full or unwritable)."""
        with self._mutex:
            if self._bytes + len(payload) > self.budget_bytes:
                # Acknowledgements may come from the shipper process: count again first.
                self._bytes = self._used_bytes()
            if self._bytes + len(payload) > self.budget_bytes:
                reason = "budget"
            else:
                try:
                    self._db.execute(
                        "INSERT INTO traces (trace_id, created, size, payload) VALUES (?, ?, ?, ?)",
                        (trace_id, time.time(), len(payload), payload),
                    )
                except sqlite3.Error as exc:
                    if not _is_disk_error(exc):
                        raise
                    reason = "disk"
                else:
                    self._bytes += len(payload)
                    return True
            self._count_drops(reason, 1)
            return False

    def put_many(self, traces: Sequence[tuple[str, bytes]]) -> int:
        """Append traces in one transaction (one WAL write for a worker's batch, not one per
        trace); how many were kept. Past the budget or on a disk error, each goes on its own as
        :meth:`put`, and is counted there if dropped."""
        size = sum(len(payload) for _, payload in traces)
        with self._mutex:
            if self._bytes + size > self.budget_bytes:
                self._bytes = self._used_bytes()
            if self._bytes + size <= self.budget_bytes:
                now = time.time()
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    self._db.executemany(
                        "INSERT INTO traces (trace_id, created, size, payload) VALUES (?, ?, ?, ?)",
                        [(trace_id, now, len(payload), payload) for trace_id, payload in traces],
                    )
                    self._db.execute("COMMIT")
                except sqlite3.Error as exc:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    if not _is_disk_error(exc):
                        raise
                else:
                    self._bytes += size
                    return len(traces)
        return sum(self.put(trace_id, payload) for trace_id, payload in traces)

    def count_incomplete(self, count: int) -> None:
        """Count traces exported incomplete: still open at TRACEWIRE_TRACE_TIMEOUT."""
        with self._mutex:
            self.incomplete += count
            if self._lock_fd is not None:
                _Block.write(
                    self.path.with_suffix(".lock"), _Block.INCOMPLETE, {"traces": self.incomplete}
                )

    def count_drops(self, reason: str, count: int) -> None:
        """Count traces lost before they reached the spool (unencodable, queue full)."""
        with self._mutex:
            self._count_drops(reason, count)

    def _count_drops(self, reason: str, count: int) -> None:
        self._drops[reason] += count
        if self._lock_fd is not None:
            _Block.write(
                self.path.with_suffix(".lock"),
                _Block.DROPS,
                {reason: n for reason, n in self._drops.items() if n},
            )

    @property
    def drops(self) -> dict[str, int]:
        """Traces dropped so far, by reason."""
        with self._mutex:
            return dict(self._drops)

    def set_shipper_state(self, state: str) -> None:
        """The shipper process says what it is doing (see :meth:`shipper_state`)."""
        _Block.write(
            self.path.with_suffix(".lock"), _Block.STATE, {"state": state, "at": time.time()}
        )

    def shipper_state(self) -> tuple[str, float] | None:
        """What the shipper process last said it was doing, and when (wall clock)."""
        data = _Block.read(self.path.with_suffix(".lock"), _Block.STATE)
        return (data["state"], data["at"]) if data else None

    def take(self, limit: int) -> list[Entry]:
        """The oldest ``limit`` entries, in order, without removing them."""
        with self._mutex:
            rows = self._db.execute(
                "SELECT seq, trace_id, payload FROM traces ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [Entry(*row) for row in rows]

    def ack(self, entries: list[Entry], stamps: Sequence[tuple[str, bytes]] = ()) -> None:
        """The store has these: forget them, and queue the ``(trace id, record)`` stamps still
        to be written (in the same transaction)."""
        if not entries:
            return
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                f"DELETE FROM traces WHERE seq IN ({','.join('?' * len(entries))})",
                [e.seq for e in entries],
            )
            self._db.executemany(
                "INSERT INTO stamps (trace_id, size, payload) VALUES (?, ?, ?)",
                [(trace_id, len(record), record) for trace_id, record in stamps],
            )
            self._db.execute("COMMIT")
            self._bytes = self._used_bytes()

    def take_stamps(self, limit: int) -> list[Entry]:
        with self._mutex:
            rows = self._db.execute(
                "SELECT seq, trace_id, payload FROM stamps ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        return [Entry(*row) for row in rows]

    def ack_stamps(self, stamps: list[Entry]) -> None:
        with self._mutex:
            self._db.execute(
                f"DELETE FROM stamps WHERE seq IN ({','.join('?' * len(stamps))})",
                [s.seq for s in stamps],
            )
            self._bytes = self._used_bytes()

    def reject(self, entry: Entry, reason: str) -> None:
        """The store refused this trace: set it aside (kept, counted) so the rest can go on."""
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT OR IGNORE INTO rejected SELECT seq, trace_id, created, size, "
                "payload, ? FROM traces WHERE seq = ?",
                (reason, entry.seq),
            )
            self._db.execute("DELETE FROM traces WHERE seq = ?", (entry.seq,))
            self._db.execute("COMMIT")

    def put_feedback(self, payload: bytes, max_entries: int, max_bytes: int) -> None:
        """Queue feedback for the shipper, within the pending-feedback budget. Past it, the
        oldest waiting feedback makes room, counted as dropped (``budget``): feedback whose
        trace is stored is applied within seconds, so the oldest is the least likely ever to
        find its trace, and a flood of feedback for traces that do not exist cannot keep later
        feedback out."""
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                count, size = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM feedback"
                ).fetchone()
                evicted: list[int] = []
                if count + 1 > max_entries or size + len(payload) > max_bytes:
                    for seq, length in self._db.execute(
                        "SELECT seq, LENGTH(payload) FROM feedback ORDER BY seq"
                    ):
                        if count + 1 <= max_entries and size + len(payload) <= max_bytes:
                            break
                        evicted.append(seq)
                        count, size = count - 1, size - length
                if size + len(payload) > max_bytes:  # alone past the budget: this one goes
                    evicted.clear()
                    self._count_feedback_drop("budget", 1)
                else:
                    self._db.executemany(
                        "DELETE FROM feedback WHERE seq = ?", [(seq,) for seq in evicted]
                    )
                    self._db.execute(
                        "INSERT INTO feedback (created, payload) VALUES (?, ?)",
                        (time.time(), payload),
                    )
                    if evicted:
                        self._count_feedback_drop("budget", len(evicted))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def take_feedback(self, limit: int) -> list[FeedbackEntry]:
        """Feedback due for a look-up: what was never looked up first, in arrival order, then
        what is due again after a look-up that found no trace."""
        with self._mutex:
            rows = self._db.execute(
                "SELECT seq, created, payload, tries FROM feedback WHERE due <= ? "
                "ORDER BY tries > 0, due, seq LIMIT ?",
                (time.time(), limit),
            ).fetchall()
        return [FeedbackEntry(*row) for row in rows]

    def ack_feedback(self, entry: FeedbackEntry, dropped: str | None = None) -> None:
        """Applied to its trace, or dropped for a reason of ``FEEDBACK_DROP_REASONS``
        (counted)."""
        with self._mutex:
            self._db.execute("DELETE FROM feedback WHERE seq = ?", (entry.seq,))
            if dropped is not None:
                self._count_feedback_drop(dropped, 1)

    def retry_feedback(self, entry: FeedbackEntry, due: float) -> None:
        """Its trace is not in the store yet: look again at ``due`` (wall clock)."""
        with self._mutex:
            self._db.execute(
                "UPDATE feedback SET tries = tries + 1, due = ? WHERE seq = ?", (due, entry.seq)
            )

    def _count_feedback_drop(self, reason: str, count: int) -> None:
        # In the database: the app (budget) and the shipper process (expired, refused) both
        # count, and an update in place adds to what the other wrote.
        assert reason in FEEDBACK_DROP_REASONS, reason
        self._db.execute(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET "
            "value = CAST(value AS INTEGER) + excluded.value",
            (f"feedback_dropped:{reason}", str(count)),
        )

    def feedback(self) -> tuple[int, int, dict[str, int]]:
        """Feedback waiting for its trace (count, bytes) and feedback dropped, by reason."""
        with self._mutex:
            return _feedback_counts(self._db)

    def pending(self, table: str = "traces") -> int:
        """Traces waiting to be shipped (or, by table: feedback, stamps)."""
        assert table in _TABLES, table
        with self._mutex:
            return self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    def outstanding(self) -> int:
        """Everything still to reach the store: traces, stamps, and feedback not looked up
        yet (feedback whose trace was not there waits for it, but nothing waits for that)."""
        with self._mutex:
            return self._db.execute(
                "SELECT (SELECT COUNT(*) FROM traces) + (SELECT COUNT(*) "
                "FROM feedback WHERE tries = 0) + (SELECT COUNT(*) FROM "
                "stamps)"
            ).fetchone()[0]

    def close(self, remove_if_empty: bool = True) -> None:
        with self._mutex:
            try:
                empty = (
                    self._db.execute(
                        "SELECT (SELECT COUNT(*) FROM traces) + (SELECT COUNT(*) FROM feedback) + "
                        "(SELECT COUNT(*) FROM stamps) + (SELECT COUNT(*) FROM rejected)"
                    ).fetchone()[0]
                    == 0
                )
                # Feedback drops are counted here only: the file stays for `spool status`.
                dropped_feedback = (
                    self._db.execute(
                        "SELECT COUNT(*) FROM meta WHERE key LIKE 'feedback_dropped%' AND "
                        "CAST(value AS INTEGER) > 0"
                    ).fetchone()[0]
                    > 0
                )
            except sqlite3.Error:  # a file gone bad under us: leave it for `spool status`
                empty = dropped_feedback = False
            dropped = any(self._drops.values()) or dropped_feedback
            self._db.close()
        if self._lock_fd is None:  # not ours to remove
            if not self.path.exists():  # its owner removed it: what our reads left goes too
                for suffix in ("-wal", "-shm"):
                    Path(str(self.path) + suffix).unlink(missing_ok=True)
            return
        if remove_if_empty and empty and not dropped:
            for suffix in ("", "-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            self.path.with_suffix(".lock").unlink(missing_ok=True)
        os.close(self._lock_fd)


def _uri(path: Path, mode: str) -> str:
    return f"{path.absolute().as_uri()}?mode={mode}"


def _add_feedback_retries(db: sqlite3.Connection) -> None:
    """A spool written before feedback look-ups were retried with back-off gets the columns
    (readers that do not know them are unaffected)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(feedback)")}
    for column, kind in (
        ("tries", "INTEGER NOT NULL DEFAULT 0"),
        ("due", "REAL NOT NULL DEFAULT 0"),
    ):
        if column not in columns:
            db.execute(f"ALTER TABLE feedback ADD COLUMN {column} {kind}")


def _check_format(db: sqlite3.Connection, path: Path, existing: bool) -> None:
    """Raise SpoolError for a spool of a newer format, sqlite3.DatabaseError for a file that is
    not a spool (not a database at all, or, if ``existing``, one without our tables)."""
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'format_version'").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        if existing:
            raise sqlite3.DatabaseError(f"{path} is not a tracewire spool") from None
        return  # a new spool
    if row is not None and int(row[0]) > FORMAT_VERSION:
        raise SpoolError(
            f"{path} has spool format {row[0]}; this tracewire reads up to "
            f"{FORMAT_VERSION}: upgrade tracewire to ship it"
        )


class _Block:
    """The status block in a spool's ``.lock`` file: JSON fields at fixed offsets, space-padded,
    written in place into bytes allocated with the file, so no write needs new disk space."""

    DROPS = (0, 448)  # (offset, size): drop counts by reason, written by the app
    STATE = (448, 64)  # what the shipper is doing and since when, written by the shipper
    INCOMPLETE = (512, 64)  # traces stored incomplete (see count_incomplete), by the app
    SIZE = 576

    @staticmethod
    def write(lock_path: Path, field: tuple[int, int], value: dict[str, object]) -> None:
        offset, size = field
        data = json.dumps(value, separators=(",", ":")).encode()
        if len(data) > size:
            return  # cannot happen for the fields above
        try:  # never created here: the owner makes it
            fd = os.open(lock_path, os.O_WRONLY | os.O_NOFOLLOW)
        except OSError:
            return  # removed: its spool is gone
        try:
            os.pwrite(fd, data.ljust(size), offset)
        except OSError:  # the disk failed outright: the log line still says it
            pass
        finally:
            os.close(fd)

    @staticmethod
    def read(lock_path: Path, field: tuple[int, int]) -> dict[str, Any]:
        offset, size = field
        try:
            fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                text = os.pread(fd, size, offset).strip()
            finally:
                os.close(fd)
            value = json.loads(text) if text else {}
        except (OSError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}


def set_aside(db_path: Path, reason: str) -> Path:
    """Rename a file no tracewire can ship out of the way (with its -wal/-shm), so it is never
    tried again; ``status`` lists it."""
    target = db_path.with_name(db_path.name + UNREADABLE_SUFFIX)
    for suffix in ("-wal", "-shm"):
        Path(str(db_path) + suffix).unlink(missing_ok=True)
    os.replace(db_path, target)
    logger.warning(
        "tracewire: %s is not a spool tracewire can read (%s); set aside as %s",
        db_path,
        reason,
        target.name,
    )
    return target


def private_directory(directory: Path) -> None:
    """Make ``directory`` (mode 0700 whatever the umask), or check the one there: it must be
    this user's (a symbolic link to it too); if others can enter it, it is made 0700, and the
    log says so. Raises SpoolError for a directory, or a link, of another user: the prompts
    would rest where that user can read or replace them."""
    try:
        directory.mkdir(mode=0o700, parents=True)
        os.chmod(directory, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(directory)
    if stat.S_ISLNK(info.st_mode) and info.st_uid not in (os.geteuid(), 0):
        raise SpoolError(
            f"the spool directory {directory} is a symbolic link of another user "
            f"(uid {info.st_uid})"
        )
    info = os.stat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise SpoolError(f"the spool directory {directory} is not a directory")
    if info.st_uid != os.geteuid():
        raise SpoolError(
            f"the spool directory {directory} belongs to another user (uid "
            f"{info.st_uid}, this process runs as uid {os.geteuid()}): the "
            "prompts it holds would be theirs to read"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(directory, 0o700)
        logger.warning(
            "tracewire: the spool directory %s was open to other users (mode %o); made it 0700",
            directory,
            stat.S_IMODE(info.st_mode),
        )


def unsafe(db_path: Path) -> str | None:
    """Why tracewire must not open the spool ``db_path`` (or its -wal, -shm or .lock): a
    symbolic link, not a regular file, another user's, or a file with another name too (a hard
    link); None if they are safe (or absent)."""
    for path in (
        db_path,
        Path(f"{db_path}-wal"),
        Path(f"{db_path}-shm"),
        db_path.with_suffix(".lock"),
    ):
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(info.st_mode):
            problem = "is a symbolic link"
        elif not stat.S_ISREG(info.st_mode):
            problem = "is not a regular file"
        elif info.st_uid != os.geteuid():
            problem = f"belongs to another user (uid {info.st_uid})"
        elif info.st_nlink != 1:
            problem = "has another name too (a hard link)"
        else:
            continue
        return f"{path.name} {problem}: tracewire never opens it; remove it"
    return None


def _create_private(path: Path) -> int:
    """A new file, 0600 whatever the umask, never through a link."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def _lock(path: Path, create: bool = False) -> int | None:
    """The spool's lock, taken (None if another process holds it): a new lock file, or the one
    there (never through a link: raises OSError)."""
    fd = _create_private(path) if create else os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _held(lock_path: Path) -> bool:
    """Whether a live process holds this lock (checked without creating the file)."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:  # none, or not a lock of ours (a link)
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def adopt(directory: Path, budget_bytes: int, destination: str | None) -> Iterator[Spool]:
    """Spools left by dead processes for ``destination`` (None: for any), each locked for the
    caller while it ships them. Unreadable files are set aside; newer ones are left alone, and
    so are unsafe ones (said once per process; ``status`` lists them)."""
    if not directory.is_dir():
        return
    for lock_path in sorted(directory.glob("spool-*.lock")):
        db_path = lock_path.with_suffix(".db")
        if (problem := unsafe(db_path)) is not None:
            if db_path not in _refused:
                _refused.add(db_path)
                logger.warning("tracewire: not shipping %s: %s", db_path, problem)
            continue
        try:
            fd = _lock(lock_path)
        except OSError:  # gone meanwhile
            continue
        if fd is None:
            continue  # its process is alive (or another process adopted it first)
        if not db_path.exists():
            lock_path.unlink(missing_ok=True)
            os.close(fd)
            continue
        try:
            spool = Spool(db_path, fd, budget_bytes)
        except SpoolError:
            os.close(fd)  # a newer tracewire's: left for it
            continue
        except sqlite3.DatabaseError as exc:
            set_aside(db_path, str(exc))
            lock_path.unlink(missing_ok=True)
            os.close(fd)
            continue
        # Destinations are recorded without credentials; one from before that was not.
        if destination is not None and scrub.text(spool.destination) != destination:
            spool.close(remove_if_empty=False)  # another app's: leave it for that app
            continue
        yield spool


# Unsafe spools adoption has said it leaves alone, in this process.
_refused: set[Path] = set()


def status(directory: Path) -> list[Status]:
    """Every spool in ``directory``, read without taking it over, and every file in it that
    cannot be shipped (with its ``problem``)."""
    found: list[Status] = []
    if not directory.is_dir():
        return found
    for db_path in sorted(directory.glob("spool-*.db")):
        if (problem := unsafe(db_path)) is not None:
            found.append(_unshippable(db_path, False, problem))
            continue
        live = _held(db_path.with_suffix(".lock"))
        try:
            db = sqlite3.connect(_uri(db_path, "ro"), uri=True, timeout=5)
            try:
                _check_format(db, db_path, existing=True)
                pending, size, oldest = db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(created) FROM traces"
                ).fetchone()
                feedback, feedback_bytes, feedback_drops = _feedback_counts(db)
                where = db.execute("SELECT value FROM meta WHERE key = 'destination'").fetchone()
                rejected = _count(db, "rejected")
                stamps = _count(db, "stamps")
            finally:
                db.close()
                if not db_path.exists():  # removed meanwhile: our reader left its -shm behind
                    for suffix in ("-wal", "-shm"):
                        Path(str(db_path) + suffix).unlink(missing_ok=True)
        except SpoolError as exc:
            found.append(_unshippable(db_path, live, str(exc)))
            continue
        except sqlite3.Error as exc:
            if not db_path.exists() or (live and "not a tracewire spool" in str(exc)):
                continue  # being created or removed right now: not a spool to report yet
            found.append(
                _unshippable(
                    db_path,
                    live,
                    f"unreadable ({exc}): not shipped; a "
                    "shipper sets it aside if it has a .lock beside it",
                )
            )
            continue
        lock_path = db_path.with_suffix(".lock")
        found.append(
            Status(
                db_path,
                pending,
                size,
                oldest,
                live,
                feedback,
                rejected,
                stamps,
                _Block.read(lock_path, _Block.INCOMPLETE).get("traces", 0),
                _Block.read(lock_path, _Block.DROPS),
                feedback_bytes=feedback_bytes,
                feedback_drops=feedback_drops,
                destination=scrub.text(where[0]) if where else "",
            )
        )
    for path in sorted(directory.glob(f"spool-*{UNREADABLE_SUFFIX}")):
        found.append(
            _unshippable(path, False, "unreadable, set aside: not shipped; inspect or delete it")
        )
    return found


def _feedback_counts(db: sqlite3.Connection) -> tuple[int, int, dict[str, int]]:
    """Feedback waiting for its trace (count, bytes) and feedback dropped, by reason."""
    pending, size = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM feedback"
    ).fetchone()
    meta = dict(db.execute("SELECT key, value FROM meta WHERE key LIKE 'feedback_dropped%'"))
    drops = {
        reason: int(meta.get(f"feedback_dropped:{reason}", 0)) for reason in FEEDBACK_DROP_REASONS
    }
    drops["expired"] += int(meta.get("feedback_dropped", 0))  # from before drops had reasons
    return pending, size, {reason: n for reason, n in drops.items() if n}


def describe_feedback(pending: int, size: int, drops: dict[str, int]) -> str:
    """What became of feedback, in words: waiting for its trace, dropped by reason."""
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(drops.items()) if n)
    return (
        f"{pending} feedback waiting for its trace ({size / 1024:.1f} KiB), "
        f"{sum(drops.values())} feedback dropped{f' ({why})' if why else ''}"
    )


def _unshippable(path: Path, live: bool, problem: str) -> Status:
    size = os.lstat(path).st_size if os.path.lexists(path) else 0
    return Status(path, 0, size, None, live, 0, 0, problem=problem)


def _count(db: sqlite3.Connection, table: str) -> int:
    try:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    except sqlite3.OperationalError:  # written by a tracewire from before the table existed
        return 0


def replay(directory: Path) -> int:
    """Queue every trace the store refused again, at the end of its spool; how many."""
    moved = 0
    if not directory.is_dir():
        return moved
    for db_path in sorted(directory.glob("spool-*.db")):
        if unsafe(db_path) is not None:
            continue  # never opened: `spool status` says why
        db = sqlite3.connect(db_path, isolation_level=None, timeout=30)
        try:
            try:
                _check_format(db, db_path, existing=True)
                if not _count(db, "rejected"):
                    continue
            except (SpoolError, sqlite3.DatabaseError):
                continue  # not ours to change: `spool status` says why
            db.execute("BEGIN IMMEDIATE")
            moved += db.execute(
                "INSERT INTO traces (trace_id, created, size, payload) "
                "SELECT trace_id, created, size, payload FROM rejected "
                "ORDER BY seq"
            ).rowcount
            db.execute("DELETE FROM rejected")
            db.execute("COMMIT")
        finally:
            db.close()
    return moved
