"""The app's hooks into MLflow (runs on the app's own threads, so it stays cheap).

tracewire replaces MLflow's default span exporter so that every trace the process makes (ours and
those made only by the user's ``@mlflow.trace`` / ``mlflow.start_span``) goes through one
pipeline (export/pipeline.py), and reads/writes MLflow's span context so our spans and MLflow's
nest both ways. Finished traces are handed to the queue as :class:`Item`; the worker thread
encodes them (export/encode.py).

MLflow internals used (pinned in tests/export/test_mlflow_pins.py; ``SUPPORTED_MLFLOW`` is the
range they were tested on): ``mlflow.tracing.provider._get_mlflow_span_processor``,
``provider.reset``, ``mlflow_runtime_context`` (``get_current``/``attach``/``detach``),
``MlflowV3SpanProcessor``, ``InMemoryTraceManager`` (``_lock``, ``_traces``,
``_otel_id_to_mlflow_trace_id``) and ``_Trace``,
``mlflow.tracing.fluent.get_current_active_span`` (replaced: where MLflow has no active span, it
returns a ``LiveSpan`` over ours), ``mlflow.pyfunc.context.get_prediction_context``.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlflow
from mlflow.entities import LiveSpan, TraceInfo, TraceLocation, TraceState
from mlflow.environment_variables import MLFLOW_USE_DEFAULT_TRACER_PROVIDER
from mlflow.tracing import fluent as _fluent
from mlflow.tracing import provider as _provider
from mlflow.tracing.constant import SpanAttributeKey
from mlflow.tracing.context import get_configured_trace_metadata, get_configured_trace_tags
from mlflow.tracing.processor.mlflow_v3 import MlflowV3SpanProcessor
from mlflow.tracing.trace_manager import InMemoryTraceManager, _Trace
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace.status import StatusCode

from tracewire.core import context as request_context
from tracewire.core import guard, span_context, spans
from tracewire.core.context import RequestContext
from tracewire.export import destination

logger = logging.getLogger("tracewire")

SUPPORTED_MLFLOW = ((3, 17), (4, 0))  # [min, max)


def _current_context():
    # MLflow's isolated context unless MLFLOW_USE_DEFAULT_TRACER_PROVIDER=false (read at install);
    # as set, without the request placeholder _context_with_request adds.
    runtime = _provider.mlflow_runtime_context
    return type(runtime).get_current(runtime) if bridge.isolated else None


def _context_with_request() -> Any:
    """MLflow's current context, as MLflow reads it. Inside a web request with no span active
    it holds a placeholder for the request's root span, so MLflow spans nest under it (and the
    root is made, see span_context.open_trace). Served when read rather than attached at each
    request's start: that was a fifth of an untraced request's cost."""
    ctx = _current_context()
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


def _placeholder(trace_id: int, span_id: int) -> otel_trace.NonRecordingSpan:
    return otel_trace.NonRecordingSpan(
        otel_trace.SpanContext(
            trace_id,
            span_id,
            is_remote=False,
            trace_flags=otel_trace.TraceFlags(otel_trace.TraceFlags.SAMPLED),
        )
    )


def active_parent() -> tuple[int, int] | None:
    """(trace id, span id) of the user's active MLflow span, if one is recording."""
    span = otel_trace.get_current_span(_current_context())
    if not span.is_recording():
        return None
    ctx = span.get_span_context()
    return ctx.trace_id, ctx.span_id


def attach(trace_id: int, span_id: int) -> Any:
    """Make a placeholder with our ids MLflow's current span, so MLflow spans nest under ours."""
    ctx = otel_trace.set_span_in_context(_placeholder(trace_id, span_id), _current_context())
    if bridge.isolated:
        return _provider.mlflow_runtime_context.attach(ctx)
    return otel_context.attach(ctx)


def detach(token: Any) -> None:
    if bridge.isolated:
        _provider.mlflow_runtime_context.detach(token)
    else:
        otel_context.detach(token)


@dataclass(frozen=True)
class Origin:
    """What MLflow's context on the caller's thread says about a trace that starts there; MLflow
    reads the same when it starts a trace (``BaseMlflowSpanProcessor._get_basic_trace_*``)."""

    model_id: str | None  # the logged model whose predict() runs (search by it)
    eval_request_id: str | None  # the row of an MLflow evaluation that runs it
    metadata: dict[str, str] | None  # ``mlflow.tracing.context(metadata=...)``
    tags: dict[str, str] | None  # ``mlflow.tracing.context(tags=...)``


def origin() -> Origin | None:
    """Core's hook when a trace is made (on the caller's thread: a few ContextVar reads)."""
    prediction = None
    module = sys.modules.get("mlflow.pyfunc.context")  # loaded only where pyfunc models run
    if module is not None:
        prediction = module.get_prediction_context()
    metadata, tags = get_configured_trace_metadata(), get_configured_trace_tags()
    if prediction is None and metadata is None and tags is None:
        return None
    model_id = eval_request_id = None
    if prediction is not None:
        model_id = prediction.model_id
        eval_request_id = prediction.request_id if prediction.is_evaluate else None
    return Origin(model_id, eval_request_id, metadata, tags)


