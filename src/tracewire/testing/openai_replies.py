"""What the fake OpenAI server answers, whatever the endpoint: the reply to a conversation (a tool
call, a schema-filling object, an echo) and its usage, sent as JSON or as an SSE stream (the
endpoints: openai_chat.py, openai_responses.py, openai_embeddings.py; what the server does:
openai_server.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tracewire.testing.openai_tokens import (
    count_prompt_tokens,
    count_tokens,
    is_tool_result,
    is_user,
    item_text,
    tool_call_count,
)

# --------------------------------------------------------------------------
# Deciding the reply (shared by chat and Responses, streamed or not).


def _sample(schema: Any, text: str, root: Mapping[str, Any]) -> Any:
    """A value satisfying ``schema``, following the rules in openai_server.py's docstring."""
    if not isinstance(schema, dict):
        return text
    if isinstance(schema.get("$ref"), str):
        target: Any = root
        for key in schema["$ref"].lstrip("#/").split("/"):
            target = target.get(key, {}) if isinstance(target, dict) else {}
        return _sample(target, text, root)
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            branches = [
                b for b in schema[key] if not (isinstance(b, dict) and b.get("type") == "null")
            ]
            return _sample((branches or schema[key])[0], text, root)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties") or {}
        names = schema.get("required", list(properties))
        return {name: _sample(properties.get(name), text, root) for name in names}
    samples: dict[Any, Any] = {
        "array": [],
        "integer": 1,
        "number": 1,
        "boolean": True,
        "null": None,
    }
    return samples.get(kind, text)


def cached_tokens(model: str, prompt_tokens: int) -> int:
    return prompt_tokens // 2 if model.endswith("-cached") else 0


@dataclass(frozen=True)
class _ToolCall:
    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class _Plan:
    """What a chat or Responses request gets back: text or a tool call, and usage."""

    model: str
    text: str | None
    tool_call: _ToolCall | None
    prompt_tokens: int
    completion_tokens: int

    @property
    def cached_tokens(self) -> int:
        return cached_tokens(self.model, self.prompt_tokens)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def plan_reply(
    model: str,
    items: list[dict[str, Any]],
    tool: tuple[str, Any] | None,
    schema: Mapping[str, Any] | None,
) -> _Plan:
    """Decide the reply to a conversation; ``tool`` is the first function tool (name, parameters)."""
    last = items[-1] if items else {}
    user_text = next((item_text(item) for item in reversed(items) if is_user(item)), "")
    prompt_tokens = count_prompt_tokens(items)
    if tool is not None and is_user(last):
        name, parameters = tool
        parameters = parameters if isinstance(parameters, dict) else {}
        arguments = json.dumps(_sample({"type": "object", **parameters}, user_text, parameters))
        call_id = f"call_{1 + sum(tool_call_count(item) for item in items)}"
        return _Plan(
            model,
            None,
            _ToolCall(call_id, name, arguments),
            prompt_tokens,
            count_tokens(arguments) + 1,
        )
    if is_tool_result(last):
        text = f"Result: {item_text(last)}"
    elif schema is not None:
        text = json.dumps(_sample(schema, user_text, schema))
    else:
        text = f"Echo: {user_text}"
    return _Plan(model, text, None, prompt_tokens, count_tokens(text))


def pieces(text: str) -> list[str]:
    """Split into word-sized deltas that concatenate back to ``text``."""
    return re.findall(r"\s*\S+|\s+$", text)


# --------------------------------------------------------------------------
# Replies and streams.


@dataclass(frozen=True)
class JSONReply:
    body: Mapping[str, Any]


@dataclass
class Stream:
    """A streamed reply: ``head`` events, content ``deltas``, then ``tail`` events.

    Events are (SSE event name or None, JSON payload). Keeping the parts apart lets
    the ``stream-error`` and ``empty-stream`` models cut the same stream short.
    """

    head: list[tuple[str | None, dict[str, Any]]] = field(default_factory=list)
    deltas: list[tuple[str | None, dict[str, Any]]] = field(default_factory=list)
    tail: list[tuple[str | None, dict[str, Any]]] = field(default_factory=list)
    # Chat and legacy completions end with [DONE]; the Responses API does not.
    done_marker: bool = True
    # Responses events carry a running sequence_number.
    sequenced: bool = False


Reply = JSONReply | Stream

_STREAM_ERROR = {
    "message": "The model stream failed (simulated by model stream-error).",
    "type": "server_error",
    "param": None,
    "code": "stream_error",
}


def sse_frames(stream: Stream, model: str) -> list[bytes]:
    """Render a stream to SSE frames, applying the special stream models."""
    if model == "empty-stream":
        events: list[tuple[str | None, dict[str, Any]]] = []
        done_marker = True
    elif model == "stream-error":
        events = stream.head + stream.deltas[:2]
        if stream.sequenced:
            flat = {key: _STREAM_ERROR[key] for key in ("code", "message", "param")}
            events.append(("error", {"type": "error", **flat, "error": dict(_STREAM_ERROR)}))
        else:
            events.append((None, {"error": dict(_STREAM_ERROR)}))
        done_marker = False
    else:
        events = stream.head + stream.deltas + stream.tail
        done_marker = stream.done_marker
    frames = []
    for sequence_number, (name, payload) in enumerate(events):
        if stream.sequenced:
            payload = {**payload, "sequence_number": sequence_number}
        prefix = f"event: {name}\n" if name else ""
        frames.append(f"{prefix}data: {json.dumps(payload)}\n\n".encode())
    if done_marker:
        frames.append(b"data: [DONE]\n\n")
    return frames
