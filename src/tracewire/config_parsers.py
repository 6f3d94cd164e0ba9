"""The parsers of tracewire's settings: each takes the name the user set (an ``autolog()``
argument or a ``TRACEWIRE_*`` variable) and the raw value, and returns the value tracewire uses,
or raises :class:`ConfigError` naming the setting and what was given.

config_settings.py declares every setting with one of these (``Setting.parse``); they run wherever
the settings are read: in the app process at ``autolog()``, in the shipper process, in the CLI.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, cast

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class ConfigError(ValueError):
    """A setting has a value tracewire cannot use; the message names the setting."""

    # Its public home, as tracebacks and ``except`` clauses name it.
    __module__ = "tracewire.config"


def boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def names(name: str, value: Any) -> tuple[str, ...]:
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


def plugins(name: str, value: Any) -> tuple[str, ...]:
    from tracewire.plugins.registry import PLUGINS

    found = names(name, value)
    if unknown := sorted(set(found) - set(PLUGINS)):
        raise ConfigError(
            f"{name} names unknown plugin(s) {unknown}; known plugins: {sorted(PLUGINS)}"
        )
    return found


def hosts(name: str, value: Any) -> tuple[str, ...]:
    """``TRACEWIRE_STREAM_USAGE_HOSTS``: the hosts to ask, ``none`` for none; only exclusions
    (``!host``) mean every other host."""
    entries = names(name, value)
    if entries == ("none",):
        return ()
    for entry in entries:
        host = entry.removeprefix("!")
        if (
            entry == "none"
            or not host
            or "/" in host
            or any(c.isspace() for c in host)
            or (host.rpartition(":")[2].isdigit() and host.count(":") == 1)
        ):
            raise ConfigError(
                f"{name} must list host names without scheme or port (api.example.com, "
                f".example.com for its subdomains, * for every host, !host to skip one, or "
                f"none), got {entry!r}"
            )
    if entries and all(entry.startswith("!") for entry in entries):
        entries = ("*", *entries)
    return entries


def tags(name: str, value: Any) -> dict[str, str]:
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
    headers = tags(name, value)
    if not set(headers) <= {"session", "user"} or not all(
        header and header.isascii() and all(c.isalnum() or c in "-_" for c in header)
        for header in headers.values()
    ):
        raise ConfigError(
            f"{name} maps 'session' and/or 'user' to header names, such as "
            f"session=X-Session-ID,user=X-User-ID; got {value!r}"
        )
    return headers


def _number(name: str, value: Any, kind: type, minimum: float) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{name} must be {'a whole number' if kind is int else 'a number'}, got {value!r}"
        ) from None
    if number < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value!r}")
    return number


def _import_callable(name: str, target: str) -> Callable[..., Any]:
    import importlib

    module, _, attribute = target.partition(":")
    try:
        found = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(
            f"{name} must be 'package.module:function', could not load {target!r}: {exc}"
        ) from None
    if not callable(found):
        raise ConfigError(f"{name}: {target!r} is not a function")
    return cast(Callable[..., Any], found)


def prices(name: str, value: Any) -> dict[str, Any]:
    from tracewire.core import cost

    try:
        return cost.load(value)
    except cost.PriceError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def delta_path(name: str, value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ConfigError(f"{name} must be a folder or an object-store URI, got {value!r}")
    import importlib.util

    if importlib.util.find_spec("deltalake") is None:
        raise ConfigError(
            f"{name} is set, but the Delta sync needs the `deltalake` package: "
            'pip install "tracewire[delta]"'
        )
    return str(value).strip()


def optional_text(name: str, value: Any) -> str:
    return str(value).strip()


def number_in(
    kind: type, minimum: float, maximum: float | None = None, scale: float = 1
) -> Callable[[str, Any], Any]:
    """A parser for a number of ``kind`` within the bounds, times ``scale`` (MB -> bytes)."""

    def parse(name: str, value: Any) -> Any:
        number = _number(name, value, kind, minimum)
        if maximum is not None and number > maximum:
            raise ConfigError(f"{name} must be between {minimum:g} and {maximum:g}, got {value!r}")
        return int(number * scale) if scale != 1 else number

    return parse


def redact(name: str, value: Any) -> Callable[[str, Any], Any]:
    if isinstance(value, str):  # TRACEWIRE_REDACT=package.module:function
        return _import_callable(name, value)
    if not callable(value):
        raise ConfigError(f"{name} must be a function (key, value) -> value, got {value!r}")
    return value  # type: ignore[no-any-return]


def spool_dir(name: str, value: Any) -> Path:
    return Path(str(value)).expanduser()


def feedback_path(name: str, value: Any) -> str:
    if not value.startswith("/") or any(c.isspace() for c in value):
        raise ConfigError(f"{name} must be a URL path such as /feedback, got {value!r}")
    return str(value)


def experiment_id(name: str, value: Any) -> str:
    if not value.isdigit():
        raise ConfigError(f"{name} must be a numeric experiment id, got {value!r}")
    return str(value)
