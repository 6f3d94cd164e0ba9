"""Every use of MLflow's internals, in one module.

tracewire replaces MLflow's default span exporter so that every trace the process makes (ours and
those made only by the user's ``@mlflow.trace`` / ``mlflow.start_span``) goes through one
pipeline (export/pipeline.py). The hooks are private MLflow API
(``mlflow.tracing.provider._get_mlflow_span_processor``, the in-memory trace manager, the span
dict format, ``rest_utils.http_request``); tests/export/test_mlflow_internals.py pins them, and
``SUPPORTED_MLFLOW`` is the range they were tested on.

Caller side (cheap): read/write MLflow's span context so our spans and MLflow's nest both ways,
and hand finished traces to the queue. Worker thread: ``encode`` a trace into spool bytes.
Shipper process: ``decode`` them into MLflow entities and write them (``Store``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence
from urllib.parse import urlparse

import mlflow
from mlflow.entities import Span as MlflowSpan
from mlflow.entities import TraceData, TraceInfo, TraceLocation, TraceState
from mlflow.environment_variables import MLFLOW_USE_DEFAULT_TRACER_PROVIDER
from mlflow.tracing import provider as _provider
from mlflow.tracing.constant import (
    MAX_CHARS_IN_TRACE_INFO_TAGS_KEY,
    MAX_CHARS_IN_TRACE_INFO_TAGS_VALUE,
    TRACE_SCHEMA_VERSION,
    TRACE_SCHEMA_VERSION_KEY,
    SpanAttributeKey,
)
from mlflow.tracing.processor.mlflow_v3 import MlflowV3SpanProcessor
from mlflow.tracing.trace_manager import InMemoryTraceManager, _Trace
from mlflow.tracing.utils import (
    aggregate_cost_from_spans,
    aggregate_usage_from_spans,
    dump_span_attribute_value,
    should_compute_cost_client_side,
)
from mlflow.tracing.utils.truncation import set_request_response_preview
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tracewire import config
from tracewire.core import attributes as keys
from tracewire.core import context as request_context
from tracewire.core import cost, guard, sampling, spans
from tracewire.core.context import RequestContext

logger = logging.getLogger("tracewire")

SUPPORTED_MLFLOW = ((3, 17), (4, 0))  # [min, max)

_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


# --------------------------------------------------------------------------- configuration


_DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def tracking_uri(settings: config.Settings) -> str:
    if settings.tracking_uri:
        return settings.tracking_uri
    try:
        return mlflow.get_tracking_uri()
    except ImportError:
        # The slim SDK cannot even look for a local store (it lacks the file store's
        # dependencies): the default is what MLflow would have chosen.
        return _DEFAULT_TRACKING_URI


def destination(settings: config.Settings) -> str:
    """Where traces go, as one JSON string: stored in each spool, read by the shipper process,
    and compared before a spool is adopted."""
    experiment_id = settings.experiment_id
    if experiment_id is None and settings.experiment_name is None:
        from mlflow.tracking.fluent import (
            _active_experiment_id,  # mlflow.set_experiment(...)
        )

        experiment_id = _active_experiment_id
    return json.dumps({"tracking_uri": tracking_uri(settings), "experiment_id": experiment_id,
                       "experiment_name": settings.experiment_name}, sort_keys=True)


def check_destination(settings: config.Settings) -> None:
    """Fail at autolog() when the destination cannot work here; no network I/O."""
    uri = tracking_uri(settings)
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme in _DB_SCHEMES or scheme in ("", "file"):
        try:
            import sqlalchemy  # noqa: F401
            from mlflow.store.tracking import sqlalchemy_store  # noqa: F401
        except ImportError:
            raise config.ConfigError(
                f"MLFLOW_TRACKING_URI is {uri!r}, a local MLflow store, which needs the full "
                "`mlflow` package that this environment does not have. Either install it with "
                "`pip install \"tracewire[local]\"`, or point MLFLOW_TRACKING_URI at a tracking "
                "server (for example MLFLOW_TRACKING_URI=http://mlflow.internal:5000)."
            ) from None


def initialize(settings: config.Settings) -> None:
    """Create a local database store's schema and the experiment now, in one process, before
    app workers start; one that cannot be opened yet is left to the shippers, which retry.
    A tracking server needs nothing here (and gets no network I/O)."""
    if urlparse(tracking_uri(settings)).scheme.split("+")[0] not in _DB_SCHEMES:
        return
    try:
        Store(settings)._destination()
    except Exception as exc:
        logger.warning("tracewire: the tracking store could not be initialized yet (%s: %s); "
                       "traces wait in the spool until it can", type(exc).__name__, exc)


# --------------------------------------------------------------------------- caller side


def _current_context():
    # MLflow's isolated context unless MLFLOW_USE_DEFAULT_TRACER_PROVIDER=false (read at install);
    # as set, without the request placeholder _context_with_request adds.
    runtime = _provider.mlflow_runtime_context
    return type(runtime).get_current(runtime) if _isolated else None


def _context_with_request() -> Any:
    """MLflow's current context, as MLflow reads it. Inside a web request with no span active
    it holds a placeholder for the request's root span, so MLflow spans nest under it (and the
    root is made, see spans.open_trace). Served when read rather than attached at each
    request's start: that was a fifth of an untraced request's cost."""
    ctx = _current_context()
    root = spans.current_request()
    if root is None or root.ended or \
            otel_trace.get_current_span(ctx) is not otel_trace.INVALID_SPAN:
        return ctx
    return otel_trace.set_span_in_context(_placeholder(root.otel_trace_id, root.span_id), ctx)


def _placeholder(trace_id: int, span_id: int) -> otel_trace.NonRecordingSpan:
    return otel_trace.NonRecordingSpan(otel_trace.SpanContext(
        trace_id, span_id, is_remote=False,
        trace_flags=otel_trace.TraceFlags(otel_trace.TraceFlags.SAMPLED)))


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
    if _isolated:
        return _provider.mlflow_runtime_context.attach(ctx)
    return otel_context.attach(ctx)


def detach(token: Any) -> None:
    if _isolated:
        _provider.mlflow_runtime_context.detach(token)
    else:
        otel_context.detach(token)


def take_over_mlflow_autolog(flavor: str) -> None:
    """Switch MLflow's own autologging for ``flavor`` off: tracewire traces those calls, and
    MLflow's patch checks this flag on every call, so the same call is not traced twice."""
    try:
        from mlflow.utils.autologging_utils import AUTOLOGGING_INTEGRATIONS
    except ImportError:
        return
    config = AUTOLOGGING_INTEGRATIONS.get(flavor)
    if config is not None and not config.get("disable", True):
        config["disable"] = True
        logger.warning("tracewire: mlflow.%s.autolog() is active too; tracewire traces these "
                       "calls, so MLflow's %s autologging is switched off to avoid tracing each "
                       "call twice", flavor, flavor)


