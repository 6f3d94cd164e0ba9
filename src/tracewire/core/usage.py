"""Token usage in MLflow's shape (``mlflow.chat.tokenUsage``), from whatever a provider returns.

Trace totals are left to MLflow's own aggregation, which skips a span's usage when an ancestor
already carries usage: a model call seen by two layers (LangChain over the OpenAI client) is
counted once because the inner span really is the child of the outer one. Cost is priced by the
MLflow store from these counts and the model name (``mlflow.llm.model``).
"""

from __future__ import annotations

from typing import Any

from tracewire.core import attributes as keys


def _get(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _usage(
    input_tokens: int | None,
    output_tokens: int | None,
    total: int | None,
    cache_read: int | None = None,
    cache_creation: int | None = None,
) -> dict[str, int] | None:
    """MLflow's token usage from validated counts; None when neither side was reported."""
    if input_tokens is None and output_tokens is None:
        return None
    input_tokens = input_tokens or 0
    output_tokens = output_tokens or 0
    result = {
        keys.INPUT_TOKENS: input_tokens,
        keys.OUTPUT_TOKENS: output_tokens,
        keys.TOTAL_TOKENS: total if total is not None else input_tokens + output_tokens,
    }
    if cache_read is not None:  # a reported 0 is kept, as MLflow keeps it
        result[keys.CACHE_READ_INPUT_TOKENS] = cache_read
    if cache_creation is not None:
        result[keys.CACHE_CREATION_INPUT_TOKENS] = cache_creation
    return result


def from_openai(usage: Any) -> dict[str, int] | None:
    """Chat/legacy (`prompt_tokens`/`completion_tokens`), Responses (`input_tokens`/...) or
    embeddings (`prompt_tokens` only) usage -> MLflow token usage, or None if absent."""
    if usage is None:
        return None
    input_tokens = _int(_get(usage, "prompt_tokens"))
    output_tokens = _int(_get(usage, "completion_tokens"))
    details = _get(usage, "prompt_tokens_details")
    if input_tokens is None:
        input_tokens = _int(_get(usage, "input_tokens"))
        output_tokens = _int(_get(usage, "output_tokens"))
        details = _get(usage, "input_tokens_details")
    return _usage(
        input_tokens,
        output_tokens,
        _int(_get(usage, "total_tokens")),
        cache_read=_int(_get(details, "cached_tokens")),
    )


def from_langchain(usage_metadata: Any) -> dict[str, int] | None:
    """LangChain's ``AIMessage.usage_metadata`` (``input_tokens``, ``output_tokens``,
    ``total_tokens``, ``input_token_details.cache_read``/``cache_creation``) -> MLflow usage."""
    details = _get(usage_metadata, "input_token_details")
    return _usage(
        _int(_get(usage_metadata, "input_tokens")),
        _int(_get(usage_metadata, "output_tokens")),
        _int(_get(usage_metadata, "total_tokens")),
        cache_read=_int(_get(details, "cache_read")),
        cache_creation=_int(_get(details, "cache_creation")),
    )


def add(a: dict[str, int] | None, b: dict[str, int] | None) -> dict[str, int] | None:
    """The sum of two usages (a batched or multi-generation model call)."""
    if a is None or b is None:
        return a or b
    return {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}
