"""LangChain plugin: every chain, runnable, chat model, LLM, tool and retriever run is a span;
LangGraph graph runs and node executions too (their structure comes from the callback metadata
LangGraph sets: ``langgraph_node``, ``langgraph_step``, ``langgraph_triggers``).

One callback handler is injected into every LangChain callback manager through
``register_configure_hook``. LangChain has no way to unregister a hook, so it is registered once,
with a switch in place of the ContextVar the hook reads: it hands out our handler while the
plugin is enabled and nothing while it is disabled, so a disabled tracewire adds no handler to
any new callback manager. A run that started while enabled still ends its span; managers made
while enabled keep the handler, which starts no span while disabled.

The handler runs inline (``run_inline``), in the caller's context, and makes each run's span
current for the run's duration: a call underneath (the OpenAI client under ChatOpenAI, a user's
``@mlflow.trace`` function inside a node) then nests under it, which is also what makes trace
token totals count a model call once. Where the context lost the run's parent (work handed to a
thread without its context, callbacks dispatched from another task), LangChain's parent run id
still says where the span belongs, and is used instead.

This module holds the handler (runs -> spans) and the plugin; what a span records of a run
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

# LangGraph's control-flow signals (interrupt(), Command(graph=PARENT)) reach on_chain_error as
# subclasses of this; matched by name so this plugin does not import LangGraph.
_BUBBLE_UP = "GraphBubbleUp"


class _Run:
    __slots__ = ("children", "span", "tokens")

    def __init__(self, span: spans.Span, tokens: Any) -> None:
        self.span = span
        self.tokens = tokens
        self.children: list[UUID] = []  # runs started under this one (ended ones are skipped)


def _is_control_flow(error: BaseException) -> bool:
    return any(
        c.__name__ == _BUBBLE_UP and c.__module__.startswith("langgraph")
        for c in type(error).__mro__
    )


# --------------------------------------------------------------------------- the handler


class _Handler:
    """Runs → spans. Each callback is one guarded step; the run map is shared by all threads
    (single dict operations, atomic under the GIL)."""

    run_inline = True
    # Under TRACEWIRE_TESTING our failures must reach the test, not LangChain's warning log.
    raise_error = guard.TESTING

    def __init__(self, plugin: LangChainPlugin) -> None:
        self._plugin = plugin
        self.runs: dict[UUID, _Run] = {}
        self.live: set[int] = set()  # id() of the spans of runs not ended yet

    # ---- span lifecycle

    def _parent(self, parent_run_id: UUID | None) -> spans.Span | None:
        """The parent run's span when the context lost it; None to let the context decide (it
        may hold a user's MLflow span inside the parent run, a truer parent)."""
        run = self.runs.get(parent_run_id) if parent_run_id is not None else None
        if run is None:
            return None
        here = spans.current()
        if (
            here is not None
            and here.trace is run.span.trace
            and here.end_ns is None
            and here.start_ns >= run.span.start_ns
        ):
            return None  # the context is inside the parent run
        return run.span

    def _start(
        self,
        run_id: UUID,
        parent_run_id: UUID | None,
        name: str,
        span_type: str,
        inputs: Any,
        attributes: dict[str, Any],
    ) -> spans.Span:
        here = self._run_span_here() if parent_run_id is None else None
        if here is not None:
            # A top-level run begun where another run's span is current, yet not inside it
            # (LangChain would have named that run its parent): the next input of a sequence's
            # batch, a stream consumed in turns with another. It goes beside that run, and is
            # not made current here: this context is the other run's, and what runs inside
            # this one finds it through LangChain's parent run id.
            span = spans.start_beside(self._outermost(here), name, span_type, inputs, attributes)
            tokens = None
        else:
            span = spans.start_span(
                name, span_type, inputs, attributes, self._parent(parent_run_id)
            )
            tokens = spans.activate(span)
        if parent_run_id is not None and attributes.get(keys.LANGGRAPH_NODE) is not None:
            parent = self.runs.get(parent_run_id)
            if parent is not None:
                parent.span.span_type = SpanType.AGENT  # a run whose children are nodes is a graph
        self.live.add(id(span))
        self.runs[run_id] = _Run(span, tokens)
        if parent_run_id is not None and (parent_run := self.runs.get(parent_run_id)):
            parent_run.children.append(run_id)
        return span

    def _end(self, run_id: UUID, outputs: Any = None, error: BaseException | None = None) -> None:
        run = self.runs.pop(run_id, None)
        if run is None:
            return
        span = run.span
        self.live.discard(id(span))
        for child in run.children:  # runs that will never end on their own: see _abandon
            self._abandon(child)
        try:
            if run.tokens is not None:
                _deactivate(run.tokens)
        finally:
            if error is not None:
                if _is_control_flow(error):
                    span.attributes[keys.LANGGRAPH_CONTROL] = type(error).__name__
                elif not isinstance(error, GeneratorExit):  # the caller closed a stream early
                    span.record_error(error)
            elif outputs is not None:
                span.outputs = outputs
            span.end()

    def _run_span_here(self) -> spans.Span | None:
        """The span of a run not ended yet that this context is in, if any (spans.current()
        looks past spans that ended where this context could not be reset, as a node of a
        graph streamed asynchronously does)."""
        here = spans.current()
        return here if here is not None and id(here) in self.live else None

    def _outermost(self, span: spans.Span) -> spans.Span:
        """The top-level run's span above ``span`` (a node of a graph being streamed)."""
        by_id = {s.span_id: s for s in span.trace.spans}
        while (
            span.parent_id is not None
            and (parent := by_id.get(span.parent_id)) is not None
            and id(parent) in self.live
        ):
            span = parent
        return span

    def _abandon(self, run_id: UUID) -> None:
        """A run still open when its parent ends was abandoned: a stream closed or its task
        cancelled while a model was streaming gets no end callback for the model's run (and
        its trace would stay open for ever, the next runs of the task joining it). It ends
        with its parent, marked."""
        run = self.runs.get(run_id)
        if run is not None:
            run.span.attributes[keys.ABANDONED] = True
            self._end(run_id)

    def span_of(self, run_id: UUID | None) -> spans.Span | None:
        run = self.runs.get(run_id) if run_id is not None else None
        return run.span if run is not None else None

    # ---- chains, runnables, graph nodes

    def on_chain_start(
        self,
        serialized: Any,
        inputs: Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._plugin.enabled:
            guard.call(
                self._chain_start, serialized, inputs, run_id, parent_run_id, tags, metadata, kwargs
            )

    def _chain_start(
        self,
        serialized: Any,
        inputs: Any,
        run_id: UUID,
        parent_run_id: UUID | None,
        tags: list[str] | None,
        metadata: dict[str, Any] | None,
        kwargs: dict[str, Any],
    ) -> None:
        name = extract.run_name(serialized, kwargs, "chain")
        attributes = extract.graph_attributes(metadata, name, tags) or {}
        capture = config.active().capture_content
        self._start(
            run_id,
            parent_run_id,
            name,
            SpanType.CHAIN,
            extract.shallow_copy(inputs) if capture else None,
            attributes,
        )

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        guard.call(self._chain_end, outputs, run_id)

    def _chain_end(self, outputs: Any, run_id: UUID) -> None:
        capture = config.active().capture_content
        self._end(run_id, extract.shallow_copy(outputs) if capture else None)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        guard.call(self._end, run_id, None, error)

    # ---- chat models and LLMs

    def on_chat_model_start(
        self,
        serialized: Any,
        messages: list[list[Any]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._plugin.enabled:
            guard.call(
                self._model_start,
                SpanType.CHAT_MODEL,
                serialized,
                messages,
                run_id,
                parent_run_id,
                metadata,
                kwargs,
            )

    def on_llm_start(
        self,
        serialized: Any,
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._plugin.enabled:
            guard.call(
                self._model_start,
                SpanType.LLM,
                serialized,
                prompts,
                run_id,
                parent_run_id,
                metadata,
                kwargs,
            )

    def _model_start(
        self,
        span_type: str,
        serialized: Any,
        prompt: list[Any],
        run_id: UUID,
        parent_run_id: UUID | None,
        metadata: dict[str, Any] | None,
        kwargs: dict[str, Any],
    ) -> None:
        capture = config.active().capture_content
        chat = span_type == SpanType.CHAT_MODEL
        attributes = extract.model_attributes(
            "chat" if chat else "text_completion", metadata, kwargs, capture
        )
        params = extract.request_params(kwargs)
        if not capture:
            inputs: Any = params or None
        elif chat:
            inputs = spans.Deferred(extract.chat_inputs, [list(batch) for batch in prompt], params)
        else:
            inputs = {"prompts": list(prompt), **params}
        name = extract.run_name(serialized, kwargs, span_type.lower())
        self._start(run_id, parent_run_id, name, span_type, inputs, attributes)

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        guard.call(self._model_end, response, run_id)

    def _model_end(self, response: Any, run_id: UUID) -> None:
        run = self.runs.get(run_id)
        if run is None:
            return
        attributes = run.span.attributes
        if (token_usage := extract.response_usage(response)) is not None:
            attributes[keys.CHAT_USAGE] = token_usage
        if (model := extract.response_model(response)) is not None:
            attributes[keys.GEN_AI_RESPONSE_MODEL] = model
            attributes.setdefault(keys.LLM_MODEL, model)
        capture = config.active().capture_content
        outputs = extract.response_outputs if capture else extract.response_summary
        self._end(run_id, spans.Deferred(outputs, response))

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        guard.call(self._end, run_id, None, error)

    # ---- tools

    def on_tool_start(
        self,
        serialized: Any,
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        inputs: Any = None,
        **kwargs: Any,
    ) -> None:
        if self._plugin.enabled:
            guard.call(
                self._tool_start, serialized, input_str, inputs, run_id, parent_run_id, kwargs
            )

    def _tool_start(
        self,
        serialized: Any,
        input_str: str,
        inputs: Any,
        run_id: UUID,
        parent_run_id: UUID | None,
        kwargs: dict[str, Any],
    ) -> None:
        attributes: dict[str, Any] = {keys.GEN_AI_OPERATION: "execute_tool"}
        if isinstance(call_id := kwargs.get("tool_call_id"), str):
            attributes[keys.GEN_AI_TOOL_CALL_ID] = call_id
        recorded = None
        if config.active().capture_content:
            recorded = extract.shallow_copy(inputs) if inputs is not None else input_str
        name = extract.run_name(serialized, kwargs, "tool")
        self._start(run_id, parent_run_id, name, SpanType.TOOL, recorded, attributes)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        guard.call(self._tool_end, output, run_id)

    def _tool_end(self, output: Any, run_id: UUID) -> None:
        self._end(run_id, output if config.active().capture_content else None)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        guard.call(self._end, run_id, None, error)

    # ---- retrievers

    def on_retriever_start(
        self,
        serialized: Any,
        query: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._plugin.enabled:
            guard.call(self._start_retriever, serialized, query, run_id, parent_run_id, kwargs)

    def _start_retriever(
        self,
        serialized: Any,
        query: str,
        run_id: UUID,
        parent_run_id: UUID | None,
        kwargs: dict[str, Any],
    ) -> None:
        capture = config.active().capture_content
        self._start(
            run_id,
            parent_run_id,
            extract.run_name(serialized, kwargs, "retriever"),
            SpanType.RETRIEVER,
            {"query": query} if capture else None,
            {},
        )

    def on_retriever_end(self, documents: Any, *, run_id: UUID, **kwargs: Any) -> None:
        guard.call(self._retriever_end, documents, run_id)

    def _retriever_end(self, documents: Any, run_id: UUID) -> None:
        documents = list(documents or ())
        self._end(
            run_id,
            spans.Deferred(extract.retrieved_documents, documents)
            if config.active().capture_content
            else {"count": len(documents)},
        )

    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        guard.call(self._end, run_id, None, error)


def _deactivate(tokens: Any) -> None:
    try:
        spans.deactivate(tokens)
    except ValueError:
        # The run ended in another context than it started in (LangChain dispatched the end
        # from another task or thread). That context is not ours to restore; the one the run
        # started in still names the span, which start_span skips once its trace is done.
        pass


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
        return self._handler.span_of(run_id) if self._handler is not None else None
