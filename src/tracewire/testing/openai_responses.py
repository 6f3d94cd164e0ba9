"""The fake OpenAI server's Responses API (POST /v1/responses), streamed or not (what the
server does: openai_server.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tracewire.testing.openai_replies import (
    JSONReply,
    Reply,
    Stream,
    pieces,
    plan_reply,
)
from tracewire.testing.openai_tokens import CREATED, require_items, require_model


def responses_reply(body: Mapping[str, Any], seq: int) -> Reply:
    model = require_model(body)
    raw_input = body.get("input")
    if isinstance(raw_input, str):
        items: list[dict[str, Any]] = [{"role": "user", "content": raw_input}]
    else:
        items = require_items(body, "input")
    instructions = body.get("instructions")
    prompt_items = (
        [{"role": "system", "content": instructions}] if isinstance(instructions, str) else []
    ) + items
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
    plan = plan_reply(model, prompt_items, tool, schema)

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
            "content": [
                {"type": "output_text", "text": plan.text or "", "annotations": [], "logprobs": []}
            ],
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
        "created_at": CREATED,
        "completed_at": CREATED,
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
        return JSONReply(response)

    in_progress = {
        **response,
        "status": "in_progress",
        "completed_at": None,
        "output": [],
        "usage": None,
    }
    where = {"item_id": item_id, "output_index": 0}
    stream = Stream(done_marker=False, sequenced=True)
    stream.head = [
        ("response.created", {"type": "response.created", "response": in_progress}),
        ("response.in_progress", {"type": "response.in_progress", "response": in_progress}),
    ]
    if plan.tool_call:
        added_item = {**done_item, "status": "in_progress", "arguments": ""}
        stream.head.append(
            (
                "response.output_item.added",
                {"type": "response.output_item.added", "output_index": 0, "item": added_item},
            )
        )
        kind = "response.function_call_arguments.delta"
        stream.deltas = [
            (kind, {"type": kind, **where, "delta": p}) for p in pieces(plan.tool_call.arguments)
        ]
        kind = "response.function_call_arguments.done"
        stream.tail.append(
            (
                kind,
                {
                    "type": kind,
                    **where,
                    "name": plan.tool_call.name,
                    "arguments": plan.tool_call.arguments,
                },
            )
        )
    else:
        part = done_item["content"][0]
        added_item = {**done_item, "status": "in_progress", "content": []}
        where_part = {**where, "content_index": 0}
        empty_part = {**part, "text": ""}
        stream.head += [
            (
                "response.output_item.added",
                {"type": "response.output_item.added", "output_index": 0, "item": added_item},
            ),
            (
                "response.content_part.added",
                {"type": "response.content_part.added", **where_part, "part": empty_part},
            ),
        ]
        kind = "response.output_text.delta"
        stream.deltas = [
            (kind, {"type": kind, **where_part, "delta": p, "logprobs": []})
            for p in pieces(plan.text or "")
        ]
        stream.tail += [
            (
                "response.output_text.done",
                {
                    "type": "response.output_text.done",
                    **where_part,
                    "text": part["text"],
                    "logprobs": [],
                },
            ),
            (
                "response.content_part.done",
                {"type": "response.content_part.done", **where_part, "part": part},
            ),
        ]
    stream.tail += [
        (
            "response.output_item.done",
            {"type": "response.output_item.done", "output_index": 0, "item": done_item},
        ),
        ("response.completed", {"type": "response.completed", "response": response}),
    ]
    return stream
