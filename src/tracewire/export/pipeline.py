"""The export pipeline, wired: caller -> bounded queue -> worker (encode, spool) -> shipper
process -> tracking store.

The caller's thread only enqueues. The worker thread encodes each finished trace and appends it
to this process's on-disk spool (write-ahead), so a crash loses at most what was still in the
queue. The shipper, a separate process started with the pipeline, opens the store at once (so a
fresh local store is ready before the first trace), moves spooled traces to it in batches and
retries while it is down.

Exit, ``disable()`` and ``flush()`` wait for the spool to empty while the store makes progress
(traces acknowledged, the shipper starting or creating a local store), at most the exit timeout,
and give up once it has made none for the flush timeout (down, hung, refusing). What is left then
stays spooled, one line on stderr says so, and the next process with the same destination (or
``tracewire spool ship``) ships it. Every trace that cannot be kept is counted in the spool with
its reason and reported in one log line a minute at most, without content.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from types import ModuleType

import wrapt

from tracewire import config
from tracewire.core import guard, scrub, spans
from tracewire.core.feedback import Feedback
from tracewire.export import destination, encode, hooks
from tracewire.export.queue import Worker
from tracewire.export.shipper_process import ADOPTED, OPENING, ShipperProcess
from tracewire.export.spool import Spool
from tracewire.export.spool_directory import describe_feedback
from tracewire.export.spool_format import SpoolError

logger = logging.getLogger("tracewire")

_lock = threading.Lock()
_owner: int | None = None  # the thread inside start() or stop(), holding _lock
_die_of: int | None = None  # a signal that came while that thread held it (see die_when_free)
_worker: Worker[hooks.Item | Feedback] | None = None
_spool: Spool | None = None
# One shipper process per tracking URI for the life of the app: autolog()/disable() cycles
# reuse it instead of paying its start-up again.
_shippers: dict[str, ShipperProcess] = {}
_shipper: ShipperProcess | None = None

# Seconds the worker lets finished traces gather between two batches (fewer if a batch's worth
# gathers first: queue.py): one wake-up, one spool transaction and one note to the shipper per
# batch. A kill -9 can lose what gathered meanwhile (OpenTelemetry's batch processor waits 5 s).
# Each batch costs the app cold caches (the worker's, and the shipper woken beside it): at 33
# calls a second, 200 ms instead of 50 halved the app's CPU per traced call (+790 -> +380 µs,
# bench/app_ab.py --gap-ms 30, docs/benchmarks.md); at 200 calls a second and in a burst the
# count bound ends the linger first.
_LINGER = 0.2
_DROP_LOG_EVERY = 60.0  # seconds between two log lines about dropped traces
_WHY = {
    "budget": "the spool reached its TRACEWIRE_SPOOL_MAX_MB budget",
    "disk": "the spool's disk is full or not writable",
    "encoding": "could not be encoded",
    "queue": "the in-memory queue (TRACEWIRE_QUEUE_SIZE) was full",
}


class _Throttle:
    """True at most once per ``_DROP_LOG_EVERY`` seconds: one log line a minute at most."""

    def __init__(self) -> None:
        self._next = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + _DROP_LOG_EVERY
        return True


_drop_log = _Throttle()
_incomplete_log = _Throttle()


def _report_drops(spool: Spool, error: str | None = None) -> None:
    """A warning about dropped traces (throttled): counts and reasons, no content."""
    if not _drop_log.due():
        return
    drops = {reason: count for reason, count in spool.drops.items() if count}
    detail = "; ".join(
        f"{count} {reason}: {_WHY.get(reason, reason)}" for reason, count in sorted(drops.items())
    )
    logger.warning(
        "tracewire: %d trace(s) dropped so far (%s%s); counted in %s, see `tracewire spool status`",
        sum(drops.values()),
        detail,
        f"; last error {error}" if error else "",
        spool.path,
    )


def _spool_batch(items: Sequence[hooks.Item | Feedback]) -> int:
    """Worker side: encode a batch and spool it in one transaction; returns how many could not
    be kept."""
    settings = config.active()
    spool, shipper, worker = _spool, _shipper, _worker
    if spool is None:
        return len(items)
    lost = 0
    error = None
    encoded: list[tuple[str, bytes]] = []
    feedback: list[Feedback] = []
    for item in items:
        if isinstance(item, Feedback):
            feedback.append(item)
            continue
        guard.call(encode.settle, item)  # a failed web request is kept by sampling
        if not guard.call(encode.sampled_out, item, settings.sample_rate):
            try:
                encoded.append(encode.encode(item, settings))
            except Exception as exc:  # counted, never logged with its content
                spool.count_drops("encoding", 1)
                lost += 1
                error = type(exc).__name__
                if guard.TESTING:
                    raise
        item.release()  # encoded, sampled out or lost: free what it holds now
    kept = spool.put_many(encoded) if encoded else 0
    lost += len(encoded) - kept
    # After the traces: feedback spooled before the trace it names (both in this batch) would be
    # looked up before the trace can be stored, and wait out a retry.
    for item in feedback:
        guard.call(
            spool.put_feedback,
            item.to_json(),
            settings.feedback_max_pending,
            settings.feedback_max_pending_bytes,
        )
    refused = worker.take_dropped() if worker is not None else 0
    if refused:
        spool.count_drops("queue", refused)
    if lost or refused:
        _report_drops(spool, error)
    if kept and shipper is not None:
        # Spooled already: if the shipper cannot be reached now, a later batch or the next
        # process ships them.
        guard.call(shipper.notify)
    return lost


def _start_on_worker() -> None:
    """First thing on the worker thread: block SIGPIPE on it (every write to the shipper's stdin
    is made here: one to a shipper that died an instant before is then an error, not a signal
    that kills an app that put SIGPIPE back to its default action); start the shipper with our
    spool, so it opens the store now instead of at the first trace; then what every trace's
    record reads once per process (encode.py), which is slow to resolve (GitPython asks git)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPIPE})
    spool, shipper = _spool, _shipper
    if spool is not None and shipper is not None:
        shipper.ship(spool.path)
    guard.call(encode.process_metadata)


