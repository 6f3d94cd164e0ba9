"""A spool's files on disk: kept private, locked, and the status block in the lock file.

The spool holds the app's prompts: its directory is this user's and no one else's (0700), every
file in it is made 0600 whatever the umask (sqlite gives ``-wal``/``-shm`` the database's
mode), and tracewire opens only regular files of its own user with one name: a symbolic link, a
hard link or another user's file named like a spool is never opened (an attacker's link would
make the shipper, perhaps root, rewrite or create a file elsewhere); ``tracewire spool status``
lists it.

A process holds an exclusive ``flock`` on its spool's ``.lock`` file for its whole life. The same
file carries a small block allocated when the spool is made and rewritten in place
(:class:`StatusBlock`): the app's drop counts and what the shipper process says it is doing, so
both land even on a full disk, which is one of the reasons traces are dropped. A file no
tracewire can read is renamed ``<name>.unreadable`` (:func:`set_aside`). Used by the app
process, the shipper process and ``tracewire spool`` alike.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

from tracewire.export.spool_format import SpoolError

logger = logging.getLogger("tracewire")

UNREADABLE_SUFFIX = ".unreadable"


class UnsafeFileError(SpoolError):
    """A spool file tracewire must not open: a link, or another user's (see the module doc)."""


class StatusBlock:
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


def create_private(path: Path) -> int:
    """A new file, 0600 whatever the umask, never through a link."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def lock(path: Path, create: bool = False) -> int | None:
    """The spool's lock, taken (None if another process holds it): a new lock file, or the one
    there (never through a link: raises OSError)."""
    fd = create_private(path) if create else os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def held(lock_path: Path) -> bool:
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
