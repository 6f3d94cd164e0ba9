"""The one aggregation path of ``tracewire stats``: trace rows (export/trace_rows.py, read from
the tracking store or from the Delta table) -> per-group figures.

Percentiles use the nearest-rank method: the p-th percentile of n values is the value at rank
ceil(p/100 * n) of the sorted values (1-based), always a value that was observed.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

BY = ("route", "session", "user", "model", "environment")
NONE = "(none)"
ALL = "(all)"

PERCENTILE_METHOD = (
    "nearest rank: the p-th percentile of n values is the value at rank "
    "ceil(p/100*n) of the sorted values"
)


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class Group:
    key: str
    traces: int
    errors: int
    error_rate: float
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    ttfb_p50_ms: float | None  # time to first byte, over the traces that recorded it
    ttfb_p95_ms: float | None
    input_tokens: int
    output_tokens: int
    total_tokens: int
    cost_usd: float
    feedback: int
    feedback_positive: int
    positive_share: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _keys(row: dict[str, Any], by: str) -> list[str]:
    if by == "model":  # a trace that called two models counts in both groups
        return list(row.get("models") or []) or [NONE]
    value = row.get(by)
    return [str(value) if value not in (None, "") else NONE]


def _group(key: str, rows: list[dict[str, Any]]) -> Group:
    durations = sorted(
        float(r["execution_duration_ms"])
        for r in rows
        if r.get("execution_duration_ms") is not None
    )
    ttfb = sorted(
        float(r["time_to_first_byte_ms"])
        for r in rows
        if r.get("time_to_first_byte_ms") is not None
    )
    errors = sum(1 for r in rows if r.get("state") == "ERROR")
    feedback = sum(r.get("feedback_count") or 0 for r in rows)
    positive = sum(r.get("feedback_positive") or 0 for r in rows)
    return Group(
        key=key,
        traces=len(rows),
        errors=errors,
        error_rate=errors / len(rows),
        latency_p50_ms=percentile(durations, 50),
        latency_p95_ms=percentile(durations, 95),
        latency_p99_ms=percentile(durations, 99),
        ttfb_p50_ms=percentile(ttfb, 50),
        ttfb_p95_ms=percentile(ttfb, 95),
        input_tokens=sum(r.get("input_tokens") or 0 for r in rows),
        output_tokens=sum(r.get("output_tokens") or 0 for r in rows),
        total_tokens=sum(r.get("total_tokens") or 0 for r in rows),
        cost_usd=math.fsum(r.get("total_cost_usd") or 0.0 for r in rows),
        feedback=feedback,
        feedback_positive=positive,
        positive_share=positive / feedback if feedback else None,
    )


def aggregate(rows: Iterable[dict[str, Any]], by: str) -> list[Group]:
    """The whole window first (``(all)``), then one group per value of ``by``, busiest first."""
    rows = list(rows)
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        for key in _keys(row, by):
            groups.setdefault(key, []).append(row)
    out = [_group(ALL, rows)] if rows else []
    out += sorted((_group(k, v) for k, v in groups.items()), key=lambda g: (-g.traces, g.key))
    return out


@dataclass
class Bucket:
    start: dt.datetime
    end: dt.datetime
    traces: int
    errors: int
    total_tokens: int
    cost_usd: float


# Widths of the time buckets, in seconds: a window gets the narrowest that cuts it into at most
# MAX_BUCKETS (an hour: 2-minute buckets, a day: 1-hour, a week: 6-hour, 30 days: 1-day).
WIDTHS = (
    60,
    120,
    300,
    600,
    900,
    1800,
    3600,
    7200,
    10_800,
    21_600,
    43_200,
    86_400,
    172_800,
    604_800,
)
MAX_BUCKETS = 40


def bucket_width(since: dt.datetime, until: dt.datetime) -> int:
    span = (until - since).total_seconds()
    for width in WIDTHS:
        if span <= width * MAX_BUCKETS:
            return width
    return WIDTHS[-1] * math.ceil(span / WIDTHS[-1] / MAX_BUCKETS)  # whole weeks


def over_time(
    rows: Iterable[dict[str, Any]], since: dt.datetime, until: dt.datetime
) -> list[Bucket]:
    """Traces, errors, tokens and cost per bucket of request time over the whole window, empty
    buckets included; buckets are aligned to whole minutes, hours or days (UTC)."""
    width = bucket_width(since, until)
    first = int(since.timestamp()) // width * width
    last = int(until.timestamp()) // width * width
    buckets: dict[int, list[dict[str, Any]]] = {s: [] for s in range(first, last + 1, width)}
    for row in rows:
        stamp = int(row["request_time"].timestamp()) // width * width
        buckets.setdefault(stamp, []).append(row)  # a trace stamped past `until` still counts

    def at(stamp: int) -> dt.datetime:
        return dt.datetime.fromtimestamp(stamp, tz=dt.UTC)

    return [
        Bucket(
            start=at(stamp),
            end=at(stamp + width),
            traces=len(rs),
            errors=sum(1 for r in rs if r.get("state") == "ERROR"),
            total_tokens=sum(r.get("total_tokens") or 0 for r in rs),
            cost_usd=math.fsum(r.get("total_cost_usd") or 0.0 for r in rs),
        )
        for stamp, rs in sorted(buckets.items())
    ]
