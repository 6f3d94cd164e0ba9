"""A finished trace -> spool bytes (runs on the app's export worker thread, off the caller's).

Only what must happen in the app happens here: span values and the request context read and
serialized once, in one pass (payload version 3: our spans in a raw form, see
export/records.py), and the user's redaction hook, before anything touches the disk. MLflow's
span records, previews and prices are made from these bytes by the shipper process
(export/records.py, export/decode.py), off the app's GIL.

MLflow internals used (pinned in tests/export/test_mlflow_pins.py): ``TraceJSONEncoder`` and
``dump_span_attribute_value``, ``_Trace.span_dict`` entries' ``to_dict`` and
``TraceInfo.to_dict``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

import orjson
import pydantic
from mlflow.entities import SpanStatusCode, TraceInfo, TraceState
from mlflow.tracing.constant import SpanAttributeKey
from mlflow.tracing.utils import (
    TraceJSONEncoder,
    dump_span_attribute_value,
    encode_span_id,
)
from mlflow.tracing.utils.environment import resolve_env_metadata

from tracewire import config
from tracewire.core import attributes as keys
from tracewire.core import sampling, scrub, spans
from tracewire.core.context import RequestContext
from tracewire.core.text import storable
from tracewire.export import records
from tracewire.export.hooks import Item

logger = logging.getLogger("tracewire")


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
    if isinstance(value, spans.Serialized):
        text = value.json.decode()
    else:
        text = dump_span_attribute_value(value)
    if len(text) <= MAX_ATTRIBUTE_CHARS:
        return text
    kept = MAX_ATTRIBUTE_CHARS - 200
    return json.dumps(
        f"{text[:kept]}... [tracewire: cut {len(text) - kept} of {len(text)} characters]",
        ensure_ascii=False,
    )


def _plain(value: Any) -> Any:
    """A value as the plain JSON MLflow would record (cut past MAX_ATTRIBUTE_CHARS): for the
    traces the one-pass dump cannot take as they are (see :func:`_serialize`)."""
    return json.loads(_dump(value))


def _raw(span: spans.Span) -> dict[str, Any]:
    """One of our spans as the shipper expands it (export/records.py): values as they are, read
    now (a Deferred is computed here, off the caller's thread), serialized with the payload."""
    raw: dict[str, Any] = {
        "id": span.span_id,
        "parent": span.parent_id,
        "name": span.name,
        "type": span.span_type,
        "start": span.start_ns,
        "end": span.end_ns or span.start_ns,
        "attributes": {
            key: value() if isinstance(value, spans.Deferred) else value
            for key, value in span.attributes.items()
        },
    }
    for name, value in (("inputs", span.inputs), ("outputs", span.outputs)):
        if isinstance(value, spans.Deferred):
            value = value()
        if value is not None:
            raw[name] = value
    if span.events:
        raw["events"] = [
            {"name": name, "time_unix_nano": at, "attributes": values}
            for name, values, at in span.events
        ]
    if isinstance(span.error, spans.StatusError):
        raw["error"] = {"message": str(span.error)}
    elif span.error is not None:
        raw["error"] = {
            "message": f"{type(span.error).__name__}: {span.error}",
            "event": _exception_event(span.error, raw["end"]),
        }
    return raw


def settle(item: Item) -> None:
    """A web request's outcome, by OpenTelemetry's HTTP server convention: a 5xx answer fails
    the request's root span (and so its trace); a 4xx only when the app's own traced work under
    it failed (a served agent's error, answered with a 400)."""
    trace = item.ours
    root = trace.root if trace is not None else None
    if trace is None or root is None or root.error is not None:
        return
    status = root.attributes.get(keys.HTTP_STATUS_CODE)
    if not isinstance(status, int) or status < 400:
        return
    cause = next(
        (
            f"{type(s.error).__name__}: {s.error}"
            for s in trace.spans
            if s.parent_id == root.span_id and s.error is not None
        ),
        None,
    )
    if cause is None and item.mlflow is not None:  # MLflow's spans under ours
        parent = encode_span_id(root.span_id)
        cause = next(
            (
                live.status.description or "error"
                for live in item.mlflow.span_dict.values()
                if live.parent_id == parent and live.status.status_code == SpanStatusCode.ERROR
            ),
            None,
        )
    if status >= 500 or cause is not None:
        root.error = spans.StatusError(f"HTTP {status}" + (f": {cause}" if cause else ""))


def sampled_out(item: Item, rate: float) -> bool:
    """Dropped by sampling: decided by session (else request, else trace) id; errors are kept."""
    if rate >= 1.0:
        return False
    if item.ours is not None:
        failed = (item.ours.root is not None and item.ours.root.error is not None) or (
            item.mlflow is not None and item.mlflow.info.state == TraceState.ERROR
        )
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
    """A finished trace as spool bytes (payload version 3, JSON). Only what must be read in the
    app is done here: span values and the request context read and serialized once, the user's
    redaction hook; MLflow's span records, previews and prices are made by the shipper
    (export/records.py)."""
    head = info = None
    groups: list[list[Any]] = []
    if item.ours is not None:
        trace = item.ours
        root = trace.root
        assert root is not None and root.end_ns is not None
        head = {
            "trace_id": trace.trace_id,
            "name": root.name,
            "request_time": root.start_ns // 1_000_000,
            "execution_duration": (root.end_ns - root.start_ns) // 1_000_000,
            "state": (TraceState.ERROR if root.error is not None else TraceState.OK).value,
            **_record(item),
        }
        trace_id = trace.trace_id
        groups.append(
            [trace.trace_id, f"{trace.otel_trace_id:032x}", [_raw(s) for s in trace.spans]]
        )
    elif item.mlflow is not None:
        info = _info_dict(item.mlflow.info)
        trace_id = item.mlflow.info.trace_id
    else:  # a late fragment: spans only, added to a trace already stored
        trace_id = item.fragments[0].trace_id
    mlflow_spans = (
        [live.to_dict() for live in item.mlflow.span_dict.values()]
        if item.mlflow is not None
        else []
    )
    groups.extend(
        [f.trace_id, f"{f.otel_trace_id:032x}", [_raw(s) for s in f.spans]] for f in item.fragments
    )
    for data in mlflow_spans:
        _scrub_errors(data)
    for _, _, raws in groups:
        for raw in raws:
            _scrub_raw_error(raw)
    if settings.redact is not None:
        _redact_all(groups, mlflow_spans, settings.redact)
    request = item.request or RequestContext()
    context = {
        "session_id": request.session_id,
        "user_id": request.user_id,
        "request_id": request.request_id,
        "tags": {**settings.trace_tags, **request.tags},
    }
    payload = {
        "v": records.VERSION,
        "head": head,
        "info": info,
        "context": context,
        "groups": groups,
        "mlflow": mlflow_spans,
        "root": item.ours.root.span_id if item.ours is not None and item.ours.root else None,
    }
    if settings.prices:
        payload["prices"] = {
            model: {k: v for k, v in dataclasses.asdict(price).items() if v is not None}
            for model, price in settings.prices.items()
        }
    return trace_id, _serialize(payload, groups)


def _serialize(payload: dict[str, Any], groups: list[list[Any]]) -> bytes:
    """One pass of orjson over the whole trace, with MLflow's encoder for what it has no form of
    (pydantic replies, arbitrary objects): about a quarter of the stdlib encoder's time, on the
    app's GIL. A trace it cannot take as it is (a circular value, a lone surrogate, an int past
    64 bits, keys JSON cannot hold), or one past MAX_ATTRIBUTE_CHARS, has each value made plain
    on its own first: cut with a marker, or in MLflow's repr fallback."""
    try:
        data = orjson.dumps(payload, default=_default, option=_ORJSON_OPTIONS)
        if len(data) <= MAX_ATTRIBUTE_CHARS:
            return data
    except TypeError:  # orjson.JSONEncodeError
        pass
    for _, _, raws in groups:
        for raw in raws:
            for name in ("inputs", "outputs"):
                if name in raw:
                    raw[name] = _plain(raw[name])
            raw["attributes"] = {key: _plain(value) for key, value in raw["attributes"].items()}
            if "events" in raw:
                raw["events"] = _plain(raw["events"])
    return _utf8(json.dumps(payload, ensure_ascii=False))


# Datetimes and dataclasses go through _default, as MLflow's encoder has them (str(), and a
# shallow dict of fields); keys that are not strings are written as json.dumps writes them.
_ORJSON_OPTIONS = (
    orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
)
_ENCODER = TraceJSONEncoder()


def _default(value: Any) -> Any:
    if isinstance(value, spans.Serialized):
        return orjson.Fragment(value.json)
    if isinstance(value, pydantic.BaseModel):
        # Quietly: pydantic warns about the app's models (a parsed reply's generic field) on
        # every dump, and a trace of the app's call is no place for it.
        return value.model_dump(warnings=False)
    return _ENCODER.default(value)


def process_metadata() -> dict[str, str]:
    """The source MLflow records on every trace (script or entry point, git commit), resolved
    once per process. Resolved when the worker starts, not at the first trace: resolving
    imports GitPython, and that import during the exit of a script stopped by Ctrl-C made it
    exit with status 1 instead of dying of SIGINT (CPython resets its unhandled-interrupt mark)."""
    return dict(resolve_env_metadata())


def _record(item: Item) -> dict[str, Any]:
    """What MLflow records on a trace it starts, for one of ours: this process's source, what
    the caller's context said when the trace began (its run, the active or served model, an
    evaluation row, ``mlflow.tracing.context``), and what MLflow's trace APIs set on the
    trace while it ran (``update_current_trace``: tags, metadata, state, previews, client
    request id), which win."""
    assert item.ours is not None
    origin = item.ours.origin
    metadata = process_metadata()
    tags: dict[str, str] = {}
    if origin is not None:
        if origin.run_id:
            metadata[keys.SOURCE_RUN] = origin.run_id
        if origin.model_id:
            metadata[keys.MODEL_ID] = origin.model_id
        if origin.eval_request_id:
            tags[keys.EVAL_REQUEST_ID] = origin.eval_request_id
        metadata.update(origin.metadata or {})
        tags.update(origin.tags or {})
    record: dict[str, Any] = {"metadata": metadata, "tags": tags}
    if item.mlflow is not None:
        info = item.mlflow.info
        metadata.update({str(k): str(v) for k, v in info.trace_metadata.items()})
        tags.update({str(k): str(v) for k, v in info.tags.items()})
        fields = {
            name: value
            for name in ("client_request_id", "request_preview", "response_preview")
            if (value := getattr(info, name))
        }
        if info.state in (TraceState.OK, TraceState.ERROR):  # set by update_current_trace
            fields["state"] = info.state.value
        if fields:
            record["set"] = fields
    return record


def _info_dict(info: TraceInfo) -> dict[str, Any]:
    """MLflow's record of its own trace as a dict (through protobuf, which refuses lone
    surrogates: those are replaced first, as in the rest of the trace)."""
    try:
        return info.to_dict()
    except UnicodeEncodeError:

        def clean(text: str | None) -> str | None:
            return storable(text) if text is not None else None

        return dataclasses.replace(
            info,
            request_preview=clean(info.request_preview),
            response_preview=clean(info.response_preview),
            client_request_id=clean(info.client_request_id),
            trace_metadata={storable(k): storable(v) for k, v in info.trace_metadata.items()},
            tags={storable(k): storable(v) for k, v in info.tags.items()},
        ).to_dict()


def _utf8(text: str) -> bytes:
    """UTF-8, with any lone surrogate (half of an emoji cut by a client, a bad decode) replaced
    by U+FFFD: it cannot be encoded, and must not cost the whole trace."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return storable(text).encode()


_ERROR_TEXT = ("exception.message", "exception.stacktrace")


def _scrub_errors(data: dict[str, Any]) -> None:
    """Credentials out of an MLflow span's error text (an exception's message and stack trace
    can show a URL with its token, a keyword argument with its key)."""
    status = data.get("status")
    if isinstance(status, dict) and status.get("message"):
        status["message"] = scrub.text(str(status["message"]))
    for event in data.get("events") or ():
        _scrub_event(event)


def _scrub_raw_error(raw: dict[str, Any]) -> None:
    """The same for one of ours, as spooled (see _raw)."""
    error = raw.get("error")
    if error is not None:
        error["message"] = scrub.text(str(error["message"]))
        if "event" in error:
            _scrub_event(error["event"])


def _scrub_event(event: dict[str, Any]) -> None:
    attributes = event.get("attributes")
    if event.get("name") == "exception" and isinstance(attributes, Mapping):
        # A copy: MLflow's are OpenTelemetry's attributes, which can be read-only.
        event["attributes"] = {
            key: scrub.text(value) if key in _ERROR_TEXT and isinstance(value, str) else value
            for key, value in attributes.items()
        }


_REDACTED_KEYS = {SpanAttributeKey.INPUTS: "inputs", SpanAttributeKey.OUTPUTS: "outputs"}
_WITHHELD = "[tracewire: withheld, redaction failed]"


def _redact_all(
    groups: list[list[Any]], mlflow_spans: list[dict[str, Any]], redact: Callable[[str, Any], Any]
) -> None:
    """The user's redaction hook, on the worker thread, before the spool, on each span's inputs
    and outputs as plain JSON (ours and MLflow's). If it fails the value is withheld: failing
    closed is the only safe way for a privacy hook."""
    for _, _, raws in groups:
        for raw in raws:
            for key in ("inputs", "outputs"):
                if key in raw:
                    raw[key] = _redacted(redact, key, _plain, raw[key])
    for data in mlflow_spans:
        attributes = data["attributes"]
        for attribute, key in _REDACTED_KEYS.items():
            if attribute in attributes:
                attributes[attribute] = dump_span_attribute_value(
                    _redacted(redact, key, json.loads, attributes[attribute])
                )


def _redacted(
    redact: Callable[[str, Any], Any], key: str, read: Callable[[Any], Any], value: Any
) -> Any:
    try:
        return _plain(redact(key, read(value)))
    except Exception as exc:  # the user's hook failed, not tracewire: no re-raise
        logger.warning("tracewire: the redact hook raised %r; the span's %s are withheld", exc, key)
        return _WITHHELD
