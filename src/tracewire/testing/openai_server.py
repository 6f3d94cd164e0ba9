"""A local, deterministic, OpenAI-compatible HTTP server for tests and demos.

Point the real ``openai`` client at it over HTTP::

    with OpenAIServer() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="sk-test")
        client.chat.completions.create(model="gpt-4o", messages=[...])
        assert server.requests[-1].body["model"] == "gpt-4o"

or run it in the foreground (the base URL is printed on one line, then it serves
until interrupted)::

    python -m tracewire.testing.openai_server [--port N] [--reject-unknown-args [openai|pydantic]]

Only the standard library is used, so it works wherever the core package does.

Endpoints (everything else answers 404 with an OpenAI error body; a body that is
not a JSON object answers 400)
    POST /v1/chat/completions, POST /v1/responses, POST /v1/embeddings,
    POST /v1/completions (legacy). Every endpoint streams when ``stream`` is true,
    except embeddings. Azure-style paths (``/v1/deployments/<name>/chat/completions``)
    are served too.

Replies (the same for streamed and non-streamed requests)
    * ``model`` echoes the requested model; ``n`` is treated as 1.
    * With function ``tools`` (and ``tool_choice`` not ``"none"``) and a user
      message last: one call to the *first* function tool, id ``call_<k>`` where
      k is 1 + the number of tool calls already in the conversation (so
      ``call_1`` on the first turn). Its arguments fill the tool's JSON schema
      (see below); chat: ``content`` is null and ``finish_reason`` is
      ``"tool_calls"``; Responses: a ``function_call`` item.
    * With a tool result last (chat ``tool`` message, Responses
      ``function_call_output`` item): ``"Result: <tool output>"``.
    * With a JSON-schema response format (chat ``response_format``, Responses
      ``text.format``): the JSON text of an object filling the schema.
    * Otherwise: ``"Echo: <text of the last user message>"``; the legacy
      completions endpoint answers ``"Echo: <prompt>"``, one choice per prompt.
    * Filling a schema: an object gets its ``required`` properties (all of them
      when there is no ``required``), strings get the last user text, integers and
      numbers 1, booleans true, arrays [], ``enum``/``const`` their first value,
      ``anyOf``/``oneOf`` their first non-null branch, ``$ref`` is followed.

Special model names (``error-*`` on every endpoint, the stream ones when streaming)
    * ``error-429``: HTTP 429 with ``Retry-After: 0`` (``openai.RateLimitError``).
    * ``error-500``: HTTP 500 (``openai.InternalServerError``).
    * ``stream-error``: two content deltas, then an error event, then the stream
      ends. Chat/completions send ``data: {"error": {...}}``. Responses sends
      ``event: error`` whose data has the flat fields of ``ResponseErrorEvent``
      *and* a nested ``error`` object, as live OpenAI does; the nested object is
      what makes the openai client raise. Either way iterating raises
      ``openai.APIError``.
    * ``empty-stream``: no events at all, only ``data: [DONE]``.
    * a name ending in ``-cached``: reports ``prompt_tokens // 2`` cached tokens.

Token counting
    * ``count_tokens(text)``: number of whitespace-separated words.
    * Prompt (chat and Responses, see ``count_prompt_tokens``): for every message
      or input item, 3 + the words of its text: its content (a string, or the
      ``text`` of each part of a list), a function call's arguments (chat
      ``tool_calls`` included) and a function call output. Responses
      ``instructions`` count as one more message; a string ``input`` is one user
      message. Tool definitions are not counted.
    * Legacy completions: the words of the prompt(s). Embeddings: the words of
      each string input, the length of each token-array input.
    * Completion: the words of the reply text; for a tool call, the words of its
      JSON arguments + 1.
    * Cached tokens: ``prompt_tokens // 2`` for ``*-cached`` models, else 0;
      reasoning tokens are always 0.

Streaming follows OpenAI's wire format: chat sends a role chunk (carrying the
start of the tool call, if any), one chunk per word (leading whitespace attached,
so the deltas concatenate to the full text; tool-call arguments likewise), a
finish chunk, and with ``stream_options.include_usage`` ``"usage": null`` on every
chunk plus one final chunk with ``choices == []`` and the usage; then
``data: [DONE]``. The Responses API sends typed events with ``sequence_number``,
from ``response.created`` to ``response.completed`` (which carries usage) and no
``[DONE]``, like OpenAI. Bodies are sent with chunked transfer encoding so the
connection stays reusable.

Unknown arguments (``OpenAIServer(reject_unknown_args=...)``, ``--reject-unknown-args``)
    By default every argument is accepted. Like servers that validate strictly (some
    OpenAI-compatible servers, older deployments), chat and legacy completions can
    instead reject any argument outside OpenAI's (``stream`` and the arguments of the
    openai client's ``create``) minus ``stream_options``, so ``stream_options`` and
    unknown ``extra_body`` fields are rejected before anything else is checked:
    ``"openai"`` (or ``True``) answers HTTP 400 ``Unrecognized request argument
    supplied: stream_options`` in an OpenAI error body (``openai.BadRequestError``);
    ``"pydantic"`` answers HTTP 422 with a FastAPI/pydantic body, ``{"detail": [{"type":
    "extra_forbidden", "loc": ["body", "stream_options"], "msg": "Extra inputs are not
    permitted", ...}]}`` (``openai.UnprocessableEntityError``). Rejected requests are
    recorded like any other. Responses and embeddings accept every argument.

Embeddings are ``dimensions`` (default 8) float32 values in [-1, 1) derived from
a SHA-256 of the input (``embedding_vector``); ``encoding_format="base64"`` (what
the openai client requests when the caller does not choose) sends the same
float32 values little-endian and base64-encoded.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import itertools
import json
import re
import socket
import socketserver
import struct
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Callable, Mapping, Sequence, Union
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_EMBEDDING_DIMENSIONS",
    "OpenAIServer",
    "RecordedRequest",
    "count_prompt_tokens",
    "count_tokens",
    "embedding_vector",
]

DEFAULT_EMBEDDING_DIMENSIONS = 8
# A fixed timestamp keeps whole response bodies reproducible.
_CREATED = 1_700_000_000
_TOKENS_PER_MESSAGE = 3


# --------------------------------------------------------------------------
# Public helpers: the rules tests use to compute expected values.


def count_tokens(text: str) -> int:
    """The server's token count for ``text``: its number of whitespace-separated words."""
    return len(text.split())


