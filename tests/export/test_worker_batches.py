"""The export worker wakes once per batch, not once per trace, and spools a batch in one
transaction; a flush, a batch's worth of traces or a backlog never waits out the linger, and a
batch past the spool's budget keeps what fits and counts the rest."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from tracewire.export import spool
from tracewire.export.queue import _BATCH, _GATHER, Worker


def _after_one_batch(linger: float) -> tuple[Worker[int], list[int]]:
    """A worker that records the size of each batch, lingering after its first (of one item)."""
    batches: list[int] = []
    first = threading.Event()

    def handle(batch: list[int]) -> int:
        batches.append(len(batch))
        first.set()
        return 0

    worker = Worker(handle, maxsize=1000, linger=linger)
    worker.submit(0)
    assert first.wait(5)
    return worker, batches


def _until(batches: list[int], items: int, timeout: float = 3) -> None:
    deadline = time.monotonic() + timeout
    while sum(batches) < items and time.monotonic() < deadline:
        time.sleep(0.01)


def test_traces_gather_while_the_worker_lingers_and_a_flush_cuts_it_short() -> None:
    worker, batches = _after_one_batch(linger=0.3)
    try:
        for i in range(_GATHER - 1):  # while the worker lingers after its first batch
            worker.submit(i)
        time.sleep(0.1)
        assert batches == [1]  # nothing handled yet: they gather
        started = time.monotonic()
        assert worker.flush(5)
        assert batches == [1, _GATHER - 1]
        worker.submit(21)
        assert worker.flush(5)  # the next one goes at once too: a flush is waiting
        assert time.monotonic() - started < 0.25
    finally:
        worker.stop(1)


def test_a_batch_s_worth_of_traces_ends_the_linger() -> None:
    worker, batches = _after_one_batch(linger=5.0)
    try:
        time.sleep(0.05)  # the worker lingers now
        started = time.monotonic()
        for i in range(_GATHER):
            worker.submit(i)
        _until(batches, 1 + _GATHER)
        assert batches == [1, _GATHER], batches  # handled at once, not after 5 s
        assert time.monotonic() - started < 3
    finally:
        worker.stop(1)


def test_a_backlog_of_more_than_a_batch_is_drained_without_lingering() -> None:
    batches: list[int] = []
    release = threading.Event()

    def handle(batch: list[int]) -> int:
        release.wait(5)  # the first batch holds the worker while a backlog builds up
        batches.append(len(batch))
        return 0

    worker = Worker(handle, maxsize=1000, linger=5.0)
    try:
        worker.submit(0)
        time.sleep(0.1)
        for i in range(3 * _BATCH):
            worker.submit(i)
        started = time.monotonic()
        release.set()
        _until(batches, 1 + 3 * _BATCH)
        # Full batches back to back; only once caught up does the worker linger (5 s here).
        assert batches == [1, _BATCH, _BATCH, _BATCH], batches
        assert time.monotonic() - started < 3
    finally:
        worker.stop(1)


def test_a_batch_is_one_transaction_and_past_the_budget_what_fits_is_kept(tmp_path: Path) -> None:
    spooled = spool.Spool.create(tmp_path, 1000, "{}")
    try:
        assert spooled.put_many([(f"tr-{i}", b"x" * 100) for i in range(3)]) == 3
        db = sqlite3.connect(spooled.path)
        assert db.execute("SELECT COUNT(DISTINCT created) FROM traces").fetchone()[0] == 1
        # 300 bytes spooled: of six more, four fit the 1000-byte budget; two are counted.
        assert spooled.put_many([(f"tr-{i}", b"y" * 150) for i in range(3, 9)]) == 4
        assert db.execute("SELECT COUNT(*) FROM traces").fetchone()[0] == 7
        db.close()
        assert spooled.drops == {"budget": 2}
    finally:
        spooled.close(remove_if_empty=False)
