"""Trace rows for a window, from the tracking store or from the Delta table; both give the rows
of export/trace_rows.py, so ``stats`` aggregates them the same way."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from tracewire.export import delta, trace_rows


def from_store(
    tracking_uri: str,
    experiment_ids: Sequence[str],
    since_ms: int,
    page_size: int = delta.SEARCH_PAGE,
) -> list[dict[str, Any]]:
    from mlflow.tracing.client import TracingClient

    client = TracingClient(tracking_uri)
    rows: list[dict[str, Any]] = []
    for infos in delta.trace_records(client, list(experiment_ids), since_ms, page_size):
        rows.extend(
            trace_rows.row(t) for t in delta.with_spans(client, [i.trace_id for i in infos])
        )
    return rows


def from_delta(
    path: str, since_ms: int, storage_options: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    import pyarrow.dataset as ds
    from deltalake import DeltaTable

    since = dt.datetime.fromtimestamp(since_ms / 1000, tz=dt.UTC)
    table = DeltaTable(path, storage_options=storage_options)
    columns = [name for name in trace_rows.schema().names if name != "spans"]
    # The partition filter prunes whole days; the time filter trims the first one.
    rows: list[dict[str, Any]] = trace_rows.read(
        table,
        columns,
        (ds.field(trace_rows.PARTITION) >= since.date()) & (ds.field("request_time") >= since),
    ).to_pylist()
    return rows
