"""Never raise into user code.

Every step tracewire runs inside a user's call (read the request, start the span, record the
result, end the span) goes through :func:`call`, which turns our own failure into one log line
and a ``None``. Under ``TRACEWIRE_TESTING=1`` the failure is raised instead, so the test suite
sees bugs the guard would otherwise hide. Only ``Exception`` is caught: ``CancelledError``,
``KeyboardInterrupt`` and ``SystemExit`` always go through.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

logger = logging.getLogger("tracewire")

T = TypeVar("T")

TESTING = os.environ.get("TRACEWIRE_TESTING", "").strip().lower() in ("1", "true", "yes")

# Tests set a predicate over step names (qualnames) to make those steps fail, proving the
# user's call survives each one.
fault: Callable[[str], bool] | None = None
_reported: set[str] = set()


class InjectedFault(RuntimeError):
    """Raised inside a guarded step when fault injection is on (tests only)."""


def report(exc: BaseException, where: str) -> None:
    """Log an internal failure once per place (re-raised under TRACEWIRE_TESTING)."""
    if TESTING and not isinstance(exc, InjectedFault):
        raise exc
    if where not in _reported:
        _reported.add(where)
        logger.warning(
            "tracewire: internal error in %s (tracing continues): %r",
            where,
            exc,
            exc_info=logger.isEnabledFor(logging.DEBUG),
        )


def call(step: Callable[..., T], *args: Any) -> T | None:
    """Run one tracing step; our failure becomes ``None``, never the caller's exception."""
    try:
        if fault is not None and fault(step.__qualname__):
            raise InjectedFault(step.__qualname__)
        return step(*args)
    except Exception as exc:
        report(exc, step.__qualname__)
        return None
