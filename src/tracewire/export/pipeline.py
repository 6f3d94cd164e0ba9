"""The export pipeline, wired: caller -> bounded queue -> worker (encode, spool) -> shipper -> store.

The caller's thread only enqueues. The worker encodes each finished trace and appends it to this
process's on-disk spool (write-ahead), so a crash loses at most what was still in the queue.
The shipper moves spooled traces to the tracking store in batches, retrying with backoff while
the store is down; what is left at exit stays spooled and is shipped by the next process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Sequence

from tracewire import config
from tracewire.core import guard
from tracewire.export import mlflow_store
from tracewire.export.queue import Worker
from tracewire.export.shipper import Shipper
from tracewire.export.spool import Spool

logger = logging.getLogger("tracewire")

_lock = threading.Lock()
_worker: Worker[mlflow_store.Item] | None = None
_spool: Spool | None = None
_shipper: Shipper | None = None


def _spool_batch(items: Sequence[mlflow_store.Item]) -> int:
    """Worker side: encode and spool a batch; returns how many could not be kept."""
    settings = config.active()
    lost = 0
    for item in items:
        if guard.call(mlflow_store.sampled_out, item, settings.sample_rate):
            continue
        encoded = guard.call(mlflow_store.encode, item, settings)
        if encoded is None or _spool is None or not _spool.put(*encoded):
            lost += 1
    if lost and _spool is not None and _spool.dropped:
        logger.warning("tracewire: spool %s is over its budget (%d MB); %d trace(s) dropped "
                       "so far", _spool.path, _spool.budget_bytes // 2**20, _spool.dropped)
    if _shipper is not None:
        _shipper.notify()
    return lost


def start(settings: config.Settings) -> None:
    """Start (or reconfigure) the pipeline; idempotent."""
    global _worker, _spool, _shipper
    with _lock:
        store = mlflow_store.Store(settings)
        if _worker is None or not _worker.alive:
            _spool = Spool.create(settings.spool_dir, settings.spool_max_bytes,
                                  mlflow_store.destination(settings))
            _worker = Worker(_spool_batch, maxsize=settings.queue_size)
            _shipper = Shipper(_spool, settings.spool_dir, store.ship)
        elif _shipper is not None:
            _shipper.retarget(store.ship)
        mlflow_store.install_hooks(_worker.submit)


def flush(timeout: float) -> bool:
    """Wait until every finished trace is in the store; False if ``timeout`` ran out first."""
    deadline = time.monotonic() + timeout
    if _worker is None or _shipper is None:
        return True
    if not _worker.flush(timeout):
        return False
    return _shipper.wait_empty(max(0.0, deadline - time.monotonic()))


def stop(timeout: float) -> bool:
    """Stop within ``timeout`` seconds; what is not shipped by then stays in the spool."""
    global _worker, _spool, _shipper
    with _lock:
        mlflow_store.uninstall_hooks()
        if _worker is None:
            return True
        deadline = time.monotonic() + timeout
        drained = _worker.stop(timeout)
        shipped = _shipper.wait_empty(max(0.0, deadline - time.monotonic())) if _shipper else True
        if _shipper is not None:
            _shipper.stop(max(0.05, deadline - time.monotonic()))
        if _spool is not None:
            _spool.close()  # removed if empty; else the next process adopts it
        _worker = _spool = _shipper = None
        return drained and shipped


def _after_fork_in_child() -> None:
    """A forked worker (gunicorn, uvicorn --workers) gets its own threads and spool file."""
    global _worker, _spool, _shipper, _lock
    _lock = threading.Lock()
    if _worker is None:
        return
    _worker = _spool = _shipper = None
    start(config.active())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
