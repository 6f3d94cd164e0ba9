"""A finished trace -> spool bytes (runs on the app's export worker thread, off the caller's).

Only what must be read in the app is read here: span values, the request context, the user's
redaction hook and prices MLflow's store would not set. MLflow's trace record is built from these
bytes by the shipper process (export/store.py).

MLflow internals used (pinned in tests/export/test_mlflow_pins.py): the span dict format that
``mlflow.entities.Span.from_dict`` reads, ``dump_span_attribute_value``, ``_Trace.span_dict``
entries' ``to_dict`` and ``TraceInfo.to_dict``.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from typing import Any, Callable

from mlflow.entities import SpanLogLevel, SpanStatusCode, TraceInfo, TraceState
from mlflow.tracing.constant import SpanAttributeKey
from mlflow.tracing.utils import dump_span_attribute_value, encode_span_id
from mlflow.tracing.utils.default_log_level import default_log_level_for_span_type
from mlflow.tracing.utils.environment import resolve_env_metadata
from mlflow.tracing.utils.truncation import _get_truncated_preview
from mlflow.tracking.fluent import _get_active_model_id_global, _get_latest_active_run

from tracewire import config
from tracewire.core import attributes as keys
from tracewire.core import cost, sampling, scrub, spans
from tracewire.core.context import RequestContext
from tracewire.export import destination
from tracewire.export.hooks import Item

logger = logging.getLogger("tracewire")


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
    """One of our spans in MLflow's stored span format (values serialized here, off the hot
    path)."""
    attrs = {
        keys.TRACE_REQUEST_ID: json.dumps(trace_id),
        keys.SPAN_TYPE: json.dumps(span.span_type),
        # The level MLflow's UI filters spans by, as MLflow sets it on its own spans.
        keys.SPAN_LOG_LEVEL: str(int(SpanLogLevel.ERROR if span.error is not None
                                     else default_log_level_for_span_type(span.span_type))),
    }
    if span.inputs is not None:
        attrs[keys.SPAN_INPUTS] = _dump(span.inputs)
    if span.outputs is not None:
        attrs[keys.SPAN_OUTPUTS] = _dump(span.outputs)
    for key, value in span.attributes.items():
        attrs[key] = _dump(value)
    end_ns = span.end_ns or span.start_ns
    events = [{"name": name, "time_unix_nano": at, "attributes": values}
              for name, values, at in span.events or ()]
    status = {"code": "STATUS_CODE_OK", "message": ""}
    if isinstance(span.error, spans.StatusError):
        status = {"code": "STATUS_CODE_ERROR", "message": str(span.error)}
    elif span.error is not None:
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


def settle(item: Item) -> None:
    """A web request's outcome, by OpenTelemetry's HTTP server convention: a 5xx answer fails
    the request's root span (and so its trace); a 4xx only when the app's own traced work under
    it failed (a served agent's error, answered with a 400)."""
    trace = item.ours
    root = trace.root if trace is not None else None
    if root is None or root.error is not None:
        return
    status = root.attributes.get(keys.HTTP_STATUS_CODE)
    if not isinstance(status, int) or status < 400:
        return
    cause = next((f"{type(s.error).__name__}: {s.error}" for s in trace.spans
                  if s.parent_id == root.span_id and s.error is not None), None)
    if cause is None and item.mlflow is not None:  # MLflow's spans under ours
        parent = encode_span_id(root.span_id)
        cause = next((live.status.description or "error"
                      for live in item.mlflow.span_dict.values()
                      if live.parent_id == parent
                      and live.status.status_code == SpanStatusCode.ERROR), None)
    if status >= 500 or cause is not None:
        root.error = spans.StatusError(f"HTTP {status}" + (f": {cause}" if cause else ""))


def sampled_out(item: Item, rate: float) -> bool:
    """Dropped by sampling: decided by session (else request, else trace) id; errors are kept."""
    if rate >= 1.0:
        return False
    if item.ours is not None:
        failed = item.ours.root is not None and item.ours.root.error is not None or \
            item.mlflow is not None and item.mlflow.info.state == TraceState.ERROR
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
                "state": (TraceState.ERROR if root.error is not None else TraceState.OK).value,
                **_record(item)}
        trace_id = trace.trace_id
        dicts.extend(span_dict(s, trace.trace_id, trace.otel_trace_id) for s in trace.spans)
    elif item.mlflow is not None:
        info = _info_dict(item.mlflow.info)
        trace_id = item.mlflow.info.trace_id
    else:  # a late fragment: spans only, added to a trace already stored
        trace_id = item.fragments[0].trace_id
    if item.mlflow is not None:
        dicts.extend(live.to_dict() for live in item.mlflow.span_dict.values())
    for fragment in item.fragments:
        dicts.extend(span_dict(s, fragment.trace_id, fragment.otel_trace_id)
                     for s in fragment.spans)
    if item.ours is not None:
        _lift_work(dicts, _b64(item.ours.root.span_id, 8))
    for data in dicts:
        _scrub_errors(data)
    if settings.redact is not None:
        for data in dicts:
            _redact(data["attributes"], settings.redact)
    if item.ours is not None and (previews := _previews(dicts, _b64(item.ours.root.span_id, 8))):
        head["previews"] = previews  # from the redacted values
    # Here, off the caller's thread, and only for prices the store would not set (core/cost.py).
    cost.price_span_dicts(dicts, settings.prices,
                          catalog=not cost.store_prices(destination.tracking_uri(settings)))
    request = item.request or RequestContext()
    context = {"session_id": request.session_id, "user_id": request.user_id,
               "request_id": request.request_id, "tags": {**settings.trace_tags, **request.tags}}
    payload = {"head": head, "info": info, "context": context, "spans": dicts}
    return trace_id, _utf8(json.dumps(payload, ensure_ascii=False))


