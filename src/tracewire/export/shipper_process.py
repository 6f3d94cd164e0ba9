"""The app's side of the shipper (runs in the app's process): the handle that starts the
shipper process (export/shipper.py), tells it which spools to ship and that new traces were
spooled, restarts it if it dies; and the states the shipper reports in each spool.

Every write to the shipper's stdin is made on the export worker's thread, which blocks SIGPIPE
(export/pipeline.py): a write to a shipper that died an instant before is an error there, never
a signal that kills an app that put SIGPIPE back to its default action.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

logger = logging.getLogger("tracewire")

_RESPAWN_EVERY = 5.0  # seconds between restarts of a shipper process that died

# What the shipper says it is doing, in the app's spool. An exit waits while the shipper works
# for it without the spool's count going down: "opening" (creating or migrating a database
# store), and "adopted", said again at each acknowledgement of what a dead process left (which
# goes first).
OPENING, SHIPPING, FAILING, ADOPTED = "opening", "shipping", "failing", "adopted"


class ShipperProcess:
    """The app's handle on its shipper process (restarted if it dies)."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self._paths: list[Path] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self.spawned_at = 0.0  # wall clock, to tell its states from a previous process's
        self._lock = threading.Lock()

    def ship(self, path: Path) -> None:
        with self._lock:
            if path not in self._paths:
                self._paths.append(path)
                if self._running():
                    self._write(f"ship {path}\n".encode())

    def notify(self) -> None:
        with self._lock:
            if self._running():
                self._write(b"\n")

    def hurry(self) -> None:
        """A flush or an exit waits: the shipper tries the store now, even in a back-off."""
        with self._lock:
            if self._running():
                self._write(b"flush\n")

    def revive(self) -> None:
        """For a flush waiting on a shipper that died: start another now, if one may start."""
        with self._lock:
            self._running()

    @property
    def alive(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    def _running(self) -> bool:
        """Whether the shipper that was running still is (then it can be written to). One that
        is gone is replaced by a new process, told every spool on its command line, unless the
        last one started less than _RESPAWN_EVERY ago: one that dies as it starts is not spun."""
        if self._proc is not None and self._proc.poll() is None:
            return True
        if self._proc is None or time.monotonic() - self._started >= _RESPAWN_EVERY:
            self._spawn()
        return False

    def _write(self, line: bytes) -> None:
        """Unbuffered, and shorter than PIPE_BUF: all of the line or none of it, and nothing
        left behind in a buffer that closing the pipe would write later, on any thread."""
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(line)
        except (BrokenPipeError, ValueError):
            pass  # it is gone: the next write starts another

    def _spawn(self) -> None:
        if self._proc is not None:
            logger.warning(
                "tracewire: the shipper process exited (code %s); restarting it",
                self._proc.returncode,
            )
            assert self._proc.stdin is not None
            self._proc.stdin.close()
        self._started = time.monotonic()
        self.spawned_at = time.time()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tracewire.export.shipper", *map(str, self._paths)],
            stdin=subprocess.PIPE,
            bufsize=0,
            stdout=subprocess.DEVNULL,
            env=self._env,
            close_fds=True,
            start_new_session=True,
        )
        assert self._proc.stdin is not None
        os.set_blocking(self._proc.stdin.fileno(), False)

    def close(self) -> None:
        """Close its stdin: it makes a last effort bounded by the flush timeout and exits on its
        own, without holding up the app's exit (what it does not ship stays spooled)."""
        with self._lock:
            proc, self._proc = self._proc, None
            self._paths.clear()
        if proc is not None and proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
