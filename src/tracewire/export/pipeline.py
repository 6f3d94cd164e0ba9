"""The export pipeline, wired: caller -> bounded queue -> worker (encode, spool) -> shipper
process -> tracking store.

The caller's thread only enqueues. The worker thread encodes each finished trace and appends it
to this process's on-disk spool (write-ahead), so a crash loses at most what was still in the
queue. The shipper, a separate process, moves spooled traces to the store in batches and
retries while the store is down; what is left when the app exits stays spooled and is shipped
by the next process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Sequence

from tracewire import config
from tracewire.core import guard
from tracewire.core.feedback import Feedback
from tracewire.export import destination, encode, hooks
from tracewire.export.queue import Worker
from tracewire.export.shipper import ShipperProcess
from tracewire.export.spool import Spool

logger = logging.getLogger("tracewire")

_lock = threading.Lock()
_worker: Worker[hooks.Item | Feedback] | None = None
_spool: Spool | None = None
# One shipper process per tracking URI for the life of the app: autolog()/disable() cycles
# reuse it instead of paying its start-up again.
_shippers: dict[str, ShipperProcess] = {}
_shipper: ShipperProcess | None = None


def _spool_batch(items: Sequence[hooks.Item | Feedback]) -> int:
    """Worker side: encode and spool a batch; returns how many could not be kept."""
    settings = config.active()
    lost = 0
    for item in items:
        if isinstance(item, Feedback):
            if _spool is None or not guard.call(_spool.put_feedback, item.to_json()):
                lost += 1
            continue
        if guard.call(encode.sampled_out, item, settings.sample_rate):
            continue
        encoded = guard.call(encode.encode, item, settings)
        if encoded is None or _spool is None or not _spool.put(*encoded):
            lost += 1
    if lost and _spool is not None and _spool.dropped:
        logger.warning("tracewire: spool %s is over its budget (%d MB); %d trace(s) dropped "
                       "so far", _spool.path, _spool.budget_bytes // 2**20, _spool.dropped)
    spool, shipper = _spool, _shipper
    if spool is not None and shipper is not None and len(items) > lost:
        # Spooled already: if the shipper cannot be reached now, a later batch or the next
        # process ships them.
        guard.call(shipper.ship, spool.path)
        guard.call(shipper.notify)
    return lost


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
    return env


def start(settings: config.Settings) -> None:
    """Start the pipeline, or point it at a new destination; idempotent."""
    global _worker, _spool, _shipper
    where = destination.destination(settings)
    if _spool is not None and _spool.destination != where:
        stop(settings.flush_timeout)
    with _lock:
        if _worker is None or not _worker.alive:
            try:
                _spool = Spool.create(settings.spool_dir, settings.spool_max_bytes, where)
            except OSError as exc:
                raise config.ConfigError(
                    f"TRACEWIRE_SPOOL_DIR {str(settings.spool_dir)!r} cannot hold tracewire's "
                    f"on-disk spool ({exc.strerror or exc}); point it at a writable directory"
                ) from None
            _worker = Worker(_spool_batch, maxsize=settings.queue_size)
            uri = destination.tracking_uri(settings)
            if uri not in _shippers:
                _shippers[uri] = ShipperProcess(_shipper_env(settings))
            _shipper = _shippers[uri]
        hooks.install_hooks(_worker.submit)


def _wait_shipped(spool: Spool, deadline: float) -> bool:
    while spool.pending() or spool.pending(feedback=True):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def flush(timeout: float) -> bool:
    """Wait until every finished trace is in the store; False if ``timeout`` ran out first."""
    deadline = time.monotonic() + timeout
    worker, spool = _worker, _spool
    if worker is None or spool is None:
        return True
    if not worker.flush(timeout):
        return False
    return _wait_shipped(spool, deadline)


def stop(timeout: float) -> bool:
    """Stop within ``timeout`` seconds; what is not shipped by then stays in the spool."""
    global _worker, _spool, _shipper
    with _lock:
        hooks.uninstall_hooks()
        if _worker is None or _spool is None:
            return True
        deadline = time.monotonic() + timeout
        drained = _worker.stop(timeout)
        shipped = _wait_shipped(_spool, deadline)
        _spool.close()  # removed if empty; else the next process adopts it
        _worker = _spool = _shipper = None
        return drained and shipped


def _at_exit(timeout: float) -> None:
    stop(timeout)
    for shipper in _shippers.values():
        shipper.close()
    _shippers.clear()


def _after_fork_in_child() -> None:
    """A forked worker (gunicorn, uvicorn --workers) gets its own threads, spool and shipper."""
    global _worker, _spool, _shipper, _lock
    _lock = threading.Lock()
    _shippers.clear()  # the parent's: its pipes are the parent's to use
    if _worker is None:
        return
    _worker = _spool = _shipper = None
    start(config.active())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
