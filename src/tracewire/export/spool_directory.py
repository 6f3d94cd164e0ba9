"""What ``tracewire spool`` and the shipper do across a spool directory: status, adopt, replay.

:func:`status` reads every spool in the directory without taking it over (``tracewire spool
status``, or the app at exit), and lists every file that cannot be shipped with its problem.
:func:`adopt` hands the shipper process the spools left by dead processes (their lock can be
taken). :func:`replay` queues the traces the store refused again (``tracewire spool replay``).
A file that is not a spool tracewire can read (garbage, a truncated copy) is set aside when a
shipper comes across it, so it never stops shipping; one of a newer format is left in place for
the tracewire that wrote it. ``status`` lists both.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tracewire.core import scrub
from tracewire.export.spool import Spool
from tracewire.export.spool_files import (
    UNREADABLE_SUFFIX,
    StatusBlock,
    held,
    lock,
    set_aside,
    unsafe,
)
from tracewire.export.spool_format import (
    SpoolError,
    check_format,
    count_rows,
    feedback_counts,
    uri,
)

logger = logging.getLogger("tracewire")


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
            fd = lock(lock_path)
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
        live = held(db_path.with_suffix(".lock"))
        try:
            db = sqlite3.connect(uri(db_path, "ro"), uri=True, timeout=5)
            try:
                check_format(db, db_path, existing=True)
                pending, size, oldest = db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0), MIN(created) FROM traces"
                ).fetchone()
                feedback, feedback_bytes, feedback_drops = feedback_counts(db)
                where = db.execute("SELECT value FROM meta WHERE key = 'destination'").fetchone()
                rejected = count_rows(db, "rejected")
                stamps = count_rows(db, "stamps")
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
                StatusBlock.read(lock_path, StatusBlock.INCOMPLETE).get("traces", 0),
                StatusBlock.read(lock_path, StatusBlock.DROPS),
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
                check_format(db, db_path, existing=True)
                if not count_rows(db, "rejected"):
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
