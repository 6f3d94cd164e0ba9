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
# What MLflow's tracking store registry takes besides the databases and its plugins' schemes
# (mlflow/tracking/_tracking_service/utils.py, _register_tracking_stores): known here without
# importing MLflow, which `tracewire run` checks a destination without.
_STORE_SCHEMES = ("", "file", "http", "https", "databricks", "databricks-uc", "uc", *_DB_SCHEMES)
_DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# The experiment id a user-only trace carries until the shipper resolves the destination.
PENDING_EXPERIMENT = "tracewire-pending"


def catalog_env() -> dict[str, str]:
    """The environment that keeps MLflow from fetching its model price catalog, for a process
    that writes or prices traces; empty if the user chose a catalog (``MLFLOW_MODEL_CATALOG_URI``).

    MLflow's SQL store prices spans as it saves them (and tracewire prices with MLflow's catalog
    for stores that do not), fetching the catalog from GitHub first: without network, that held
    up shipping for 7-27 s in every new process. MLflow's bundled catalog prices the same models.
    """
    return {} if "MLFLOW_MODEL_CATALOG_URI" in os.environ else {"MLFLOW_MODEL_CATALOG_URI": ""}


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
    return json.dumps(
        {
            "tracking_uri": scrub.text(tracking_uri(settings)),
            "experiment_id": experiment_id,
            "experiment_name": settings.experiment_name,
        },
        sort_keys=True,
    )


def writable_uri(recorded: str, settings: config.Settings) -> str:
    """The URI to write a spool's traces to, from the one it records: this process's own
    tracking URI, credentials included, when it names the same store; else the recorded one
    (credentials then come from MLflow's variables, MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN)."""
    own = settings.tracking_uri
    return own if own is not None and scrub.text(own) == recorded else recorded


def check_destination(settings: config.Settings, named: str | None = None) -> None:
    """Fail at autolog() when the destination cannot work here; no network I/O. ``named``:
    how an error names the URI's source, when a command took it as an option."""
    uri = tracking_uri(settings)
    named = named or _named(settings, uri)
    _check_store_type(uri, named)
    path = sqlite_path(uri)
    if path is not None:
        nearest = next(p for p in (path, *path.parents) if p.exists())
        if not os.access(nearest, os.W_OK):
            raise config.ConfigError(
                f"{named}, a local store that cannot be "
                f"{'written' if nearest == path else 'created'}: {nearest} is not writable. "
                "Point MLFLOW_TRACKING_URI at a writable place (for example "
                "sqlite:////tmp/mlflow.db) or at a tracking server."
            )


def check_readable(settings: config.Settings) -> str:
    """For commands that only read the store (``stats``, ``export delta``): the tracking URI,
    once it names a store this environment can open. A local store that does not exist is an
    error here: opening it would create an empty one. No network I/O."""
    uri = tracking_uri(settings)
    named = _named(settings, uri)
    _check_store_type(uri, named)
    path = _local_store(uri)
    if path is not None and not (path.is_dir() or (path.is_file() and path.stat().st_size)):
        raise config.ConfigError(
            f"{named}, but there is no MLflow store at {path}: run this in the folder your app "
            "keeps its store in, or set MLFLOW_TRACKING_URI to it (sqlite:////path/to/mlflow.db "
            "or http://your-server:5000)"
        )
    return uri


def _named(settings: config.Settings, uri: str) -> str:
    """Where the tracking URI came from, for an error message (without credentials)."""
    if settings.tracking_uri:  # mlflow.set_tracking_uri() sets the variable too
        return f"MLFLOW_TRACKING_URI is {scrub.text(uri)!r}"
    return f"MLflow's default tracking URI is {scrub.text(uri)!r} (MLFLOW_TRACKING_URI is not set)"


def _check_store_type(uri: str, named: str) -> None:
    """A store MLflow knows, whose code this environment has."""
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme not in _STORE_SCHEMES and scheme not in _plugin_schemes():
        # MLflow itself would only fail at the first trace, with an unrelated message.
        raise config.ConfigError(
            f"{named}, whose scheme {scheme!r} MLflow has no tracking store for: use http:// "
            "or https:// for a tracking server, sqlite:/// (or postgresql://, mysql://, "
            "mssql://) for a database, or databricks."
        )
    if scheme in _DB_SCHEMES or scheme in ("", "file"):
        # Looked for, not imported: the SQL store costs half a second to import, and the
        # shipper process is the one that writes to it.
        if not all(
            _importable(m)
            for m in ("sqlalchemy", "alembic", "mlflow.store.tracking.sqlalchemy_store")
        ):
            raise config.ConfigError(
                f"{named}, a local MLflow store, which needs the full `mlflow` package that "
                "this environment does not have. Either install it with `pip install "
                '"tracewire[local]"`, or point MLFLOW_TRACKING_URI at a tracking server (for '
                "example MLFLOW_TRACKING_URI=http://mlflow.internal:5000)."
            )


def _plugin_schemes() -> set[str]:
    """Schemes that installed MLflow plugins register (the ``mlflow.tracking_store`` entry
    points MLflow's registry loads)."""
    from importlib.metadata import entry_points

    return {entry.name for entry in entry_points(group="mlflow.tracking_store")}


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


def _local_store(uri: str) -> Path | None:
    """The file or folder of a local store (sqlite, or MLflow's file store); None for others."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return Path(os.path.abspath(unquote(parsed.path) if parsed.scheme else uri))
    return sqlite_path(uri)


def is_database(uri: str) -> bool:
    """A database-backed MLflow store, written directly (not through a tracking server)."""
    return urlparse(uri).scheme.split("+")[0] in _DB_SCHEMES


def describe(recorded: str) -> str:
    """A spool's recorded destination in words: the store, and the experiment if one is named."""
    try:
        where = json.loads(recorded)
        uri = where["tracking_uri"]
    except (ValueError, TypeError, KeyError):
        return "an unknown store"
    experiment = where.get("experiment_name") or where.get("experiment_id")
    return f"{uri}" + (f", experiment {experiment!r}" if experiment else "")
