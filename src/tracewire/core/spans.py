"""Our span and trace records, and the top-level traces still open (on the app's threads).

A tracewire span is a small record: name, type, ids, timestamps and *references* to the call's
inputs and outputs. Nothing is serialized on the caller's thread. When the top span of a trace
ends, the whole trace is handed to the export queue, whose worker turns it into MLflow spans.
That is what keeps the hot path cheap (an MLflow/OpenTelemetry span costs several hundred
microseconds here). Where a new span nests, ours or MLflow's, is core/span_context.py's part.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from tracewire.core import context as request_context
from tracewire.core import guard, ids
from tracewire.core.attributes import ABANDONED, INCOMPLETE
from tracewire.core.bridge import Bridge, Unconnected
from tracewire.core.context import RequestContext

# Open top-level traces by OpenTelemetry trace id, so MLflow spans started under ours can find
# their trace, and work that never ends can be expired.
_open: dict[int, Trace] = {}


_bridge: Bridge = Unconnected()


def connect(bridge: Bridge) -> None:
    """Install the export side's bridge (export/hooks.py, when the pipeline starts)."""
    global _bridge
    _bridge = bridge


def bridge() -> Bridge:
    """The export side's bridge; :class:`Unconnected` until it connects."""
    return _bridge


class Deferred:
    """A value the export worker computes (e.g. a streamed reply assembled from its chunks), so
    the caller's thread only keeps references."""

    __slots__ = ("fn", "args")

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn = fn
        self.args = args

    def __call__(self) -> Any:
        return self.fn(*self.args)


class Serialized:
    """A value already written as JSON text (UTF-8). A model's reply is written so on the
    caller's thread, in pydantic's own serializer (a few µs): kept as objects until the export
    worker read it, each reply's dozen models stayed young in the garbage collector's eyes, made
    it run every few calls and, every few thousand, in full (about 150 ms on a 275k-object
    heap), on the app's thread."""

    __slots__ = ("json",)

    def __init__(self, json: bytes) -> None:
        self.json = json


class StatusError(Exception):
    """A span marked failed with a status message and no exception (MLflow's
    ``span.set_status("ERROR")``, a web request answered with a 5xx)."""


class Trace:
    """All spans of one trace (or of one fragment inside a user's MLflow trace)."""

    __slots__ = (
        "otel_trace_id",
        "spans",
        "root",
        "request",
        "parent_span_id",
        "joined",
        "done",
        "origin",
        "_open_spans",
        "_lock",
    )

    def __init__(
        self, otel_trace_id: int, parent_span_id: int | None, request: RequestContext | None = None
    ) -> None:
        self.otel_trace_id = otel_trace_id
        self.spans: list[Span] = []
        self.root: Span | None = None
        self.request: RequestContext | None = request or request_context.current()
        # Set when our top span is the child of a user's MLflow span (we are a fragment).
        self.parent_span_id = parent_span_id
        # Set when MLflow registered its own spans under ours (see export/hooks.py).
        self.joined = False
        self.done = False
        # What MLflow's context says: read with MLflow's own functions, so guarded on its own
        # (a failure there costs the trace its run and model links, not the trace).
        self.origin = guard.call(_bridge.origin)
        self._open_spans = 0
        self._lock = threading.Lock()

    @property
    def trace_id(self) -> str:
        return "tr-" + format(self.otel_trace_id, "032x")

    def release(self) -> None:
        """Exported: let go of the spans. A trace and its spans hold each other, so without
        this they, and the replies they recorded, live until the garbage collector's next pass:
        about 25 objects per traced call, which made it collect every few calls on the app's
        thread, and in full now and then. A span that ends later still finds its trace done."""
        self.spans = []
        self.root = None

    def find_span(self, span_id: int) -> Span | None:
        for span in self.spans:
            if span.span_id == span_id:
                return span
        return None


class Span:
    """A span being recorded; values are kept as references until the export worker reads them.
    Made, it counts as open in its trace (the first one made is the root) until it ends."""

    __slots__ = (
        "trace",
        "span_id",
        "parent_id",
        "name",
        "span_type",
        "start_ns",
        "end_ns",
        "inputs",
        "outputs",
        "attributes",
        "error",
        "events",
    )

    def __init__(
        self,
        trace: Trace,
        parent_id: int | None,
        name: str,
        span_type: str,
        inputs: Any,
        attributes: dict[str, Any] | None,
        start_ns: int | None = None,
        span_id: int | None = None,
    ) -> None:
        self.trace = trace
        self.span_id = span_id or ids.span_id()
        self.parent_id = parent_id
        self.name = name
        self.span_type = span_type
        self.start_ns = start_ns or time.time_ns()
        self.end_ns: int | None = None
        self.inputs = inputs
        self.outputs: Any = None
        self.attributes: dict[str, Any] = attributes if attributes is not None else {}
        self.error: BaseException | None = None
        # Events added through MLflow's span API: (name, attributes, time in ns).
        self.events: list[tuple[str, dict[str, Any], int]] | None = None
        with trace._lock:
            trace._open_spans += 1
            trace.spans.append(self)
            if trace.root is None:
                trace.root = self

    def record_error(self, error: BaseException) -> None:
        self.error = error

    def end(self, end_ns: int | None = None) -> None:
        """End the span (once); the trace is handed off when its last open span ends."""
        if self.end_ns is not None:
            return
        self.end_ns = end_ns or time.time_ns()
        trace = self.trace
        with trace._lock:
            trace._open_spans -= 1
            finished = (
                trace._open_spans == 0
                and trace.root is not None
                and trace.root.end_ns is not None
                and not trace.done
            )
            if finished:
                trace.done = True
        if finished:
            _open.pop(trace.otel_trace_id, None)
            _bridge.finished(trace)


def expire(started_before_ns: int, reason: str) -> int:
    """Hand to export, as incomplete, every open top-level trace whose root started before
    ``started_before_ns``: work whose end never came (a stream abandoned with no close, a
    task that never finishes) must not hold its trace in memory for the life of the process.
    Its spans still open end now, marked abandoned; its root, if still open, fails with
    ``reason``. Spans that end later are not recorded; work started under them later makes
    a new trace. Returns how many traces were expired."""
    expired = 0
    for trace in list(_open.values()):  # one C-level copy: no other thread's change breaks it
        root = trace.root
        if root is None or root.start_ns >= started_before_ns:
            continue
        now = time.time_ns()
        with trace._lock:
            if trace.done:
                continue
            trace.done = True
            cut = [span for span in trace.spans if span.end_ns is None]
            for span in cut:
                span.end_ns = now
                span.attributes[ABANDONED] = True
        if root in cut and root.error is None:
            root.error = StatusError(reason)
        root.attributes[INCOMPLETE] = len(cut)
        _open.pop(trace.otel_trace_id, None)
        expired += 1
        _bridge.finished(trace)
    return expired


def track(trace: Trace) -> None:
    """Count a new top-level trace as open until its last span ends (see :func:`expire`)."""
    _open[trace.otel_trace_id] = trace


def find_open_trace(otel_trace_id: int) -> Trace | None:
    """The open top-level tracewire trace with this OpenTelemetry id, if any."""
    return _open.get(otel_trace_id)