def _register(trace: spans.Trace, manager: InMemoryTraceManager) -> str:
    """Give MLflow a record of our trace (under ``_lock``), so that its trace APIs
    (``update_current_trace``, spans started under ours) find it; what they set on the record
    is merged into our trace when it ends (export/encode.py)."""
    trace_id = manager.get_mlflow_trace_id_from_otel_id(trace.otel_trace_id)
    if trace_id is not None:
        return trace_id
    root = trace.root
    manager.register_trace(
        trace.otel_trace_id,
        TraceInfo(
            trace_id=trace.trace_id,
            trace_location=TraceLocation.from_experiment_id("0"),  # replaced by the worker
            request_time=(root.start_ns if root is not None else 0) // 1_000_000,
            state=TraceState.IN_PROGRESS,
            trace_metadata={},
            tags={},
        ),
    )
    trace.joined = True
    return trace.trace_id


def _our_active_span() -> LiveSpan | None:
    """MLflow's view of our innermost active span, or of the web request's root: what
    ``mlflow.get_current_active_span()`` returns where MLflow itself has none (its context
    holds our non-recording placeholder there), and so what ``update_current_trace`` and
    ``get_active_trace_id`` work on."""
    span = span_context.current()
    if span is None and (request := span_context.current_request()) is not None:
        span = request.materialize()
    if span is None or span.trace.done:
        return None
    trace = span.trace
    manager = InMemoryTraceManager.get_instance()
    with _lock:
        if trace.parent_span_id is None:
            trace_id = _register(trace, manager)
        else:  # a fragment of the user's MLflow trace: its record is the user's
            trace_id = manager.get_mlflow_trace_id_from_otel_id(trace.otel_trace_id)
            if trace_id is None:  # that trace has ended already
                return None
    return LiveSpan(_SpanView(span), trace_id, span.span_type)  # type: ignore[arg-type]


def _span_context(trace_id: int, span_id: int) -> otel_trace.SpanContext:
    return otel_trace.SpanContext(
        trace_id,
        span_id,
        is_remote=False,
        trace_flags=otel_trace.TraceFlags(otel_trace.TraceFlags.SAMPLED),
    )


class _SpanView(ReadableSpan):
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
        return {key: dump_span_attribute_value(value) for key, value in values.items()}

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
        import time

        ours = self._ours
        if ours.events is None:
            ours.events = []
        ours.events.append((name, dict(attributes or {}), timestamp or time.time_ns()))

    def end(self, end_time: int | None = None) -> None:
        """Our spans end with the call they trace."""


def _with_our_spans(get_current_active_span: Callable[[], Any]) -> Callable[[], Any]:
    def current_active_span() -> Any:
        span = get_current_active_span()
        if span is None:
            span = guard.call(_our_active_span)
        return span

    current_active_span.__wrapped__ = get_current_active_span  # type: ignore[attr-defined]
    return current_active_span


@dataclass
class Item:
    """One finished trace on its way to the store."""

    ours: spans.Trace | None = None  # a tracewire trace (our root span)
    mlflow: _Trace | None = None  # MLflow's record: its root, or its spans under ours
    fragments: list[spans.Trace] = field(default_factory=list)  # our spans under an MLflow root
    request: RequestContext | None = None


_lock = threading.Lock()
_fragments: dict[int, list[spans.Trace]] = {}
_mlflow_requests: dict[int, RequestContext | None] = {}


def _pop_mlflow_trace(otel_trace_id: int) -> _Trace | None:
    manager = InMemoryTraceManager.get_instance()
    with manager._lock:
        mlflow_id = manager._otel_id_to_mlflow_trace_id.pop(otel_trace_id, None)
        return manager._traces.pop(mlflow_id, None) if mlflow_id else None


class MlflowBridge:
    """Core's bridge (core/bridge.py) to MLflow's span context and to the export queue; the
    exporter MLflow calls submits through it too. One instance, :data:`bridge`."""

    def __init__(self) -> None:
        # Where finished traces go (never blocks); None while tracewire is disabled.
        self.submit: Callable[[Item], object] | None = None
        # MLflow's own context (MLFLOW_USE_DEFAULT_TRACER_PROVIDER, read at install), not
        # OpenTelemetry's global one.
        self.isolated = True

    def finished(self, trace: spans.Trace) -> None:
        """Our trace ended (runs on the caller's thread; dict operations only)."""
        if trace.parent_span_id is None:
            joined = _pop_mlflow_trace(trace.otel_trace_id) if trace.joined else None
            self.send(Item(ours=trace, mlflow=joined, request=trace.request))
            return
        manager = InMemoryTraceManager.get_instance()
        with _lock:
            if manager.get_mlflow_trace_id_from_otel_id(trace.otel_trace_id) is not None:
                _fragments.setdefault(trace.otel_trace_id, []).append(trace)
                return
        # The user's trace was already exported (our span outlived it, e.g. a stream): alone.
        self.send(Item(fragments=[trace], request=trace.request))

    def send(self, item: Item) -> None:
        """Hand a finished trace to the export queue, if tracewire is enabled."""
        submit = self.submit
        if submit is not None:
            submit(item)

    def origin(self) -> Origin | None:
        return origin() if self.submit is not None else None

    def mlflow_parent(self) -> tuple[int, int] | None:
        return active_parent()

    def attach(self, trace_id: int, span_id: int) -> Any:
        return attach(trace_id, span_id)

    def detach(self, token: Any) -> None:
        detach(token)

    def attach_request(self, trace_id: int, span_id: int) -> Any:
        # Isolated: MLflow reads its context through one call, which serves the placeholder.
        return None if self.isolated else attach(trace_id, span_id)


