"""The fake OpenAI server's chat completions (POST /v1/chat/completions) and legacy completions
(POST /v1/completions), streamed or not (what the server does: openai_server.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tracewire.testing.openai_replies import (
    JSONReply,
    Reply,
    Stream,
    cached_tokens,
    pieces,
    plan_reply,
)
from tracewire.testing.openai_tokens import (
    CREATED,
    bad_request,
    count_tokens,
    require_items,
    require_model,
)


def _usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
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
    usage = _usage(prompt_tokens, completion_tokens, cached_tokens(model, prompt_tokens))
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
