"""One frozen settings object, read from ``autolog()`` arguments and the environment.

Arguments win over ``TRACEWIRE_*`` variables, which mirror every argument. MLflow's own variables
choose the destination (``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_ID``/``_NAME``) and
``ENABLE_MLFLOW_TRACING=false`` turns tracing off, as in MLflow's production-tracing contract.
A value that cannot be used fails here, naming the setting, before anything is patched.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")

# Chat-completion streams to these hosts are asked for `stream_options.include_usage`: every
# host ("*"). A host that rejects the argument is remembered for the process (plugins/openai.py).
DEFAULT_STREAM_USAGE_HOSTS = ("*",)


def default_spool_dir() -> Path:
    """$XDG_CACHE_HOME/tracewire/spool (or ~/.cache/...), else, if home is not writable
    (read-only containers), a directory of this user's own in the temp dir: one level, so that
    the spool's checks (ownership, mode) cover every directory another user could make there."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if os.access(cache, os.W_OK) or (not os.path.exists(cache)
                                     and os.access(os.path.dirname(cache), os.W_OK)):
        return Path(cache) / "tracewire" / "spool"
    return Path(tempfile.gettempdir()) / f"tracewire-{os.geteuid()}"


class ConfigError(ValueError):
    """A setting has a value tracewire cannot use; the message names the setting."""


@dataclass(frozen=True)
class Settings:
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    capture_content: bool = True
    tags: Mapping[str, str] = field(default_factory=dict)
    stream_usage: bool = True
    # "*" every host, "api.example.com" that host, ".example.com" its subdomains, "!host" never
    # that host (wins over the others); () no host at all.
    stream_usage_hosts: tuple[str, ...] = DEFAULT_STREAM_USAGE_HOSTS
    queue_size: int = 10_000
    flush_timeout: float = 2.0
    exit_timeout: float = 30.0
    # A trace still open this long is exported as incomplete (spans.expire).
    trace_timeout: float = 3600.0
    spool_dir: Path = field(default_factory=default_spool_dir)
    spool_max_bytes: int = 512 * 1024 * 1024
    ship_timeout: float = 10.0
    sample_rate: float = 1.0
    feedback_retention: float = 86_400.0
    # Feedback waiting for its trace, per process: past either, the oldest makes room.
    feedback_max_pending: int = 1000
    feedback_max_pending_bytes: int = 1024 * 1024
    # Called as redact(key, value) for span "inputs" and "outputs" before they reach disk.
    redact: Callable[[str, Any], Any] | None = None
    tracking_uri: str | None = None
    experiment_id: str | None = None
    experiment_name: str | None = None
    # Per-token prices by model name that win over MLflow's catalog (core/cost.py).
    prices: Mapping[str, Any] = field(default_factory=dict)
    # Background sync of the experiment's traces into this Delta table, every interval seconds.
    delta_path: str | None = None
    delta_interval: float = 300.0
    # The feedback route of the TracingMiddleware the starlette plugin installs, and the
    # identity headers it trusts ({"session": header, "user": header}; none by default).
    feedback_path: str | None = None
    trust_identity_headers: Mapping[str, str] = field(default_factory=dict)


_active = Settings()


def active() -> Settings:
    """The settings of the last ``autolog()`` call (defaults before any)."""
    return _active


def activate(settings: Settings) -> None:
    global _active
    _active = settings


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value.strip() if value is not None and value.strip() else None


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def _names(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items: Iterable[Any] = value.split(",")
    elif isinstance(value, Iterable):
        items = value
    else:
        raise ConfigError(f"{name} must be a list of names, got {value!r}")
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"{name} must contain names (strings), got {item!r}")
        if item.strip():
            out.append(item.strip().lower())
    return tuple(out)


def _plugins(name: str, value: Any) -> tuple[str, ...]:
    from tracewire.plugins.registry import PLUGINS

    names = _names(name, value)
    if unknown := sorted(set(names) - set(PLUGINS)):
        raise ConfigError(f"{name} names unknown plugin(s) {unknown}; known plugins: "
                          f"{sorted(PLUGINS)}")
    return names


def _hosts(name: str, value: Any) -> tuple[str, ...]:
    """``TRACEWIRE_STREAM_USAGE_HOSTS``: the hosts to ask, ``none`` for none; only exclusions
    (``!host``) mean every other host."""
    entries = _names(name, value)
    if entries == ("none",):
        return ()
    for entry in entries:
        host = entry.removeprefix("!")
        if (entry == "none" or not host or "/" in host or any(c.isspace() for c in host)
                or host.rpartition(":")[2].isdigit() and host.count(":") == 1):
            raise ConfigError(
                f"{name} must list host names without scheme or port (api.example.com, "
                f".example.com for its subdomains, * for every host, !host to skip one, or "
                f"none), got {entry!r}")
    if entries and all(entry.startswith("!") for entry in entries):
        entries = ("*", *entries)
    return entries