bridge = MlflowBridge()


class _Processor(MlflowV3SpanProcessor):
    """MLflow's processor, plus: an MLflow span started under one of our spans joins our trace."""

    def on_start(self, span, parent_context=None):  # type: ignore[no-untyped-def]
        guard.call(self._adopt, span)
        super().on_start(span, parent_context)

    def _adopt(self, span) -> None:  # type: ignore[no-untyped-def]
        trace_id = span.context.trace_id
        if span.parent is None:
            _mlflow_requests[trace_id] = request_context.current()
            if span.attributes.get(SpanAttributeKey.EXPERIMENT_ID) is None:
                # The worker picks the experiment. Without this MLflow resolves it here, on the
                # caller's thread: a store round trip, racing our worker to create it by name.
                span.set_attribute(
                    SpanAttributeKey.EXPERIMENT_ID, json.dumps(destination.PENDING_EXPERIMENT)
                )
            return
        if self._trace_manager.get_mlflow_trace_id_from_otel_id(trace_id) is not None:
            return
        ours = span_context.open_trace(trace_id)
        if ours is not None:
            with _lock:
                _register(ours, self._trace_manager)


class _Exporter(SpanExporter):
    """Receives MLflow's ended spans; a root's trace goes to our queue with our fragments."""

    def export(self, otel_spans: Sequence[Any]) -> SpanExportResult:
        for otel_span in otel_spans:
            if otel_span.parent is None:
                guard.call(self._export_root, otel_span.context.trace_id)
        return SpanExportResult.SUCCESS

    @staticmethod
    def _export_root(trace_id: int) -> None:
        with _lock:
            record = _pop_mlflow_trace(trace_id)
            fragments = _fragments.pop(trace_id, [])
        request = _mlflow_requests.pop(trace_id, None)
        if record is not None:
            bridge.send(Item(mlflow=record, fragments=fragments, request=request))

    def shutdown(self) -> None:
        pass


def _make_processor(tracking_uri: str) -> MlflowV3SpanProcessor:
    return _Processor(span_exporter=_Exporter(), export_metrics=False, use_batch_processor=False)


_original_make_processor = None


def install_hooks(submit: Callable[[Item], object]) -> None:
    """Route MLflow's traces and ours to ``submit`` (idempotent)."""
    global _original_make_processor
    bridge.isolated = MLFLOW_USE_DEFAULT_TRACER_PROVIDER.get()
    bridge.submit = submit
    if _original_make_processor is None:
        version = tuple(int(p) for p in mlflow.__version__.split(".")[:2] if p.isdigit())
        if not SUPPORTED_MLFLOW[0] <= version < SUPPORTED_MLFLOW[1]:
            logger.warning(
                "tracewire: mlflow %s is outside the tested range %s-%s; tracing "
                "relies on its private exporter hook",
                mlflow.__version__,
                SUPPORTED_MLFLOW[0],
                SUPPORTED_MLFLOW[1],
            )
        _original_make_processor = _provider._get_mlflow_span_processor
        _provider._get_mlflow_span_processor = _make_processor
        _provider.provider.reset()  # re-created with our processor on the next span
    spans.connect(bridge)
    if bridge.isolated:  # MLflow reads it through this one call: the placeholder is served there
        _provider.mlflow_runtime_context.get_current = _context_with_request  # type: ignore[method-assign]
    if not hasattr(_fluent.get_current_active_span, "__wrapped__"):
        # Where MLflow has no active span of its own, ours: module attributes, as MLflow's own
        # functions (update_current_trace, get_active_trace_id) look it up at each call.
        mlflow.get_current_active_span = _fluent.get_current_active_span = _with_our_spans(
            _fluent.get_current_active_span
        )


def uninstall_hooks() -> None:
    """Give MLflow its own exporter back."""
    global _original_make_processor
    # Spans still open keep attaching and detaching MLflow's context; nothing more is exported.
    bridge.submit = None
    if (original := getattr(_fluent.get_current_active_span, "__wrapped__", None)) is not None:
        mlflow.get_current_active_span = _fluent.get_current_active_span = original
    vars(_provider.mlflow_runtime_context).pop("get_current", None)
    if _original_make_processor is not None:
        _provider._get_mlflow_span_processor = _original_make_processor
        _original_make_processor = None
        _provider.provider.reset()
