"""Fresh ids from the OS's random source: trace and span ids, request ids.

They reach clients (``X-Trace-ID``, ``X-Request-ID``) and key feedback, so none may be
predictable from others: a Mersenne Twister (``random``, OpenTelemetry's default generator)
gives its state away after a few hundred outputs. One ``os.urandom`` read serves 256 ids (a read
per id was a tenth of the middleware's cost). ``list.pop`` and ``list.extend`` are atomic, so
threads never share an id; a forked worker drops the ids its parent had read ahead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

_BATCH = 256
_trace_ids: list[int] = []
_span_ids: list[int] = []
_request_ids: list[str] = []
_HEX_SLICES = [slice(start, start + 32) for start in range(0, 32 * _BATCH, 32)]


def _ints(size: int) -> list[int]:
    data = os.urandom(size * _BATCH)
    # Zero is no valid OpenTelemetry id (a chance of 2**-64 per id, but never one).
    return [
        int.from_bytes(data[start : start + size], "big") or 1
        for start in range(0, size * _BATCH, size)
    ]


def _hex() -> list[str]:
    return list(map(os.urandom(16 * _BATCH).hex().__getitem__, _HEX_SLICES))


def _take(pool: list[T], refill: Callable[[], list[T]]) -> T:
    try:
        return pool.pop()
    except IndexError:
        fresh = refill()
        taken = fresh.pop()
        pool.extend(fresh)
        return taken


def trace_id() -> int:
    """A 128-bit trace id."""
    return _take(_trace_ids, lambda: _ints(16))


def span_id() -> int:
    """A 64-bit span id."""
    return _take(_span_ids, lambda: _ints(8))


def request_id() -> str:
    """32 hex characters."""
    return _take(_request_ids, _hex)


def _forget_parents_ids() -> None:
    _trace_ids.clear()
    _span_ids.clear()
    _request_ids.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parents_ids)
