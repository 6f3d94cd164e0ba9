"""One traced OpenAI call (:class:`Call`) and how a whole reply is recorded on its span.

A whole reply is recorded as JSON written on the caller's thread, or as a summary without its
content (``capture_content=False``, an embedding's shape) made there: either way the reply's
objects are freed with the caller's, not held for the export worker (see
:class:`tracewire.core.spans.Serialized`). Streamed replies are assembled in
:mod:`tracewire.plugins.openai_streams`.
"""

from __future__ import annotations

from typing import Any

from tracewire.core import attributes as keys
from tracewire.core import guard, span_context, spans, usage

CHAT, RESPONSES, EMBEDDINGS, COMPLETIONS = "chat", "responses", "embeddings", "text_completion"


class Call:
    """What one traced call carries from its start to its end. Inside ``with call:`` its span is
    current; an exception leaving the block is recorded on the span, which then ends. Each of
    those steps is guarded on its own."""

    __slots__ = ("capture", "hide_usage", "kind", "kwargs", "server", "span", "stream", "tokens")

    def __init__(
        self,
        span: spans.Span,
        kwargs: dict[str, Any],
        kind: str,
        stream: bool,
        hide_usage: bool,
        capture: bool,
        server: tuple[str | None, int | None] = (None, None),
    ) -> None:
        self.span = span
        # What is sent: the caller's arguments, or a copy with stream_options added.
        self.kwargs = kwargs
        self.kind = kind
        self.stream = stream
        # Whether the stream's usage-only chunk is ours (asked for on the caller's behalf).
        self.hide_usage = hide_usage
        self.capture = capture
        self.server = server
        self.tokens: Any = None

    def __enter__(self) -> None:
        self.tokens = guard.call(span_context.activate, self.span)

    def __exit__(self, exc_type: object, error: BaseException | None, traceback: object) -> None:
        if error is not None:
            guard.call(end_with_error, self, error)
        if self.tokens is not None:
            guard.call(span_context.deactivate, self.tokens)


def summary(response: Any) -> dict[str, Any]:
    """A reply without any content: what capture_content=False records."""
    out: dict[str, Any] = {}
    for name in ("id", "model", "status"):
        value = getattr(response, name, None)
        if value is not None:
            out[name] = value
    choices = getattr(response, "choices", None)
    if choices:
        out["finish_reasons"] = [getattr(c, "finish_reason", None) for c in choices]
    return out


def _embedding_summary(response: Any) -> dict[str, Any]:
    # Vectors are never recorded: they are large and say nothing a trace reader needs.
    data = getattr(response, "data", None) or []
    first = getattr(data[0], "embedding", None) if data else None
    return {
        "model": getattr(response, "model", None),
        "count": len(data),
        "dimensions": len(first) if isinstance(first, list) else None,
    }


def _serialized(response: Any) -> Any:
    """The reply as JSON text now, so its models are freed with the caller's (spans.Serialized);
    one pydantic cannot write (or with a lone surrogate) is kept for the worker to write."""
    try:
        return spans.Serialized(response.model_dump_json(warnings=False).encode())
    except Exception:
        return response


def _record(call: Call, response: Any, response_usage: Any) -> None:
    span = call.span
    if (token_usage := usage.from_openai(response_usage)) is not None:
        span.attributes[keys.CHAT_USAGE] = token_usage
    model = getattr(response, "model", None)
    if isinstance(model, str):
        span.attributes[keys.GEN_AI_RESPONSE_MODEL] = model
    if call.kind == EMBEDDINGS:
        span.outputs = _embedding_summary(response)
    elif call.capture:
        span.outputs = _serialized(response)
    else:
        span.outputs = summary(response)
    status = getattr(response, "status", None)
    if call.kind == RESPONSES and status == "failed":
        error = getattr(response, "error", None)
        span.record_error(RuntimeError(f"response failed: {getattr(error, 'message', error)}"))


def end_with_reply(call: Call, response: Any) -> None:
    """Record a whole reply (a parsed model; anything else is the caller's to read) and end."""
    try:
        if hasattr(response, "model_dump"):
            _record(call, response, getattr(response, "usage", None))
    finally:  # a reply we cannot read must not leave its span, and its trace, open
        call.span.end()


def end_with_raw_reply(call: Call, raw: Any) -> None:
    """``.with_raw_response.create(...)``: the reply is what ``raw.parse()`` returns."""
    end_with_reply(call, raw.parse())  # cached: the caller's own .parse() returns this same object


def end_with_error(call: Call, error: BaseException) -> None:
    """The call raised ``error`` (the caller gets it unchanged)."""
    call.span.record_error(error)
    call.span.end()
