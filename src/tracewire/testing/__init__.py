"""Test helpers shipped with tracewire, usable from our tests and our users' tests.

``OpenAIServer`` is a local, deterministic OpenAI-compatible HTTP server; see
``tracewire.testing.openai_server`` for its behaviour.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .openai_server import (
        OpenAIServer,
        RecordedRequest,
        count_prompt_tokens,
        count_tokens,
        embedding_vector,
    )

__all__ = [
    "OpenAIServer",
    "RecordedRequest",
    "count_prompt_tokens",
    "count_tokens",
    "embedding_vector",
]


def __getattr__(name: str) -> Any:
    # Imported lazily: an eager import would make
    # ``python -m tracewire.testing.openai_server`` warn that the module was
    # already in sys.modules before runpy executed it.
    if name in __all__:
        return getattr(importlib.import_module(".openai_server", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
