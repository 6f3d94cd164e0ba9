"""The shipper: a background thread that moves spooled traces to the tracking store, in order.

It ships batches from this process's spool, and from spools left behind by dead processes
(adopted under their lock). A failed batch stays in the spool and is retried with exponential
backoff and full jitter, so a store that is down or overloaded is neither hammered nor able to
slow the app: the app's threads only ever append to the spool.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from tracewire.export import spool as spools
from tracewire.export.spool import Entry, Spool

logger = logging.getLogger("tracewire")

_BATCH = 100
_BACKOFF_BASE = 0.5
_BACKOFF_CAP = 30.0
_ADOPT_EVERY = 30.0  # seconds between looks for spools of dead processes


class Shipper:
    def __init__(self, own: Spool, directory: Path, ship: Callable[[Sequence[Entry]], None],
                 name: str = "tracewire-ship") -> None:
        self._own = own
        self._directory = directory
        self._ship = ship
        self._wake = threading.Event()  # new entries were spooled
        self._stop = threading.Event()
        self._idle = threading.Condition()
        self._failures = 0
        self._adopted: list[Spool] = []
        self._next_adopt = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def retarget(self, ship: Callable[[Sequence[Entry]], None]) -> None:
        """Ship to a new destination from now on (autolog() called again with new settings)."""
        self._ship = ship

    def notify(self) -> None:
        self._wake.set()

    def wait_empty(self, timeout: float) -> bool:
        """Wait until this process's spool is empty; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._own.pending():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._wake.set()
                self._idle.wait(min(remaining, 0.05))
        return True

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        if not self._thread.is_alive():  # else it is stuck in a store call: leave its spools
            for adopted in self._adopted:
                adopted.close()  # releases the lock for a later process

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._ship_one_batch():
                continue
            with self._idle:
                self._idle.notify_all()
            if self._failures:  # back off; new traces do not cut the wait short
                delay = random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** self._failures))
                self._stop.wait(delay)
            else:
                self._wake.wait(1.0)
                self._wake.clear()

    def _next_batch(self) -> tuple[Spool, list[Entry]]:
        now = time.monotonic()
        if now >= self._next_adopt:
            self._next_adopt = now + _ADOPT_EVERY
            self._adopted.extend(spools.adopt(self._directory, self._own.budget_bytes,
                                              self._own.destination))
        while self._adopted:  # what dead processes left behind is older: it goes first
            entries = self._adopted[0].take(_BATCH)
            if entries:
                return self._adopted[0], entries
            self._adopted.pop(0).close()
        return self._own, self._own.take(_BATCH)

    def _ship_one_batch(self) -> bool:
        """Ship the oldest batch; False if there was none or the store failed."""
        source, entries = self._next_batch()
        if not entries:
            return False
        try:
            self._ship(entries)
        except Exception as exc:  # store down, slow or refusing: the batch stays spooled
            self._failures += 1
            if self._failures in (1, 5) or self._failures % 20 == 0:
                logger.warning("tracewire: tracking store unavailable (%s: %s); %d trace(s) "
                               "kept in the spool, retrying", type(exc).__name__, exc,
                               source.pending())
            return False
        source.ack(entries)
        if self._failures:
            logger.warning("tracewire: tracking store reachable again; shipping the spool")
            self._failures = 0
        return True
