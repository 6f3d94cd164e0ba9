"""The frozen settings object of one ``autolog()`` call, read from its arguments and the
environment by the declarations of config_settings.py (``SETTINGS``), and the active one.

Arguments win over ``TRACEWIRE_*`` variables. MLflow's own variables choose the destination
(``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_ID``/``_NAME``) and ``ENABLE_MLFLOW_TRACING=false``
turns tracing off, as in MLflow's production-tracing contract. A value that cannot be used fails
here, naming what the user set, before anything is patched. Read in the app process, the
shipper process and the CLI alike.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The public path of both is here, with the settings they serve.
from tracewire.config_parsers import ConfigError as ConfigError
from tracewire.config_parsers import identity_headers as identity_headers
from tracewire.config_settings import SETTINGS, Setting


@dataclass(frozen=True)
class Settings:
    """The settings of one ``autolog()`` call; each field is declared in config_settings.SETTINGS."""

    include: tuple[str, ...] | None
    exclude: tuple[str, ...]
    capture_content: bool
    tags: Mapping[str, str]
    redact: Callable[[str, Any], Any] | None
    stream_usage: bool
    # "*" every host, "api.example.com" that host, ".example.com" its subdomains, "!host" never
    # that host (wins over the others); () no host at all.
    stream_usage_hosts: tuple[str, ...]
    environment: str | None
    app_version: str | None
    region: str | None
    sample_rate: float
    queue_size: int
    spool_dir: Path
    spool_max_bytes: int
    feedback_retention: float
    feedback_max_pending: int
    feedback_max_pending_bytes: int
    feedback_path: str | None
    # The identity headers the starlette plugin's middleware trusts: {"session": header,
    # "user": header}.
    trust_identity_headers: Mapping[str, str]
    session_cookie_key: str | None
    prices: Mapping[str, Any]
    delta_path: str | None
    delta_interval: float
    ship_timeout: float
    flush_timeout: float
    exit_timeout: float
    trace_timeout: float
    tracking_uri: str | None
    experiment_id: str | None
    experiment_name: str | None

    @property
    def trace_tags(self) -> dict[str, str]:
        """The tags every trace gets: the deployment's, then ``tags``."""
        deployment = {
            "deployment.environment": self.environment,
            "service.version": self.app_version,
            "cloud.region": self.region,
        }
        return {**{k: v for k, v in deployment.items() if v is not None}, **self.tags}


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value.strip() if value is not None and value.strip() else None


ARGUMENTS = tuple(s.field for s in SETTINGS if s.argument and not s.switch)
_BY_ENV = {s.env: s for s in SETTINGS}


def _read(setting: Setting, arguments: Mapping[str, Any]) -> Any:
    """The setting's value: the argument, else the variable, else the default (for a setting
    that merges, the argument over the variable)."""
    given = arguments.get(setting.field) if setting.argument else None
    from_arg = setting.parse(f"argument {setting.field}", given) if given is not None else None
    if from_arg is not None and setting.merge is None:
        return from_arg  # the variable is not even read: it may be stale or wrong
    env = _env(setting.env)
    from_env = setting.parse(setting.env, env) if env is not None else None
    if from_arg is not None:
        merge = setting.merge
        return merge(from_env, from_arg) if merge is not None and from_env is not None else from_arg
    if from_env is not None:
        return from_env
    return setting.default() if callable(setting.default) else setting.default


def resolve(**arguments: Any) -> Settings:
    """Merge ``autolog()`` arguments over environment variables into validated settings."""
    if unknown := sorted(set(arguments) - set(ARGUMENTS)):
        raise TypeError(f"unknown setting(s) {unknown}; the arguments are {list(ARGUMENTS)}")
    return Settings(**{s.field: _read(s, arguments) for s in SETTINGS if not s.switch})


def from_environment(env: str) -> Any:
    """One declared setting as the environment sets it (or its default), for code that runs
    before or without ``autolog()`` (the middleware, built with the app)."""
    return _read(_BY_ENV[env], {})


def tracing_enabled() -> bool:
    """MLflow's production switch: ``ENABLE_MLFLOW_TRACING=false`` turns autolog into a no-op."""
    return bool(from_environment("ENABLE_MLFLOW_TRACING"))


def disable_requested(disable: bool) -> bool:
    """``autolog(disable=True)``, or ``TRACEWIRE_DISABLE=true`` (which mirrors it)."""
    return disable or bool(from_environment("TRACEWIRE_DISABLE"))


def defaults() -> Settings:
    """Every setting at its default, whatever the environment says."""
    return Settings(
        **{
            s.field: s.default() if callable(s.default) else s.default
            for s in SETTINGS
            if not s.switch
        }
    )


_active = defaults()


def active() -> Settings:
    """The settings of the last ``autolog()`` call (defaults before any)."""
    return _active


def activate(settings: Settings) -> None:
    global _active
    _active = settings
