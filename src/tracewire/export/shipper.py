"""The shipper: a separate process that moves spooled traces to the tracking store, in order.

Writing to the store runs a lot of Python (MLflow's store client, SQLAlchemy): in a thread of
the app's process it would hold the GIL for milliseconds at a time and stretch the app's tail
latency. In its own process it cannot. The app starts it when ``autolog()`` runs
(``python -m tracewire.export.shipper <spool path>...``), so the store is opened (a fresh local
store created) before the first trace, and talks to it through its stdin, one line each:
``ship <spool path>`` to take another spool on, an empty line when new traces were spooled.
The shipper says what it is doing in each app spool's meta (``Spool.set_shipper_state``:
"opening" a database store, "shipping", "failing"), which is how the app's exit knows whether
waiting can help. When the app exits (or dies: its end of the pipe closes) the shipper finishes
what it can within the flush timeout and exits too.

It ships its spools and, every 30 s, spools left behind by dead processes for the same
destinations (adopted under their lock). A failed batch stays spooled and is retried with
exponential backoff and full jitter, so a store that is down or overloaded is neither hammered
nor able to slow the app. Nothing that fails pins it: after any failure the store client is made
anew (MLflow caches some failures for the life of a client), and an error of its own is logged
and retried like an outage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import signal
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tracewire.core import scrub
from tracewire.export.shipper_process import ADOPTED, FAILING, OPENING, SHIPPING
from tracewire.export.spool import Entry, FeedbackEntry, Spool
from tracewire.export.spool_directory import adopt
from tracewire.export.spool_files import UnsafeFileError, set_aside

logger = logging.getLogger("tracewire")

_BATCH = 100
_STAMP_BATCH = 16
_BACKOFF_BASE = 0.5
_BACKOFF_CAP = 30.0
_ADOPT_EVERY = 30.0  # seconds between looks for spools of dead processes
_FEEDBACK_EVERY = 0.5  # seconds between rounds of feedback look-ups (of what is due)
_FEEDBACK_ROUND = 1.0  # seconds of look-ups a round may take at most
# Feedback whose trace is not in the store is looked up again 0.5 s later, then 2 s, 4 s, ... up to this.
_FEEDBACK_BACKOFF_CAP = 300.0

# --------------------------------------------------------------------------- in the shipper


class Shipper:
    """The shipping loop: spools in, batches to ``store_for(destination).ship(entries)`` out.

    Runs on a thread of the shipper process (:meth:`start`), or in the foreground for
    ``tracewire spool ship`` (:meth:`ship_one_batch` until it returns False)."""

    def __init__(self, directory: Path, budget_bytes: int, store_for: Callable[[str], Any]) -> None:
        self._directory = directory
        self._budget = budget_bytes
        self._store_for = store_for
        self._stores: dict[str, Any] = {}
        self._next_feedback = 0.0
        self._spools: list[Spool] = []  # the app's, in the order it handed them over
        self._adopted: list[Spool] = []
        self._failures = 0
        self.shipped = 0  # traces stored (or set aside as refused) so far
        self._retry_after: float | None = None
        self.last_error: Exception | None = None
        self._next_adopt = 0.0
        self._wake = threading.Event()
        self._hurry = threading.Event()  # someone waits (a flush, an exit): no back-off now
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="tracewire-ship", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def take_on(self, path: Path) -> None:
        try:
            source = Spool(path, None, self._budget)
        except sqlite3.OperationalError:
            return  # gone already: its app stopped with nothing left to ship
        except UnsafeFileError as exc:  # replaced under the app: never opened
            logger.warning("tracewire: not shipping %s: %s", path, exc)
            return
        with self._lock:
            self._spools.append(source)
        self._wake.set()

    def adopt_all(self, destination: str | None = None) -> list[Spool]:
        """Take over every spool left by a dead process for ``destination`` (None: whatever
        its destination), for ``tracewire spool ship``; the spools taken."""
        with self._lock:
            found = list(adopt(self._directory, self._budget, destination))
            self._adopted.extend(found)
        return found

    def notify(self) -> None:
        self._wake.set()

    def hurry(self) -> None:
        """A flush or an exit waits: try the store now, even in a back-off (a store that came
        back meanwhile would otherwise wait up to ``_BACKOFF_CAP`` for us, past the wait)."""
        self._hurry.set()
        self._wake.set()

    def stop(self, drain_timeout: float) -> None:
        """Ship what is left for at most ``drain_timeout`` seconds, then stop. Failing, it
        tries once more first, and goes on only if that works."""
        deadline = time.monotonic() + drain_timeout
        failures = self._failures
        self.hurry()
        while time.monotonic() < deadline and self._pending() and self._failures in (0, failures):
            self._wake.set()
            time.sleep(0.05)
        self._stop.set()
        self._hurry.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(max(0.0, deadline - time.monotonic()) + 0.1)
        with self._lock:
            for source in [*self._adopted, *self._spools]:
                source.close()

    @property
    def failing(self) -> bool:
        return self._failures > 0

    def _pending(self) -> bool:
        with self._lock:
            sources = [*self._adopted, *self._spools]
        return any(s.outstanding() for s in sources)

    def _store(self, destination: str) -> Any:
        store = self._stores.get(destination)
        if store is None:
            store = self._stores[destination] = self._store_for(destination)
        return store

    def _tell(self, destination: str, state: str) -> None:
        """Say what we are doing in the app spools that go to ``destination``."""
        with self._lock:
            sources = [s for s in self._spools if s.destination == destination]
        for source in sources:
            source.set_shipper_state(state)

    def _run(self) -> None:
        while not self._stop.is_set():
            failures = self._failures
            try:
                if self._prepare():
                    if self.ship_one_batch():
                        continue
                    if self._failures == failures and self.stamp_one_batch():
                        continue
                    if self._failures == failures:  # the store opened, nothing to write
                        self._recovered()
                if not self._failures and time.monotonic() >= self._next_feedback:
                    self._next_feedback = time.monotonic() + _FEEDBACK_EVERY
                    self.apply_feedback()
            except Exception as exc:  # a bug or a spool gone bad under us: never die of it
                if self._stop.is_set():  # the last effort ended and closed the spools under a
                    return  # batch: it stays spooled for the next process, nothing failed
                self._failed(exc, None)
            if self._failures:  # back off; new traces do not cut the wait short, a flush does
                self._hurry.wait(self._backoff())
                self._hurry.clear()
            else:
                self._wake.wait(1.0)
                self._wake.clear()

    def _prepare(self) -> bool:
        """Open the store of each app spool's destination before its first trace (a fresh local
        store is created then); False if one could not be opened (retried after the backoff)."""
        with self._lock:
            waiting = [
                d
                for d in dict.fromkeys(s.destination for s in self._spools)
                if d not in self._stores or not self._stores[d].ready
            ]
        for destination in waiting:
            first = destination not in self._stores
            store = self._store(destination)
            # Local work worth waiting for at exit only the first time: creating the store.
            self._tell(destination, OPENING if store.local and first else SHIPPING)
            try:
                store.prepare()
            except Exception as exc:
                self._failed(exc, store)
                self._tell(destination, FAILING)
                return False
            self._tell(destination, SHIPPING)
        return True

    def _next_batch(self) -> tuple[Spool, list[Entry]] | None:
        with self._lock:
            now = time.monotonic()
            if now >= self._next_adopt and self._spools:
                self._next_adopt = now + _ADOPT_EVERY
                for destination in {s.destination for s in self._spools}:
                    self._adopted.extend(adopt(self._directory, self._budget, destination))
            # What dead processes left behind is older: it goes first.
            for source in [*self._adopted, *self._spools]:
                try:
                    entries = source.take(_BATCH)
                except sqlite3.DatabaseError as exc:
                    if source not in self._adopted:
                        raise  # the app's own: it owns the file; retried with backoff
                    self._adopted.remove(source)  # went bad since adopted: set aside
                    source.close(remove_if_empty=False)
                    set_aside(source.path, str(exc))
                    continue
                if entries:
                    return source, entries
                if source in self._adopted and not source.outstanding():  # stamps included
                    self._adopted.remove(source)
                    source.close()
                elif not source.path.exists():  # the app removed it, empty, when it stopped
                    self._spools.remove(source)
                    source.close()
        return None

    def ship_one_batch(self) -> bool:
        """Ship the oldest batch; False if there was none or the store failed."""
        batch = self._next_batch()
        if batch is None:
            return False
        source, entries = batch
        store = self._store(source.destination)
        try:
            stamps = store.ship(entries)
        except Exception as exc:  # store down, slow or refusing: the batch stays spooled
            if not store.rejects(exc):
                self._failed(exc, store)
                self._tell(source.destination, FAILING)
                return False
            # Refused, not unavailable: find the trace(s) it refuses, one at a time, so a
            # single bad trace cannot hold up the ones behind it.
            return self._ship_each(store, source, entries)
        source.ack(entries, stamps)
        self.shipped += len(entries)
        if self._recovered():
            self._tell(source.destination, SHIPPING)
        if source in self._adopted:
            self._tell(source.destination, ADOPTED)
        return True

    def stamps_pending(self) -> int:
        """Stamps still to write, in the spools held (a spool is let go once empty)."""
        with self._lock:
            sources = [*self._adopted, *self._spools]
        return sum(source.pending("stamps") for source in sources)

    def stamp_one_batch(self) -> bool:
        """Write the oldest client request ids still to stamp (only when no trace is waiting:
        a trace's visibility comes first); False if there were none or the store failed."""
        with self._lock:
            sources = [*self._adopted, *self._spools]
        for source in sources:
            stamps = source.take_stamps(_STAMP_BATCH)
            if not stamps:
                continue
            store = self._store(source.destination)
            try:
                store.stamp([s.payload for s in stamps])
            except Exception as exc:
                self._failed(exc, store)
                return False
            source.ack_stamps(stamps)
            if source in self._adopted:
                self._tell(source.destination, ADOPTED)
            return True
        return False

    def _ship_each(self, store: Any, source: Spool, entries: list[Entry]) -> bool:
        for entry in entries:
            try:
                stamps = store.ship([entry])
            except Exception as exc:
                if not store.rejects(exc):
                    self._failed(exc, store)
                    return False
                source.reject(entry, scrub.text(f"{type(exc).__name__}: {exc}")[:1000])
                logger.warning(
                    "tracewire: the tracking store refused trace %s (%s: %s); it is "
                    "kept aside in %s: fix the cause, then run `tracewire spool "
                    "replay`",
                    entry.trace_id,
                    type(exc).__name__,
                    exc,
                    source.path,
                )
                continue
            source.ack([entry], stamps)
            self.shipped += 1
        self._recovered()
        return True

    def _backoff(self) -> float:
        """Exponential with full jitter, and at least what the store asked for (Retry-After)."""
        wait = random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**self._failures))
        return max(wait, self._retry_after or 0.0)

    def _failed(self, exc: Exception, store: Any | None) -> None:
        # A new kind of failure is said at once (a full disk after a store outage, say); the
        # same one again only now and then.
        new = type(exc) is not type(self.last_error)
        self._failures += 1
        self.last_error = exc
        self._retry_after = store.retry_after if store is not None else None
        if store is not None:
            store.reset()  # a new client next time: nothing MLflow cached of this failure stays
        if new or self._failures in (1, 5) or self._failures % 20 == 0:
            if store is None:
                logger.warning(
                    "tracewire: the shipper failed (%s: %s); retrying", type(exc).__name__, exc
                )
            else:
                logger.warning(
                    "tracewire: tracking store unavailable (%s: %s); traces stay in "
                    "the spool, retrying",
                    type(exc).__name__,
                    exc,
                )

    def _recovered(self) -> bool:
        if not self._failures:
            return False
        logger.warning("tracewire: tracking store reachable again; shipping the spool")
        self._failures = 0
        self.last_error = None
        return True

    def apply_feedback(self) -> int:
        """Feedback waits in the spool until its trace is stored, for the retention period.
        A round looks up what was never looked up first, then what is due again: a look-up
        that finds no trace backs off (0.5 s, then 2 s, doubling, up to 5 min), and a round stops after
        ``_FEEDBACK_ROUND`` seconds, so feedback for traces that never come costs little and
        cannot hold up feedback whose trace is there. One that fails (the store, or a value it
        cannot take) ends the round and backs off too, so that it cannot hold up the rest.
        Returns how many were applied."""
        from tracewire.export.store import APPLIED, REFUSED

        with self._lock:
            sources = [*self._adopted, *self._spools]
        end = time.monotonic() + _FEEDBACK_ROUND
        dropped: Counter[str] = Counter()
        applied = 0

        def later(source: Spool, entry: FeedbackEntry) -> None:
            """Not applied: look again after a back-off, or drop it once it has expired (one
            that cannot be read, a damaged row, has no expiry to wait for)."""
            try:
                expires = float(json.loads(entry.payload)["expires"])
            except (ValueError, TypeError, KeyError):
                expires = 0.0
            if time.time() > expires:
                source.ack_feedback(entry, dropped="expired")
                dropped[
                    "expired: its trace was not stored within TRACEWIRE_FEEDBACK_RETENTION"
                ] += 1
                return
            # The first miss is often feedback racing its own trace (posted as the response
            # ends, before the trace does): look again soon.
            delay = 0.5 if entry.tries == 0 else 2.0 * 2 ** (entry.tries - 1)
            source.retry_feedback(entry, time.time() + min(_FEEDBACK_BACKOFF_CAP, delay))

        try:
            for source in sources:
                while time.monotonic() < end and (entries := source.take_feedback(_BATCH)):
                    for entry in entries:
                        if time.monotonic() >= end:
                            return applied
                        try:
                            outcome = self._store(source.destination).apply_feedback(entry.payload)
                        except Exception:
                            # The store is down, or cannot take this one: it must not stay
                            # first in line either way (every round would stop at it).
                            later(source, entry)
                            raise
                        if outcome == APPLIED:
                            source.ack_feedback(entry)
                            applied += 1
                        elif outcome == REFUSED:
                            source.ack_feedback(entry, dropped="refused")
                            dropped["refused: the trace's owner is someone else"] += 1
                        else:
                            later(source, entry)
        except Exception as exc:  # the store is down: the next round tries again
            logger.warning(
                "tracewire: could not apply feedback yet (%s: %s)", type(exc).__name__, exc
            )
        finally:
            if dropped:  # one line a round at most, counts only
                logger.warning(
                    "tracewire: feedback dropped (%s); see `tracewire spool status`",
                    "; ".join(f"{n} {why}" for why, n in dropped.items()),
                )
        return applied


