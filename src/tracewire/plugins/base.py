"""The two kinds of plugin, and the patch-once / unpatch-exactly mechanics.

A plugin patches its framework from a wrapt post-import hook, so import order does not matter.
wrapt cannot unregister a hook, so each plugin registers its hook once and the hook does nothing
while the plugin is disabled. There are two kinds:

- :class:`WrappingPlugin` wraps functions (``targets()``). Our wrappers are marked
  (:class:`TracewireWrapper`) and pass straight through while the plugin is disabled; ``wrap``
  never wraps twice and ``unwrap`` removes only ours, so if someone else wrapped on top of ours,
  ours stays in their chain, passing through.
- :class:`HookPlugin` registers a hook the framework calls (``register()``), once for the
  process (frameworks offer no way to remove one); the hook must do nothing while disabled.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import wrapt

from tracewire.core import guard

logger = logging.getLogger("tracewire")


class PluginUnavailable(ImportError):
    """The plugin's framework is not installed (or not in the supported version range)."""


class TracewireWrapper(wrapt.FunctionWrapper):  # type: ignore[type-arg]
    """A wrapt wrapper that is recognisably ours."""


def wrap(owner: Any, name: str, wrapper: Callable[..., Any]) -> None:
    current = vars(owner).get(name)
    if current is None or isinstance(current, TracewireWrapper):
        return
    setattr(owner, name, TracewireWrapper(current, wrapper))


def after_call(
    step: Callable[[Any, tuple[Any, ...], dict[str, Any]], object],
) -> Callable[..., Any]:
    """A wrapper that returns what the original returns, after ``step(result, args, kwargs)``
    (guarded): for a plugin that only reads or adds to what a call made."""

    def wrapper(
        wrapped: Callable[..., Any],
        instance: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        result = wrapped(*args, **kwargs)
        guard.call(step, result, args, kwargs)
        return result

    return wrapper


def unwrap(owner: Any, name: str) -> None:
    current = vars(owner).get(name)
    if isinstance(current, TracewireWrapper):
        setattr(owner, name, current.__wrapped__)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


class Plugin:
    """What every plugin declares, and how it is enabled and disabled. Subclass
    :class:`WrappingPlugin` or :class:`HookPlugin`, not this."""

    name: str  # registry name, used in include= / exclude=
    module: str  # importing this module triggers patching
    distribution: str  # the pip distribution whose version is checked
    extra: str  # `pip install "tracewire[<extra>]"`
    supported: tuple[str, str]  # versions [minimum, maximum)
    # MLflow's autolog flavor covering the same calls: kept off while this plugin is on.
    mlflow_flavor: str | None = None

    def __init__(self) -> None:
        self.enabled = False
        self.patched = False
        self._hooked = False
        self._claimed = False
        self._lock = threading.RLock()

    def patch(self) -> None:
        raise NotImplementedError

    def unpatch(self) -> None:
        raise NotImplementedError

    def attached(self) -> bool:
        """Whether the framework calls into this plugin now (its wrappers or hook in place)."""
        raise NotImplementedError

    def _claim_mlflow_flavor(self) -> None:
        """Trace each call once: switch ``mlflow.<flavor>.autolog()`` off now, and again
        right after any later call of it enables it."""
        flavor = self.mlflow_flavor
        assert flavor is not None
        take_over_mlflow_autolog(flavor)
        if self._claimed:
            return
        self._claimed = True

        def take_over_again(_result: Any, *_: Any) -> None:
            if self.enabled:
                take_over_mlflow_autolog(flavor)

        wrapt.register_post_import_hook(
            lambda module: wrap(module, "autolog", after_call(take_over_again)), f"mlflow.{flavor}"
        )

    def installed_version(self) -> str:
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise PluginUnavailable(
                f"tracewire plugin {self.name!r} needs {self.distribution}, which is not "
                f'installed: pip install "tracewire[{self.extra}]"'
            ) from None

    def check_version(self) -> bool:
        version = self.installed_version()
        low, high = self.supported
        if not _version_tuple(low) <= _version_tuple(version) < _version_tuple(high):
            logger.warning(
                "tracewire: %s %s is outside the supported range [%s, %s); "
                "the %s plugin is skipped",
                self.distribution,
                version,
                low,
                high,
                self.name,
            )
            return False
        return True

    def enable(self) -> None:
        with self._lock:
            self.enabled = True
            if not self._hooked:
                self._hooked = True
                # Runs now if the framework is already imported, else at its first import.
                wrapt.register_post_import_hook(self._on_import, self.module)
            elif self.module in sys.modules:
                self._on_import(sys.modules[self.module])

    def disable(self) -> None:
        with self._lock:
            self.enabled = False
            if self.patched:
                self.patched = False
                guard.call(self.unpatch)

    def _on_import(self, module: ModuleType) -> None:
        with self._lock:
            if not self.enabled or self.patched:
                return
            if not guard.call(self.check_version):
                return
            self.patched = True
            guard.call(self.patch)
            if self.mlflow_flavor:
                guard.call(self._claim_mlflow_flavor)


class WrappingPlugin(Plugin):
    """A plugin that wraps functions: ``targets()`` lists them, each wrapper is called as
    ``wrapper(wrapped, instance, args, kwargs)`` (wrapt's signature) only while the plugin is
    enabled."""

    def targets(self) -> list[tuple[Any, str, Callable[..., Any]]]:
        """(owner, attribute name, wrapper) for everything this plugin wraps."""
        raise NotImplementedError

    def patch(self) -> None:
        for owner, name, wrapper in self.targets():
            wrap(owner, name, self._while_enabled(wrapper))

    def unpatch(self) -> None:
        for owner, name, _ in self.targets():
            unwrap(owner, name)

    def attached(self) -> bool:
        targets = self.targets()
        return bool(targets) and all(
            isinstance(vars(owner).get(name), TracewireWrapper) for owner, name, _ in targets
        )

    def _while_enabled(self, wrapper: Callable[..., Any]) -> Callable[..., Any]:
        def call(
            wrapped: Callable[..., Any],
            instance: Any,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
        ) -> Any:
            if not self.enabled:  # a wrapper someone else's wraps on top of keeps us in
                return wrapped(*args, **kwargs)
            return wrapper(wrapped, instance, args, kwargs)

        return call


class HookPlugin(Plugin):
    """A plugin that registers a hook its framework calls; the hook stays registered for the
    life of the process and does nothing while the plugin is disabled."""

    def register(self) -> None:
        """Register the hook with the framework (called once per process)."""
        raise NotImplementedError

    def registered(self) -> int:
        """How many hooks of ours the framework holds (one at most, ever)."""
        raise NotImplementedError

    def patch(self) -> None:
        if not self.registered():
            self.register()

    def unpatch(self) -> None:
        """Nothing to undo: the hook does nothing while the plugin is disabled."""

    def attached(self) -> bool:
        return self.enabled and self.registered() == 1


def take_over_mlflow_autolog(flavor: str) -> None:
    """Switch MLflow's own autologging for ``flavor`` off: tracewire traces those calls, and
    MLflow's patch checks this flag on every call, so the same call is not traced twice."""
    try:
        from mlflow.utils.autologging_utils import AUTOLOGGING_INTEGRATIONS
    except ImportError:
        return
    config = AUTOLOGGING_INTEGRATIONS.get(flavor)
    if config is not None and not config.get("disable", True):
        config["disable"] = True
        logger.warning(
            "tracewire: mlflow.%s.autolog() is active too; tracewire traces these "
            "calls, so MLflow's %s autologging is switched off to avoid tracing each "
            "call twice",
            flavor,
            flavor,
        )