@dataclass
class Item:
    """One finished trace on its way to the store."""

    ours: spans.Trace | None = None            # a tracewire trace (our root span)
    mlflow: _Trace | None = None                # MLflow's record: its root, or its spans under ours
    fragments: list[spans.Trace] = field(default_factory=list)  # our spans under an MLflow root
    request: RequestContext | None = None


_lock = threading.Lock()
_fragments: dict[int, list[spans.Trace]] = {}
_mlflow_requests: dict[int, RequestContext | None] = {}
_isolated = True
# Set by the pipeline: where finished traces go (never blocks).
_submit: Callable[[Item], None] = lambda item: None


def _pop_mlflow_trace(otel_trace_id: int) -> _Trace | None:
    manager = InMemoryTraceManager.get_instance()
    with manager._lock:
        mlflow_id = manager._otel_id_to_mlflow_trace_id.pop(otel_trace_id, None)
        return manager._traces.pop(mlflow_id, None) if mlflow_id else None


def on_trace_finished(trace: spans.Trace) -> None:
    """Core's sink: our trace ended (runs on the caller's thread; dict operations only)."""
    if trace.parent_span_id is None:
        joined = _pop_mlflow_trace(trace.otel_trace_id) if trace.joined else None
        _submit(Item(ours=trace, mlflow=joined, request=trace.request))
        return
    manager = InMemoryTraceManager.get_instance()
    with _lock:
        if manager.get_mlflow_trace_id_from_otel_id(trace.otel_trace_id) is not None:
            _fragments.setdefault(trace.otel_trace_id, []).append(trace)
            return
    # The user's trace was already exported (our span outlived it, e.g. a stream): ship alone.
    _submit(Item(fragments=[trace], request=trace.request))


