"""Where a new span nests (runs on the app's threads): the span current in each context (thread,
task), a web request's root, and the calls every plugin and the middleware use to start spans
and make them current. The records themselves are in core/spans.py.

Nesting with the user's own MLflow spans works both ways:

- inside a user's ``@mlflow.trace`` / ``mlflow.start_span``: our spans take the user's span as
  parent and are merged into the user's trace when it is exported (see export/hooks.py);
- a user's MLflow span started inside one of ours: while our span is active, MLflow's context
  holds a non-recording placeholder with our ids, so MLflow parents its span under ours; the
  MLflow trace record is registered just in time and merged into ours when our trace ends.
  A web request's root (:class:`RequestRoot`) gets its placeholder when MLflow reads its
  context (see export/mlflow_context.py), and its trace when the first span starts under it.
"""

from __future__ import annotations

import threading
import time
from contextvars import ContextVar, Token
from typing import Any

from tracewire.core import context as request_context
from tracewire.core import ids, spans
from tracewire.core.context import RequestContext

_current: ContextVar[spans.Span | None] = ContextVar("tracewire_span", default=None)


def current() -> spans.Span | None:
    """The span of ours active in this context, if any: past spans that ended where this
    context could not be reset (a stream's run ended from another task), the nearest one
    still open, so nothing nests under work that is over."""
    span = _current.get()
    if span is not None and span.end_ns is not None:
        span = open_ancestor(span)
    return span


def open_ancestor(span: spans.Span) -> spans.Span | None:
    """``span`` if it is still open, else its nearest ancestor in its trace that is; None when
    there is none (the trace is over, or nearly)."""
    if span.end_ns is None:
        return span
    by_id = {s.span_id: s for s in span.trace.spans}  # a rare path: no index kept for it
    while span.end_ns is not None:
        parent = by_id.get(span.parent_id) if span.parent_id is not None else None
        if parent is None:
            return None
        span = parent
    return span


def start_span(
    name: str,
    span_type: str,
    inputs: Any = None,
    attributes: dict[str, Any] | None = None,
    parent: spans.Span | None = None,
) -> spans.Span:
    """Start a span under the innermost active span (ours or the user's MLflow span), or as
    the root of a new trace. ``parent`` overrides the context: for frameworks that know a
    call's parent when the context lost it (LangChain's parent run id across threads)."""
    if parent is not None and not parent.trace.done:
        return spans.Span(parent.trace, parent.span_id, name, span_type, inputs, attributes)
    parent = current()
    if parent is None:
        request = _request.get()
        if request is not None:
            parent = request.materialize()
    if parent is not None and parent.trace.done:
        parent = None  # a context that outlived its trace (e.g. a task left running)
    # MLflow's current span is recording only when it is the user's own span: ours appear
    # there as non-recording placeholders. A recording one is therefore the innermost.
    mlflow_parent = spans.bridge().mlflow_parent()
    if mlflow_parent is not None:
        trace_id, span_id = mlflow_parent
        if parent is not None and parent.trace.otel_trace_id == trace_id:
            trace, parent_id = parent.trace, span_id
        else:  # under a user's MLflow trace: our spans are a fragment of it
            trace, parent_id = spans.Trace(trace_id, parent_span_id=span_id), span_id
    elif parent is not None:
        trace, parent_id = parent.trace, parent.span_id
    else:
        trace, parent_id = _new_trace(), None
    return spans.Span(trace, parent_id, name, span_type, inputs, attributes)


def start_beside(
    span: spans.Span,
    name: str,
    span_type: str,
    inputs: Any = None,
    attributes: dict[str, Any] | None = None,
) -> spans.Span:
    """Start a span beside ``span``: under its parent, or as the root of a new trace when
    ``span`` is a root. For work begun where ``span`` is current but not running inside it (a
    batch's next input, a stream consumed in turns with another)."""
    if span.parent_id is not None and not span.trace.done:
        return spans.Span(span.trace, span.parent_id, name, span_type, inputs, attributes)
    return spans.Span(_new_trace(), None, name, span_type, inputs, attributes)


def _new_trace() -> spans.Trace:
    trace = spans.Trace(ids.trace_id(), parent_span_id=None)
    spans.track(trace)
    return trace


def activate(span: spans.Span) -> tuple[Token[spans.Span | None], Any]:
    """Make ``span`` the parent of spans started in this context (ours and MLflow's)."""
    return _current.set(span), spans.bridge().attach(span.trace.otel_trace_id, span.span_id)


