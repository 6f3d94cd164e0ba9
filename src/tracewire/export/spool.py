"""The durable on-disk spool between the export worker and the shipper.

Every finished trace is written here (write-ahead) before anything is sent to the tracking
store, and deleted only once the store has it. One sqlite file in WAL mode per process
(export/spool_format.py), so forked or parallel workers never contend for it; the process holds
an exclusive ``flock`` on the file's ``.lock`` companion for its whole life (export/spool_files.py).
A spool whose lock can be taken belongs to a dead process: ``spool_directory.adopt`` hands it to
the caller, which ships what is left.

Every trace that does not make it in is counted beside the spool, by reason (``DROP_REASONS``),
so ``tracewire spool status`` (another process) can report it: past the size budget, on a full or
unwritable disk, unencodable, or refused by a full in-memory queue. The counts, and what the
shipper process says it is doing, live in the spool's ``.lock`` file
(``spool_files.StatusBlock``), so both land even on a full disk, which is one of the reasons
traces are dropped. A trace the store refuses outright (a 4xx: it can never succeed as it is) is
set aside in the same file, so it cannot hold up the traces behind it, and waits there for
``tracewire spool replay``.

Into a tracking server a trace is stored from its spans alone, many per request; its client
request id, which no span can carry, is stamped on afterwards (one ``start_trace`` each). The
trace's acknowledgement queues that stamp in the same transaction (table ``stamps``), so it
survives a crash as the trace did.

The app process writes its spool (holding the lock); its shipper process opens the same file to
ship and acknowledge.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tracewire.export.spool_files import (
    StatusBlock,
    UnsafeFileError,
    create_private,
    lock,
    private_directory,
    unsafe,
)
from tracewire.export.spool_format import (
    FEEDBACK_DROP_REASONS,
    FORMAT_VERSION,
    SCHEMA,
    SpoolError,
    add_feedback_retries,
    check_format,
    feedback_counts,
    uri,
)

# Why a trace was not kept: past the size budget, the disk full or unwritable, a payload that
# could not be encoded, the in-memory queue full (the worker fell behind the app).
DROP_REASONS = ("budget", "disk", "encoding", "queue")

_TABLES = ("traces", "feedback", "stamps")


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
        self._drops: Counter[str] = Counter(
            StatusBlock.read(path.with_suffix(".lock"), StatusBlock.DROPS)
        )
        self.incomplete = 0
        # Only the app that owns a spool creates it: anyone else opening a path that is gone
        # (the app removed it, empty, as it stopped) must not make an empty one there.
        mode = "rwc" if destination is not None else "rw"
        self._db = sqlite3.connect(
            uri(path, mode), uri=True, check_same_thread=False, isolation_level=None, timeout=30
        )
        try:
            # Before anything is written to a file that may not be ours.
            check_format(self._db, path, existing=destination is None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a process crash (kill -9); only an OS crash can lose
            # the last transactions, which is the trade every WAL-mode queue makes for speed.
            self._db.execute("PRAGMA synchronous=NORMAL")
            if destination is not None:
                # The app's own connection: the shipper's (the default 1000 pages) copies the
                # WAL back into the file as it ships, off the app's CPU; the app does it only
                # when the shipper falls far behind (about 40 MB of WAL).
                self._db.execute("PRAGMA wal_autocheckpoint=10000")
            self._db.executescript(SCHEMA)
            add_feedback_retries(self._db)
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
        lock_fd = lock(directory / f"{stem}.lock", create=True)
        if lock_fd is None:  # cannot happen for a fresh name, but never share a spool
            raise SpoolError(f"could not lock a new spool in {directory}")
        os.pwrite(lock_fd, b" " * StatusBlock.SIZE, 0)  # the block, allocated now
        db_path = directory / f"{stem}.db"
        # Made here, not by sqlite (0644 under the usual umask): its -wal and -shm, which hold
        # the prompts too, get the same mode.
        os.close(create_private(db_path))
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
        """Append traces in one statement (one transaction, one WAL write for a worker's batch);
        how many were kept. Past the budget or on a disk error, each goes on its own as
        :meth:`put`, and is counted there if dropped.

        One statement, not ``executemany``: sqlite3 lets go of the GIL for each statement it
        steps, and the worker then waits to take it back from a busy app thread (up to the
        interpreter's 5 ms switch interval) once per trace instead of once per batch."""
        size = sum(len(payload) for _, payload in traces)
        with self._mutex:
            if self._bytes + size > self.budget_bytes:
                self._bytes = self._used_bytes()
            if self._bytes + size <= self.budget_bytes:
                now = time.time()
                values: list[object] = []
                for trace_id, payload in traces:
                    values += (trace_id, now, len(payload), payload)
                rows = ", ".join(["(?, ?, ?, ?)"] * len(traces))
                try:
                    self._db.execute(
                        f"INSERT INTO traces (trace_id, created, size, payload) VALUES {rows}",
                        values,
                    )
                except sqlite3.Error as exc:
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
                StatusBlock.write(
                    self.path.with_suffix(".lock"),
                    StatusBlock.INCOMPLETE,
                    {"traces": self.incomplete},
                )

    def count_drops(self, reason: str, count: int) -> None:
        """Count traces lost before they reached the spool (unencodable, queue full)."""
        with self._mutex:
            self._count_drops(reason, count)

    def _count_drops(self, reason: str, count: int) -> None:
        self._drops[reason] += count
        if self._lock_fd is not None:
            StatusBlock.write(
                self.path.with_suffix(".lock"),
                StatusBlock.DROPS,
                {reason: n for reason, n in self._drops.items() if n},
            )

    @property
    def drops(self) -> dict[str, int]:
        """Traces dropped so far, by reason."""
        with self._mutex:
            return dict(self._drops)

    def set_shipper_state(self, state: str) -> None:
        """The shipper process says what it is doing (see :meth:`shipper_state`)."""
        StatusBlock.write(
            self.path.with_suffix(".lock"), StatusBlock.STATE, {"state": state, "at": time.time()}
        )

    def shipper_state(self) -> tuple[str, float] | None:
        """What the shipper process last said it was doing, and when (wall clock)."""
        data = StatusBlock.read(self.path.with_suffix(".lock"), StatusBlock.STATE)
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
            return feedback_counts(self._db)

    def pending(self, table: str = "traces") -> int:
        """Traces waiting to be shipped (or, by table: feedback, stamps)."""
        assert table in _TABLES, table
        with self._mutex:
            return self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]

    def outstanding(self) -> int:
        """Everything still to reach the store: traces, stamps, and feedback looked up at most
        once (the first miss is often feedback racing its own trace, looked up again 0.5 s
        later; feedback still missing its trace after that waits for it, but nothing waits for
        that)."""
        with self._mutex:
            return self._db.execute(
                "SELECT (SELECT COUNT(*) FROM traces) + (SELECT COUNT(*) "
                "FROM feedback WHERE tries <= 1) + (SELECT COUNT(*) FROM "
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
