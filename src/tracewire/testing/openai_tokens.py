"""The fake OpenAI server's token counting and request reading: the rules tests use to
compute expected values (what the server does: openai_server.py)."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_EMBEDDING_DIMENSIONS = 8
# A fixed timestamp keeps whole response bodies reproducible.
CREATED = 1_700_000_000
_TOKENS_PER_MESSAGE = 3


# --------------------------------------------------------------------------
# Public helpers: the rules tests use to compute expected values.


def count_tokens(text: str) -> int:
    """The server's token count for ``text``: its number of whitespace-separated words."""
    return len(text.split())


def count_prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    """Prompt tokens for chat messages or Responses input items (3 + words each)."""
    return sum(count_tokens(item_text(item)) + _TOKENS_PER_MESSAGE for item in messages)


def embedding_vector(
    value: str | Sequence[int], dimensions: int = DEFAULT_EMBEDDING_DIMENSIONS
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


class APIError(Exception):
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
        self.body: dict[str, Any] = {
            "error": {"message": message, "type": type, "param": param, "code": code}
        }
        self.headers = dict(headers or {})


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param=param)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def item_text(item: Mapping[str, Any]) -> str:
    parts = [_content_text(item.get("content")), _content_text(item.get("output"))]
    if item.get("type") == "function_call":
        parts.append(str(item.get("arguments", "")))
    for call in item.get("tool_calls") or []:
        parts.append(str(call.get("function", {}).get("arguments", "")))
    return " ".join(part for part in parts if part)


def tool_call_count(item: Mapping[str, Any]) -> int:
    if item.get("type") == "function_call":
        return 1
    return len(item.get("tool_calls") or [])


def is_tool_result(item: Mapping[str, Any]) -> bool:
    return item.get("role") == "tool" or item.get("type") == "function_call_output"


def is_user(item: Mapping[str, Any]) -> bool:
    return item.get("role") == "user" and item.get("type", "message") == "message"


def require_model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("You must provide a model parameter.", "model")
    if model == "error-429":
        raise APIError(
            429,
            "Rate limit reached for requests (simulated by model error-429).",
            "requests",
            code="rate_limit_exceeded",
            headers={"Retry-After": "0"},
        )
    if model == "error-500":
        raise APIError(
            500,
            "The server had an error while processing your request (simulated by model error-500).",
            "server_error",
        )
    return model


def require_items(body: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    items = body.get(name)
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise bad_request(f"'{name}' must be a list of objects.", name)
    return items
