"""The shipper's last effort at exit is bounded: a batch still being written when it ends stays
spooled for the next process (shipped twice, it lands once), and closing the spools under it is
not reported as a failure ("the shipper failed ...; retrying" at every such exit). A store
that came back while the shipper backs off gets the traces when a flush or an exit waits."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tracewire import config
from tracewire.core import span_context
from tracewire.export import destination, encode, hooks, shipper
from tracewire.export.spool import Spool


def _spool_of_one(directory: Path, tracking_uri: str, text: str) -> Spool:
    """The app's spool, holding one finished trace for the store."""
    settings = dataclasses.replace(config.resolve(), tracking_uri=tracking_uri)
    source = Spool.create(directory, 10**8, destination.destination(settings))
    span = span_context.start_span("work", "CHAIN", inputs={"text": text})
    span.end()
    source.put(*encode.encode(hooks.Item(ours=span.trace), settings))
    return source


def test_a_batch_cut_off_by_the_end_of_the_last_effort_stays_spooled_without_a_warning(
    tmp_path: Path, tracking_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    source = _spool_of_one(tmp_path, tracking_uri, "cut off")
    writing, release = threading.Event(), threading.Event()

    def slow_store(where: str) -> Any:
        store = shipper.store_for(where)
        ship = store.ship

        def held(entries: Any) -> Any:  # the store answers after the last effort is over
            writing.set()
            release.wait(10)
            return ship(entries)

        store.ship = held
        return store

    worker = shipper.Shipper(tmp_path, 10**8, slow_store)
    worker.start()
    worker.take_on(source.path)
    assert writing.wait(30)
    with caplog.at_level(logging.WARNING, logger="tracewire"):
        worker.stop(0.2)
        release.set()
        time.sleep(1)  # the batch's answer arrives and its ack meets a closed spool
    assert not [r for r in caplog.records if "shipper failed" in r.getMessage()]
    assert source.pending() == 1  # still there for the next process
    source.close(remove_if_empty=False)


@pytest.mark.parametrize("how", ["flush", "exit"])
def test_a_store_back_during_a_back_off_gets_the_traces_when_a_flush_or_an_exit_waits(
    tmp_path: Path, tracking_uri: str, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _spool_of_one(tmp_path, tracking_uri, "after an outage")
    down = threading.Event()
    down.set()

    def flaky_store(where: str) -> Any:  # the real store, unreachable while `down` is set
        store = shipper.store_for(where)
        ship = store.ship

        def ship_unless_down(entries: Any) -> Any:
            if down.is_set():
                raise ConnectionError("store down")
            return ship(entries)

        store.ship = ship_unless_down
        return store

    # A long outage: after the next failure the shipper backs off for the longest, 30 s.
    monkeypatch.setattr(shipper, "random", SimpleNamespace(uniform=lambda low, high: high))
    worker = shipper.Shipper(tmp_path, 10**8, flaky_store)
    worker._failures = 12
    worker.take_on(source.path)
    worker.start()
    deadline = time.monotonic() + 30
    while worker._failures < 13 and time.monotonic() < deadline:  # it met the outage again
        time.sleep(0.05)
    assert worker._failures == 13
    down.clear()  # the store is back; the shipper sleeps through its back-off
    started = time.monotonic()
    if how == "flush":
        worker.hurry()
        while source.pending() and time.monotonic() - started < 10:
            time.sleep(0.05)
        worker.stop(2)
    else:
        worker.stop(2)  # the app left: its bounded last effort
    assert source.pending() == 0
    assert time.monotonic() - started < 5
    source.close(remove_if_empty=False)
