"""The spool's sqlite file format: its tables, its version, and what reads it whole.

One file per spool (export/spool.py holds the class that writes and ships it): ``traces``
waiting for the store, ``rejected`` (refused by the store, waiting for ``tracewire spool
replay``), ``feedback`` waiting for its trace, ``stamps`` (client request ids still to be written
on stored traces), and ``meta`` (the format version, the destination, feedback drop counts). A
file of an older version is upgraded in place when opened; one of a newer version raises
:class:`SpoolError` and is left for the tracewire that wrote it. Used by the app process, the
shipper process and ``tracewire spool`` alike.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

# 2: traces are written as the app captured them (export/records.py), and a spool of version 1
# (MLflow's span records) still ships. 3: payloads of version 3 (export/records.py), which an
# older tracewire cannot read: it leaves the file for this one.
FORMAT_VERSION = 3

# Why feedback was not applied: pushed out of the pending-feedback budget by newer feedback, its
# trace not stored within the retention period, or the trace's owner is someone else.
FEEDBACK_DROP_REASONS = ("budget", "expired", "refused")

SCHEMA = """
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


class SpoolError(RuntimeError):
    """A spool file this tracewire cannot use: one of a newer format version."""


def uri(path: Path, mode: str) -> str:
    return f"{path.absolute().as_uri()}?mode={mode}"


def add_feedback_retries(db: sqlite3.Connection) -> None:
    """A spool written before feedback look-ups were retried with back-off gets the columns
    (readers that do not know them are unaffected)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(feedback)")}
    for column, kind in (
        ("tries", "INTEGER NOT NULL DEFAULT 0"),
        ("due", "REAL NOT NULL DEFAULT 0"),
    ):
        if column not in columns:
            db.execute(f"ALTER TABLE feedback ADD COLUMN {column} {kind}")


def check_format(db: sqlite3.Connection, path: Path, existing: bool) -> None:
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


def feedback_counts(db: sqlite3.Connection) -> tuple[int, int, dict[str, int]]:
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


def count_rows(db: sqlite3.Connection, table: str) -> int:
    try:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    except sqlite3.OperationalError:  # written by a tracewire from before the table existed
        return 0
