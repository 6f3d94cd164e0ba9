"""The fake OpenAI server's replies for chat, legacy completions and embeddings: what to
answer (a tool call, a schema-filling object, an echo), as JSON or as an SSE stream, and a
strict server's rejection of unknown arguments (what the server does: openai_server.py)."""

from __future__ import annotations

import base64
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tracewire.testing.openai_tokens import (
    CREATED,
    DEFAULT_EMBEDDING_DIMENSIONS,
    APIError,
    bad_request,
    count_prompt_tokens,
    count_tokens,
    embedding_vector,
    is_tool_result,
    is_user,
    item_text,
    require_items,
    require_model,
    tool_call_count,
)

# --------------------------------------------------------------------------
# Deciding the reply (shared by chat and Responses, streamed or not).


def _sample(schema: Any, text: str, root: Mapping[str, Any]) -> Any:
    """A value satisfying ``schema``, following the rules in the module docstring."""
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


def _cached_tokens(model: str, prompt_tokens: int) -> int:
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
        return _cached_tokens(self.model, self.prompt_tokens)

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


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


# --------------------------------------------------------------------------
# POST /v1/chat/completions


def chat_reply(body: Mapping[str, Any], seq: int) -> Reply:
    model = require_model(body)
    messages = require_items(body, "messages")
    tool = next(
        (
            (t["function"].get("name", ""), t["function"].get("parameters"))
            for t in body.get("tools") or []
            if isinstance(t, dict)
            and t.get("type") == "function"
            and isinstance(t.get("function"), dict)
            and body.get("tool_choice") != "none"
        ),
        None,
    )
    response_format = body.get("response_format")
    schema = None
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
    plan = plan_reply(model, messages, tool, schema)
    finish_reason = "tool_calls" if plan.tool_call else "stop"
    usage = _usage(plan.prompt_tokens, plan.completion_tokens, plan.cached_tokens)
    envelope = {"id": f"chatcmpl-{seq}", "created": CREATED, "model": model}

    if not body.get("stream"):
        message: dict[str, Any] = {
            "role": "assistant",
            "content": plan.text,
            "refusal": None,
            "annotations": [],
        }
        if plan.tool_call:
            message["tool_calls"] = [
                {
                    "id": plan.tool_call.call_id,
                    "type": "function",
                    "function": {
                        "name": plan.tool_call.name,
                        "arguments": plan.tool_call.arguments,
                    },
                }
            ]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        return JSONReply(
            {**envelope, "object": "chat.completion", "choices": [choice], "usage": usage}
        )

    include_usage = _include_usage(body)

    def chunk(delta: dict[str, Any], finish: str | None = None) -> tuple[None, dict[str, Any]]:
        payload = {
            **envelope,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            payload["usage"] = None
        return None, payload

    stream = Stream()
    if plan.tool_call:
        # OpenAI opens a tool call in the role chunk, then streams the arguments.
        opening = {
            "index": 0,
            "id": plan.tool_call.call_id,
            "type": "function",
            "function": {"name": plan.tool_call.name, "arguments": ""},
        }
        stream.head.append(
            chunk({"role": "assistant", "content": None, "tool_calls": [opening], "refusal": None})
        )
        stream.deltas = [
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            for piece in pieces(plan.tool_call.arguments)
        ]
    else:
        stream.head.append(chunk({"role": "assistant", "content": "", "refusal": None}))
        stream.deltas = [chunk({"content": piece}) for piece in pieces(plan.text or "")]
    stream.tail.append(chunk({}, finish_reason))
    if include_usage:
        stream.tail.append(
            (None, {**envelope, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        )
    return stream


# --------------------------------------------------------------------------
# POST /v1/completions (legacy)


def completions_reply(body: Mapping[str, Any], seq: int) -> Reply:
    model = require_model(body)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise bad_request("'prompt' must be a string or a list of strings.", "prompt")
    texts = [f"Echo: {p}" for p in prompts]
    prompt_tokens = sum(count_tokens(p) for p in prompts)
    completion_tokens = sum(count_tokens(t) for t in texts)
    usage = _usage(prompt_tokens, completion_tokens, _cached_tokens(model, prompt_tokens))
    envelope = {
        "id": f"cmpl-{seq}",
        "object": "text_completion",
        "created": CREATED,
        "model": model,
    }

    if not body.get("stream"):
        choices = [
            {"text": t, "index": i, "logprobs": None, "finish_reason": "stop"}
            for i, t in enumerate(texts)
        ]
        return JSONReply({**envelope, "choices": choices, "usage": usage})

    include_usage = _include_usage(body)

    def chunk(index: int, text: str, finish: str | None = None) -> tuple[None, dict[str, Any]]:
        payload: dict[str, Any] = {
            **envelope,
            "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            payload["usage"] = None
        return None, payload

    stream = Stream()
    stream.deltas = [chunk(i, piece) for i, text in enumerate(texts) for piece in pieces(text)]
    stream.tail = [chunk(i, "", "stop") for i in range(len(texts))]
    if include_usage:
        stream.tail.append((None, {**envelope, "choices": [], "usage": usage}))
    return stream


# --------------------------------------------------------------------------
# POST /v1/responses

# --------------------------------------------------------------------------
# POST /v1/embeddings


def embeddings_reply(body: Mapping[str, Any], seq: int) -> Reply:
    model = require_model(body)
    raw = body.get("input")
    # One string, one token array, or a list of either.
    if isinstance(raw, str) or (
        isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw)
    ):
        inputs: list[Any] = [raw]
    else:
        inputs = raw if isinstance(raw, list) else []
    valid = bool(inputs) and all(
        isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, int) for t in v))
        for v in inputs
    )
    if not valid:
        raise bad_request(
            "'input' must be a string, a token array, or a non-empty list of them.", "input"
        )
    dimensions = body.get("dimensions", DEFAULT_EMBEDDING_DIMENSIONS)
    if not isinstance(dimensions, int) or dimensions < 1:
        raise bad_request("'dimensions' must be a positive integer.", "dimensions")
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, value in enumerate(inputs):
        vector = embedding_vector(value, dimensions)
        encoded: Any = (
            base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            if as_base64
            else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(count_tokens(v) if isinstance(v, str) else len(v) for v in inputs)
    return JSONReply(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


# What a strict server knows (OpenAI's arguments without `stream_options`).
_KNOWN_ARGS = {
    "/v1/chat/completions": frozenset(
        {
            "audio",
            "frequency_penalty",
            "function_call",
            "functions",
            "logit_bias",
            "logprobs",
            "max_completion_tokens",
            "max_tokens",
            "messages",
            "metadata",
            "modalities",
            "model",
            "moderation",
            "n",
            "parallel_tool_calls",
            "prediction",
            "presence_penalty",
            "prompt_cache_key",
            "prompt_cache_options",
            "prompt_cache_retention",
            "reasoning_effort",
            "response_format",
            "safety_identifier",
            "seed",
            "service_tier",
            "stop",
            "store",
            "stream",
            "temperature",
            "tool_choice",
            "tools",
            "top_logprobs",
            "top_p",
            "user",
            "verbosity",
            "web_search_options",
        }
    ),
    "/v1/completions": frozenset(
        {
            "best_of",
            "echo",
            "frequency_penalty",
            "logit_bias",
            "logprobs",
            "max_tokens",
            "model",
            "n",
            "presence_penalty",
            "prompt",
            "seed",
            "stop",
            "stream",
            "suffix",
            "temperature",
            "top_p",
            "user",
        }
    ),
}
REJECT_STYLES = ("openai", "pydantic")


def reject_unknown(style: str, path: str, body: Mapping[str, Any]) -> None:
    known = _KNOWN_ARGS.get(path)
    unknown = [name for name in body if name not in known] if known is not None else []
    if not unknown:
        return
    if style == "pydantic":
        error = APIError(422, "Extra inputs are not permitted", "invalid_request_error")
        error.body = {
            "detail": [
                {
                    "type": "extra_forbidden",
                    "loc": ["body", name],
                    "msg": "Extra inputs are not permitted",
                    "input": body[name],
                }
                for name in unknown
            ]
        }
        raise error
    plural = "s" if len(unknown) > 1 else ""
    raise bad_request(f"Unrecognized request argument{plural} supplied: {', '.join(unknown)}")
