"""Plugin names -> the classes that implement them, as ``module:Class`` strings: nothing is
imported until ``autolog()`` enables a plugin, and a framework that is never imported costs
nothing. One instance per plugin for the life of the process (its hooks cannot be removed)."""

from __future__ import annotations

import importlib
import threading

from tracewire.plugins.base import Plugin

PLUGINS: dict[str, str] = {
    "openai": "tracewire.plugins.openai:OpenAIPlugin",
    "langchain": "tracewire.plugins.langchain:LangChainPlugin",
    "langgraph": "tracewire.plugins.langgraph:LangGraphPlugin",
    "starlette": "tracewire.plugins.starlette:StarlettePlugin",
    "mlflow_agent": "tracewire.plugins.mlflow_agent:MlflowAgentPlugin",
}

_instances: dict[str, Plugin] = {}
_lock = threading.Lock()


def get(name: str) -> Plugin:
    """The process's instance of the plugin registered as ``name``."""
    with _lock:
        plugin = _instances.get(name)
        if plugin is None:
            module, _, cls = PLUGINS[name].partition(":")
            plugin = _instances[name] = getattr(importlib.import_module(module), cls)()
        return plugin