def count_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Prompt tokens for chat messages or Responses input items (3 + words each)."""
    return sum(count_tokens(_item_text(item)) + _TOKENS_PER_MESSAGE for item in messages)


def embedding_vector(
    value: Union[str, Sequence[int]], dimensions: int = DEFAULT_EMBEDDING_DIMENSIONS
) -> list[float]:
    """The embedding the server returns for a string or token-array input."""
    seed = (value if isinstance(value, str) else json.dumps(list(value))).encode()
    digest = b""
    block = 0
    while len(digest) < 4 * dimensions:
        digest += hashlib.sha256(seed + block.to_bytes(4, "little")).digest()
        block += 1
    values = [n / 2**31 - 1.0 for n in struct.unpack(f"<{dimensions}I", digest[: 4 * dimensions])]
    # Round to float32 so the float and base64 encodings carry identical values.
    return list(struct.unpack(f"<{dimensions}f", struct.pack(f"<{dimensions}f", *values)))


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    """Header names are lower-case."""
    body: Any
    """The parsed JSON body; None when the body was empty or not JSON."""


# --------------------------------------------------------------------------
# Reading requests.


class _APIError(Exception):
    """An OpenAI-style error reply, raised anywhere below the HTTP handler."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}
        self.headers = dict(headers or {})


