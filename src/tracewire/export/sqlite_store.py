"""Creating a fresh local sqlite MLflow store atomically (runs in the shipper process, and in
``tracewire run`` before the command starts).

MLflow creates a sqlite store in place, in about 270 separately committed statements (its
schema, then alembic's migrations one by one): a process stopped in the middle leaves an
``mlflow.db`` MLflow can never open again ("table secrets already exists"). Here the store is
built under a temporary name beside it, checked, flushed to disk and only then given its name,
with one atomic step that never replaces an existing file: killed at any instant, the directory
holds no ``mlflow.db`` or a whole one. Creators take turns under a lock file beside the store,
so a temporary file found by the lock's holder was left by a creator that died, and goes.

A store found in place may still be in the making by a process that ignores the lock: the app's
own MLflow calls (``mlflow.set_active_model`` in a fresh folder), another tool. Opening it then
would run MLflow's migration a second time beside the first, and both fail ("table ... already
exists"), the app's call included: it is waited for until whole.

MLflow internals used (pinned in tests/export/test_mlflow_pins.py):
``mlflow.store.db.utils.create_sqlalchemy_engine``, ``SqlAlchemyStore._engine_map`` (the
store takes its engine from there) and ``_get_sqlalchemy_store`` (how MLflow builds a store).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_LOCK_SUFFIX = ".tracewire-init.lock"
_TEMPORARY = ".tracewire-"  # "<name>.tracewire-<pid>-<random>.tmp" and its journals
_SIDECARS = ("", "-journal", "-wal", "-shm")
# How long a store in the making by someone else is waited for (MLflow takes about 5 s).
_WHOLE_WAIT = 60.0


def create(db_path: Path) -> None:
    """Make sure a whole, fully migrated store exists at ``db_path``: at once if it exists;
    otherwise built aside and published atomically. Concurrent callers (threads or processes)
    wait for one another. Raises what MLflow raises if it cannot be built (nothing is
    published then)."""
    if not db_path.exists():
        _create(db_path)
    deadline = time.monotonic() + _WHOLE_WAIT
    while not _whole(db_path) and time.monotonic() < deadline:
        time.sleep(0.1)  # past the deadline, MLflow says what is wrong with it


def _create(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True, exist_ok=True)  # as MLflow does for a new store
    lock_path = Path(f"{db_path}{_LOCK_SUFFIX}")
    with _lock(lock_path):
        for stale in db_path.parent.glob(f"{glob.escape(db_path.name)}{_TEMPORARY}*.tmp*"):
            stale.unlink(missing_ok=True)  # a creator that died: only the lock holder builds
        if db_path.exists():  # made by the creator we waited for
            return
        tmp = db_path.with_name(
            f"{db_path.name}{_TEMPORARY}{os.getpid()}-{secrets.token_hex(6)}.tmp"
        )
        try:
            _build(tmp)
            _check(tmp)
            _fsync(tmp)
            _publish(tmp, db_path)
            # Whoever waits on it, or comes later, finds the store and builds nothing: the
            # lock file need not stay in the user's folder.
            lock_path.unlink(missing_ok=True)
        finally:
            for sidecar in _SIDECARS:
                Path(f"{tmp}{sidecar}").unlink(missing_ok=True)
            _fsync(db_path.parent)


def _build(tmp: Path) -> None:
    """MLflow creates and migrates the store at ``tmp`` (schema, alembic stamp, the Default
    experiment), as ``TracingClient(uri).store`` would, then every connection to it closes."""
    from mlflow.store.db.utils import create_sqlalchemy_engine
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking._tracking_service.utils import _get_sqlalchemy_store
    from mlflow.utils.file_utils import path_to_local_sqlite_uri
    from sqlalchemy import event

    uri = path_to_local_sqlite_uri(str(tmp))
    engine = create_sqlalchemy_engine(uri)

    @event.listens_for(engine, "connect")
    def _unsynced(connection: sqlite3.Connection, record: Any) -> None:
        # The file is nobody's until it is published, and fsynced then: a thousand fsyncs
        # while building it would buy nothing (a death leaves garbage either way).
        connection.execute("PRAGMA synchronous=OFF")
        connection.execute("PRAGMA journal_mode=MEMORY")

    SqlAlchemyStore._engine_map[uri] = engine  # the store is built on this engine
    try:
        _get_sqlalchemy_store(uri, None)
    finally:
        SqlAlchemyStore._engine_map.pop(uri, None)
        engine.dispose()


def _whole(path: Path) -> bool:
    """Whether MLflow has finished making the store: the Default experiment is what it writes
    last (after its schema and every migration)."""
    try:
        connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=1)
    except sqlite3.Error:
        return False
    try:
        return (
            connection.execute(
                "SELECT COUNT(*) FROM experiments WHERE experiment_id = 0"
            ).fetchone()[0]
            == 1
        )
    except sqlite3.Error:  # no such table yet, or locked by its maker
        return False
    finally:
        connection.close()


def _check(tmp: Path) -> None:
    """MLflow returned, so its schema check passed; check the file itself before publishing."""
    connection = sqlite3.connect(f"{tmp.as_uri()}?mode=ro", uri=True)
    try:
        ok = (
            connection.execute("PRAGMA quick_check").fetchone()[0] == "ok"
            and connection.execute("SELECT COUNT(*) FROM alembic_version").fetchone()[0] == 1
            and connection.execute(
                "SELECT COUNT(*) FROM experiments WHERE experiment_id = 0"
            ).fetchone()[0]
            == 1
        )
    finally:
        connection.close()
    if not ok or any(Path(f"{tmp}{sidecar}").exists() for sidecar in _SIDECARS[1:]):
        raise RuntimeError(f"the new store {tmp} is not whole; it is not published")


def _publish(tmp: Path, final: Path) -> None:
    """Give the finished file its name without ever replacing one: a store made meanwhile by
    a process that ignores our lock (MLflow itself) wins."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        return
    except OSError as exc:  # a filesystem without hard links: rename, checked under the lock
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if not final.exists():
            os.rename(tmp, final)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """The kernel releases it when its holder dies: a killed creator never blocks the next."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