def _hurry_shipper() -> None:
    """On the worker thread, at a flush or an exit: the shipper tries the store now, even if it
    is backing off after failures (the store may have come back meanwhile)."""
    shipper = _shipper
    if shipper is not None:
        shipper.hurry()


def _expire_open_traces() -> None:
    """Worker side, every few seconds: export the traces open past the trace timeout as
    incomplete (spans.expire), counted in the spool and said in the log."""
    timeout = config.active().trace_timeout
    expired = spans.expire(
        time.time_ns() - int(timeout * 1e9),
        f"trace still open after TRACEWIRE_TRACE_TIMEOUT ({timeout:g} s)",
    )
    spool = _spool
    if expired and spool is not None:
        spool.count_incomplete(expired)
        if _incomplete_log.due():
            logger.warning(
                "tracewire: %d trace(s) still open after %g s "
                "(TRACEWIRE_TRACE_TIMEOUT) stored incomplete, %d so far; their open "
                "spans are marked tracewire.abandoned",
                expired,
                timeout,
                spool.incomplete,
            )


def submit_feedback(feedback: Feedback) -> bool:
    """Queue feedback for the shipper (never blocks); False if tracewire is not enabled."""
    worker = _worker
    return worker is not None and worker.submit(feedback)


def _shipper_env(settings: config.Settings) -> dict[str, str]:
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = destination.tracking_uri(settings)
    env["TRACEWIRE_SPOOL_DIR"] = str(settings.spool_dir)
    env["TRACEWIRE_SPOOL_MAX_MB"] = str(settings.spool_max_bytes / 2**20)
    env.pop("TRACEWIRE_RUN", None)  # `tracewire run`'s start-up hook is for the app, not us
    # It shares the app's stderr: only what needs attention (MLflow's INFO lines do not).
    env.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    env.update(destination.catalog_env())
    return env


