"""tracewire: production tracing for GenAI apps on MLflow.

import tracewire
tracewire.autolog()   # every installed framework, idempotent
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tracewire import middleware  # tracewire.middleware.TracingMiddleware
from tracewire.config import ConfigError
from tracewire.core import scrub
from tracewire.core.context import context, propagate, set_session, set_tags, set_user
from tracewire.plugins import registry
from tracewire.plugins.base import Plugin, PluginUnavailable

__all__ = [
    "ConfigError",
    "PluginUnavailable",
    "autolog",
    "context",
    "disable",
    "flush",
    "log_feedback",
    "middleware",
    "propagate",
    "set_session",
    "set_tags",
    "set_user",
]

logger = logging.getLogger("tracewire")
logger.addFilter(scrub.LogFilter())  # every process of ours imports this package first

_lock = threading.Lock()
_enabled: dict[str, Plugin] = {}
_atexit_registered = False
_delta_started = False  # the Delta module is imported only once a sync was asked for


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a submodule ("langgraph.pregel") whose package is missing
        return False


def _selected(include: tuple[str, ...] | None, exclude: tuple[str, ...]) -> list[Plugin]:
    selected = []
    for name in include if include is not None else tuple(registry.PLUGINS):
        if name in exclude:
            continue
        plugin = registry.get(name)
        if include is not None:
            plugin.installed_version()  # asked for by name: a missing framework is an error
        elif not _installed(plugin.module):
            continue  # not installed and not asked for: skipped silently
        selected.append(plugin)
    return selected


def autolog(
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    capture_content: bool | None = None,
    tags: Mapping[str, str] | None = None,
    disable: bool = False,
    stream_usage: bool | None = None,
    sample_rate: float | None = None,
    redact: Callable[[str, Any], Any] | None = None,
    prices: Mapping[str, Any] | str | None = None,
    delta_path: str | None = None,
    delta_interval: float | None = None,
) -> None:
    """Trace every installed framework into MLflow. Safe to call again; ``disable=True`` undoes it.

    Each argument is a setting (the settings table of the docs, declared in
    ``config_settings.SETTINGS``): left as ``None`` it comes from its ``TRACEWIRE_*`` variable,
    then its default.
    ``ENABLE_MLFLOW_TRACING=false`` makes this a no-op. Invalid settings raise
    :class:`ConfigError` naming what was set; naming a plugin in ``include`` whose framework is
    missing raises :class:`PluginUnavailable`.
    """
    # Every parameter but disable is a setting declared in config_settings.SETTINGS (a test
    # checks it).
    settings_given = {name: value for name, value in locals().items() if name != "disable"}
    from tracewire import config

    if config.disable_requested(disable):
        _disable()
        return

    if not config.tracing_enabled():
        logger.info("tracewire: ENABLE_MLFLOW_TRACING is false, autolog() does nothing")
        return
    settings = config.resolve(**settings_given)
    plugins = _selected(settings.include, settings.exclude)

    from tracewire.export import destination, pipeline

    destination.check_destination(settings)
    global _atexit_registered, _delta_started
    with _lock:
        config.activate(settings)
        pipeline.start(settings)
        wanted = {p.name: p for p in plugins}
        for name in list(_enabled):
            if name not in wanted:
                _enabled.pop(name).disable()
        for name, plugin in wanted.items():
            plugin.enable()
            _enabled[name] = plugin
        if settings.delta_path is not None or _delta_started:
            _delta_started = True
            from tracewire.export import delta

            delta.start_background(settings)
        if not _atexit_registered:
            _atexit_registered = True
            atexit.register(_at_exit)
            _flush_on_sigterm()


def _disable() -> None:
    """Restore every patched function exactly and stop exporting (pending traces are flushed
    within the flush timeout)."""
    from tracewire import config

    with _lock:
        for plugin in _enabled.values():
            plugin.disable()
        _enabled.clear()
        from tracewire.export import pipeline

        pipeline.stop()
        if _delta_started:
            from tracewire.export import delta

            delta.stop_background(config.active().flush_timeout)


disable = _disable


def flush(timeout: float | None = None) -> bool:
    """Wait until every finished trace is in the tracking store; for serverless handlers and
    scripts that must see their traces before going on.

    Without ``timeout`` it waits while the store makes progress (at most
    ``TRACEWIRE_EXIT_TIMEOUT``, 30 s) and returns False once the store has made none for
    ``TRACEWIRE_FLUSH_TIMEOUT`` (2 s: down, hung or refusing); with ``timeout``, it waits up to
    that many seconds. False means some traces are still on their way: they stay in the
    on-disk spool and are shipped later."""
    from tracewire.export import pipeline

    return pipeline.flush(timeout)


def log_feedback(
    *,
    request_id: str | None = None,
    trace_id: str | None = None,
    name: str = "feedback",
    value: bool | int | float | str,
    rationale: str | None = None,
    user: str | None = None,
) -> bool:
    """Record feedback (thumbs up/down, a score, a comment) on the trace of a request
    (``request_id``, as echoed to the client) or on a trace id.

    Never blocks: it goes through the export pipeline and waits in the on-disk spool until its
    trace is in the store (so it survives restarts), for ``TRACEWIRE_FEEDBACK_RETENTION``
    seconds (default a day); after that it is dropped and counted. Raises ``ValueError`` for
    malformed feedback (a value that is not a bool, a finite number or a string, among others);
    returns False if tracewire is not enabled.
    """
    import time

    from tracewire import config
    from tracewire.core.feedback import Feedback
    from tracewire.export import pipeline

    return pipeline.submit_feedback(
        Feedback(
            name=name,
            value=value,
            request_id=request_id,
            trace_id=trace_id,
            rationale=rationale,
            source_id=user,
            expires=time.time() + config.active().feedback_retention,
        )
    )


def _at_exit() -> None:
    from tracewire.export import pipeline

    pipeline.at_exit()


def _flush_on_sigterm() -> None:
    """SIGTERM (a container stopping) ends Python without running exit handlers, and servers
    that handle it (uvicorn) put the previous handler back and raise it again when they are
    done: traces still in memory would be lost. Only if nothing handles SIGTERM yet, tracewire
    does: the same bounded flush as a normal exit, then the process dies of the signal as
    before."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        return

    def flush_then_die(signum: int, frame: Any) -> None:
        from tracewire import config
        from tracewire.export import pipeline

        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
        if pipeline.interrupted_inside():  # an exit or disable() already flushing: finish it
            pipeline.die_when_free(signum)
            return
        # On a thread of its own: the code this signal interrupted may hold a lock the flush
        # needs, and then the join's bound, not a deadlock, ends the wait.
        flusher = threading.Thread(target=_at_exit, name="tracewire-sigterm", daemon=True)
        flusher.start()
        flusher.join(config.active().exit_timeout + 1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, flush_then_die)