def deactivate(tokens: tuple[Token[spans.Span | None], Any]) -> None:
    token, mlflow_token = tokens
    try:
        spans.bridge().detach(mlflow_token)
    finally:
        _current.reset(token)


class RequestRoot(RequestContext):
    """A web request: the context its traces belong to (request id, session, user, tags) and
    its root span before anything is traced under it.

    Most requests (health checks, static files) trace nothing: they pay for these fields and
    no more. The trace and its root span are made when the first span starts under the request
    (ours, or a user's MLflow span under the placeholder with these ids), on whatever thread
    that happens. The middleware subclasses it to carry its own per-request fields."""

    __slots__ = (
        "name",
        "span_type",
        "inputs",
        "error",
        "start_ns",
        "otel_trace_id",
        "span_id",
        "parent_id",
        "span",
        "ended",
        "_tokens",
    )
    request_id: str  # a web request always has one
    parent_id: int | None
    # What enter_request set, for leave_request to reset.
    _tokens: tuple[
        Token[RequestContext | None],
        Token[RequestRoot | None],
        Token[spans.Span | None] | None,
        Any,
    ]

    def __init__(
        self,
        name: str,
        span_type: str,
        inputs: Any,
        remote_parent: tuple[int, int] | None,
        request_id: str,
        session_id: str | None,
        user_id: str | None,
    ) -> None:
        RequestContext.__init__(self, request_id, session_id, user_id)
        self.name = name
        self.span_type = span_type
        self.inputs = inputs
        self.error: BaseException | None = None
        self.start_ns = time.time_ns()
        self.otel_trace_id, self.parent_id = remote_parent or (ids.trace_id(), None)
        self.span_id = ids.span_id()
        self.span: spans.Span | None = None
        self.ended = False

    @property
    def trace_id(self) -> str:
        return "tr-" + format(self.otel_trace_id, "032x")

    def materialize(self) -> spans.Span | None:
        """The root span, made on first use; None once the request has ended."""
        if self.span is not None or self.ended:
            return self.span
        with _request_lock:
            if self.span is None and not self.ended:
                trace = spans.Trace(self.otel_trace_id, parent_span_id=None, request=self)
                span = spans.Span(
                    trace,
                    self.parent_id,
                    self.name,
                    self.span_type,
                    self.inputs,
                    None,
                    start_ns=self.start_ns,
                    span_id=self.span_id,
                )
                spans.track(trace)
                self.span = span
        return self.span


_request: ContextVar[RequestRoot | None] = ContextVar("tracewire_request_root", default=None)
_request_lock = threading.Lock()


def current_request() -> RequestRoot | None:
    """The web request this context runs in, if any."""
    return _request.get()


def enter_request(root: RequestRoot) -> None:
    """Make ``root`` the current request and request context: spans started in this context
    nest under it, in a new trace whatever this context held (with a remote parent, in the
    caller's trace). It is exported only if something is traced under it (see
    :func:`leave_request`)."""
    # MLflow's first: if it fails, nothing of ours is left set in this context.
    mlflow_token = spans.bridge().attach_request(root.otel_trace_id, root.span_id)
    root._tokens = (
        request_context.enter(root),
        _request.set(root),
        _current.set(None) if _current.get() is not None else None,
        mlflow_token,
    )


def leave_request(root: RequestRoot, keep_idle: bool) -> spans.Span | None:
    """Restore the context :func:`enter_request` found and close the root to new spans.
    Returns the root span, for the caller to describe and end, or None when nothing was traced
    under the request and not ``keep_idle``: the request leaves no trace."""
    context_token, request_token, current_token, mlflow_token = root._tokens
    try:
        if mlflow_token is not None:
            spans.bridge().detach(mlflow_token)
    finally:
        if current_token is not None:
            _current.reset(current_token)
        _request.reset(request_token)
        request_context.leave(context_token)
    if keep_idle:
        root.materialize()
    _request_lock.acquire()  # not `with`: here that doubled the cost of taking the lock
    try:
        root.ended = True
    finally:
        _request_lock.release()
    span = root.span
    if span is not None:
        span.error = root.error
    return span


def open_trace(otel_trace_id: int) -> spans.Trace | None:
    """The open tracewire trace with this OpenTelemetry id, if any: a request's root is made
    here when the first span under it is a user's MLflow span."""
    trace = spans.find_open_trace(otel_trace_id)
    if trace is None:
        request = _request.get()
        if request is not None and request.otel_trace_id == otel_trace_id:
            span = request.materialize()
            trace = span.trace if span is not None and not span.trace.done else None
    return trace