# The experiment of a user-only trace until the worker resolves the destination.
_PENDING = "tracewire-pending"


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
                span.set_attribute(SpanAttributeKey.EXPERIMENT_ID, json.dumps(_PENDING))
            return
        if self._trace_manager.get_mlflow_trace_id_from_otel_id(trace_id) is not None:
            return
        ours = spans.open_trace(trace_id)
        if ours is None:
            return
        self._trace_manager.register_trace(trace_id, TraceInfo(
            trace_id=ours.trace_id,
            trace_location=TraceLocation.from_experiment_id("0"),  # replaced by the worker
            request_time=span.start_time // 1_000_000,
            state=TraceState.IN_PROGRESS,
            trace_metadata={},
            tags={},
        ))
        ours.joined = True


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
            _submit(Item(mlflow=record, fragments=fragments, request=request))

    def shutdown(self) -> None:
        pass


def _make_processor(tracking_uri: str) -> MlflowV3SpanProcessor:
    return _Processor(span_exporter=_Exporter(), export_metrics=False, use_batch_processor=False)


_original_make_processor = None
_original_http_request = None
_shipping = threading.local()


def _http_request(*args: Any, **kwargs: Any) -> Any:
    """MLflow's HTTP call, with our retry budget on the shipper's thread: one attempt and our
    timeout (the shipper retries with backoff), instead of 7 retries x 120 s."""
    if getattr(_shipping, "timeout", None) is not None:
        kwargs["max_retries"] = 0
        kwargs["timeout"] = _shipping.timeout
    return _original_http_request(*args, **kwargs)  # type: ignore[misc]


def install_hooks(submit: Callable[[Item], None]) -> None:
    """Route MLflow's traces and ours to ``submit`` (idempotent)."""
    global _original_make_processor, _isolated, _submit
    _isolated = MLFLOW_USE_DEFAULT_TRACER_PROVIDER.get()
    _submit = submit
    if _original_make_processor is None:
        version = tuple(int(p) for p in mlflow.__version__.split(".")[:2] if p.isdigit())
        if not SUPPORTED_MLFLOW[0] <= version < SUPPORTED_MLFLOW[1]:
            logger.warning("tracewire: mlflow %s is outside the tested range %s-%s; tracing "
                           "relies on its private exporter hook", mlflow.__version__,
                           SUPPORTED_MLFLOW[0], SUPPORTED_MLFLOW[1])
        _original_make_processor = _provider._get_mlflow_span_processor
        _provider._get_mlflow_span_processor = _make_processor
        _provider.provider.reset()  # re-created with our processor on the next span
    spans._sink = on_trace_finished
    spans._mlflow_parent = active_parent
    spans._mlflow_attach = attach
    spans._mlflow_detach = detach
    if _isolated:  # MLflow reads it through this one call: the placeholder is served there
        _provider.mlflow_runtime_context.get_current = _context_with_request
        spans._mlflow_attach_request = None
    else:  # OpenTelemetry's global context: attached up front
        spans._mlflow_attach_request = attach


def uninstall_hooks() -> None:
    """Give MLflow its own exporter back."""
    global _original_make_processor
    spans._sink = None
    vars(_provider.mlflow_runtime_context).pop("get_current", None)
    if _original_make_processor is not None:
        _provider._get_mlflow_span_processor = _original_make_processor
        _original_make_processor = None
        _provider.provider.reset()


def install_http_budget() -> None:
    """In the shipper process: MLflow's REST calls made while shipping get our retry budget."""
    global _original_http_request
    from mlflow.utils import rest_utils

    if _original_http_request is not None:
        return
    _original_http_request = rest_utils.http_request
    rest_utils.http_request = _http_request
    try:
        from mlflow.store.tracking import rest_store
    except ImportError:
        return
    rest_store.http_request = _http_request


# --------------------------------------------------------------------------- worker side


def _b64(value: int, size: int) -> str:
    return base64.b64encode(value.to_bytes(size, "big")).decode("ascii")


def _exception_event(error: BaseException, time_ns: int) -> dict[str, Any]:
    import traceback

    return {
        "name": "exception",
        "time_unix_nano": time_ns,
        "attributes": {
            "exception.type": type(error).__name__,
            "exception.message": str(error),
            "exception.stacktrace": "".join(traceback.format_exception(error)).strip(),
        },
    }