def store_for(destination: str) -> Any:
    """The store a spool's destination (see ``destination.destination``) names."""
    from tracewire import config
    from tracewire.export import destination as destinations
    from tracewire.export import store

    where: dict[str, Any] = json.loads(destination)
    own = config.resolve()
    settings = dataclasses.replace(
        own,
        tracking_uri=destinations.writable_uri(where["tracking_uri"], own),
        experiment_id=where["experiment_id"],
        experiment_name=where["experiment_name"],
    )
    return store.Store(settings)


def main(paths: Sequence[str]) -> int:
    """The shipper process: ships ``paths`` (the app's spools, from its command line) and those
    its stdin names later, until the app closes it."""
    from tracewire import config

    # Background work: when CPU is short, the app's own threads go first. (SCHED_IDLE was
    # tried: on a busy machine it starved the shipper through its bounded last effort at
    # exit, so traces waited in the spool for the next process instead of arriving.)
    os.nice(10)
    # Started from the app's export worker, whose thread blocks SIGPIPE (export/pipeline.py):
    # as any process, this one and what it starts get the default signal mask back.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGPIPE})

    from tracewire.export import store_http

    store_http.install_http_budget()
    settings = config.resolve()
    shipper = Shipper(settings.spool_dir, settings.spool_max_bytes, store_for)
    shipper.start()
    for path in paths:
        shipper.take_on(Path(path))
    for line in iter(sys.stdin.buffer.readline, b""):
        if line.startswith(b"ship "):
            shipper.take_on(Path(line[5:].decode().rstrip("\n")))
        elif line == b"flush\n":
            shipper.hurry()
        else:
            shipper.notify()
    shipper.stop(settings.flush_timeout)  # the app has gone: a bounded last effort
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