def _bad_request(message: str, param: str | None = None) -> _APIError:
    return _APIError(400, message, "invalid_request_error", param=param)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def _item_text(item: Mapping[str, Any]) -> str:
    parts = [_content_text(item.get("content")), _content_text(item.get("output"))]
    if item.get("type") == "function_call":
        parts.append(str(item.get("arguments", "")))
    for call in item.get("tool_calls") or []:
        parts.append(str(call.get("function", {}).get("arguments", "")))
    return " ".join(part for part in parts if part)


def _tool_call_count(item: Mapping[str, Any]) -> int:
    if item.get("type") == "function_call":
        return 1
    return len(item.get("tool_calls") or [])


def _is_tool_result(item: Mapping[str, Any]) -> bool:
    return item.get("role") == "tool" or item.get("type") == "function_call_output"


def _is_user(item: Mapping[str, Any]) -> bool:
    return item.get("role") == "user" and item.get("type", "message") == "message"


def _require_model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad_request("You must provide a model parameter.", "model")
    if model == "error-429":
        raise _APIError(
            429,
            "Rate limit reached for requests (simulated by model error-429).",
            "requests",
            code="rate_limit_exceeded",
            headers={"Retry-After": "0"},
        )
    if model == "error-500":
        raise _APIError(
            500,
            "The server had an error while processing your request (simulated by model error-500).",
            "server_error",
        )
    return model


