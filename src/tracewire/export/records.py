"""A trace as the app captured it (spool payload version 3, or 2) -> MLflow's span records (runs in the
shipper process, and in the CLI commands that ship).

The app's export worker writes each of our spans in a raw form: ids, times and the span's values
as plain JSON, serialized once (export/encode.py). Everything that needs nothing of the app's
process happens here, off its GIL: MLflow's span dict format (base64 ids, attribute values as
JSON text, log levels, status), a web request's root taking the conversation's inputs and
outputs, the trace's previews, and prices MLflow's store would not set. The values arrive
redacted already: redaction happens in the app, before anything touches the disk.

MLflow internals used (pinned in tests/export/test_mlflow_pins.py): the span dict format that
``mlflow.entities.Span.from_dict`` reads, ``default_log_level_for_span_type`` and
``_get_truncated_preview``.
"""

from __future__ import annotations

import base64
import json
import operator
from typing import Any

from mlflow.entities import SpanLogLevel
from mlflow.tracing.utils.default_log_level import default_log_level_for_span_type
from mlflow.tracing.utils.truncation import _get_truncated_preview

from tracewire.core import attributes as keys
from tracewire.core import cost

# 3: the OpenTelemetry trace id is 32 hex digits (2: an int, which orjson cannot write).
VERSION = 3
CAPTURED = (2, VERSION)


def b64(value: int, size: int) -> str:
    return base64.b64encode(value.to_bytes(size, "big")).decode("ascii")


def _text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def span_dict(raw: dict[str, Any], trace_id: str, otel_trace_id: str | int) -> dict[str, Any]:
    """One raw span of ours in MLflow's stored span format."""
    if isinstance(otel_trace_id, str):
        otel_trace_id = int(otel_trace_id, 16)
    error = raw.get("error")
    attrs = {
        keys.TRACE_REQUEST_ID: _text(trace_id),
        keys.SPAN_TYPE: _text(raw["type"]),
        # The level MLflow's UI filters spans by, as MLflow sets it on its own spans.
        keys.SPAN_LOG_LEVEL: str(
            int(
                SpanLogLevel.ERROR
                if error is not None
                else default_log_level_for_span_type(raw["type"])
            )
        ),
    }
    if "inputs" in raw:
        attrs[keys.SPAN_INPUTS] = _text(raw["inputs"])
    if "outputs" in raw:
        attrs[keys.SPAN_OUTPUTS] = _text(raw["outputs"])
    for key, value in raw["attributes"].items():
        attrs[key] = _text(value)
    events = raw.get("events") or []
    status = {"code": "STATUS_CODE_OK", "message": ""}
    if error is not None:
        status = {"code": "STATUS_CODE_ERROR", "message": error["message"]}
        if error.get("event") is not None:
            events = [*events, error["event"]]
    return {
        "trace_id": b64(otel_trace_id, 16),
        "span_id": b64(raw["id"], 8),
        "parent_span_id": b64(raw["parent"], 8) if raw["parent"] is not None else None,
        "name": raw["name"],
        "start_time_unix_nano": raw["start"],
        "end_time_unix_nano": raw["end"],
        "events": events,
        "status": status,
        "attributes": attrs,
        "links": [],
    }


def expand(data: dict[str, Any], catalog: bool) -> dict[str, Any]:
    """A captured payload (version 2 or 3) as the version 1 payload the store decodes: MLflow span dicts, the
    root's lifted values, previews and prices. ``catalog``: price every model MLflow's catalog
    knows (the store does not price spans itself)."""
    dicts: list[dict[str, Any]] = []
    groups = data["groups"]  # [trace id, OpenTelemetry trace id, raw spans]: ours first
    ours = groups[0] if data["head"] is not None else None
    if ours is not None:
        dicts.extend(span_dict(raw, ours[0], ours[1]) for raw in ours[2])
    dicts.extend(data["mlflow"])
    for trace_id, otel_trace_id, raws in groups[1:] if ours is not None else groups:
        dicts.extend(span_dict(raw, trace_id, otel_trace_id) for raw in raws)
    head = data["head"]
    if ours is not None:
        root_id = b64(data["root"], 8)
        _lift_work(dicts, root_id)
        if previews := _previews(dicts, root_id):
            head["previews"] = previews
    cost.price_span_dicts(dicts, cost.load(data.get("prices") or {}), catalog=catalog)
    return {"head": head, "info": data["info"], "context": data["context"], "spans": dicts}


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
    for key, pick, time in (
        (keys.SPAN_INPUTS, min, "start_time_unix_nano"),
        (keys.SPAN_OUTPUTS, max, "end_time_unix_nano"),
    ):
        if key not in attributes:
            found = pick(
                (d for d in children if key in d["attributes"]),
                key=operator.itemgetter(time),
                default=None,
            )
            if found is not None:
                attributes[key] = found["attributes"][key]


# LangChain's message types, as the roles MLflow's previews look for.
_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool"}


def _chat_form(value: Any) -> Any:
    """LangChain's messages (``{"type": "human", "content": ...}``, in a graph's or chain's
    ``messages``) in the chat form MLflow's previews read (``{"role": "user", ...}``)."""
    if not isinstance(value, dict) or not isinstance(value.get("messages"), list):
        return value
    langchain = [
        isinstance(m, dict) and "role" not in m and "type" in m and "content" in m
        for m in value["messages"]
    ]
    if not any(langchain):
        return value
    messages = [
        {"role": _ROLES.get(m["type"], m["type"]), "content": m["content"]} if chat else m
        for m, chat in zip(value["messages"], langchain)
    ]
    return {**value, "messages": messages}


def _previews(dicts: list[dict[str, Any]], root_id: str) -> dict[str, str]:
    """The trace's request and response previews where MLflow's own would show raw JSON (a
    LangGraph run's message list): the last question and the last answer."""
    root = next((d for d in dicts if d["span_id"] == root_id), None)
    found: dict[str, str] = {}
    if root is None:
        return found
    for attribute, name, role in (
        (keys.SPAN_INPUTS, "request_preview", "user"),
        (keys.SPAN_OUTPUTS, "response_preview", "assistant"),
    ):
        if (text := root["attributes"].get(attribute)) is None:
            continue
        try:
            value = json.loads(text)
        except ValueError:
            continue
        chat = _chat_form(value)
        if chat is not value:
            if (preview := _get_truncated_preview(json.dumps(chat), role=role)) is not None:
                found[name] = preview
    return found