@contextlib.contextmanager
def _holding_lock() -> Iterator[None]:
    global _owner
    with _lock:
        _owner = threading.get_ident()
        try:
            yield
        finally:
            _owner = None
    if _die_of is not None:
        os.kill(os.getpid(), _die_of)


def interrupted_inside() -> bool:
    """Whether the calling thread (a signal handler's) interrupted start() or stop(): then a
    flush of its own would wait on the lock the interrupted code holds."""
    return _owner == threading.get_ident()


def die_when_free(signum: int) -> None:
    """Let the interrupted start() or stop() finish (bounded), then die of ``signum`` (its
    handler must be the default by then)."""
    global _die_of
    _die_of = signum


def start(settings: config.Settings) -> None:
    """Start the pipeline, or point it at a new destination; idempotent."""
    global _worker, _spool, _shipper
    where = destination.destination(settings)
    if _spool is not None and _spool.destination != where:
        stop()
    with _holding_lock():
        if _worker is None or not _worker.alive:
            try:
                _spool = Spool.create(settings.spool_dir, settings.spool_max_bytes, where)
            except OSError as exc:
                raise config.ConfigError(
                    f"TRACEWIRE_SPOOL_DIR {str(settings.spool_dir)!r} cannot hold tracewire's "
                    f"on-disk spool ({exc.strerror or exc}); point it at a writable directory"
                ) from None
            except SpoolError as exc:
                raise config.ConfigError(
                    f"TRACEWIRE_SPOOL_DIR {str(settings.spool_dir)!r} cannot hold tracewire's "
                    f"on-disk spool: {exc}; point it at a directory of this user's"
                ) from None
            uri = destination.tracking_uri(settings)
            if uri not in _shippers:
                _shippers[uri] = ShipperProcess(_shipper_env(settings))
            _shipper = _shippers[uri]
            _worker = Worker(
                _spool_batch,
                maxsize=settings.queue_size,
                on_start=_start_on_worker,
                on_flush=_hurry_shipper,
                linger=_LINGER,
                every=(min(5.0, settings.trace_timeout / 4), _expire_open_traces),
            )
        hooks.install_hooks(_worker.submit)


# How long local work may count as progress: the shipper process starting (importing MLflow:
# 1-3 s here) and creating or migrating a database store (about 5 s for a fresh sqlite store).
_STARTING_MAX = 20.0
_OPENING_MAX = 60.0


def _progress_elsewhere(spool: Spool, shipper: ShipperProcess | None, stall: float) -> bool:
    """The shipper is working for this spool without its count going down: starting up,
    creating or migrating a database store (local work that ends on its own), or shipping what
    a dead process left, which goes first."""
    if shipper is None or not shipper.alive:
        return False
    now = time.time()
    state = spool.shipper_state()
    if state is None or state[1] < shipper.spawned_at:  # this process has said nothing yet
        return now - shipper.spawned_at < _STARTING_MAX
    return (state[0] == OPENING and now - state[1] < _OPENING_MAX) or (
        state[0] == ADOPTED and now - state[1] < stall
    )


def _wait_stored(
    spool: Spool, shipper: ShipperProcess | None, deadline: float, stall: float
) -> bool:
    """Wait until the spool is empty (True); False at ``deadline``, or once the store has made
    no progress (ours acknowledged, or the shipper's work that comes first) for ``stall``
    seconds."""
    last_count = math.inf
    last_progress = time.monotonic()
    while True:
        count = spool.outstanding()
        if not count:
            return True
        if shipper is not None and not shipper.alive:
            # Killed meanwhile: its successor's start counts as progress. Guarded: starting a
            # process can fail (the interpreter replaced by a deploy, no file descriptors left).
            guard.call(shipper.revive)
        now = time.monotonic()
        if count < last_count or _progress_elsewhere(spool, shipper, stall):
            last_progress = now
        last_count = count
        if now >= deadline or now - last_progress > stall:
            return False
        time.sleep(0.02)


