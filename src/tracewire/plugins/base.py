"""The contract every plugin implements, and the patch-once / unpatch-exactly mechanics.

A plugin patches its framework from a wrapt post-import hook, so import order does not matter.
wrapt cannot unregister a hook, so each plugin registers its hook once and the hook does nothing
while the plugin is disabled. Our wrappers are marked (:class:`TracewireWrapper`); ``wrap`` never
wraps twice and ``unwrap`` removes only ours. If someone else wrapped on top of ours, our wrapper
stays in their chain but passes straight through while the plugin is disabled.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import sys
import threading
from types import ModuleType
from typing import Any, Callable

import wrapt

from tracewire.core import guard

logger = logging.getLogger("tracewire")


class PluginUnavailable(ImportError):
    """The plugin's framework is not installed (or not in the supported version range)."""


class TracewireWrapper(wrapt.FunctionWrapper):
    """A wrapt wrapper that is recognisably ours."""


def wrap(owner: Any, name: str, wrapper: Callable[..., Any]) -> None:
    current = vars(owner).get(name)
    if current is None or isinstance(current, TracewireWrapper):
        return
    setattr(owner, name, TracewireWrapper(current, wrapper))


def unwrap(owner: Any, name: str) -> None:
    current = vars(owner).get(name)
    if isinstance(current, TracewireWrapper):
        setattr(owner, name, current.__wrapped__)


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


class Plugin:
    """Subclasses set the class attributes and list what they wrap in ``targets``; a plugin
    that hooks its framework differently overrides ``patch`` / ``unpatch`` too."""

    name: str                       # registry name, used in include= / exclude=
    module: str                     # importing this module triggers patching
    distribution: str               # the pip distribution whose version is checked
    extra: str                      # `pip install "tracewire[<extra>]"`
    supported: tuple[str, str]      # versions [minimum, maximum)
    # MLflow's autolog flavor covering the same calls: kept off while this plugin is on.
    mlflow_flavor: str | None = None

    def __init__(self) -> None:
        self.enabled = False
        self.patched = False
        self._hooked = False
        self._claimed = False
        self._lock = threading.RLock()

    def targets(self) -> list[tuple[Any, str, Callable[..., Any]]]:
        """(owner, attribute name, wrapper) for everything this plugin wraps."""
        raise NotImplementedError

    def patch(self) -> None:
        for owner, name, wrapper in self.targets():
            wrap(owner, name, wrapper)

    def unpatch(self) -> None:
        for owner, name, _ in self.targets():
            unwrap(owner, name)

    def _claim_mlflow_flavor(self) -> None:
        """Trace each call once: switch ``mlflow.<flavor>.autolog()`` off now, and again
        right after any later call of it enables it."""
        from tracewire.export import hooks

        flavor = self.mlflow_flavor
        hooks.take_over_mlflow_autolog(flavor)
        if self._claimed:
            return
        self._claimed = True

        def after_autolog(wrapped: Callable[..., Any], instance: Any, args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> Any:
            result = wrapped(*args, **kwargs)
            if self.enabled:
                guard.call(hooks.take_over_mlflow_autolog, flavor)
            return result

        wrapt.register_post_import_hook(lambda module: wrap(module, "autolog", after_autolog),
                                        f"mlflow.{flavor}")

    def installed_version(self) -> str:
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise PluginUnavailable(
                f"tracewire plugin {self.name!r} needs {self.distribution}, which is not "
                f"installed: pip install \"tracewire[{self.extra}]\"") from None

    def check_version(self) -> bool:
        version = self.installed_version()
        low, high = self.supported
        if not _version_tuple(low) <= _version_tuple(version) < _version_tuple(high):
            logger.warning("tracewire: %s %s is outside the supported range [%s, %s); "
                           "the %s plugin is skipped", self.distribution, version, low, high,
                           self.name)
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
