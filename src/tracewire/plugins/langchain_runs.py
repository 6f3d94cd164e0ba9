"""The LangChain plugin's open runs, each with its span: where a run's span goes when the run
starts, and how it ends.

A run's span is made current for the run's duration, in the caller's context (the handler runs
inline): a call underneath (the OpenAI client under ChatOpenAI, a user's ``@mlflow.trace``
function inside a node) then nests under it, which is also what makes trace token totals count a
model call once. Where the context lost the run's parent (work handed to a thread without its
context, callbacks dispatched from another task), LangChain's parent run id still says where the
span belongs, and is used instead. The run map is shared by all threads (single dict
operations, atomic under the GIL).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from tracewire.core import attributes as keys
from tracewire.core import span_context, spans
from tracewire.core.attributes import SpanType

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


def _deactivate(tokens: Any) -> None:
    try:
        span_context.deactivate(tokens)
    except ValueError:
        # The run ended in another context than it started in (LangChain dispatched the end
        # from another task or thread). That context is not ours to restore; the one the run
        # started in still names the span, which start_span skips once its trace is done.
        pass


class Runs:
    """The runs started and not ended yet, by LangChain run id."""

    def __init__(self) -> None:
        self._runs: dict[UUID, _Run] = {}
        self._live: set[int] = set()  # id() of the spans of runs not ended yet

    def span_of(self, run_id: UUID | None) -> spans.Span | None:
        run = self._runs.get(run_id) if run_id is not None else None
        return run.span if run is not None else None

    def start(
        self,
        run_id: UUID,
        parent_run_id: UUID | None,
        name: str,
        span_type: str,
        inputs: Any,
        attributes: dict[str, Any],
    ) -> None:
        here = self._run_span_here() if parent_run_id is None else None
        if here is not None:
            # A top-level run begun where another run's span is current, yet not inside it
            # (LangChain would have named that run its parent): the next input of a sequence's
            # batch, a stream consumed in turns with another. It goes beside that run, and is
            # not made current here: this context is the other run's, and what runs inside
            # this one finds it through LangChain's parent run id.
            span = span_context.start_beside(
                self._outermost(here), name, span_type, inputs, attributes
            )
            tokens = None
        else:
            span = span_context.start_span(
                name, span_type, inputs, attributes, self._parent(parent_run_id)
            )
            tokens = span_context.activate(span)
        if parent_run_id is not None and attributes.get(keys.LANGGRAPH_NODE) is not None:
            parent = self._runs.get(parent_run_id)
            if parent is not None:
                parent.span.span_type = SpanType.AGENT  # a run whose children are nodes is a graph
        self._live.add(id(span))
        self._runs[run_id] = _Run(span, tokens)
        if parent_run_id is not None and (parent_run := self._runs.get(parent_run_id)):
            parent_run.children.append(run_id)

    def end(self, run_id: UUID, outputs: Any = None, error: BaseException | None = None) -> None:
        run = self._runs.pop(run_id, None)
        if run is None:
            return
        span = run.span
        self._live.discard(id(span))
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

    def _parent(self, parent_run_id: UUID | None) -> spans.Span | None:
        """The parent run's span when the context lost it; None to let the context decide (it
        may hold a user's MLflow span inside the parent run, a truer parent)."""
        run = self._runs.get(parent_run_id) if parent_run_id is not None else None
        if run is None:
            return None
        here = span_context.current()
        if (
            here is not None
            and here.trace is run.span.trace
            and here.end_ns is None
            and here.start_ns >= run.span.start_ns
        ):
            return None  # the context is inside the parent run
        return run.span

    def _run_span_here(self) -> spans.Span | None:
        """The span of a run not ended yet that this context is in, if any (span_context.current()
        looks past spans that ended where this context could not be reset, as a node of a
        graph streamed asynchronously does)."""
        here = span_context.current()
        return here if here is not None and id(here) in self._live else None

    def _outermost(self, span: spans.Span) -> spans.Span:
        """The top-level run's span above ``span`` (a node of a graph being streamed)."""
        by_id = {s.span_id: s for s in span.trace.spans}
        while (
            span.parent_id is not None
            and (parent := by_id.get(span.parent_id)) is not None
            and id(parent) in self._live
        ):
            span = parent
        return span

    def _abandon(self, run_id: UUID) -> None:
        """A run still open when its parent ends was abandoned: a stream closed or its task
        cancelled while a model was streaming gets no end callback for the model's run (and
        its trace would stay open for ever, the next runs of the task joining it). It ends
        with its parent, marked."""
        run = self._runs.get(run_id)
        if run is not None:
            run.span.attributes[keys.ABANDONED] = True
            self.end(run_id)
