"""Our spans in MLflow's span context (runs on the app's own threads, so it stays cheap).

While one of our spans is active, MLflow's context holds a non-recording placeholder with our
ids, so MLflow parents its spans under ours; a recording span there is the user's own, which ours
nest under. :class:`MlflowContext` is that half of core's bridge (core/bridge.py); export/hooks.py
adds the other half and installs it. Also here: what MLflow's context says about a trace starting
(:class:`Origin`), and :class:`SpanView`, one of our spans as the OpenTelemetry span an MLflow
``LiveSpan`` wraps.

MLflow internals used (pinned in tests/export/test_mlflow_pins.py): ``mlflow_runtime_context``
(``get_current``/``attach``/``detach``), ``InMemoryTraceManager.get_mlflow_trace_id_from_otel_id``,
``mlflow.pyfunc.context.get_prediction_context``, and ``LiveSpan`` writing through its
OpenTelemetry span's ``set_attribute`` as JSON text.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Any

from mlflow.tracing import provider as _provider
from mlflow.tracing.constant import SpanAttributeKey
from mlflow.tracing.context import get_configured_trace_metadata, get_configured_trace_tags
from mlflow.tracing.trace_manager import InMemoryTraceManager
from mlflow.tracking.fluent import _get_active_model_id_global, _get_latest_active_run
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace.status import StatusCode

from tracewire.core import span_context, spans


class MlflowContext:
    """MLflow's span context, as our spans read and write it."""

    def __init__(self) -> None:
        # MLflow's own context (MLFLOW_USE_DEFAULT_TRACER_PROVIDER, read at install), not
        # OpenTelemetry's global one.
        self.isolated = True

    def current_context(self) -> Any:
        """MLflow's current context as set, without the request placeholder
        :meth:`context_with_request` adds."""
        runtime = _provider.mlflow_runtime_context
        return type(runtime).get_current(runtime) if self.isolated else None

    def context_with_request(self) -> Any:
        """MLflow's current context, as MLflow reads it. Inside a web request with no span
        active it holds a placeholder for the request's root span, so MLflow spans nest under it
        (and the root is made, see span_context.open_trace). Served when read rather than
        attached at each request's start: that was a fifth of an untraced request's cost."""
        ctx = self.current_context()
        current = otel_trace.get_current_span(ctx)
        if type(current) is otel_trace.NonRecordingSpan:
            standing = _in_place_of(current)
            if standing is not current:
                current = standing
                ctx = otel_trace.set_span_in_context(current, ctx)
        root = span_context.current_request()
        if root is None or root.ended or current is not otel_trace.INVALID_SPAN:
            return ctx
        return otel_trace.set_span_in_context(_placeholder(root.otel_trace_id, root.span_id), ctx)

    def mlflow_parent(self) -> tuple[int, int] | None:
        """(trace id, span id) of the user's active MLflow span, if one is recording."""
        span = otel_trace.get_current_span(self.current_context())
        if not span.is_recording():
            return None
        ctx = span.get_span_context()
        return ctx.trace_id, ctx.span_id

    def attach(self, trace_id: int, span_id: int) -> Any:
        """Make a placeholder with our ids MLflow's current span, so MLflow spans nest under
        ours."""
        ctx = otel_trace.set_span_in_context(
            _placeholder(trace_id, span_id), self.current_context()
        )
        if self.isolated:
            return _provider.mlflow_runtime_context.attach(ctx)
        return otel_context.attach(ctx)

    def detach(self, token: Any) -> None:
        if self.isolated:
            _provider.mlflow_runtime_context.detach(token)
        else:
            otel_context.detach(token)

    def attach_request(self, trace_id: int, span_id: int) -> Any:
        # Isolated: MLflow reads its context through one call, which serves the placeholder.
        return None if self.isolated else self.attach(trace_id, span_id)


def _in_place_of(placeholder: otel_trace.NonRecordingSpan) -> otel_trace.Span:
    """What MLflow sees in place of a placeholder of ours. A placeholder can outlive its span
    in a context the span's end could not reset (an async stream closed from another task):
    then the nearest span above it still open stands in, or nothing once its trace is over
    (MLflow would parent a span under a trace that is gone, and drop it)."""
    ids = placeholder.get_span_context()
    trace = spans.find_open_trace(ids.trace_id)
    if trace is None:  # not ours, or over; unless ours are a fragment of a recording MLflow trace
        manager = InMemoryTraceManager.get_instance()
        if manager.get_mlflow_trace_id_from_otel_id(ids.trace_id) is None:
            return otel_trace.INVALID_SPAN
        return placeholder
    here = span_context.current()
    if here is not None and here.span_id == ids.span_id:
        return placeholder  # the usual case: the span this context made current, open
    span = trace.find_span(ids.span_id)
    if span is None or span.end_ns is None:
        return placeholder
    span = span_context.open_ancestor(span)
    return (
        otel_trace.INVALID_SPAN if span is None else _placeholder(trace.otel_trace_id, span.span_id)
    )