def flush(timeout: float | None) -> bool:
    """Wait until every finished trace is in the store. With ``timeout``, at most that long;
    without, while the store makes progress (at most the exit timeout). False if some are
    still spooled."""
    settings = config.active()
    worker, spool, shipper = _worker, _spool, _shipper
    if worker is None or spool is None:
        return True
    budget = settings.exit_timeout if timeout is None else timeout
    deadline = time.monotonic() + budget
    if not worker.flush(budget):
        return False
    return _wait_stored(
        spool, shipper, deadline, settings.flush_timeout if timeout is None else math.inf
    )


def stop() -> bool:
    """Stop: wait as ``flush()`` does, then leave what is not stored in the spool (one line on
    stderr says so); True if everything was stored."""
    global _worker, _spool, _shipper
    settings = config.active()
    with _holding_lock():
        hooks.uninstall_hooks()
        if _worker is None or _spool is None:
            return True
        deadline = time.monotonic() + settings.exit_timeout
        try:
            drained = _worker.stop(settings.exit_timeout)
            stored = _wait_stored(_spool, _shipper, deadline, settings.flush_timeout)
        finally:
            _say_left_behind(_spool, settings)
            _spool.close()  # removed if empty; else the next process adopts it
            _worker = _spool = _shipper = None
        return drained and stored


def _say_left_behind(spool: Spool, settings: config.Settings) -> None:
    """One line on stderr, if any trace of this process is not in the store, for the person
    reading the output of a script or a container that just stopped."""
    left, drops = spool.pending(), {reason: n for reason, n in spool.drops.items() if n}
    said = []
    if left:
        uri = scrub.text(destination.tracking_uri(settings))
        said.append(
            f"{left} trace(s) not yet in the tracking store ({uri}) stay in "
            f"{spool.path}; the next process tracing to it ships them, or run: "
            f"tracewire spool ship --dir {spool.path.parent}"
        )
    if drops:
        counts = ", ".join(f"{n} {reason}" for reason, n in sorted(drops.items()))
        said.append(
            f"{sum(drops.values())} trace(s) were dropped ({counts}); `tracewire spool "
            f"status --dir {spool.path.parent}` has the counts"
        )
    feedback_pending, feedback_bytes, feedback_drops = spool.feedback()
    if feedback_pending or feedback_drops:
        said.append(describe_feedback(feedback_pending, feedback_bytes, feedback_drops))
    if said:
        sys.stderr.write(f"tracewire: {'; '.join(said)}\n")
        sys.stderr.flush()


def at_exit() -> None:
    """The app is exiting (atexit, SIGTERM): stop, then let the shipper processes go."""
    try:
        stop()
    except KeyboardInterrupt:  # Ctrl-C while waiting: what is not stored stays spooled (said)
        pass
    for shipper in _shippers.values():
        shipper.close()
    _shippers.clear()


def _after_fork_in_child() -> None:
    """A forked worker (gunicorn, uvicorn --workers, multiprocessing) gets its own threads,
    spool and shipper."""
    global _worker, _spool, _shipper, _lock
    _lock = threading.Lock()
    _shippers.clear()  # the parent's: its pipes are the parent's to use
    if _worker is None:
        return
    _worker = _spool = _shipper = None
    start(config.active())


class _ExitInForkedChild:
    """A multiprocessing child leaves by os._exit, past atexit, and clears the finalizers it
    was forked with: its own, registered when it starts, stop the pipeline first."""

    def __call__(self, mp_util: ModuleType) -> None:
        mp_util.register_after_fork(self, lambda _: mp_util.Finalize(None, at_exit, exitpriority=0))


_exit_in_forked_child = _ExitInForkedChild()  # kept alive: multiprocessing holds a weakref

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
    wrapt.register_post_import_hook(_exit_in_forked_child, "multiprocessing.util")
