"""LangGraph plugin: what LangChain's callbacks do not carry to the graph run's span.

The graph and node spans themselves come from the LangChain plugin (LangGraph reports every
graph run and node execution through LangChain callbacks). This plugin wraps the two functions
LangGraph uses to build a graph run's lifecycle callback manager, called once per graph run with
its full config and run id, to add:

- the session and user: ``configurable.thread_id`` and ``configurable.user_id`` of the run
  become the trace's ``mlflow.trace.session`` / ``mlflow.trace.user`` unless the app named
  them for the request (what a client claimed, in headers or a served agent's request, yields);
- interrupts and resumes, through LangGraph's own ``on_interrupt`` / ``on_resume`` callbacks.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any
from uuid import UUID

from tracewire import config
from tracewire.core import attributes as keys
from tracewire.core import context as request_context
from tracewire.core import guard, spans
from tracewire.plugins import registry
from tracewire.plugins.base import WrappingPlugin, after_call
from tracewire.plugins.langchain import LangChainPlugin

_MODULE = "langgraph.pregel.main"
_FACTORIES = (
    "get_sync_graph_callback_manager_for_config",
    "get_async_graph_callback_manager_for_config",
)


class _RunContext:
    """The request context one graph run's trace reads when it ends: the request's own values,
    with the run's thread and user filling in what the request leaves open. A view, not a copy,
    so ``set_user()`` later in the request still lands; per trace, so concurrent runs with
    different threads in one request never share a session."""

    __slots__ = ("base", "thread", "user")

    def __init__(
        self, base: request_context.RequestContext | None, thread: str | None, user: str | None
    ) -> None:
        self.base = base
        self.thread = thread
        self.user = user

    @property
    def request_id(self) -> str | None:
        return self.base.request_id if self.base is not None else None

    @property
    def session_id(self) -> str | None:
        base = self.base
        if base is not None and base.session_id and base.session_id != base.claimed_session:
            return base.session_id  # the app's own
        return self.thread or (base.session_id if base is not None else None)

    @property
    def user_id(self) -> str | None:
        base = self.base
        if base is not None and base.user_id and base.user_id != base.claimed_user:
            return base.user_id
        return self.user or (base.user_id if base is not None else None)

    @property
    def tags(self) -> dict[str, str]:
        return self.base.tags if self.base is not None else {}


def _id(value: Any, limit: int) -> str | None:
    if isinstance(value, (int, UUID)) and not isinstance(value, bool):
        value = str(value)
    return request_context.valid_id(value, limit)


def _graph_span(run_id: Any) -> spans.Span | None:
    """The graph run's span, which the LangChain plugin made from its callbacks."""
    langchain = registry.get("langchain")
    return langchain.span_of(run_id) if isinstance(langchain, LangChainPlugin) else None


def _attach(
    manager: Any, args: tuple[Any, ...], kwargs: dict[str, Any], lifecycle_handler: Any
) -> None:
    """Session and user from the run's config; our lifecycle handler on its manager."""
    run_config = args[0] if args else kwargs.get("config")
    span = _graph_span(kwargs.get("run_id"))
    if span is None:
        return
    configurable = (run_config or {}).get("configurable") or {}
    trace = span.trace
    if not isinstance(trace.request, _RunContext):  # a subgraph's trace already has its view
        thread = _id(configurable.get("thread_id"), request_context.MAX_SESSION_ID)
        user = _id(configurable.get("user_id"), request_context.MAX_USER_ID)
        if thread is not None or user is not None:
            trace.request = _RunContext(trace.request, thread, user)  # type: ignore[assignment]
    if lifecycle_handler is not None:
        manager.add_handler(lifecycle_handler, False)


def _on_interrupt(event: Any) -> None:
    span = _graph_span(event.run_id)
    if span is None:
        return
    interrupt: dict[str, Any] = {"status": event.status, "checkpoint_id": event.checkpoint_id}
    if config.active().capture_content:
        interrupt["values"] = [getattr(i, "value", None) for i in event.interrupts]
    else:
        interrupt["count"] = len(event.interrupts)
    span.attributes[keys.LANGGRAPH_INTERRUPT] = interrupt


def _on_resume(event: Any) -> None:
    span = _graph_span(event.run_id)
    if span is not None:
        span.attributes[keys.LANGGRAPH_RESUMED_FROM] = event.checkpoint_id


def _make_lifecycle_handler() -> Any:
    from langgraph.callbacks import GraphCallbackHandler

    class TracewireGraphHandler(GraphCallbackHandler):
        run_inline = True
        raise_error = guard.TESTING

        def on_interrupt(self, event: Any) -> None:
            guard.call(_on_interrupt, event)

        def on_resume(self, event: Any) -> None:
            guard.call(_on_resume, event)

    return TracewireGraphHandler()


class LangGraphPlugin(WrappingPlugin):
    name = "langgraph"
    module = "langgraph.pregel"  # `langgraph` itself is a namespace package: no import hook fires
    distribution = "langgraph"
    extra = "langgraph"
    supported = ("1.0", "2")

    def __init__(self) -> None:
        super().__init__()
        self._handler: Any = None

    def targets(self) -> list[tuple[Any, str, Callable[..., Any]]]:
        module = importlib.import_module(_MODULE)
        wrapper = after_call(self._on_manager)
        return [(module, name, wrapper) for name in _FACTORIES if name in vars(module)]

    def _on_manager(self, manager: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._handler is None:
            self._handler = guard.call(_make_lifecycle_handler)
        _attach(manager, args, kwargs, self._handler)