def _tags(name: str, value: Any) -> dict[str, str]:
    if isinstance(value, str):  # TRACEWIRE_TAGS="team=search,tier=gold"
        pairs = {}
        for part in value.split(","):
            if not part.strip():
                continue
            key, sep, val = part.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"{name} must look like 'k=v,k2=v2', got {value!r}")
            pairs[key.strip()] = val.strip()
        return pairs
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    raise ConfigError(f"{name} must be a mapping of tag names to values, got {value!r}")


def identity_headers(name: str, value: Any) -> dict[str, str]:
    """Which headers name the session and the user (``session=X-Session-ID,user=X-User-ID``
    or a mapping): only ``session`` and ``user``, each an HTTP header name."""
    headers = _tags(name, value)
    if not set(headers) <= {"session", "user"} or not all(
            header and header.isascii() and all(c.isalnum() or c in "-_" for c in header)
            for header in headers.values()):
        raise ConfigError(f"{name} maps 'session' and/or 'user' to header names, such as "
                          f"session=X-Session-ID,user=X-User-ID; got {value!r}")
    return headers


def _number(name: str, value: Any, kind: type, minimum: float) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be {'a whole number' if kind is int else 'a number'}, "
                          f"got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value!r}")
    return number


def _import_callable(name: str, target: str) -> Callable[..., Any]:
    import importlib

    module, _, attribute = target.partition(":")
    try:
        found = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{name} must be 'package.module:function', could not load "
                          f"{target!r}: {exc}") from None
    if not callable(found):
        raise ConfigError(f"{name}: {target!r} is not a function")
    return found