# One attribute (a base64 image, a huge tool output) is cut past this, with a marker.
MAX_ATTRIBUTE_CHARS = 256 * 1024


def _dump(value: Any) -> str:
    if isinstance(value, spans.Deferred):
        value = value()
    text = dump_span_attribute_value(value)
    if len(text) <= MAX_ATTRIBUTE_CHARS:
        return text
    kept = MAX_ATTRIBUTE_CHARS - 200
    return json.dumps(f"{text[:kept]}... [tracewire: cut {len(text) - kept} of {len(text)} "
                      f"characters]", ensure_ascii=False)


def span_dict(span: spans.Span, trace_id: str, otel_trace_id: int) -> dict[str, Any]:
    """One of our spans in MLflow's stored span format (values serialized here, off the hot path)."""
    attrs = {
        keys.TRACE_REQUEST_ID: json.dumps(trace_id),
        keys.SPAN_TYPE: json.dumps(span.span_type),
    }
    if span.inputs is not None:
        attrs[keys.SPAN_INPUTS] = _dump(span.inputs)
    if span.outputs is not None:
        attrs[keys.SPAN_OUTPUTS] = _dump(span.outputs)
    for key, value in span.attributes.items():
        attrs[key] = _dump(value)
    end_ns = span.end_ns or span.start_ns
    events = []
    status = {"code": "STATUS_CODE_OK", "message": ""}
    if span.error is not None:
        events.append(_exception_event(span.error, end_ns))
        status = {"code": "STATUS_CODE_ERROR",
                  "message": f"{type(span.error).__name__}: {span.error}"}
    return {
        "trace_id": _b64(otel_trace_id, 16),
        "span_id": _b64(span.span_id, 8),
        "parent_span_id": _b64(span.parent_id, 8) if span.parent_id is not None else None,
        "name": span.name,
        "start_time_unix_nano": span.start_ns,
        "end_time_unix_nano": end_ns,
        "events": events,
        "status": status,
        "attributes": attrs,
        "links": [],
    }


def sampled_out(item: Item, rate: float) -> bool:
    """Dropped by sampling: decided by session (else request, else trace) id; errors are kept."""
    if rate >= 1.0:
        return False
    if item.ours is not None:
        failed = item.ours.root is not None and item.ours.root.error is not None
        trace_id = item.ours.trace_id
    elif item.mlflow is not None:
        failed = item.mlflow.info.state == TraceState.ERROR
        trace_id = item.mlflow.info.trace_id
    else:
        return False  # late spans of a trace already kept
    if failed:
        return False
    request = item.request
    key = (request.session_id or request.request_id if request is not None else None) or trace_id
    return not sampling.keep(key, rate)


def encode(item: Item, settings: config.Settings) -> tuple[str, bytes]:
    """A finished trace as spool bytes (JSON). Only what must be read in the app is read here
    (span values, the request context); MLflow's trace record is built by the shipper."""
    dicts: list[dict[str, Any]] = []
    head = info = None
    if item.ours is not None:
        trace = item.ours
        root = trace.root
        assert root is not None and root.end_ns is not None
        head = {"trace_id": trace.trace_id, "name": root.name,
                "request_time": root.start_ns // 1_000_000,
                "execution_duration": (root.end_ns - root.start_ns) // 1_000_000,
                "state": (TraceState.ERROR if root.error is not None else TraceState.OK).value}
        trace_id = trace.trace_id
        dicts.extend(span_dict(s, trace.trace_id, trace.otel_trace_id) for s in trace.spans)
    elif item.mlflow is not None:
        info = item.mlflow.info.to_dict()
        trace_id = item.mlflow.info.trace_id
    else:  # a late fragment: spans only, added to a trace already stored
        trace_id = item.fragments[0].trace_id
    if item.mlflow is not None:
        dicts.extend(live.to_dict() for live in item.mlflow.span_dict.values())
    for fragment in item.fragments:
        dicts.extend(span_dict(s, fragment.trace_id, fragment.otel_trace_id)
                     for s in fragment.spans)
    if settings.redact is not None:
        for data in dicts:
            _redact(data["attributes"], settings.redact)
    # Here, off the caller's thread, and only for prices the store would not set (core/cost.py).
    cost.price_span_dicts(dicts, settings.prices,
                          catalog=not cost.store_prices(tracking_uri(settings)))
    request = item.request or RequestContext()
    context = {"session_id": request.session_id, "user_id": request.user_id,
               "request_id": request.request_id, "tags": {**settings.tags, **request.tags}}
    payload = {"head": head, "info": info, "context": context, "spans": dicts}
    return trace_id, json.dumps(payload, ensure_ascii=False).encode()