def process_metadata() -> dict[str, str]:
    """The source MLflow records on every trace (script or entry point, git commit), resolved
    once per process. Resolved when the worker starts, not at the first trace: resolving
    imports GitPython, and that import during the exit of a script stopped by Ctrl-C made it
    exit with status 1 instead of dying of SIGINT (CPython resets its unhandled-interrupt mark)."""
    return dict(resolve_env_metadata())


def _record(item: Item) -> dict[str, Any]:
    """What MLflow records on a trace it starts, for one of ours: this process's source, run
    and active model, what the caller's context said when the trace began (the served model,
    an evaluation row, ``mlflow.tracing.context``), and what MLflow's trace APIs set on the
    trace while it ran (``update_current_trace``: tags, metadata, state, previews, client
    request id), which win."""
    assert item.ours is not None
    origin = item.ours.origin
    metadata = process_metadata()
    tags: dict[str, str] = {}
    if run := _get_latest_active_run():
        metadata[keys.SOURCE_RUN] = run.info.run_id
    if model_id := _get_active_model_id_global() or (origin.model_id if origin else None):
        metadata[keys.MODEL_ID] = model_id
    if origin is not None:
        if origin.eval_request_id:
            tags[keys.EVAL_REQUEST_ID] = origin.eval_request_id
        metadata.update(origin.metadata or {})
        tags.update(origin.tags or {})
    record: dict[str, Any] = {"metadata": metadata, "tags": tags}
    if item.mlflow is not None:
        info = item.mlflow.info
        metadata.update({str(k): str(v) for k, v in info.trace_metadata.items()})
        tags.update({str(k): str(v) for k, v in info.tags.items()})
        fields = {name: value for name in ("client_request_id", "request_preview",
                                           "response_preview")
                  if (value := getattr(info, name))}
        if info.state in (TraceState.OK, TraceState.ERROR):  # set by update_current_trace
            fields["state"] = info.state.value
        if fields:
            record["set"] = fields
    return record


