"""The fake OpenAI server's embeddings (POST /v1/embeddings): a vector derived from each input,
as floats or base64 (what the server does: openai_server.py)."""

from __future__ import annotations

import base64
import struct
from collections.abc import Mapping
from typing import Any

from tracewire.testing.openai_replies import JSONReply, Reply
from tracewire.testing.openai_tokens import (
    DEFAULT_EMBEDDING_DIMENSIONS,
    bad_request,
    count_tokens,
    embedding_vector,
    require_model,
)


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
