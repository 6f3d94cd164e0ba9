"""``--since``: a duration back from now (``90m``, ``24h``, ``7d``) or an ISO date/time (UTC
unless it names a zone). Not a subcommand: a helper shared by ``stats`` and ``export``."""

from __future__ import annotations

import datetime as dt
import re
import time

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def since_ms(text: str, now: float | None = None) -> int:
    """Milliseconds since the epoch for a ``--since`` value; ValueError if it is neither form."""
    now = time.time() if now is None else now
    if match := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text):
        return int((now - float(match[1]) * _UNITS[match[2]]) * 1000)
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since must be a duration like 24h or 7d, or an ISO date/time "
                         f"like 2026-01-31 or 2026-01-31T12:00, got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return int(when.timestamp() * 1000)
