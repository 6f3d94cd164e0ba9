"""A batch written into a database store in one transaction and one flush (export/store.py)
holds exactly what MLflow's own per-trace writes hold, with MLflow's opt-in trace rollups off
(one flush) and on (a flush per trace, as MLflow does it: their bookkeeping needs it)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
import time
from typing import Any

import mlflow
import pytest

from tests.support.store import new_experiment, synthetic
from tracewire.testing.traces import Synthetic, write

DAY_MS = 86_400_000


def _traces() -> list[Synthetic]:
    now = int(time.time() * 1000)
    # Three days old (a spool replayed late: the rollups' partitions are then rebuilt) and fresh.
    return synthetic(4, now - 3 * DAY_MS, session="s-1", user="u-1", request_id="r-1") + synthetic(
        3, now - 60_000, error="boom", tags={"team": "search"}
    )


def _stored(tracking_uri: str, experiment_id: str) -> list[dict[str, Any]]:
    """What MLflow reads back, without what differs between two writes of the same traces."""
    found = mlflow.MlflowClient(tracking_uri).search_traces(
        locations=[experiment_id], include_spans=True, max_results=100
    )
    records = []
    for trace in found:
        info = trace.info.to_dict()
        for key in ("trace_id", "trace_location"):
            info.pop(key, None)
        info["tags"].pop("mlflow.artifactLocation", None)
        spans = [
            {k: v for k, v in span.to_dict().items() if k not in ("trace_id", "span_id")}
            for span in trace.data.spans
        ]
        for span in spans:
            span["attributes"].pop("mlflow.traceRequestId", None)
            span.pop("parent_span_id", None)
        records.append({"info": info, "spans": spans})
    return sorted(records, key=repr)


@pytest.mark.parametrize("batch", [1, 7])
def test_one_flush_per_batch_stores_what_a_flush_per_trace_stores(
    tracking_uri: str, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    traces = _traces()
    per_trace = new_experiment(tracking_uri)
    monkeypatch.setenv("MLFLOW_SQL_TRACE_ROLLUPS_ENABLED", "true")  # MLflow's flush per trace
    write(traces, tracking_uri, per_trace, batch=batch)
    expected = _stored(tracking_uri, per_trace)
    assert len(expected) == len(traces)

    monkeypatch.setenv("MLFLOW_SQL_TRACE_ROLLUPS_ENABLED", "false")
    one_flush = new_experiment(tracking_uri)
    write([_again(t) for t in traces], tracking_uri, one_flush, batch=batch)
    assert _stored(tracking_uri, one_flush) == expected


def _again(trace: Synthetic) -> Synthetic:
    """The same trace under a new id (ids are unique in the store)."""
    return dataclasses.replace(trace, otel_trace_id=trace.otel_trace_id ^ (1 << 100))


def test_telling_a_tracking_servers_store_from_a_sql_one_imports_no_sql_store() -> None:
    # MLflow's SQL store takes seconds to import: a shipper writing to a tracking server paid
    # them at its first batch, and an exit waiting on it gave up meanwhile.
    script = textwrap.dedent(
        """
        import sys
        from mlflow.store.tracking.rest_store import RestStore
        from mlflow.utils.rest_utils import MlflowHostCreds
        from tracewire.export.store import is_sql

        store = RestStore(lambda: MlflowHostCreds("http://127.0.0.1:9"))
        assert not is_sql(store)
        assert "mlflow.store.tracking.sqlalchemy_store" not in sys.modules
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        assert is_sql(SqlAlchemyStore.__new__(SqlAlchemyStore))
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
