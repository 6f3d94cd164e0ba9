"""Text made storable. A lone surrogate (half of an emoji cut by a client, a bad decode) cannot
be encoded as UTF-8: MLflow's protobuf and JSON writers fail on it, and a tracking server fails
every read of a record that holds one. It is replaced with U+FFFD instead."""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def storable(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD."""
    return _SURROGATE.sub("\ufffd", text)
