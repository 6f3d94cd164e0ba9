"""Plugin names -> the modules that implement them (module strings only: nothing is imported
until ``autolog()`` enables a plugin, and a framework that is never imported costs nothing)."""

from __future__ import annotations

PLUGINS: dict[str, str] = {
    "openai": "tracewire.plugins.openai",
    "langchain": "tracewire.plugins.langchain",
    "langgraph": "tracewire.plugins.langgraph",
    "starlette": "tracewire.plugins.starlette",
    "mlflow_agent": "tracewire.plugins.mlflow_agent",
}
