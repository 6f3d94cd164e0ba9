"""One analytics row per trace: the columns of the Delta table and of ``tracewire stats``.

A row is built from MLflow's own trace record (read back from the tracking store), so the table
holds what the store holds: session, user and deployment tags from the trace metadata, token
usage and cost as MLflow aggregated them, the web request's route, status and time to first
byte from the root span the middleware wrote, and the feedback logged on the trace.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
from typing import TYPE_CHECKING, Any

from tracewire.core import attributes as keys

if TYPE_CHECKING:
    import pyarrow as pa

# Partition column: the UTC day of the request.
PARTITION = "request_date"


@functools.cache
def schema() -> pa.Schema:
    """The table's Arrow schema (pyarrow is imported only by what reads or writes the table:
    ``tracewire stats`` on the store runs without it)."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("trace_id", pa.string(), nullable=False),
            pa.field("client_request_id", pa.string()),
            pa.field("request_time", pa.timestamp("ms", tz="UTC")),
            pa.field(PARTITION, pa.date32()),
            pa.field("state", pa.string()),
            pa.field("execution_duration_ms", pa.int64()),
            pa.field("name", pa.string()),
            pa.field("session", pa.string()),
            pa.field("user", pa.string()),
            pa.field("environment", pa.string()),
            pa.field("service_version", pa.string()),
            pa.field("region", pa.string()),
            pa.field("tags", pa.string()),
            pa.field("request_preview", pa.string()),
            pa.field("response_preview", pa.string()),
            pa.field("input_tokens", pa.int64()),
            pa.field("output_tokens", pa.int64()),
            pa.field("total_tokens", pa.int64()),
            pa.field("cache_read_input_tokens", pa.int64()),
            pa.field("cache_creation_input_tokens", pa.int64()),
            pa.field("input_cost_usd", pa.float64()),
            pa.field("output_cost_usd", pa.float64()),
            pa.field("total_cost_usd", pa.float64()),
            pa.field("models", pa.list_(pa.string())),
            pa.field("route", pa.string()),
            pa.field("http_status", pa.int32()),
            pa.field("time_to_first_byte_ms", pa.float64()),
            pa.field("error_message", pa.string()),
            pa.field("feedback_count", pa.int32()),
            pa.field("feedback_positive", pa.int32()),
            pa.field("assessments", pa.string()),
            pa.field("assessments_hash", pa.string()),
            pa.field("revision", pa.string()),
            pa.field("spans", pa.string()),
        ]
    )


