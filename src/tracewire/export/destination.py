"""Where traces go: the tracking URI and experiment, read in the app (at ``autolog()``), by the
shipper process and by the CLI. No network I/O here.

MLflow internals used (pinned in tests/export/test_mlflow_pins.py):
``mlflow.tracking.fluent._active_experiment_id`` (what ``mlflow.set_experiment`` chose).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from tracewire import config
from tracewire.core import scrub

_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
_DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# The experiment id a user-only trace carries until the shipper resolves the destination.
PENDING_EXPERIMENT = "tracewire-pending"


def tracking_uri(settings: config.Settings) -> str:
    if settings.tracking_uri:
        return settings.tracking_uri
    import mlflow  # only here: `tracewire run` checks a destination without loading MLflow

    try:
        return mlflow.get_tracking_uri()
    except ImportError:
        # The slim SDK cannot even look for a local store (it lacks the file store's
        # dependencies): the default is what MLflow would have chosen.
        return _DEFAULT_TRACKING_URI


def destination(settings: config.Settings) -> str:
    """Where traces go, as one JSON string: stored in each spool, read by the shipper process,
    and compared before a spool is adopted. Without credentials (it rests on disk): the shipper
    takes them from its own environment (:func:`writable_uri`)."""
    experiment_id = settings.experiment_id
    if experiment_id is None and settings.experiment_name is None:
        from mlflow.tracking.fluent import (
            _active_experiment_id,  # mlflow.set_experiment(...)
        )

        experiment_id = _active_experiment_id
    return json.dumps({"tracking_uri": scrub.text(tracking_uri(settings)),
                       "experiment_id": experiment_id,
                       "experiment_name": settings.experiment_name}, sort_keys=True)


def writable_uri(recorded: str, settings: config.Settings) -> str:
    """The URI to write a spool's traces to, from the one it records: this process's own
    tracking URI, credentials included, when it names the same store; else the recorded one
    (credentials then come from MLflow's variables, MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN)."""
    own = settings.tracking_uri
    return own if own is not None and scrub.text(own) == recorded else recorded


def check_destination(settings: config.Settings) -> None:
    """Fail at autolog() when the destination cannot work here; no network I/O."""
    real_uri = tracking_uri(settings)
    uri = scrub.text(real_uri)  # what the messages below show
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme in _DB_SCHEMES or scheme in ("", "file"):
        # Looked for, not imported: the SQL store costs half a second to import, and the
        # shipper process is the one that writes to it.
        if not all(_importable(m) for m in ("sqlalchemy", "alembic",
                                            "mlflow.store.tracking.sqlalchemy_store")):
            raise config.ConfigError(
                f"MLFLOW_TRACKING_URI is {uri!r}, a local MLflow store, which needs the full "
                "`mlflow` package that this environment does not have. Either install it with "
                "`pip install \"tracewire[local]\"`, or point MLFLOW_TRACKING_URI at a tracking "
                "server (for example MLFLOW_TRACKING_URI=http://mlflow.internal:5000)."
            )
    path = sqlite_path(real_uri)
    if path is not None:
        nearest = next(p for p in (path, *path.parents) if p.exists())
        if not os.access(nearest, os.W_OK):
            raise config.ConfigError(
                f"MLFLOW_TRACKING_URI is {uri!r}, a local store that cannot be "
                f"{'written' if nearest == path else 'created'}: {nearest} is not writable. "
                "Point MLFLOW_TRACKING_URI at a writable place (for example "
                "sqlite:////tmp/mlflow.db) or at a tracking server.")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` store (relative to the working directory, or absolute with
    four slashes; percent-decoded, as SQLAlchemy reads it); None for other stores."""
    parsed = urlparse(uri)
    if parsed.scheme.split("+")[0] != "sqlite" or parsed.path in ("", "/", "/:memory:"):
        return None
    return Path(os.path.abspath(unquote(parsed.path[1:])))


def is_database(uri: str) -> bool:
    """A database-backed MLflow store, written directly (not through a tracking server)."""
    return urlparse(uri).scheme.split("+")[0] in _DB_SCHEMES