def _lift_work(dicts: list[dict[str, Any]], root_id: str) -> None:
    """A root with no inputs or outputs of its own (a web request's) takes those of the
    outermost work under it: the first with inputs, the last with outputs. The trace's request
    and response (MLflow's previews, its trace view, evaluation of production traces) are then
    the conversation's. Only values recorded already are reused: nothing under
    ``capture_content=False``."""
    root = next((d for d in dicts if d["span_id"] == root_id), None)
    if root is None:
        return
    attributes = root["attributes"]
    children = [d for d in dicts if d["parent_span_id"] == root_id]
    if keys.SPAN_INPUTS not in attributes:
        first = min((d for d in children if keys.SPAN_INPUTS in d["attributes"]),
                    key=lambda d: d["start_time_unix_nano"], default=None)
        if first is not None:
            attributes[keys.SPAN_INPUTS] = first["attributes"][keys.SPAN_INPUTS]
    if keys.SPAN_OUTPUTS not in attributes:
        last = max((d for d in children if keys.SPAN_OUTPUTS in d["attributes"]),
                   key=lambda d: d["end_time_unix_nano"], default=None)
        if last is not None:
            attributes[keys.SPAN_OUTPUTS] = last["attributes"][keys.SPAN_OUTPUTS]


# LangChain's message types, as the roles MLflow's previews look for.
_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}


def _chat_form(value: Any) -> Any:
    """LangChain's messages (``{"type": "human", "content": ...}``, in a graph's or chain's
    ``messages``) in the chat form MLflow's previews read (``{"role": "user", ...}``)."""
    if not isinstance(value, dict) or not isinstance(value.get("messages"), list):
        return value
    langchain = [isinstance(m, dict) and "role" not in m and "type" in m and "content" in m
                 for m in value["messages"]]
    if not any(langchain):
        return value
    messages = [{"role": _ROLES.get(m["type"], m["type"]), "content": m["content"]} if chat
                else m for m, chat in zip(value["messages"], langchain)]
    return {**value, "messages": messages}


def _previews(dicts: list[dict[str, Any]], root_id: str) -> dict[str, str]:
    """The trace's request and response previews where MLflow's own would show raw JSON (a
    LangGraph run's message list): the last question and the last answer."""
    root = next((d for d in dicts if d["span_id"] == root_id), None)
    found: dict[str, str] = {}
    if root is None:
        return found
    for attribute, name, role in ((keys.SPAN_INPUTS, "request_preview", "user"),
                                  (keys.SPAN_OUTPUTS, "response_preview", "assistant")):
        if (text := root["attributes"].get(attribute)) is None:
            continue
        try:
            value = json.loads(text)
        except ValueError:
            continue
        chat = _chat_form(value)
        if chat is not value:
            found[name] = _get_truncated_preview(json.dumps(chat), role=role)
    return found


_SURROGATE = re.compile("[\ud800-\udfff]")


def _info_dict(info: TraceInfo) -> dict[str, Any]:
    """MLflow's record of its own trace as a dict (through protobuf, which refuses lone
    surrogates: those are replaced first, as in the rest of the trace)."""
    try:
        return info.to_dict()
    except UnicodeEncodeError:
        def clean(text: str | None) -> str | None:
            return _SURROGATE.sub("\ufffd", text) if text is not None else None

        return dataclasses.replace(
            info, request_preview=clean(info.request_preview),
            response_preview=clean(info.response_preview),
            client_request_id=clean(info.client_request_id),
            trace_metadata={clean(k): clean(v) for k, v in info.trace_metadata.items()},
            tags={clean(k): clean(v) for k, v in info.tags.items()}).to_dict()


def _utf8(text: str) -> bytes:
    """UTF-8, with any lone surrogate (half of an emoji cut by a client, a bad decode) replaced
    by U+FFFD: it cannot be encoded, and must not cost the whole trace."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text).encode()


_ERROR_TEXT = ("exception.message", "exception.stacktrace")


def _scrub_errors(data: dict[str, Any]) -> None:
    """Credentials out of a span's error text, ours or MLflow's (an exception's message and
    stack trace can show a URL with its token, a keyword argument with its key)."""
    status = data.get("status")
    if isinstance(status, dict) and status.get("message"):
        status["message"] = scrub.text(str(status["message"]))
    for event in data.get("events") or ():
        attributes = event.get("attributes")
        if event.get("name") == "exception" and isinstance(attributes, Mapping):
            # A copy: MLflow's are OpenTelemetry's attributes, which can be read-only.
            event["attributes"] = {key: scrub.text(value) if key in _ERROR_TEXT
                                   and isinstance(value, str) else value
                                   for key, value in attributes.items()}


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
