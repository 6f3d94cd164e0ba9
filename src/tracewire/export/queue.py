"""A bounded in-memory queue and the background worker that drains it.

The caller's thread does one non-blocking ``put``; encoding and spooling happen on the worker.
Once it has caught up, the worker lets the next batch gather for ``linger`` seconds, or until
``_GATHER`` traces wait (a flush or a stop cuts it short too; a backlog is drained without
pause): each time the worker wakes and takes the GIL, the app's threads pay for it, so it does
that once per batch, not once per trace. The time bound batches a steady trickle (a few traces
a second cost per batch, not per trace); the count bound keeps a burst's batches, and so the
time the worker holds the GIL from a busy app thread, small.
When the queue is full the trace is dropped and counted (the on-disk spool is what keeps a
backlog, not memory); the handler takes the count (``take_dropped``) and reports it. Shutdown is
bounded: ``stop`` waits at most ``timeout`` seconds for the backlog, then leaves.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

logger = logging.getLogger("tracewire")

T = TypeVar("T")

_BATCH = 64  # at most this many items per handler call
_GATHER = 16  # this many waiting end the linger: a batch's worth has gathered


class _Marker:
    """Put behind what was submitted before a flush: the worker sets it once all that is handled."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class Worker(Generic[T]):
    """One daemon thread draining a bounded queue in batches through ``handler``, which
    returns how many items of the batch it could not export.

    The queue is a deque: ``append`` and ``popleft`` are atomic, so a submit takes no lock and
    wakes the worker only when it sleeps (``queue.Queue`` took a lock and notified on every put:
    about 3 µs on the caller's thread, and a lock the worker could be holding)."""

    def __init__(
        self,
        handler: Callable[[Sequence[T]], int],
        maxsize: int,
        name: str = "tracewire-export",
        on_start: Callable[[], None] | None = None,
        on_flush: Callable[[], None] | None = None,
        every: tuple[float, Callable[[], None]] | None = None,
        linger: float = 0.0,
    ) -> None:
        self._handler = handler
        self._linger = linger
        self._hurry = threading.Event()  # a flush, a stop or a batch's worth waits: no lingering
        self._on_start = on_start  # run first on the worker thread: set-up kept off the caller's
        self._on_flush = on_flush  # on the worker thread, once what came before a flush is handled
        # (seconds, fn): housekeeping run on the worker thread that often, busy or idle.
        self._tick_every: float | None = every[0] if every is not None else None
        self._on_tick: Callable[[], None] | None = every[1] if every is not None else None
        self._items: deque[T | _Marker] = deque()
        self._maxsize = maxsize
        self._wake = threading.Event()  # set: the worker has, or will look for, work
        self._lock = threading.Lock()
        self._dropped = 0  # refused (the queue was full), not yet taken by the handler
        self.lost = 0  # accepted, but the export failed
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T) -> bool:
        """Hand one item to the worker without ever blocking; False if it had to be dropped.
        (Threads submitting at once can overshoot ``maxsize`` by a few items: a bound on memory,
        not an exact count.)"""
        if len(self._items) >= self._maxsize:
            with self._lock:
                self._dropped += 1
            return False
        self._items.append(item)
        if not self._wake.is_set():
            self._wake.set()
        elif len(self._items) == _GATHER:
            self._hurry.set()  # enough for a batch: no more lingering
        return True

    def take_dropped(self) -> int:
        """How many items were refused since the last call."""
        with self._lock:
            dropped, self._dropped = self._dropped, 0
        return dropped

    def flush(self, timeout: float) -> bool:
        """Wait until everything submitted so far is handled; False on timeout or if an
        export failed meanwhile."""
        if self._stopping and not self._thread.is_alive():
            return not self._items
        lost = self.lost
        marker = _Marker()
        self._items.append(marker)
        self._hurry.set()
        self._wake.set()
        return marker.done.wait(timeout) and self.lost == lost

    def stop(self, timeout: float) -> bool:
        """Flush for at most ``timeout`` seconds, then stop the thread; True if fully drained."""
        drained = self.flush(timeout)
        self._stopping = True
        self._wake.set()
        self._hurry.set()  # not lingering over what came after the flush
        self._thread.join(timeout=0.1 if not drained else max(timeout, 0.1))
        return drained

    @property
    def backlog(self) -> int:
        """Items waiting for the worker (a batch being handled is no longer counted)."""
        return len(self._items)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        if self._on_start is not None:
            try:
                self._on_start()
            except Exception:  # the worker must survive its set-up too
                logger.exception("tracewire: export worker set-up failed")
        interval = self._tick_every
        next_tick = time.monotonic() + interval if interval is not None else math.inf
        items = self._items
        while True:
            if not items:
                if self._stopping:
                    return
                self._wake.clear()
                if not items:  # looked again: a submit between the two saw the flag still set
                    self._wake.wait(timeout=interval)
            if interval is not None and time.monotonic() >= next_tick:
                next_tick = time.monotonic() + interval
                self._call(self._on_tick)
            batch: list[T] = []
            while items and len(batch) < _BATCH:
                item = items.popleft()
                if isinstance(item, _Marker):
                    if batch:
                        self._handle(batch)
                        batch = []
                    self._call(self._on_flush)
                    item.done.set()
                else:
                    batch.append(item)
            if batch:
                self._handle(batch)
                if len(items) < _GATHER and self._linger and not self._stopping:
                    self._hurry.wait(self._linger)
                    self._hurry.clear()

    @staticmethod
    def _call(hook: Callable[[], None] | None) -> None:
        try:
            if hook is not None:
                hook()
        except Exception:  # the worker must survive its housekeeping too
            logger.exception("tracewire: export worker housekeeping failed")

    def _handle(self, batch: list[T]) -> None:
        try:
            lost = self._handler(batch)
        except Exception:  # the worker must survive anything a batch does
            logger.exception("tracewire: export of %d trace(s) failed", len(batch))
            lost = len(batch)
        self.lost += lost  # only the worker writes it