_REDACTED_KEYS = {SpanAttributeKey.INPUTS: "inputs", SpanAttributeKey.OUTPUTS: "outputs"}


def _redact(attributes: dict[str, Any], redact: Callable[[str, Any], Any]) -> None:
    """The user's redaction hook, on the worker thread, before the spool. If it fails the value
    is withheld: failing closed is the only safe way for a privacy hook."""
    for attribute, key in _REDACTED_KEYS.items():
        if attribute in attributes:
            try:
                value = redact(key, json.loads(attributes[attribute]))
                attributes[attribute] = dump_span_attribute_value(value)
            except Exception as exc:  # the user's hook failed, not tracewire: no re-raise
                logger.warning("tracewire: the redact hook raised %r; the span's %s are "
                               "withheld", exc, key)
                attributes[attribute] = json.dumps("[tracewire: withheld, redaction failed]")


def decode(payload: bytes, experiment_id: str, record_in_spans: bool
           ) -> tuple[TraceInfo | None, list[MlflowSpan]]:
    """Spool bytes -> MLflow's trace record (None for late spans) and spans, in ``experiment_id``
    unless the trace names its own.

    With ``record_in_spans`` (a tracking server, where each trace record is a request of its
    own), a trace of ours whose record the spans can carry comes back as spans only: see
    :func:`_record_in_root_span`."""
    data = json.loads(payload)
    head, context = data["head"], data["context"]
    if head is not None and record_in_spans and not context["request_id"] and \
            _record_in_root_span(head, context, data["spans"]):
        info: TraceInfo | None = None
    elif head is not None:
        info = TraceInfo(
            trace_id=head["trace_id"],
            trace_location=TraceLocation.from_experiment_id(experiment_id),
            request_time=head["request_time"],
            execution_duration=head["execution_duration"],
            state=TraceState(head["state"]),
            trace_metadata={TRACE_SCHEMA_VERSION_KEY: str(TRACE_SCHEMA_VERSION)},
            tags={keys.TRACE_NAME: head["name"]},
        )
    elif data["info"] is not None:
        info = TraceInfo.from_dict(data["info"])
        if info.experiment_id in (None, _PENDING):
            info.trace_location = TraceLocation.from_experiment_id(experiment_id)
    else:
        info = None
    location = json.dumps(info.experiment_id if info is not None else experiment_id)
    for span in data["spans"]:
        if SpanAttributeKey.EXPERIMENT_ID in span["attributes"]:
            span["attributes"][SpanAttributeKey.EXPERIMENT_ID] = location
    trace_spans = [MlflowSpan.from_dict(d) for d in data["spans"]]
    if info is not None:
        _stamp(info, trace_spans, context)
    return info, trace_spans


def _storable_tags(tags: dict[str, str]) -> dict[str, str]:
    """The store refuses a whole trace over one long tag (a span named after a huge prompt, a
    tag set from request data): values cut to its limit, keys it cannot hold dropped."""
    return {key: value[:MAX_CHARS_IN_TRACE_INFO_TAGS_VALUE] for key, value in tags.items()
            if len(key) <= MAX_CHARS_IN_TRACE_INFO_TAGS_KEY}


def _record_in_root_span(head: dict[str, Any], context: dict[str, Any],
                         span_dicts: list[dict[str, Any]]) -> bool:
    """Put what ``start_trace`` would record into the root span, in the attributes a tracking
    server reads when spans arrive for a trace it does not have yet (MLflow's OTLP intake:
    ``SqlAlchemyStore._log_spans_once``): tags as ``mlflow.traceTag.<key>``, the session as
    ``session.id``, the user as ``user.id``. It takes the state, times, previews, token usage
    and cost from the spans themselves. Many such traces go in one request, against one
    ``start_trace`` request each (3-4x the server's CPU). Only a client request id (every web
    request has one) has no span attribute, so those traces keep ``start_trace``; so does a
    trace continuing a remote parent (its root has a parent: the server would see no root)."""
    root = next((d for d in span_dicts if d["parent_span_id"] is None), None)
    if root is None:
        return False
    attributes = root["attributes"]
    tags = _storable_tags({keys.TRACE_NAME: head["name"], **context["tags"]})
    for key, value in tags.items():
        attributes[SpanAttributeKey.TRACE_TAG_PREFIX + key] = json.dumps(value)
    if context["session_id"]:
        attributes[SpanAttributeKey.SESSION_ID] = json.dumps(context["session_id"])
    if context["user_id"]:
        attributes[keys.USER_ID] = json.dumps(context["user_id"])
    return True


