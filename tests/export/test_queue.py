"""export/queue.py: the bounded queue between the app's threads and the export worker."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from tracewire.export.queue import Worker


def test_items_are_handled_in_batches_and_flush_waits_for_them() -> None:
    handled: list[int] = []
    worker = Worker(lambda batch: handled.extend(batch) or 0, maxsize=1000)
    for i in range(500):
        assert worker.submit(i)
    assert worker.flush(10)
    assert handled == list(range(500))
    assert worker.stop(5)
    assert not worker.alive


def test_a_full_queue_refuses_without_blocking_and_counts_once() -> None:
    release = threading.Event()
    worker = Worker(lambda batch: release.wait(10) and 0, maxsize=3)
    worker.submit(0)
    time.sleep(0.1)  # the worker now holds item 0 and waits
    accepted = [worker.submit(i) for i in range(1, 10)]
    assert accepted == [True] * 3 + [False] * 6
    assert worker.take_dropped() == 6 and worker.take_dropped() == 0
    release.set()
    assert worker.flush(10)
    worker.stop(5)


def test_flush_reports_a_failed_export_and_the_worker_survives_it() -> None:
    def handler(batch: Sequence[int]) -> int:
        if 13 in batch:
            raise RuntimeError("boom")
        return 0

    worker = Worker(handler, maxsize=100)
    worker.submit(13)
    assert not worker.flush(10)  # lost, and said so
    worker.submit(1)
    assert worker.flush(10)
    assert worker.lost == 1
    worker.stop(5)


def test_stop_is_bounded_when_the_handler_hangs() -> None:
    hang = threading.Event()
    worker = Worker(lambda batch: hang.wait(30) and 0, maxsize=10)
    worker.submit(1)
    worker.submit(2)
    started = time.monotonic()
    assert not worker.stop(0.3)
    assert time.monotonic() - started < 5
    hang.set()


def test_housekeeping_runs_on_the_worker_idle_or_busy_and_survives_its_errors() -> None:
    ticks: list[str] = []

    def tick() -> None:
        ticks.append(threading.current_thread().name)
        if len(ticks) == 1:
            raise RuntimeError("first tick fails")

    worker = Worker(lambda batch: 0, maxsize=100, name="tw-test", every=(0.05, tick))
    time.sleep(0.4)  # idle
    busy_until = time.monotonic() + 0.4
    while time.monotonic() < busy_until:  # busy
        worker.submit(1)
        time.sleep(0.001)
    worker.stop(5)
    assert len(ticks) >= 6 and set(ticks) == {"tw-test"}


def test_a_flush_after_stop_answers_at_once() -> None:
    worker = Worker(lambda batch: 0, maxsize=10)
    worker.submit(1)
    assert worker.stop(5)
    started = time.monotonic()
    assert worker.flush(30)
    assert time.monotonic() - started < 1
