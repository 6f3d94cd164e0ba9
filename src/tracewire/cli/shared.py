"""What ``stats`` and ``export`` share (not a subcommand): ``--since``, a duration back from now
(``90m``, ``24h``, ``7d``) or an ISO date/time (UTC unless it names a zone); the check that
the Delta extra is installed; and one line, within seconds, for a store that cannot be read."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import time
from collections.abc import Iterator

_RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def since_ms(text: str, now: float | None = None) -> int:
    """Milliseconds since the epoch for a ``--since`` value; ValueError if it is neither form."""
    now = time.time() if now is None else now
    if match := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text):
        return int((now - float(match[1]) * _UNITS[match[2]]) * 1000)
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since must be a duration like 24h or 7d, or an ISO date/time "
            f"like 2026-01-31 or 2026-01-31T12:00, got {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def require_deltalake(what: str) -> None:
    """A missing extra is a one-line error naming what to install, not a traceback."""
    import importlib.util

    from tracewire.cli import CLIError

    if importlib.util.find_spec("deltalake") is None or importlib.util.find_spec("pyarrow") is None:
        raise CLIError(f'{what} needs the Delta extra: pip install "tracewire[delta]"')


@contextlib.contextmanager
def reading_store(uri: str) -> Iterator[None]:
    """A store that cannot be read (damaged, of another MLflow version, unreachable) is one
    line naming it, not MLflow's or SQLAlchemy's traceback."""
    from mlflow.exceptions import MlflowException

    from tracewire.cli import CLIError
    from tracewire.core import scrub
    from tracewire.export import destination

    errors: tuple[type[Exception], ...] = (MlflowException,)
    if destination.is_database(uri):  # its driver's errors reach us unwrapped
        from sqlalchemy.exc import SQLAlchemyError

        errors += (SQLAlchemyError,)
    # MLflow retries a server that cannot be reached 7 times per request, for about two
    # minutes; a person waiting on a report is told after two retries (seconds), unless they
    # chose a number.
    chosen = _RETRIES in os.environ
    if not chosen:
        os.environ[_RETRIES] = "2"
    try:
        yield
    except errors as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(f"cannot read the tracking store {scrub.text(uri)}: {reason}") from None
    finally:
        if not chosen:
            os.environ.pop(_RETRIES, None)