def _require_items(body: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    items = body.get(name)
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise _bad_request(f"'{name}' must be a list of objects.", name)
    return items


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
            branches = [b for b in schema[key] if not (isinstance(b, dict) and b.get("type") == "null")]
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
    return {"array": [], "integer": 1, "number": 1, "boolean": True, "null": None}.get(kind, text)


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


def _plan(
    model: str,
    items: list[dict[str, Any]],
    tool: tuple[str, Any] | None,
    schema: Mapping[str, Any] | None,
) -> _Plan:
    """Decide the reply to a conversation; ``tool`` is the first function tool (name, parameters)."""
    last = items[-1] if items else {}
    user_text = next((_item_text(item) for item in reversed(items) if _is_user(item)), "")
    prompt_tokens = count_prompt_tokens(items)
    if tool is not None and _is_user(last):
        name, parameters = tool
        parameters = parameters if isinstance(parameters, dict) else {}
        arguments = json.dumps(_sample({"type": "object", **parameters}, user_text, parameters))
        call_id = f"call_{1 + sum(_tool_call_count(item) for item in items)}"
        return _Plan(model, None, _ToolCall(call_id, name, arguments), prompt_tokens, count_tokens(arguments) + 1)
    if _is_tool_result(last):
        text = f"Result: {_item_text(last)}"
    elif schema is not None:
        text = json.dumps(_sample(schema, user_text, schema))
    else:
        text = f"Echo: {user_text}"
    return _Plan(model, text, None, prompt_tokens, count_tokens(text))


def _pieces(text: str) -> list[str]:
    """Split into word-sized deltas that concatenate back to ``text``."""
    return re.findall(r"\s*\S+|\s+$", text)


# --------------------------------------------------------------------------
# Replies and streams.


@dataclass(frozen=True)
class _JSONReply:
    body: Mapping[str, Any]


@dataclass
class _Stream:
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


_Reply = Union[_JSONReply, _Stream]

_STREAM_ERROR = {
    "message": "The model stream failed (simulated by model stream-error).",
    "type": "server_error",
    "param": None,
    "code": "stream_error",
}


def _sse_frames(stream: _Stream, model: str) -> list[bytes]:
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


def _chat(body: Mapping[str, Any], seq: int) -> _Reply:
    model = _require_model(body)
    messages = _require_items(body, "messages")
    tool = next(
        (
            (t["function"].get("name", ""), t["function"].get("parameters"))
            for t in body.get("tools") or []
            if isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and body.get("tool_choice") != "none"
        ),
        None,
    )
    response_format = body.get("response_format")
    schema = None
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {}
    plan = _plan(model, messages, tool, schema)
    finish_reason = "tool_calls" if plan.tool_call else "stop"
    usage = _usage(plan.prompt_tokens, plan.completion_tokens, plan.cached_tokens)
    envelope = {"id": f"chatcmpl-{seq}", "created": _CREATED, "model": model}

    if not body.get("stream"):
        message: dict[str, Any] = {"role": "assistant", "content": plan.text, "refusal": None, "annotations": []}
        if plan.tool_call:
            message["tool_calls"] = [
                {
                    "id": plan.tool_call.call_id,
                    "type": "function",
                    "function": {"name": plan.tool_call.name, "arguments": plan.tool_call.arguments},
                }
            ]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        return _JSONReply({**envelope, "object": "chat.completion", "choices": [choice], "usage": usage})

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

    stream = _Stream()
    if plan.tool_call:
        # OpenAI opens a tool call in the role chunk, then streams the arguments.
        opening = {
            "index": 0,
            "id": plan.tool_call.call_id,
            "type": "function",
            "function": {"name": plan.tool_call.name, "arguments": ""},
        }
        stream.head.append(chunk({"role": "assistant", "content": None, "tool_calls": [opening], "refusal": None}))
        stream.deltas = [
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            for piece in _pieces(plan.tool_call.arguments)
        ]
    else:
        stream.head.append(chunk({"role": "assistant", "content": "", "refusal": None}))
        stream.deltas = [chunk({"content": piece}) for piece in _pieces(plan.text or "")]
    stream.tail.append(chunk({}, finish_reason))
    if include_usage:
        stream.tail.append((None, {**envelope, "object": "chat.completion.chunk", "choices": [], "usage": usage}))
    return stream


# --------------------------------------------------------------------------
# POST /v1/completions (legacy)


def _completions(body: Mapping[str, Any], seq: int) -> _Reply:
    model = _require_model(body)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise _bad_request("'prompt' must be a string or a list of strings.", "prompt")
    texts = [f"Echo: {p}" for p in prompts]
    prompt_tokens = sum(count_tokens(p) for p in prompts)
    completion_tokens = sum(count_tokens(t) for t in texts)
    usage = _usage(prompt_tokens, completion_tokens, _cached_tokens(model, prompt_tokens))
    envelope = {"id": f"cmpl-{seq}", "object": "text_completion", "created": _CREATED, "model": model}

    if not body.get("stream"):
        choices = [{"text": t, "index": i, "logprobs": None, "finish_reason": "stop"} for i, t in enumerate(texts)]
        return _JSONReply({**envelope, "choices": choices, "usage": usage})

    include_usage = _include_usage(body)

    def chunk(index: int, text: str, finish: str | None = None) -> tuple[None, dict[str, Any]]:
        payload: dict[str, Any] = {
            **envelope,
            "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            payload["usage"] = None
        return None, payload

    stream = _Stream()
    stream.deltas = [chunk(i, piece) for i, text in enumerate(texts) for piece in _pieces(text)]
    stream.tail = [chunk(i, "", "stop") for i in range(len(texts))]
    if include_usage:
        stream.tail.append((None, {**envelope, "choices": [], "usage": usage}))
    return stream


# --------------------------------------------------------------------------
# POST /v1/responses


def _responses(body: Mapping[str, Any], seq: int) -> _Reply:
    model = _require_model(body)
    raw_input = body.get("input")
    if isinstance(raw_input, str):
        items: list[dict[str, Any]] = [{"role": "user", "content": raw_input}]
    else:
        items = _require_items(body, "input")
    instructions = body.get("instructions")
    prompt_items = ([{"role": "system", "content": instructions}] if isinstance(instructions, str) else []) + items
    tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
    tool = next(
        (
            (t.get("name", ""), t.get("parameters"))
            for t in tools
            if t.get("type") == "function" and body.get("tool_choice") != "none"
        ),
        None,
    )
    text_config = body.get("text")
    text_format = text_config.get("format") if isinstance(text_config, dict) else None
    schema = None
    if isinstance(text_format, dict) and text_format.get("type") == "json_schema":
        schema = text_format.get("schema") or {}
    # Instructions count towards the prompt as a system message; they never shape the reply.
    plan = _plan(model, prompt_items, tool, schema)

    if plan.tool_call:
        item_id = f"fc_{seq}"
        done_item: dict[str, Any] = {
            "id": item_id,
            "type": "function_call",
            "status": "completed",
            "call_id": plan.tool_call.call_id,
            "name": plan.tool_call.name,
            "arguments": plan.tool_call.arguments,
        }
    else:
        item_id = f"msg_{seq}"
        done_item = {
            "id": item_id,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": plan.text or "", "annotations": [], "logprobs": []}],
        }
    usage = {
        "input_tokens": plan.prompt_tokens,
        "input_tokens_details": {"cached_tokens": plan.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": plan.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": plan.total_tokens,
    }
    response: dict[str, Any] = {
        "id": f"resp_{seq}",
        "object": "response",
        "created_at": _CREATED,
        "completed_at": _CREATED,
        "status": "completed",
        "model": model,
        "instructions": instructions,
        "output": [done_item],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": tools,
        "text": text_config if isinstance(text_config, dict) else {"format": {"type": "text"}},
        "error": None,
        "incomplete_details": None,
        "metadata": body.get("metadata") or {},
        "usage": usage,
    }
    if not body.get("stream"):
        return _JSONReply(response)

    in_progress = {**response, "status": "in_progress", "completed_at": None, "output": [], "usage": None}
    where = {"item_id": item_id, "output_index": 0}
    stream = _Stream(done_marker=False, sequenced=True)
    stream.head = [
        ("response.created", {"type": "response.created", "response": in_progress}),
        ("response.in_progress", {"type": "response.in_progress", "response": in_progress}),
    ]
    if plan.tool_call:
        added_item = {**done_item, "status": "in_progress", "arguments": ""}
        stream.head.append(
            ("response.output_item.added", {"type": "response.output_item.added", "output_index": 0, "item": added_item})
        )
        kind = "response.function_call_arguments.delta"
        stream.deltas = [(kind, {"type": kind, **where, "delta": p}) for p in _pieces(plan.tool_call.arguments)]
        kind = "response.function_call_arguments.done"
        stream.tail.append(
            (kind, {"type": kind, **where, "name": plan.tool_call.name, "arguments": plan.tool_call.arguments})
        )
    else:
        part = done_item["content"][0]
        added_item = {**done_item, "status": "in_progress", "content": []}
        where_part = {**where, "content_index": 0}
        empty_part = {**part, "text": ""}
        stream.head += [
            ("response.output_item.added", {"type": "response.output_item.added", "output_index": 0, "item": added_item}),
            ("response.content_part.added", {"type": "response.content_part.added", **where_part, "part": empty_part}),
        ]
        kind = "response.output_text.delta"
        stream.deltas = [
            (kind, {"type": kind, **where_part, "delta": p, "logprobs": []}) for p in _pieces(plan.text or "")
        ]
        stream.tail += [
            (
                "response.output_text.done",
                {"type": "response.output_text.done", **where_part, "text": part["text"], "logprobs": []},
            ),
            ("response.content_part.done", {"type": "response.content_part.done", **where_part, "part": part}),
        ]
    stream.tail += [
        ("response.output_item.done", {"type": "response.output_item.done", "output_index": 0, "item": done_item}),
        ("response.completed", {"type": "response.completed", "response": response}),
    ]
    return stream


# --------------------------------------------------------------------------
# POST /v1/embeddings


def _embeddings(body: Mapping[str, Any], seq: int) -> _Reply:
    model = _require_model(body)
    raw = body.get("input")
    # One string, one token array, or a list of either.
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw)):
        inputs: list[Any] = [raw]
    else:
        inputs = raw if isinstance(raw, list) else []
    valid = bool(inputs) and all(
        isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, int) for t in v)) for v in inputs
    )
    if not valid:
        raise _bad_request("'input' must be a string, a token array, or a non-empty list of them.", "input")
    dimensions = body.get("dimensions", DEFAULT_EMBEDDING_DIMENSIONS)
    if not isinstance(dimensions, int) or dimensions < 1:
        raise _bad_request("'dimensions' must be a positive integer.", "dimensions")
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, value in enumerate(inputs):
        vector = embedding_vector(value, dimensions)
        encoded: Any = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode() if as_base64 else vector
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(count_tokens(v) if isinstance(v, str) else len(v) for v in inputs)
    return _JSONReply(
        {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    )


# What a strict server knows (OpenAI's arguments without `stream_options`).
_KNOWN_ARGS = {
    "/v1/chat/completions": frozenset({
        "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
        "max_completion_tokens", "max_tokens", "messages", "metadata", "modalities", "model",
        "moderation", "n", "parallel_tool_calls", "prediction", "presence_penalty",
        "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention", "reasoning_effort",
        "response_format", "safety_identifier", "seed", "service_tier", "stop", "store", "stream",
        "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity",
        "web_search_options",
    }),
    "/v1/completions": frozenset({
        "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "model",
        "n", "presence_penalty", "prompt", "seed", "stop", "stream", "suffix", "temperature",
        "top_p", "user",
    }),
}
_REJECT_STYLES = ("openai", "pydantic")


def _reject_unknown(style: str, path: str, body: Mapping[str, Any]) -> None:
    known = _KNOWN_ARGS.get(path)
    unknown = [name for name in body if name not in known] if known is not None else []
    if not unknown:
        return
    if style == "pydantic":
        error = _APIError(422, "Extra inputs are not permitted", "invalid_request_error")
        error.body = {"detail": [
            {"type": "extra_forbidden", "loc": ["body", name], "msg": "Extra inputs are not permitted",
             "input": body[name]} for name in unknown]}
        raise error
    plural = "s" if len(unknown) > 1 else ""
    raise _bad_request(f"Unrecognized request argument{plural} supplied: {', '.join(unknown)}")


_ENDPOINTS: dict[str, Callable[[Mapping[str, Any], int], _Reply]] = {
    "/v1/chat/completions": _chat,
    "/v1/completions": _completions,
    "/v1/responses": _responses,
    "/v1/embeddings": _embeddings,
}


# --------------------------------------------------------------------------
# HTTP plumbing.


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # A thread pool opens hundreds of connections at once; with the default
    # backlog of 5 the kernel drops SYNs and clients stall on 1 s retransmits.
    request_queue_size = 1024

    def __init__(self, port: int, owner: OpenAIServer) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.owner = owner
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (socket.getfqdn), a DNS
        # lookup that can take seconds on some machines; nothing here needs it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", int(self.server_address[1])

    def track(self, connection: socket.socket, *, open: bool) -> None:
        with self._connections_lock:
            if open:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def close_connections(self) -> None:
        # Idle keep-alive connections park their handler threads in recv();
        # shutting the sockets down lets those threads finish immediately.
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients may hang up mid-stream (the openai sync Stream closes right after
        # [DONE] without reading the final chunk); that is not worth a traceback.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps connections alive, as httpx expects.
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: with Nagle's algorithm each reply would wait
    # for the client's delayed ACK (about 40 ms a call).
    disable_nagle_algorithm = True
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, open=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, open=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: no per-request lines on stderr."""

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        headers = {name.lower(): value for name, value in self.headers.items()}
        seq = self.server.owner._record(RecordedRequest(self.command, self.path, headers, body))
        # Azure clients put the deployment in the path: /v1/deployments/<name>/chat/completions.
        path = re.sub(r"/deployments/[^/]+/", "/", urlsplit(self.path).path)
        endpoint = _ENDPOINTS.get(path) if self.command == "POST" else None
        try:
            if endpoint is None:
                raise _APIError(
                    404, f"Invalid URL ({self.command} {self.path})", "invalid_request_error", code="unknown_url"
                )
            if not isinstance(body, dict):
                raise _bad_request("We could not parse the JSON body of your request: expected a JSON object.")
            if self.server.owner.reject_unknown_args:
                _reject_unknown(self.server.owner.reject_unknown_args, path, body)
            reply = endpoint(body, seq)
        except _APIError as error:
            self._send_json(error.status, error.body, seq, error.headers)
            return
        if isinstance(reply, _JSONReply):
            self._send_json(200, reply.body, seq)
        else:
            self._send_stream(_sse_frames(reply, body["model"]), seq)

    def _send_json(
        self, status: int, body: Mapping[str, Any], seq: int, headers: Mapping[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", f"req_{seq}")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_stream(self, frames: list[bytes], seq: int) -> None:
        # Chunked encoding marks the end of the body without closing the
        # connection, so keep-alive clients can reuse it for the next request.
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("x-request-id", f"req_{seq}")
        self.end_headers()
        for frame in frames:
            self.wfile.write(b"%X\r\n%s\r\n" % (len(frame), frame))
        self.wfile.write(b"0\r\n\r\n")


class OpenAIServer:
    """A deterministic OpenAI-compatible server on 127.0.0.1 (see the module docstring).

    Use as a context manager, or call ``start()`` and ``stop()``.
    """

    def __init__(self, port: int = 0, *, reject_unknown_args: bool | str = False) -> None:
        """``port=0`` picks a free port. ``reject_unknown_args``: ``True``/``"openai"`` or
        ``"pydantic"`` rejects arguments a strict server does not know, ``stream_options``
        included (see the module docstring)."""
        if reject_unknown_args is True:
            reject_unknown_args = "openai"
        if reject_unknown_args and reject_unknown_args not in _REJECT_STYLES:
            raise ValueError(f"reject_unknown_args must be one of {_REJECT_STYLES}, "
                             f"got {reject_unknown_args!r}")
        self.reject_unknown_args: str | None = reject_unknown_args or None
        self._requested_port = port
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._sequence = itertools.count(1)

    def start(self) -> OpenAIServer:
        """Bind and serve in a daemon thread; returns self."""
        if self._httpd is not None:
            raise RuntimeError("OpenAIServer is already running")
        self._httpd = _HTTPServer(self._requested_port, self)
        # A short poll interval keeps stop() prompt.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"tracewire-openai-server-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close open connections and join the server thread. Idempotent."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("OpenAIServer is not running")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """The URL to pass as the openai client's ``base_url``."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of the requests received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self._requests.clear()

    def _record(self, request: RecordedRequest) -> int:
        """Store a request; returns its sequence number, used in response ids."""
        with self._lock:
            self._requests.append(request)
            return next(self._sequence)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the server in the foreground, printing its base URL on one line."""
    parser = argparse.ArgumentParser(description="Run a local deterministic OpenAI-compatible server.")
    parser.add_argument("--port", type=int, default=0, help="port to bind on 127.0.0.1 (default: a free one)")
    parser.add_argument(
        "--reject-unknown-args", nargs="?", const="openai", choices=_REJECT_STYLES, default=None,
        help="reject chat/completions arguments a strict server does not know, stream_options "
        "included: HTTP 400 like OpenAI (openai, the default) or 422 like FastAPI (pydantic)")
    args = parser.parse_args(argv)
    with OpenAIServer(port=args.port, reject_unknown_args=args.reject_unknown_args or False) as server:
        print(server.base_url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
