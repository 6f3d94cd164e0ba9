"""Spooled traces -> MLflow's trace records and spans, as the store is written (runs only in
the shipper process, and in the CLI commands that ship).

The counterpart of export/encode.py: a payload of version 3 or 2 (what the app captured) is made
into MLflow's span records here (export/records.py); version 1 (a spool an older tracewire left)
has them. The request context becomes the trace's tags and metadata; for a tracking server, a
trace's record rides in its root span's attributes where it can (:func:`decode`).

MLflow internals used (pinned in tests/export/test_mlflow_pins.py): the OTLP intake's root span
attributes (``mlflow.traceTag.<key>``, ``session.id``, ``user.id``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mlflow.entities import Span as MlflowSpan
from mlflow.entities import Trace, TraceData, TraceInfo, TraceLocation, TraceState
from mlflow.tracing.constant import (
    MAX_CHARS_IN_TRACE_INFO_METADATA,
    MAX_CHARS_IN_TRACE_INFO_TAGS_KEY,
    MAX_CHARS_IN_TRACE_INFO_TAGS_VALUE,
    TRACE_SCHEMA_VERSION,
    TRACE_SCHEMA_VERSION_KEY,
    TRUNCATION_SUFFIX,
    SpanAttributeKey,
    TraceMetadataKey,
)
from mlflow.tracing.utils import (
    add_size_stats_to_trace_metadata,
    aggregate_cost_from_spans,
    aggregate_usage_from_spans,
    should_compute_cost_client_side,
)
from mlflow.tracing.utils.truncation import set_request_response_preview
from mlflow.utils.mlflow_tags import TRACE_RESOLVE_TAGS_ALLOWLIST

from tracewire.core import attributes as keys
from tracewire.export import destination, records


@dataclass
class Decoded:
    """One spooled trace as MLflow entities."""

    info: TraceInfo | None  # its record; None for late spans of a trace already stored
    spans: list[MlflowSpan]
    # The record rides in the root span's attributes (a tracking server makes it from there):
    # no start_trace now.
    via_spans: bool = False
    # ... and what the spans cannot carry (the client request id, MLflow's metadata) is
    # written later, by a start_trace the server merges (Store.stamp).
    stamp: bool = False


# Trace metadata a tracking server derives from spans arriving for a trace it does not have,
# and metadata that describes rather than identifies (the process's source, sizes, the root's
# values cut short): neither is worth a request of its own (a ``start_trace`` each, the server's
# bottleneck, about 50 a second), and the latter rides along when a trace is stamped anyway.
_NO_STAMP = frozenset(
    {
        TRACE_SCHEMA_VERSION_KEY,
        keys.TRACE_SESSION,
        keys.TRACE_USER,
        keys.TRACE_TOKEN_USAGE,
        keys.TRACE_COST,
        keys.TRACE_INPUTS,
        keys.TRACE_OUTPUTS,
        TraceMetadataKey.SIZE_STATS,
        TraceMetadataKey.SIZE_BYTES,
        *TRACE_RESOLVE_TAGS_ALLOWLIST,
    }
)


def decode(payload: bytes, experiment_id: str, record_in_spans: bool, catalog: bool) -> Decoded:
    """Spool bytes -> MLflow's trace record and spans, in ``experiment_id`` unless the trace
    names its own. A payload of version 3 or 2 (what the app captured, export/records.py) is made
    into MLflow's span records here, with prices from MLflow's catalog if ``catalog`` (a store
    that does not price spans itself); version 1 (a spool an older tracewire left) has them.

    With ``record_in_spans`` (a tracking server, where each trace record is a request of its
    own), a trace of ours whose record the spans can carry is written as spans only: see
    :func:`_record_in_root_span`."""
    data = json.loads(payload)
    if data.get("v") in records.CAPTURED:
        data = records.expand(data, catalog)
    head, context = data["head"], data["context"]
    if head is not None:
        fields = head.get("set") or {}  # what MLflow's trace APIs set (export/encode.py)
        info: TraceInfo | None = TraceInfo(
            trace_id=head["trace_id"],
            trace_location=TraceLocation.from_experiment_id(experiment_id),
            request_time=head["request_time"],
            execution_duration=head["execution_duration"],
            state=TraceState(fields.get("state", head["state"])),
            trace_metadata={
                TRACE_SCHEMA_VERSION_KEY: str(TRACE_SCHEMA_VERSION),
                **head.get("metadata", {}),
            },
            tags={keys.TRACE_NAME: head["name"], **head.get("tags", {})},
            client_request_id=fields.get("client_request_id"),
            # The app's own previews, else ours where MLflow's would be raw JSON (encode.py).
            request_preview=fields.get("request_preview")
            or head.get("previews", {}).get("request_preview"),
            response_preview=fields.get("response_preview")
            or head.get("previews", {}).get("response_preview"),
        )
    elif data["info"] is not None:
        info = TraceInfo.from_dict(data["info"])
        if info.experiment_id in (None, destination.PENDING_EXPERIMENT):
            info.trace_location = TraceLocation.from_experiment_id(experiment_id)
    else:
        info = None
    location = json.dumps(info.experiment_id if info is not None else experiment_id)
    for span in data["spans"]:
        if SpanAttributeKey.EXPERIMENT_ID in span["attributes"]:
            span["attributes"][SpanAttributeKey.EXPERIMENT_ID] = location
    if info is None:
        return Decoded(None, [MlflowSpan.from_dict(d) for d in data["spans"]])
    # Before the spans are built: the root's attributes may carry the record.
    via_spans = (
        head is not None
        and record_in_spans
        and not head.get("set")
        and _record_in_root_span(head, context, data["spans"])
    )
    trace_spans = [MlflowSpan.from_dict(d) for d in data["spans"]]
    _stamp(info, trace_spans, context)
    stamp = via_spans and bool(
        info.client_request_id or head.get("previews") or set(info.trace_metadata) - _NO_STAMP
    )
    return Decoded(info, trace_spans, via_spans, stamp)


def _storable_tags(tags: dict[str, str]) -> dict[str, str]:
    """The store refuses a whole trace over one long tag (a span named after a huge prompt, a
    tag set from request data): values cut to its limit, keys it cannot hold dropped."""
    return {
        key: value[:MAX_CHARS_IN_TRACE_INFO_TAGS_VALUE]
        for key, value in tags.items()
        if len(key) <= MAX_CHARS_IN_TRACE_INFO_TAGS_KEY
    }


def _context_tags(context: dict[str, Any]) -> dict[str, str]:
    """The trace tags the request context gives: deployment and request tags, the request id."""
    request_id = {keys.REQUEST_ID_TAG: context["request_id"]} if context["request_id"] else {}
    return {**context["tags"], **request_id}


def _record_in_root_span(
    head: dict[str, Any], context: dict[str, Any], span_dicts: list[dict[str, Any]]
) -> bool:
    """Put what ``start_trace`` would record into the root span, in the attributes a tracking
    server reads when spans arrive for a trace it does not have yet (MLflow's OTLP intake:
    ``SqlAlchemyStore._log_spans_once``): tags as ``mlflow.traceTag.<key>`` (the request id
    among them), the session as ``session.id``, the user as ``user.id``. It takes the state,
    times, previews, token usage and cost from the spans themselves. Many such traces go in one
    request, against one ``start_trace`` request each (3-4x the server's CPU), so web-request
    traces become visible several times faster; what no span attribute sets (the client request
    id, MLflow's metadata such as the model id) is stamped on afterwards. A trace continuing a
    remote parent keeps ``start_trace`` (its root has a parent: the server would see no root),
    and so does one whose state, previews or client request id the app set through MLflow's
    API (the server would take them from the spans first)."""
    root = next((d for d in span_dicts if d["parent_span_id"] is None), None)
    if root is None:
        return False
    attributes = root["attributes"]
    metadata = head.get("metadata", {})
    tags = _storable_tags(
        {keys.TRACE_NAME: head["name"], **_context_tags(context), **head.get("tags", {})}
    )
    for key, value in tags.items():
        attributes[SpanAttributeKey.TRACE_TAG_PREFIX + key] = json.dumps(value)
    if session := metadata.get(keys.TRACE_SESSION) or context["session_id"]:
        attributes[SpanAttributeKey.SESSION_ID] = json.dumps(session)
    if user := metadata.get(keys.TRACE_USER) or context["user_id"]:
        attributes[keys.USER_ID] = json.dumps(user)
    return True


def _stamp(info: TraceInfo, trace_spans: list[MlflowSpan], context: dict[str, Any]) -> None:
    """Trace-level fields: request context, deployment tags, token totals, previews."""
    metadata = info.trace_metadata
    # What the app set through MLflow's API (update_current_trace) wins.
    if context["session_id"] and keys.TRACE_SESSION not in metadata:
        metadata[keys.TRACE_SESSION] = context["session_id"]
    if context["user_id"] and keys.TRACE_USER not in metadata:
        metadata[keys.TRACE_USER] = context["user_id"]
    if context["request_id"] and not info.client_request_id:
        info.client_request_id = context["request_id"]
    info.tags = _storable_tags({**_context_tags(context), **info.tags})
    if usage := aggregate_usage_from_spans(trace_spans):  # type: ignore[arg-type]
        metadata[keys.TRACE_TOKEN_USAGE] = json.dumps(usage)
    # A store that prices spans sums the trace's cost itself; one that does not gets ours.
    if should_compute_cost_client_side() and (
        total := aggregate_cost_from_spans(trace_spans)  # type: ignore[arg-type]
    ):
        metadata[keys.TRACE_COST] = json.dumps(total)
    set_request_response_preview(info, TraceData(spans=trace_spans))
    if (root := next((s for s in trace_spans if s.parent_id is None), None)) is not None:
        # As MLflow's span processor records them (its trace table still reads them).
        attributes = root.to_dict()["attributes"]
        for key, attribute in (
            (keys.TRACE_INPUTS, SpanAttributeKey.INPUTS),
            (keys.TRACE_OUTPUTS, SpanAttributeKey.OUTPUTS),
        ):
            metadata.setdefault(key, _metadata_text(attributes.get(attribute) or ""))
    # MLflow's exporter adds them to each trace it writes; the store reads the span count to
    # tell a trace whose spans are all written from one still arriving.
    add_size_stats_to_trace_metadata(Trace(info, TraceData(spans=trace_spans)))


def _metadata_text(value: str) -> str:
    if len(value) <= MAX_CHARS_IN_TRACE_INFO_METADATA:
        return value
    return value[: MAX_CHARS_IN_TRACE_INFO_METADATA - len(TRUNCATION_SUFFIX)] + TRUNCATION_SUFFIX