def _json(value: Any) -> Any:
    """A span attribute as stored (JSON text), decoded."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def assessments_hash(info: Any) -> str:
    """What changes when feedback is added, edited or removed: every assessment's id and last
    update time (MLflow bumps it on each edit), sorted so the order of reading does not matter."""
    marks = sorted(f"{a.assessment_id}@{a.last_update_time_ms}" for a in info.assessments or ())
    return hashlib.sha1("\n".join(marks).encode()).hexdigest()[:16]


def revision(info: Any) -> str:
    """A fingerprint of the trace record as the store holds it now (state, duration, metadata,
    tags, assessments): a stored row whose revision differs is rewritten. Late spans change the
    token and cost metadata the store recomputes, so they show up here too."""
    parts = json.dumps(
        [
            info.state.value if info.state else None,
            info.execution_duration,
            sorted(info.trace_metadata.items()),
            sorted(info.tags.items()),
            assessments_hash(info),
        ]
    )
    return hashlib.sha1(parts.encode()).hexdigest()[:16]


def _positive(value: Any) -> bool:
    # Thumbs up (True) or a score above zero; strings are comments, never counted positive.
    if isinstance(value, bool):
        return value
    return isinstance(value, (int, float)) and value > 0


def _feedback(info: Any) -> tuple[int, int, list[dict[str, Any]]]:
    count = positive = 0
    out = []
    for a in info.assessments or ():
        value = getattr(a, "value", None)
        is_feedback = getattr(a, "feedback", None) is not None
        if is_feedback and a.valid is not False:
            count += 1
            positive += _positive(value)
        out.append(
            {
                "id": a.assessment_id,
                "name": a.name,
                "value": value,
                "kind": "feedback" if is_feedback else "expectation",
                "rationale": a.rationale,
                "source": a.source.source_id if a.source else None,
                "updated_ms": a.last_update_time_ms,
            }
        )
    return count, positive, out


def _root(span_dicts: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((d for d in span_dicts if not d.get("parent_span_id")), None)


def _error(span_dicts: list[dict[str, Any]]) -> str | None:
    # The root's message if it failed, else the first failed span's (the cause).
    failed = [d for d in span_dicts if (d.get("status") or {}).get("code") == "STATUS_CODE_ERROR"]
    chosen = _root(failed) or min(failed, key=lambda d: d["start_time_unix_nano"], default=None)
    return (chosen["status"].get("message") or "error") if chosen is not None else None


def row(trace: Any) -> dict[str, Any]:
    """One Delta row from an MLflow ``Trace`` (with spans)."""
    info = trace.info
    # Span dicts, not span objects: MLflow reads stored spans lazily, and to_dict() hands back
    # the stored dict without building the span (most of the cost of a row otherwise).
    span_dicts = [s.to_dict() for s in trace.data.spans] if trace.data else []
    metadata = info.trace_metadata
    usage = _json(metadata.get(keys.TRACE_TOKEN_USAGE)) or {}
    cost = _json(metadata.get(keys.TRACE_COST)) or {}
    root = _root(span_dicts)
    root_attrs = root["attributes"] if root is not None else {}
    models = sorted(
        {m for d in span_dicts if isinstance(m := _json(d["attributes"].get(keys.LLM_MODEL)), str)}
    )
    count, positive, assessments = _feedback(info)
    ttfb = _json(root_attrs.get(keys.HTTP_TIME_TO_FIRST_BYTE))
    status = _json(root_attrs.get(keys.HTTP_STATUS_CODE))
    route = _json(root_attrs.get(keys.HTTP_ROUTE))
    request_time = dt.datetime.fromtimestamp(info.request_time / 1000, tz=dt.UTC)
    return {
        "trace_id": info.trace_id,
        # Through a tracking server the column is stamped after the trace is stored; the tag
        # holds the same id from the start.
        "client_request_id": info.client_request_id or info.tags.get(keys.REQUEST_ID_TAG),
        "request_time": request_time,
        PARTITION: request_time.date(),
        "state": info.state.value if info.state else None,
        "execution_duration_ms": info.execution_duration,
        "name": info.tags.get(keys.TRACE_NAME),
        "session": metadata.get(keys.TRACE_SESSION),
        "user": metadata.get(keys.TRACE_USER),
        "environment": info.tags.get(keys.DEPLOYMENT_ENVIRONMENT),
        "service_version": info.tags.get(keys.SERVICE_VERSION),
        "region": info.tags.get(keys.CLOUD_REGION),
        "tags": json.dumps(
            {
                k: v
                for k, v in info.tags.items()
                if not k.startswith("mlflow.") and k != keys.REQUEST_ID_TAG
            },
            sort_keys=True,
        ),
        "request_preview": info.request_preview,
        "response_preview": info.response_preview,
        "input_tokens": usage.get(keys.INPUT_TOKENS),
        "output_tokens": usage.get(keys.OUTPUT_TOKENS),
        "total_tokens": usage.get(keys.TOTAL_TOKENS),
        "cache_read_input_tokens": usage.get(keys.CACHE_READ_INPUT_TOKENS),
        "cache_creation_input_tokens": usage.get(keys.CACHE_CREATION_INPUT_TOKENS),
        "input_cost_usd": cost.get(keys.INPUT_COST),
        "output_cost_usd": cost.get(keys.OUTPUT_COST),
        "total_cost_usd": cost.get(keys.TOTAL_COST),
        "models": models,
        "route": route if isinstance(route, str) else None,
        "http_status": int(status) if isinstance(status, (int, float)) else None,
        "time_to_first_byte_ms": float(ttfb) if isinstance(ttfb, (int, float)) else None,
        "error_message": _error(span_dicts),
        "feedback_count": count,
        "feedback_positive": positive,
        "assessments": json.dumps(assessments, default=str),
        "assessments_hash": assessments_hash(info),
        "revision": revision(info),
        "spans": json.dumps(span_dicts, default=str),
    }


def table(rows: list[dict[str, Any]]) -> pa.Table:
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=schema())


def read(table: Any, columns: list[str] | None = None, filter: Any = None) -> pa.Table:
    """Rows of a ``deltalake.DeltaTable`` as an Arrow table, on the calling thread only.

    With Arrow's thread pool (the default), a scan through deltalake's Arrow dataset can abort
    the interpreter at exit ("terminate called without an active exception", exit code 134:
    a scan thread outlives Arrow's teardown; 1 to 3 runs in 12 here with deltalake 1.6).
    Without it, none did.
    """
    return table.to_pyarrow_dataset().to_table(columns=columns, filter=filter, use_threads=False)
