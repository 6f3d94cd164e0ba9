"""The app's hooks into MLflow (runs on the app's own threads, so it stays cheap).

tracewire replaces MLflow's default span exporter so that every trace the process makes (ours and
those made only by the user's ``@mlflow.trace`` / ``mlflow.start_span``) goes through one
pipeline (export/pipeline.py), and connects core to MLflow's span context
(export/mlflow_context.py) so our spans and MLflow's nest both ways. Finished traces are handed
to the queue as :class:`Item`; the worker thread encodes them (export/encode.py).

MLflow internals used (pinned in tests/export/test_mlflow_pins.py; ``SUPPORTED_MLFLOW`` is the
range they were tested on): ``mlflow.tracing.provider._get_mlflow_span_processor``,
``provider.reset``, ``mlflow_runtime_context.get_current`` (replaced on the instance),
``MlflowV3SpanProcessor``, ``InMemoryTraceManager`` (``_lock``, ``_traces``,
``_otel_id_to_mlflow_trace_id``) and ``_Trace``,
``mlflow.tracing.fluent.get_current_active_span`` (replaced: where MLflow has no active span, it
returns a ``LiveSpan`` over ours).
"""

from __future__ import annotations

import json
import logging
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
from mlflow.tracing.processor.mlflow_v3 import MlflowV3SpanProcessor
from mlflow.tracing.trace_manager import InMemoryTraceManager, _Trace
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tracewire.core import context as request_context
from tracewire.core import guard, span_context, spans
from tracewire.core.context import RequestContext
from tracewire.export import destination
from tracewire.export.mlflow_context import MlflowContext, Origin, SpanView, origin

logger = logging.getLogger("tracewire")

SUPPORTED_MLFLOW = ((3, 17), (4, 0))  # [min, max)


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
    return LiveSpan(SpanView(span), trace_id, span.span_type)  # type: ignore[arg-type]


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

    def release(self) -> None:
        """Spooled or given up: free our traces' spans now (see spans.Trace.release)."""
        for trace in [self.ours, *self.fragments]:
            if trace is not None:
                trace.release()


_lock = threading.Lock()
_fragments: dict[int, list[spans.Trace]] = {}
_mlflow_requests: dict[int, RequestContext | None] = {}


def _pop_mlflow_trace(otel_trace_id: int) -> _Trace | None:
    manager = InMemoryTraceManager.get_instance()
    with manager._lock:
        mlflow_id = manager._otel_id_to_mlflow_trace_id.pop(otel_trace_id, None)
        return manager._traces.pop(mlflow_id, None) if mlflow_id else None


class MlflowBridge(MlflowContext):
    """Core's bridge (core/bridge.py) to MLflow's span context (the part it inherits) and to the
    export queue; the exporter MLflow calls submits through it too. One instance,
    :data:`bridge`."""

    def __init__(self) -> None:
        super().__init__()
        # Where finished traces go (never blocks); None while tracewire is disabled.
        self.submit: Callable[[Item], object] | None = None

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
        _provider.mlflow_runtime_context.get_current = bridge.context_with_request  # type: ignore[method-assign]
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
