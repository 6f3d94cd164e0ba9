"""An exported trace is freed at once: nothing of it waits for the garbage collector.

A trace and its spans refer to each other; left so, every traced call left about 25 objects
(its spans, the reply they recorded) for the collector, which then ran every few calls on the
app's threads and in full (about 150 ms on a 275k-object heap) every few thousand calls."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from tests.conftest import Traced
from tracewire.core import spans


@pytest.fixture
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_traced_calls_leave_nothing_for_the_garbage_collector(
    traced: Traced, client, collector_off: None
) -> None:
    for i in range(20):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"call {i}"}]
        )
    assert len(traced.traces(expected=20)) == 20
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    ours = [o for o in gc.garbage if isinstance(o, spans.Trace | spans.Span)]
    assert ours == []
