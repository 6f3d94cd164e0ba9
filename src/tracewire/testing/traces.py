"""Many traces into a tracking store fast, for tests and benchmarks of what reads them.

Each trace is spool bytes in the shape the app's export worker writes (a web request root span
with route, status and time to first byte; one chat span with token usage and a model), shipped
through tracewire's own store writer (``store.Store.ship``) in batches: the same decode,
stamping and SQL write an app's traces go through, without 10,000 app calls.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tracewire.core import attributes as keys


@dataclass
class Synthetic:
    """One trace to write; times in milliseconds since the epoch."""

    otel_trace_id: int
    request_time_ms: int
    duration_ms: int
    route: str = "/chat"
    status: int = 200
    ttfb_ms: float | None = None
    session: str | None = None
    user: str | None = None
    request_id: str | None = None
    model: str | None = "gpt-4o-mini"
    input_tokens: int = 100
    output_tokens: int = 20
    error: str | None = None
    tags: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def trace_id(self) -> str:
        return "tr-" + format(self.otel_trace_id, "032x")


def _b64(value: int, size: int) -> str:
    return base64.b64encode(value.to_bytes(size, "big")).decode()


def _span(
    t: Synthetic,
    span_id: int,
    parent: int | None,
    name: str,
    start_ns: int,
    end_ns: int,
    attrs: dict[str, Any],
    error: str | None,
) -> dict[str, Any]:
    attributes = {keys.TRACE_REQUEST_ID: json.dumps(t.trace_id)}
    attributes.update({k: json.dumps(v) for k, v in attrs.items()})
    return {
        "trace_id": _b64(t.otel_trace_id, 16),
        "span_id": _b64(span_id, 8),
        "parent_span_id": _b64(parent, 8) if parent is not None else None,
        "name": name,
        "start_time_unix_nano": start_ns,
        "end_time_unix_nano": end_ns,
        "events": [],
        "status": {
            "code": "STATUS_CODE_ERROR" if error else "STATUS_CODE_OK",
            "message": error or "",
        },
        "attributes": attributes,
        "links": [],
    }


def payload(t: Synthetic) -> bytes:
    """The spool bytes of one synthetic trace (see ``encode.encode``)."""
    start_ns = t.request_time_ms * 1_000_000
    end_ns = start_ns + t.duration_ms * 1_000_000
    root_attrs: dict[str, Any] = {
        keys.SPAN_TYPE: keys.SpanType.CHAIN,
        keys.HTTP_METHOD: "POST",
        keys.HTTP_ROUTE: t.route,
        keys.HTTP_STATUS_CODE: t.status,
        keys.SPAN_INPUTS: {"path": t.route},
        keys.SPAN_OUTPUTS: {"status": t.status},
    }
    if t.ttfb_ms is not None:
        root_attrs[keys.HTTP_TIME_TO_FIRST_BYTE] = t.ttfb_ms
    spans = [_span(t, 1, None, f"POST {t.route}", start_ns, end_ns, root_attrs, t.error)]
    if t.model is not None:
        usage = {
            keys.INPUT_TOKENS: t.input_tokens,
            keys.OUTPUT_TOKENS: t.output_tokens,
            keys.TOTAL_TOKENS: t.input_tokens + t.output_tokens,
        }
        spans.append(
            _span(
                t,
                2,
                1,
                "chat",
                start_ns + 1,
                end_ns - 1,
                {
                    keys.SPAN_TYPE: keys.SpanType.CHAT_MODEL,
                    keys.LLM_MODEL: t.model,
                    keys.LLM_PROVIDER: "openai",
                    keys.CHAT_USAGE: usage,
                    keys.SPAN_INPUTS: {"messages": [{"role": "user", "content": "hi"}]},
                    keys.SPAN_OUTPUTS: {"content": "hello"},
                },
                t.error,
            )
        )
    head = {
        "trace_id": t.trace_id,
        "name": f"POST {t.route}",
        "request_time": t.request_time_ms,
        "execution_duration": t.duration_ms,
        "state": "ERROR" if t.error else "OK",
    }
    context = {
        "session_id": t.session,
        "user_id": t.user,
        "request_id": t.request_id,
        "tags": t.tags,
    }
    return json.dumps({"head": head, "info": None, "context": context, "spans": spans}).encode()


@dataclass
class _Entry:
    payload: bytes


def write(
    traces: Sequence[Synthetic], tracking_uri: str, experiment_id: str, batch: int = 500
) -> None:
    """Ship ``traces`` into experiment ``experiment_id`` of the store at ``tracking_uri``."""
    from tracewire import config
    from tracewire.export import store as stores

    settings = dataclasses.replace(
        config.resolve(), tracking_uri=tracking_uri, experiment_id=experiment_id
    )
    store = stores.Store(settings)
    for start in range(0, len(traces), batch):
        store.ship([_Entry(payload(t)) for t in traces[start : start + batch]])