def _stamp(info: TraceInfo, trace_spans: list[MlflowSpan], context: dict[str, Any]) -> None:
    """Trace-level fields: request context, deployment tags, token totals, previews."""
    metadata = info.trace_metadata
    if context["session_id"]:
        metadata[keys.TRACE_SESSION] = context["session_id"]
    if context["user_id"]:
        metadata[keys.TRACE_USER] = context["user_id"]
    if context["request_id"] and not info.client_request_id:
        info.client_request_id = context["request_id"]
    info.tags = _storable_tags({**info.tags, **context["tags"]})
    if usage := aggregate_usage_from_spans(trace_spans):
        metadata[keys.TRACE_TOKEN_USAGE] = json.dumps(usage)
    # A store that prices spans sums the trace's cost itself; one that does not gets ours.
    if should_compute_cost_client_side() and (total := aggregate_cost_from_spans(trace_spans)):
        metadata[keys.TRACE_COST] = json.dumps(total)
    set_request_response_preview(info, TraceData(spans=trace_spans))


_FEEDBACK_ID = "tracewire.feedback_id"


@contextlib.contextmanager
def _sqlite_init_lock(uri: str) -> Iterator[None]:
    """Several processes (one shipper per app worker) opening a fresh sqlite store at once
    race in MLflow's schema migration: they take turns under a lock file beside it."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite" or not parsed.path or parsed.path in ("/", "/:memory:"):
        yield
        return
    database = parsed.path[1:]  # sqlite:///relative.db, sqlite:////absolute.db
    # MLflow creates a new store's directory; the lock beside it needs the directory first.
    os.makedirs(os.path.dirname(database) or ".", exist_ok=True)
    fd = os.open(f"{database}.tracewire-init.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class Store:
    """The tracking store, as the shipper sees it: batches of spooled traces in, or an
    exception (then the batch stays spooled and is retried)."""

    def __init__(self, settings: config.Settings) -> None:
        self._settings = settings
        self._client: Any = None
        self._experiment_id: str | None = None

    def _destination(self) -> tuple[Any, str]:
        if self._client is None:
            from mlflow.tracing.client import TracingClient

            uri = tracking_uri(self._settings)
            with _sqlite_init_lock(uri):
                client = TracingClient(uri)
                client.store  # opens the store: creates and migrates a fresh sqlite schema
            self._client = client
        if self._experiment_id is None:
            self._experiment_id = self._resolve_experiment()
        return self._client, self._experiment_id

    def _resolve_experiment(self) -> str:
        settings = self._settings
        if settings.experiment_id:
            return settings.experiment_id
        if settings.experiment_name:
            # The store API, not MlflowClient: the slim mlflow-tracing SDK has only the former.
            store = self._client.store
            experiment = store.get_experiment_by_name(settings.experiment_name)
            if experiment is not None:
                return experiment.experiment_id
            try:
                return store.create_experiment(settings.experiment_name)
            except Exception:
                # Created meanwhile by another process, or by MLflow itself (it resolves
                # MLFLOW_EXPERIMENT_NAME for user spans that carry an experiment).
                experiment = store.get_experiment_by_name(settings.experiment_name)
                if experiment is None:
                    raise
                return experiment.experiment_id
        from mlflow.tracking.fluent import _active_experiment_id

        return _active_experiment_id or "0"

    def apply_feedback(self, payload: bytes) -> bool:
        """Log one feedback on its trace; False while the trace is not in the store yet."""
        from mlflow.entities import AssessmentSource, Feedback
        from mlflow.exceptions import MlflowException

        data = json.loads(payload)
        _shipping.timeout = self._settings.ship_timeout
        try:
            client, experiment_id = self._destination()
            trace_id = data["trace_id"]
            if trace_id is None:
                found = client.search_traces(
                    locations=[experiment_id], max_results=1, include_spans=False,
                    filter_string=f"trace.client_request_id = '{data['request_id']}'")
                if not found:
                    return False
                trace_id = found[0].info.trace_id
            try:
                info = client.get_trace_info(trace_id)
            except MlflowException as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    return False
                raise
            if any((a.metadata or {}).get(_FEEDBACK_ID) == data["feedback_id"]
                   for a in info.assessments):
                return True  # applied before a crash that kept it spooled
            client.log_assessment(trace_id, Feedback(
                name=data["name"], value=data["value"], rationale=data["rationale"],
                source=AssessmentSource(source_type="HUMAN",
                                        source_id=data["source_id"] or "anonymous"),
                metadata={_FEEDBACK_ID: data["feedback_id"]}))
            return True
        finally:
            _shipping.timeout = None

    @staticmethod
    def rejects(exc: Exception) -> bool:
        """Whether the store refused the data itself (a 4xx), so that sending the same bytes
        again cannot succeed. Throttling (429), timeouts (408) and credentials (401/403: fixed
        by configuration, not by changing the trace) are worth retrying."""
        from mlflow.exceptions import MlflowException

        if not isinstance(exc, MlflowException):
            return False
        code = exc.get_http_status_code()
        return 400 <= code < 500 and code not in (401, 403, 408, 429)

    def ship(self, entries: Sequence[Any]) -> None:
        """Write a batch; idempotent by trace id, so a batch shipped twice lands once."""
        _shipping.timeout = self._settings.ship_timeout
        try:
            client, experiment_id = self._destination()
            infos: list[TraceInfo] = []
            by_experiment: dict[str, list[MlflowSpan]] = {}
            store = client.store
            sql = _is_sql(store)
            for entry in entries:
                decoded = guard.call(decode, entry.payload, experiment_id, not sql)
                if decoded is None:
                    continue  # undecodable: shipping it again would not help
                info, trace_spans = decoded
                if info is not None:
                    infos.append(info)
                location = info.experiment_id if info is not None else experiment_id
                by_experiment.setdefault(location, []).extend(trace_spans)
            if sql:
                _write_sql(store, infos, by_experiment)
                return
            for info in infos:  # a tracking server merges a trace it already has
                store.start_trace(info)
            for location, batch in by_experiment.items():
                store.log_spans(location, batch)
        finally:
            _shipping.timeout = None


def _is_sql(store: Any) -> bool:
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    except ImportError:  # the slim SDK: only REST stores
        return False
    return isinstance(store, SqlAlchemyStore)


@contextlib.contextmanager
def _one_transaction(store: Any) -> Iterator[Any]:
    """Every store call in the block runs in one session and commits once, at the end.

    MLflow's SQL store opens, checks the experiment in and commits a session per
    ``start_trace``: about 60% of a trace's write time. Sharing one session (and one experiment
    lookup) across a batch makes it all-or-nothing too: a failed batch leaves nothing behind
    and is shipped again whole.
    """
    make_session, get_experiment = store.ManagedSessionMaker, store.get_experiment
    experiments: dict[str, Any] = {}

    def cached_experiment(experiment_id: str) -> Any:
        if experiment_id not in experiments:
            experiments[experiment_id] = get_experiment(experiment_id)
        return experiments[experiment_id]

    with make_session(read_only=False) as session:
        @contextlib.contextmanager
        def shared_session(read_only: bool = True) -> Iterator[Any]:
            yield session

        store.ManagedSessionMaker, store.get_experiment = shared_session, cached_experiment
        try:
            yield session
        finally:
            store.ManagedSessionMaker = make_session
            del store.get_experiment  # back to the class's method


def _write_sql(store: Any, infos: list[TraceInfo],
               by_experiment: dict[str, list[MlflowSpan]]) -> None:
    from mlflow.store.tracking.dbmodels.models import SqlTraceInfo

    with _one_transaction(store) as session:
        ids = [info.trace_id for info in infos]
        # Already stored (shipped before a crash that kept them spooled): MLflow would merge
        # them after a rollback, which would undo the rest of this shared transaction.
        stored = {row[0] for row in session.query(SqlTraceInfo.request_id)
                  .filter(SqlTraceInfo.request_id.in_(ids))} if ids else set()
        for info in infos:
            if info.trace_id not in stored:
                store.start_trace(info)
        for location, batch in by_experiment.items():
            store.log_spans(location, batch)