def _span_context(trace_id: int, span_id: int) -> otel_trace.SpanContext:
    return otel_trace.SpanContext(
        trace_id,
        span_id,
        is_remote=False,
        trace_flags=otel_trace.TraceFlags(otel_trace.TraceFlags.SAMPLED),
    )


def _placeholder(trace_id: int, span_id: int) -> otel_trace.NonRecordingSpan:
    # _span_context's, inlined: this runs each time one of our spans is made current.
    return otel_trace.NonRecordingSpan(
        otel_trace.SpanContext(
            trace_id,
            span_id,
            is_remote=False,
            trace_flags=otel_trace.TraceFlags(otel_trace.TraceFlags.SAMPLED),
        )
    )


@dataclass(frozen=True)
class Origin:
    """What MLflow's context says about a trace that starts on the caller's thread, read then;
    MLflow reads the same when it starts a trace (``BaseMlflowSpanProcessor._get_basic_trace_*``).
    Read at the start, not when the worker encodes the trace: a run or an active model can end
    right after the call (an evaluation loop's last row, a short script)."""

    run_id: str | None  # the run the trace is made in (MLflow's latest across threads)
    model_id: str | None  # the active model, else the logged model whose predict() runs
    eval_request_id: str | None  # the row of an MLflow evaluation that runs it
    metadata: dict[str, str] | None  # ``mlflow.tracing.context(metadata=...)``
    tags: dict[str, str] | None  # ``mlflow.tracing.context(tags=...)``


def origin() -> Origin | None:
    """Core's hook when a trace is made (on the caller's thread: a few ContextVar and
    thread-local reads, about 1 µs)."""
    prediction = None
    module = sys.modules.get("mlflow.pyfunc.context")  # loaded only where pyfunc models run
    if module is not None:
        prediction = module.get_prediction_context()
    run, model_id = _get_latest_active_run(), _get_active_model_id_global()
    metadata, tags = get_configured_trace_metadata(), get_configured_trace_tags()
    if prediction is None and not (run or model_id or metadata or tags):
        return None
    eval_request_id = None
    if prediction is not None:
        model_id = model_id or prediction.model_id
        eval_request_id = prediction.request_id if prediction.is_evaluate else None
    return Origin(run.info.run_id if run else None, model_id, eval_request_id, metadata, tags)


class SpanView(ReadableSpan):
    """One of our spans as the OpenTelemetry span an MLflow ``LiveSpan`` wraps: MLflow's span
    API (attributes, inputs, outputs, status, events) reads and writes our record. MLflow hands
    every value over as JSON text."""

    def __init__(self, span: spans.Span) -> None:
        trace_id = span.trace.otel_trace_id
        super().__init__(
            name=span.name,
            context=_span_context(trace_id, span.span_id),
            parent=_span_context(trace_id, span.parent_id) if span.parent_id else None,
            start_time=span.start_ns,
        )
        self._ours = span

    @property
    def attributes(self) -> dict[str, Any]:  # type: ignore[override]
        from mlflow.tracing.utils import dump_span_attribute_value

        ours = self._ours
        values = {
            key: value
            for key, value in ours.attributes.items()
            if not isinstance(value, spans.Deferred)
        }
        values[SpanAttributeKey.SPAN_TYPE] = ours.span_type
        values[SpanAttributeKey.REQUEST_ID] = ours.trace.trace_id
        for key, value in (
            (SpanAttributeKey.INPUTS, ours.inputs),
            (SpanAttributeKey.OUTPUTS, ours.outputs),
        ):
            if value is not None and not isinstance(value, spans.Deferred):
                values[key] = value
        return {
            key: value.json.decode()
            if isinstance(value, spans.Serialized)
            else dump_span_attribute_value(value)
            for key, value in values.items()
        }

    def is_recording(self) -> bool:
        return self._ours.end_ns is None

    def set_attribute(self, key: str, value: Any) -> None:
        ours = self._ours
        if key == SpanAttributeKey.REQUEST_ID or ours.trace.done:  # the worker reads it now
            return
        value = json.loads(value) if isinstance(value, str) else value
        if key == SpanAttributeKey.SPAN_TYPE:
            ours.span_type = value
        elif key == SpanAttributeKey.INPUTS:
            ours.inputs = value
        elif key == SpanAttributeKey.OUTPUTS:
            ours.outputs = value
        else:
            ours.attributes[key] = value

    def set_status(self, status: Any, description: str | None = None) -> None:
        ours = self._ours
        if getattr(status, "status_code", status) is StatusCode.ERROR and ours.error is None:
            ours.error = spans.StatusError(
                getattr(status, "description", None) or description or ""
            )

    def add_event(self, name: str, attributes: Any = None, timestamp: int | None = None) -> None:
        ours = self._ours
        if ours.events is None:
            ours.events = []
        ours.events.append((name, dict(attributes or {}), timestamp or time.time_ns()))

    def end(self, end_time: int | None = None) -> None:
        """Our spans end with the call they trace."""
