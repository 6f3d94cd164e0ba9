"""LangChain plugin: every chain, runnable, chat model, LLM, tool and retriever run is a span;
LangGraph graph runs and node executions too (their structure comes from the callback metadata
LangGraph sets: ``langgraph_node``, ``langgraph_step``, ``langgraph_triggers``).

One callback handler is injected into every LangChain callback manager through
``register_configure_hook``. LangChain has no way to unregister a hook, so it is registered once,
with a switch in place of the ContextVar the hook reads: it hands out our handler while the
plugin is enabled and nothing while it is disabled, so a disabled tracewire adds no handler to
any new callback manager. A run that started while enabled still ends its span; managers made
while enabled keep the handler, which starts no span while disabled.

This module holds the handler (LangChain's callbacks -> runs) and the plugin. Where a run's span
goes and how it ends is :mod:`~tracewire.plugins.langchain_runs`; what a span records of a run
(name, attributes, inputs, outputs, usage) is taken from LangChain's arguments by
:mod:`~tracewire.plugins.langchain_extract`.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from tracewire import config
from tracewire.core import attributes as keys
from tracewire.core import guard, spans
from tracewire.core.attributes import SpanType
from tracewire.plugins import langchain_extract as extract
from tracewire.plugins.base import HookPlugin
from tracewire.plugins.langchain_runs import Runs


class _Handler:
    """LangChain's callbacks -> runs. Each callback is one guarded step. LangChain passes every
    callback the run's ``run_id`` and a start callback also ``parent_run_id``, ``tags`` and
    ``metadata``, all by keyword: a start callback keeps them in ``kwargs`` with the rest."""

    # The handler runs in the caller's context: a run's span is current for what runs inside it.
    run_inline = True
    # Under TRACEWIRE_TESTING our failures must reach the test, not LangChain's warning log.
    raise_error = guard.TESTING

    def __init__(self, plugin: LangChainPlugin) -> None:
        self._plugin = plugin
        self.runs = Runs()

    def _start(
        self,
        kwargs: dict[str, Any],
        name: str,
        span_type: str,
        inputs: Any,
        attributes: dict[str, Any],
    ) -> None:
        self.runs.start(
            kwargs["run_id"], kwargs.get("parent_run_id"), name, span_type, inputs, attributes
        )

    # ---- chains, runnables, graph nodes

    def on_chain_start(self, serialized: Any, inputs: Any, **kwargs: Any) -> None:
        if self._plugin.enabled:
            guard.call(self._chain_start, serialized, inputs, kwargs)

    def _chain_start(self, serialized: Any, inputs: Any, kwargs: dict[str, Any]) -> None:
        name = extract.run_name(serialized, kwargs, "chain")
        attributes = extract.graph_attributes(kwargs.get("metadata"), name, kwargs.get("tags"))
        capture = config.active().capture_content
        self._start(
            kwargs,
            name,
            SpanType.CHAIN,
            extract.shallow_copy(inputs) if capture else None,
            attributes or {},
        )

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        guard.call(self._chain_end, outputs, run_id)

    def _chain_end(self, outputs: Any, run_id: UUID) -> None:
        capture = config.active().capture_content
        self.runs.end(run_id, extract.shallow_copy(outputs) if capture else None)

    # ---- chat models and LLMs

    def on_chat_model_start(
        self, serialized: Any, messages: list[list[Any]], **kwargs: Any
    ) -> None:
        if self._plugin.enabled:
            guard.call(self._model_start, SpanType.CHAT_MODEL, serialized, messages, kwargs)

    def on_llm_start(self, serialized: Any, prompts: list[str], **kwargs: Any) -> None:
        if self._plugin.enabled:
            guard.call(self._model_start, SpanType.LLM, serialized, prompts, kwargs)

    def _model_start(
        self, span_type: str, serialized: Any, prompt: list[Any], kwargs: dict[str, Any]
    ) -> None:
        capture = config.active().capture_content
        chat = span_type == SpanType.CHAT_MODEL
        attributes = extract.model_attributes(
            "chat" if chat else "text_completion", kwargs.get("metadata"), kwargs, capture
        )
        params = extract.request_params(kwargs)
        if not capture:
            inputs: Any = params or None
        elif chat:
            inputs = spans.Deferred(extract.chat_inputs, [list(batch) for batch in prompt], params)
        else:
            inputs = {"prompts": list(prompt), **params}
        name = extract.run_name(serialized, kwargs, span_type.lower())
        self._start(kwargs, name, span_type, inputs, attributes)

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        guard.call(self._model_end, response, run_id)

    def _model_end(self, response: Any, run_id: UUID) -> None:
        span = self.runs.span_of(run_id)
        if span is None:
            return
        attributes = span.attributes
        if (token_usage := extract.response_usage(response)) is not None:
            attributes[keys.CHAT_USAGE] = token_usage
        if (model := extract.response_model(response)) is not None:
            attributes[keys.GEN_AI_RESPONSE_MODEL] = model
            attributes.setdefault(keys.LLM_MODEL, model)
        capture = config.active().capture_content
        outputs = extract.response_outputs if capture else extract.response_summary
        self.runs.end(run_id, spans.Deferred(outputs, response))

    # ---- tools

    def on_tool_start(self, serialized: Any, input_str: str, **kwargs: Any) -> None:
        if self._plugin.enabled:
            guard.call(self._tool_start, serialized, input_str, kwargs)

    def _tool_start(self, serialized: Any, input_str: str, kwargs: dict[str, Any]) -> None:
        attributes: dict[str, Any] = {keys.GEN_AI_OPERATION: "execute_tool"}
        if isinstance(call_id := kwargs.get("tool_call_id"), str):
            attributes[keys.GEN_AI_TOOL_CALL_ID] = call_id
        recorded = None
        if config.active().capture_content:
            inputs = kwargs.get("inputs")
            recorded = extract.shallow_copy(inputs) if inputs is not None else input_str
        name = extract.run_name(serialized, kwargs, "tool")
        self._start(kwargs, name, SpanType.TOOL, recorded, attributes)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        guard.call(self._tool_end, output, run_id)

    def _tool_end(self, output: Any, run_id: UUID) -> None:
        self.runs.end(run_id, output if config.active().capture_content else None)

    # ---- retrievers

    def on_retriever_start(self, serialized: Any, query: str, **kwargs: Any) -> None:
        if self._plugin.enabled:
            guard.call(self._retriever_start, serialized, query, kwargs)

    def _retriever_start(self, serialized: Any, query: str, kwargs: dict[str, Any]) -> None:
        capture = config.active().capture_content
        name = extract.run_name(serialized, kwargs, "retriever")
        self._start(kwargs, name, SpanType.RETRIEVER, {"query": query} if capture else None, {})

    def on_retriever_end(self, documents: Any, *, run_id: UUID, **kwargs: Any) -> None:
        guard.call(self._retriever_end, documents, run_id)

    def _retriever_end(self, documents: Any, run_id: UUID) -> None:
        documents = list(documents or ())
        self.runs.end(
            run_id,
            spans.Deferred(extract.retrieved_documents, documents)
            if config.active().capture_content
            else {"count": len(documents)},
        )

    # ---- errors: a run of any kind ends the same way

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        guard.call(self.runs.end, run_id, None, error)

    on_llm_error = on_tool_error = on_retriever_error = on_chain_error


class _Switch:
    """Stands in for the ContextVar LangChain's configure hook reads (``_configure`` only calls
    its ``get()``): our handler while the plugin is enabled, else None (no handler added). A
    ContextVar could not do this for every thread and task at once."""

    __slots__ = ("_handler", "_plugin")

    def __init__(self, plugin: LangChainPlugin, handler: Any) -> None:
        self._plugin = plugin
        self._handler = handler

    def get(self) -> Any:
        return self._handler if self._plugin.enabled else None


class LangChainPlugin(HookPlugin):
    name = "langchain"
    module = "langchain_core"
    distribution = "langchain-core"
    extra = "langchain"
    supported = ("0.3", "2")
    mlflow_flavor = "langchain"

    def __init__(self) -> None:
        super().__init__()
        self._handler: _Handler | None = None

    def register(self) -> None:
        # The LangChain base class is mixed in here, so importing this module imports no
        # LangChain.
        from langchain_core.callbacks import BaseCallbackHandler
        from langchain_core.tracers.context import register_configure_hook

        handler_class = type("TracewireCallbackHandler", (_Handler, BaseCallbackHandler), {})
        self._handler = handler_class(self)
        register_configure_hook(_Switch(self, self._handler), inheritable=True)  # type: ignore[arg-type]

    def registered(self) -> int:
        from langchain_core.tracers.context import _configure_hooks

        return sum(isinstance(var, _Switch) for var, *_ in _configure_hooks)

    def span_of(self, run_id: UUID | None) -> spans.Span | None:
        """The span of a LangChain run still open (LangGraph's plugin adds to a graph's)."""
        return self._handler.runs.span_of(run_id) if self._handler is not None else None