def _prices(name: str, value: Any) -> dict[str, Any]:
    from tracewire.core import cost

    try:
        return cost.load(value)
    except cost.PriceError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _delta_path(name: str, value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ConfigError(f"{name} must be a folder or an object-store URI, got {value!r}")
    import importlib.util

    if importlib.util.find_spec("deltalake") is None:
        raise ConfigError(f"{name} is set, but the Delta sync needs the `deltalake` package: "
                          "pip install \"tracewire[delta]\"")
    return str(value).strip()


def tracing_enabled() -> bool:
    """MLflow's production switch: ``ENABLE_MLFLOW_TRACING=false`` turns autolog into a no-op."""
    value = _env("ENABLE_MLFLOW_TRACING")
    return True if value is None else _bool("ENABLE_MLFLOW_TRACING", value)


def disable_requested(disable: bool) -> bool:
    """``autolog(disable=True)``, or ``TRACEWIRE_DISABLE=true`` (which mirrors it)."""
    if disable:
        return True
    value = _env("TRACEWIRE_DISABLE")
    return False if value is None else _bool("TRACEWIRE_DISABLE", value)


def resolve(
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    capture_content: bool | None = None,
    tags: Mapping[str, str] | None = None,
    stream_usage: bool | None = None,
    sample_rate: float | None = None,
    redact: Callable[[str, Any], Any] | None = None,
    prices: Mapping[str, Any] | str | None = None,
    delta_path: str | None = None,
    delta_interval: float | None = None,
) -> Settings:
    """Merge arguments over environment variables into validated settings."""

    def pick(arg: Any, env: str) -> tuple[str, Any]:
        # The name reported in an error is the one the user actually set.
        return ("argument " + env.removeprefix("TRACEWIRE_").lower(), arg) if arg is not None else (
            env, _env(env))

    name, value = pick(include, "TRACEWIRE_INCLUDE")
    include_ = _plugins(name, value) if value is not None else None
    name, value = pick(exclude, "TRACEWIRE_EXCLUDE")
    exclude_ = _plugins(name, value) if value is not None else ()
    name, value = pick(capture_content, "TRACEWIRE_CAPTURE_CONTENT")
    capture = _bool(name, value) if value is not None else True
    name, value = pick(stream_usage, "TRACEWIRE_STREAM_USAGE")
    stream_usage_ = _bool(name, value) if value is not None else True

    name, value = pick(sample_rate, "TRACEWIRE_SAMPLE_RATE")
    rate = _number(name, value, float, 0.0) if value is not None else 1.0
    if rate > 1.0:
        raise ConfigError(f"{name} must be between 0 and 1, got {value!r}")

    hosts = DEFAULT_STREAM_USAGE_HOSTS
    if (listed := _env("TRACEWIRE_STREAM_USAGE_HOSTS")) is not None:
        hosts = _hosts("TRACEWIRE_STREAM_USAGE_HOSTS", listed)

    all_tags: dict[str, str] = {}
    for env, key in (("TRACEWIRE_ENVIRONMENT", "deployment.environment"),
                     ("TRACEWIRE_APP_VERSION", "service.version"),
                     ("TRACEWIRE_REGION", "cloud.region")):
        if (val := _env(env)) is not None:
            all_tags[key] = val
    if (env_tags := _env("TRACEWIRE_TAGS")) is not None:
        all_tags.update(_tags("TRACEWIRE_TAGS", env_tags))
    if tags is not None:
        all_tags.update(_tags("argument tags", tags))

    queue_size = _number("TRACEWIRE_QUEUE_SIZE", _env("TRACEWIRE_QUEUE_SIZE") or 10_000, int, 1)
    flush_timeout = _number("TRACEWIRE_FLUSH_TIMEOUT", _env("TRACEWIRE_FLUSH_TIMEOUT") or 2.0,
                            float, 0)
    exit_timeout = _number("TRACEWIRE_EXIT_TIMEOUT", _env("TRACEWIRE_EXIT_TIMEOUT") or 30.0,
                           float, 0)
    trace_timeout = _number("TRACEWIRE_TRACE_TIMEOUT", _env("TRACEWIRE_TRACE_TIMEOUT") or 3600.0,
                            float, 1.0)

    spool_dir = Path(_env("TRACEWIRE_SPOOL_DIR") or default_spool_dir()).expanduser()
    spool_mb = _number("TRACEWIRE_SPOOL_MAX_MB", _env("TRACEWIRE_SPOOL_MAX_MB") or 512, float, 0.001)
    ship_timeout = _number("TRACEWIRE_SHIP_TIMEOUT", _env("TRACEWIRE_SHIP_TIMEOUT") or 10.0,
                           float, 0.1)

    if redact is None and (target := _env("TRACEWIRE_REDACT")) is not None:
        redact = _import_callable("TRACEWIRE_REDACT", target)
    if redact is not None and not callable(redact):
        raise ConfigError(f"argument redact must be a function (key, value) -> value, got {redact!r}")

    feedback_retention = _number("TRACEWIRE_FEEDBACK_RETENTION",
                                 _env("TRACEWIRE_FEEDBACK_RETENTION") or 86_400.0, float, 0)
    feedback_max_pending = _number("TRACEWIRE_FEEDBACK_MAX_PENDING",
                                   _env("TRACEWIRE_FEEDBACK_MAX_PENDING") or 1000, int, 1)
    feedback_pending_mb = _number("TRACEWIRE_FEEDBACK_MAX_PENDING_MB",
                                  _env("TRACEWIRE_FEEDBACK_MAX_PENDING_MB") or 1, float, 0.001)

    name, value = pick(prices, "TRACEWIRE_PRICES")
    prices_ = _prices(name, value) if value is not None else {}
    name, value = pick(delta_path, "TRACEWIRE_DELTA_PATH")
    delta_path_ = _delta_path(name, value) if value is not None else None
    name, value = pick(delta_interval, "TRACEWIRE_DELTA_INTERVAL")
    delta_interval_ = _number(name, value, float, 1.0) if value is not None else 300.0

    feedback_path = _env("TRACEWIRE_FEEDBACK_PATH")
    if feedback_path is not None and (not feedback_path.startswith("/") or any(
            c.isspace() for c in feedback_path)):
        raise ConfigError(f"TRACEWIRE_FEEDBACK_PATH must be a URL path such as /feedback, got "
                          f"{feedback_path!r}")

    trusted = _env("TRACEWIRE_TRUST_IDENTITY_HEADERS")
    trust_identity_headers = identity_headers("TRACEWIRE_TRUST_IDENTITY_HEADERS", trusted) \
        if trusted is not None else {}

    experiment_id = _env("MLFLOW_EXPERIMENT_ID")
    if experiment_id is not None and not experiment_id.isdigit():
        raise ConfigError(f"MLFLOW_EXPERIMENT_ID must be a numeric experiment id, got {experiment_id!r}")

    return Settings(
        include=include_,
        exclude=exclude_,
        capture_content=capture,
        tags=all_tags,
        stream_usage=stream_usage_,
        stream_usage_hosts=hosts,
        queue_size=queue_size,
        flush_timeout=flush_timeout,
        exit_timeout=exit_timeout,
        trace_timeout=trace_timeout,
        spool_dir=spool_dir,
        spool_max_bytes=int(spool_mb * 1024 * 1024),
        ship_timeout=ship_timeout,
        sample_rate=rate,
        feedback_retention=feedback_retention,
        feedback_max_pending=feedback_max_pending,
        feedback_max_pending_bytes=int(feedback_pending_mb * 1024 * 1024),
        redact=redact,
        tracking_uri=_env("MLFLOW_TRACKING_URI"),
        experiment_id=experiment_id,
        experiment_name=_env("MLFLOW_EXPERIMENT_NAME"),
        prices=prices_,
        delta_path=delta_path_,
        delta_interval=delta_interval_,
        feedback_path=feedback_path,
        trust_identity_headers=trust_identity_headers,
    )
