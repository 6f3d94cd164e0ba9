"""A strict fake OpenAI server: chat and legacy completions refuse any argument OpenAI does not
know, as OpenAI or as a FastAPI/pydantic server answers (what the server does, and when:
openai_server.py, ``reject_unknown_args``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tracewire.testing.openai_tokens import APIError, bad_request

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
