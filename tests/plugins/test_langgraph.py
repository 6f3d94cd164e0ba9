"""LangGraph through the LangChain and LangGraph plugins: a real StateGraph (two nodes, a
conditional edge, a ToolNode, a subgraph, a checkpointer) run sync, async and streamed, read back
through MLflow's API."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any

import mlflow
import openai
import pytest
from langchain_core.messages import AnyMessage, HumanMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import Command, interrupt
from typing_extensions import TypedDict

from tests.conftest import API_KEY, Traced
from tests.support.langchain_fakes import FakeChat, ToolThenAnswer, reply
from tracewire.testing import OpenAIServer
from tracewire.testing.openai_server import count_tokens

QUESTION = "What is the capital of France"
# Two model calls per run: a tool call, then the answer.
USAGE = {"input_tokens": 12 + 30, "output_tokens": 7 + 2, "total_tokens": 19 + 32}


class State(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    summary: str


@tool
def capital(country: str) -> str:
    """The capital of a country."""
    return {"France": "Paris"}.get(country, "unknown")


def fake_model() -> Any:
    return ToolThenAnswer().bind_tools([capital])


def build(model: Any, *, asynchronous: bool = False) -> Any:
    """agent -> (tools_condition) -> tools -> agent -> summary (a subgraph) -> end; the agent
    node is a coroutine when ``asynchronous``."""

    def condense(state: State) -> State:
        return {"summary": state["messages"][-1].content}

    sub = StateGraph(State)
    sub.add_node("condense", condense)
    sub.add_edge(START, "condense")

    def agent(state: State) -> State:
        return {"messages": [model.invoke(state["messages"])]}

    async def aagent(state: State) -> State:
        return {"messages": [await model.ainvoke(state["messages"])]}

    graph = StateGraph(State)
    graph.add_node("agent", aagent if asynchronous else agent)
    graph.add_node("tools", ToolNode([capital]))
    graph.add_node("summary", sub.compile(name="summarizer"))
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition, {"tools": "tools", END: "summary"})
    graph.add_edge("tools", "agent")
    graph.add_edge("summary", END)
    return graph.compile(checkpointer=InMemorySaver())


def config(thread: str, **extra: Any) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread, **extra}}


def shape(trace: mlflow.entities.Trace, span: Any = None) -> Any:
    """The span tree as (name, type, [children in start order]), from the root."""
    spans = trace.data.spans
    if span is None:
        roots = [s for s in spans if s.parent_id is None]
        assert len(roots) == 1, [s.name for s in roots]
        span = roots[0]
    children = sorted(
        (s for s in spans if s.parent_id == span.span_id), key=lambda s: s.start_time_ns
    )
    return (span.name, span.span_type, [shape(trace, c) for c in children])


AGENT_STEP = [("ToolThenAnswer", "CHAT_MODEL", []), ("tools_condition", "CHAIN", [])]
TREE = (
    "LangGraph",
    "AGENT",
    [
        ("agent", "CHAIN", AGENT_STEP),
        ("tools", "CHAIN", [("capital", "TOOL", [])]),
        ("agent", "CHAIN", AGENT_STEP),
        ("summary", "CHAIN", [("summarizer", "AGENT", [("condense", "CHAIN", [])])]),
    ],
)


def nodes(trace: mlflow.entities.Trace) -> list[tuple[str, int, list[str]]]:
    return [
        (s.name, s.attributes["langgraph.step"], s.attributes["langgraph.triggers"])
        for s in sorted(trace.data.spans, key=lambda s: s.start_time_ns)
        if "langgraph.step" in s.attributes and s.attributes["langgraph.node"] != "condense"
    ]


def test_graph_run_is_one_trace_with_every_step(traced: Traced) -> None:
    app = build(fake_model())
    result = app.invoke({"messages": [HumanMessage(QUESTION)]}, config("thread-1", user_id="alice"))
    assert result["summary"] == "Paris"

    trace = traced.trace()
    assert shape(trace) == TREE
    assert nodes(trace) == [
        ("agent", 1, ["branch:to:agent"]),
        ("tools", 2, ["branch:to:tools"]),
        ("agent", 3, ["branch:to:agent"]),
        ("summary", 4, ["branch:to:summary"]),
    ]
    spans = {s.name: s for s in trace.data.spans}
    assert spans["LangGraph"].inputs["messages"][0]["content"] == QUESTION
    assert spans["LangGraph"].outputs["summary"] == "Paris"
    # The trace list shows the question and the answer, not LangChain's message JSON.
    assert trace.info.request_preview == QUESTION
    assert trace.info.response_preview == result["messages"][-1].content
    assert spans["capital"].inputs == {"country": "France"}
    assert spans["capital"].outputs["content"] == "Paris"  # the ToolMessage
    routes = [s.outputs for s in trace.data.spans if s.name == "tools_condition"]
    assert routes == ["tools", "__end__"]  # the conditional edge's decisions
    assert trace.info.token_usage == USAGE
    assert trace.info.trace_metadata["mlflow.trace.session"] == "thread-1"
    assert trace.info.trace_metadata["mlflow.trace.user"] == "alice"


async def _astream_events(app: Any, inputs: Any, cfg: Any) -> Any:
    return [e async for e in app.astream_events(inputs, cfg, version="v2")][-1]


async def _astream(app: Any, inputs: Any, cfg: Any) -> Any:
    return [c async for c in app.astream(inputs, cfg, stream_mode=["values", "messages"])]


ASYNC = {"ainvoke", "astream", "astream_events"}
RUNS = {
    "ainvoke": lambda app, i, c: asyncio.run(app.ainvoke(i, c)),
    "stream-values": lambda app, i, c: list(app.stream(i, c, stream_mode="values")),
    "stream-updates": lambda app, i, c: list(app.stream(i, c, stream_mode="updates")),
    "stream-messages": lambda app, i, c: list(app.stream(i, c, stream_mode="messages")),
    "astream": lambda app, i, c: asyncio.run(_astream(app, i, c)),
    "astream_events": lambda app, i, c: asyncio.run(_astream_events(app, i, c)),
}


@pytest.mark.parametrize("how", sorted(RUNS))
def test_async_and_streamed_runs_keep_the_tree(traced: Traced, how: str) -> None:
    app = build(fake_model(), asynchronous=how in ASYNC)
    assert RUNS[how](app, {"messages": [HumanMessage(QUESTION)]}, config(f"thread-{how}"))
    trace = traced.trace()
    assert shape(trace) == TREE
    assert trace.info.token_usage == USAGE
    assert trace.info.trace_metadata["mlflow.trace.session"] == f"thread-{how}"


def test_a_node_that_raises_marks_node_and_graph(traced: Traced) -> None:
    def broken(state: State) -> State:
        raise ValueError("node failed")

    graph = StateGraph(State)
    graph.add_node("broken", broken)
    graph.add_edge(START, "broken")
    with pytest.raises(ValueError, match="node failed"):
        graph.compile().invoke({"messages": [HumanMessage("x")]})

    trace = traced.trace()
    assert shape(trace) == ("LangGraph", "AGENT", [("broken", "CHAIN", [])])
    assert trace.info.state.value == "ERROR"
    for span in trace.data.spans:
        assert span.status.status_code.value == "ERROR"
        assert span.events[0].attributes["exception.message"] == "node failed"


def test_interrupt_is_control_flow_and_resume_is_visible(traced: Traced) -> None:
    def ask(state: State) -> State:
        return {"summary": interrupt("approve?")}

    graph = StateGraph(State)
    graph.add_node("ask", ask)
    graph.add_edge(START, "ask")
    app = graph.compile(checkpointer=InMemorySaver())
    paused = app.invoke({"messages": [HumanMessage("x")]}, config("thread-hitl"))
    assert paused["__interrupt__"][0].value == "approve?"
    assert app.invoke(Command(resume="yes"), config("thread-hitl"))["summary"] == "yes"

    first, second = traced.traces(expected=2)
    for trace in (first, second):
        assert trace.info.state.value == "OK"
        assert shape(trace) == ("LangGraph", "AGENT", [("ask", "CHAIN", [])])
        assert trace.info.trace_metadata["mlflow.trace.session"] == "thread-hitl"
    root, node = sorted(first.data.spans, key=lambda s: s.start_time_ns)
    assert node.status.status_code.value == "OK" and not node.events
    assert node.attributes["langgraph.control"] == "GraphInterrupt"
    assert root.attributes["langgraph.interrupt"]["values"] == ["approve?"]
    resumed = next(s for s in second.data.spans if s.parent_id is None)
    checkpoint = root.attributes["langgraph.interrupt"]["checkpoint_id"]
    assert resumed.attributes["langgraph.resumed_from"] == checkpoint


def test_fifty_concurrent_runs_never_mix(traced: Traced) -> None:
    app = build(fake_model(), asynchronous=True)

    async def run_all() -> list[Any]:
        return await asyncio.gather(
            *(
                app.ainvoke({"messages": [HumanMessage(f"question {i}")]}, config(f"thread-{i}"))
                for i in range(50)
            )
        )

    assert all(r["summary"] == "Paris" for r in asyncio.run(run_all()))
    traces = traced.traces(expected=50)
    sessions = set()
    for trace in traces:
        assert shape(trace) == TREE  # every span in its own run's trace, none elsewhere
        session = trace.info.trace_metadata["mlflow.trace.session"]
        root = next(s for s in trace.data.spans if s.parent_id is None)
        assert root.inputs["messages"][0]["content"] == "question " + session.split("-")[1]
        sessions.add(session)
    assert len(sessions) == 50


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_user_mlflow_trace_inside_a_node_nests_under_it(traced: Traced, asynchronous: bool) -> None:
    model = FakeChat.scripted(reply("hi", input_tokens=1, output_tokens=1))

    @mlflow.trace(name="lookup")
    def lookup(text: str) -> str:
        return model.invoke(text).content

    @mlflow.trace(name="lookup")
    async def alookup(text: str) -> str:
        return (await model.ainvoke(text)).content

    def node(state: State) -> State:
        return {"summary": lookup("x")}

    async def anode(state: State) -> State:
        return {"summary": await alookup("x")}

    graph = StateGraph(State)
    graph.add_node("work", anode if asynchronous else node)
    graph.add_edge(START, "work")
    app = graph.compile()
    inputs = {"messages": [HumanMessage("x")]}
    result = asyncio.run(app.ainvoke(inputs)) if asynchronous else app.invoke(inputs)
    assert result["summary"] == "hi"
    assert shape(traced.trace()) == (
        "LangGraph",
        "AGENT",
        [("work", "CHAIN", [("lookup", "UNKNOWN", [("FakeChat", "CHAT_MODEL", [])])])],
    )


def test_streamed_chat_openai_in_a_graph_counts_exact_tokens(
    traced: Traced, openai_server: OpenAIServer
) -> None:
    model = ChatOpenAI(
        model="gpt-4o-mini",
        base_url=openai_server.base_url,
        api_key=API_KEY,
        max_retries=0,
        http_async_client=openai.DefaultAsyncHttpxClient(),
    )

    def agent(state: State) -> State:
        return {"messages": [model.invoke(state["messages"])]}

    async def aagent(state: State) -> State:
        return {"messages": [await model.ainvoke(state["messages"])]}

    def app(node: Any) -> Any:
        graph = StateGraph(State)
        graph.add_node("agent", node)
        graph.add_edge(START, "agent")
        return graph.compile()

    inputs = {"messages": [HumanMessage(QUESTION)]}

    async def astreamed() -> list[Any]:
        return [c async for c in app(aagent).astream(inputs, stream_mode="messages")]

    # stream_mode="messages" makes the model stream its reply.
    assert (
        "".join(m.content for m, _ in app(agent).stream(inputs, stream_mode="messages"))
        == "Echo: " + QUESTION
    )
    assert "".join(m.content for m, _ in asyncio.run(astreamed())) == "Echo: " + QUESTION
    prompt, completion = 3 + count_tokens(QUESTION), count_tokens("Echo: " + QUESTION)
    for trace in traced.traces(expected=2):
        assert shape(trace) == (
            "LangGraph",
            "AGENT",
            [
                (
                    "agent",
                    "CHAIN",
                    [("ChatOpenAI", "CHAT_MODEL", [("chat gpt-4o-mini", "CHAT_MODEL", [])])],
                )
            ],
        )
        assert trace.info.token_usage == {
            "input_tokens": prompt,
            "output_tokens": completion,
            "total_tokens": prompt + completion,
            "cache_read_input_tokens": 0,
        }


def test_parallel_nodes_in_langgraphs_thread_pool_keep_their_children(traced: Traced) -> None:
    model = FakeChat.scripted(
        reply("hi", input_tokens=1, output_tokens=1), reply("ho", input_tokens=1, output_tokens=1)
    )

    def left(state: State) -> State:
        return {"messages": [model.invoke("left")]}

    def right(state: State) -> State:
        return {"messages": [model.invoke("right")]}

    graph = StateGraph(State)
    graph.add_node("left", left)
    graph.add_node("right", right)
    graph.add_edge(START, "left")
    graph.add_edge(START, "right")  # one step, two tasks: LangGraph runs them on its pool
    assert len(graph.compile().invoke({"messages": []})["messages"]) == 2

    _, _, children = shape(trace := traced.trace())
    assert sorted(children) == [
        ("left", "CHAIN", [("FakeChat", "CHAT_MODEL", [])]),
        ("right", "CHAIN", [("FakeChat", "CHAT_MODEL", [])]),
    ]
    assert trace.info.token_usage["total_tokens"] == 4


def test_no_span_stays_current_after_a_run_or_a_stream_closed_early(traced: Traced) -> None:
    from tracewire.core import span_context

    app = build(fake_model())
    inputs = {"messages": [HumanMessage(QUESTION)]}
    app.invoke(inputs, config("t-a"))
    assert span_context.current() is None
    list(app.stream(inputs, config("t-b")))
    assert span_context.current() is None
    for _ in app.stream(inputs, config("t-c"), stream_mode="updates"):
        break  # the caller stops after the first node: LangGraph closes the run
    assert span_context.current() is None

    early = traced.traces(expected=3)[2]
    assert early.info.state.value == "OK"  # closing a stream is not a failure
    assert [c[0] for c in shape(early)[2]] == ["agent"]


def test_a_graph_inside_a_users_span_joins_the_users_trace(traced: Traced) -> None:
    app = build(fake_model())
    with mlflow.start_span("request"):
        app.invoke({"messages": [HumanMessage(QUESTION)]}, config("thread-inside"))
    trace = traced.trace()
    assert shape(trace) == ("request", "UNKNOWN", [TREE])
    assert trace.info.token_usage == USAGE
    assert "mlflow.trace.session" not in trace.info.trace_metadata  # the user's trace decides


def test_a_retried_node_shows_each_attempt(traced: Traced) -> None:
    from langgraph.types import RetryPolicy

    attempts = []

    def flaky(state: State) -> State:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("try again")
        return {"summary": "done"}

    graph = StateGraph(State)
    graph.add_node("flaky", flaky, retry_policy=RetryPolicy(initial_interval=0.01, jitter=False))
    graph.add_edge(START, "flaky")
    assert graph.compile().invoke({"messages": []})["summary"] == "done"

    trace = traced.trace()
    assert trace.info.state.value == "OK"
    assert shape(trace) == ("LangGraph", "AGENT", [("flaky", "CHAIN", []), ("flaky", "CHAIN", [])])
    first, second = sorted(
        (s for s in trace.data.spans if s.name == "flaky"), key=lambda s: s.start_time_ns
    )
    assert first.status.status_code.value == "ERROR"
    assert second.status.status_code.value == "OK" and second.outputs == {"summary": "done"}


def test_inside_a_request_span_the_request_context_wins_and_the_thread_fills_in(
    traced: Traced,
) -> None:
    import tracewire
    from tracewire.core import span_context

    app = build(fake_model())
    with tracewire.context(request_id="req-42", user_id="bob"):
        outer = span_context.start_span("POST /chat", "CHAIN")  # what TracingMiddleware opens
        tokens = span_context.activate(outer)
        try:
            app.invoke(
                {"messages": [HumanMessage(QUESTION)]}, config("thread-7", user_id="not-bob")
            )
        finally:
            span_context.deactivate(tokens)
            outer.end()

    trace = traced.trace()
    assert shape(trace) == ("POST /chat", "CHAIN", [TREE])
    assert trace.info.client_request_id == "req-42"
    assert trace.info.trace_metadata["mlflow.trace.user"] == "bob"
    assert trace.info.trace_metadata["mlflow.trace.session"] == "thread-7"


def test_a_command_to_the_parent_graph_is_control_flow(traced: Traced) -> None:
    def hop(state: State) -> Command:
        return Command(graph=Command.PARENT, goto="done", update={"summary": "hopped"})

    sub = StateGraph(State)
    sub.add_node("hop", hop)
    sub.add_edge(START, "hop")
    graph = StateGraph(State)
    graph.add_node("inner", sub.compile(name="inner_graph"))
    graph.add_node("done", lambda state: {})
    graph.add_edge(START, "inner")
    assert graph.compile().invoke({"messages": []})["summary"] == "hopped"

    trace = traced.trace()
    assert trace.info.state.value == "OK"
    controlled = {s.name: s.attributes.get("langgraph.control") for s in trace.data.spans}
    assert controlled["hop"] == "ParentCommand"
    assert all(s.status.status_code.value == "OK" for s in trace.data.spans)
    assert [c[0] for c in shape(trace)[2]] == ["inner", "done"]


class Count(TypedDict):
    n: int


def add_then_scale() -> Any:
    """START -> add (n + 1) -> scale (n * 10) -> END, plain functions."""
    graph = StateGraph(Count)
    graph.add_node("add", lambda state: {"n": state["n"] + 1})
    graph.add_node("scale", lambda state: {"n": state["n"] * 10})
    graph.add_edge(START, "add")
    graph.add_edge("add", "scale")
    graph.add_edge("scale", END)
    return graph.compile()


def test_two_streams_consumed_in_turns_are_two_traces(traced: Traced) -> None:
    """Two graph runs streamed alternately in one thread (sync)."""
    import itertools

    from tracewire.core import span_context

    app = add_then_scale()
    first, second = app.stream({"n": 1}), app.stream({"n": 2})
    chunks = [c for pair in itertools.zip_longest(first, second) for c in pair if c]
    assert chunks == [
        {"add": {"n": 2}},
        {"add": {"n": 3}},
        {"scale": {"n": 20}},
        {"scale": {"n": 30}},
    ]
    assert span_context.current() is None
    traces = traced.traces(expected=2)
    assert sorted(t.data.spans[0].inputs["n"] for t in traces) == [1, 2]
    for trace in traces:
        assert shape(trace) == (
            "LangGraph",
            "AGENT",
            [("add", "CHAIN", []), ("scale", "CHAIN", [])],
        )


def test_a_run_that_never_ends_is_stored_incomplete_after_the_trace_timeout(
    traced: Traced, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream left open (never closed, never collected) keeps its run
    open; past TRACEWIRE_TRACE_TIMEOUT its trace is stored as it is, failed and marked, counted
    in the spool, and no longer held by tracewire."""
    import time

    import tracewire
    from tracewire import config as tw_config
    from tracewire.core import span_context, spans
    from tracewire.export import spool_directory as spool

    tracewire.disable()
    monkeypatch.setenv("TRACEWIRE_TRACE_TIMEOUT", "1")
    traced.enable()

    stream = add_then_scale().stream({"n": 1})
    assert next(stream) == {"add": {"n": 2}}  # the graph's run stays open from here on
    open_trace = span_context.current().trace  # type: ignore[union-attr]
    deadline = time.monotonic() + 30
    while not open_trace.done and time.monotonic() < deadline:
        time.sleep(0.1)
    assert spans.find_open_trace(open_trace.otel_trace_id) is None

    trace = traced.trace()
    root = trace.data.spans[0]
    assert (root.name, trace.info.state.value) == ("LangGraph", "ERROR")
    assert "TRACEWIRE_TRACE_TIMEOUT (1 s)" in root.status.description
    assert root.attributes["tracewire.abandoned"] is True
    assert root.attributes["tracewire.incomplete"] == 1
    assert shape(trace) == ("LangGraph", "AGENT", [("add", "CHAIN", [])])
    spool_dir = tw_config.active().spool_dir
    assert sum(s.incomplete for s in spool.status(spool_dir) if s.live) == 1
    stream.close()  # ends nothing more: the trace is stored already
    assert len(traced.traces()) == 1


ABANDONED_STREAM = """
import asyncio, os, sys
from typing import Annotated

import mlflow, tracewire
from langchain_core.messages import AnyMessage
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from typing_extensions import TypedDict

tracewire.autolog()
model = ChatOpenAI(model="gpt-4o-mini", base_url=os.environ["TEST_BASE_URL"], api_key="sk-test",
                   streaming=True)

class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]

async def agent(state):
    return {"messages": [await model.ainvoke(state["messages"])]}

graph = StateGraph(State)
graph.add_node("agent", agent)
graph.add_edge(START, "agent")
graph.add_edge("agent", END)
app = graph.compile()

@mlflow.trace
def mine(x):
    return x

async def main(how):
    question = {"messages": [("user", "a question long enough to stream in many chunks")]}
    stream = app.astream(question, stream_mode="messages")
    if how == "aclose":  # the caller stops after the first token
        async for _ in stream:
            break
        await stream.aclose()
    else:  # the consuming task is cancelled, as a client's disconnect does in an SSE endpoint
        async def consume():
            async for _ in stream:
                await asyncio.sleep(10)
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.5)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
    mine(1)
    for i in range(3):
        await app.ainvoke({"messages": [("user", f"after {i}")]})

asyncio.run(main(sys.argv[1]))
assert tracewire.flush(30)
"""


@pytest.mark.parametrize("how", ["aclose", "cancel"])
def test_a_stream_abandoned_mid_model_call_keeps_its_trace_and_the_runs_after_it(
    traced: Traced, openai_server: OpenAIServer, tmp_path: Any, how: str
) -> None:
    """The model's run gets no end callback when its stream is closed or
    its task cancelled; it ends with its graph's run, and the task's next runs (and a user's
    span) are traces of their own. Its own process: one event loop per process (langchain-openai
    shares its async HTTP client, and a second ``asyncio.run`` finds its loop closed)."""
    import os
    import subprocess
    import sys

    (tmp_path / "app.py").write_text(ABANDONED_STREAM)
    env = {**os.environ, "TEST_BASE_URL": openai_server.base_url}
    done = subprocess.run(
        [sys.executable, str(tmp_path / "app.py"), how],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    traces = traced.traces(expected=5)
    names = sorted(t.data.spans[0].name for t in traces)
    assert names == ["LangGraph"] * 4 + ["mine"]
    first = min(
        (t for t in traces if t.data.spans[0].name == "LangGraph"),
        key=lambda t: t.info.request_time,
    )
    assert "a question long enough" in json.dumps(first.data.spans[0].inputs)
    model_spans = [s for s in first.data.spans if s.name == "ChatOpenAI"]
    if how == "aclose":
        assert model_spans[0].attributes["tracewire.abandoned"] is True


def test_two_async_streams_consumed_in_turns_in_one_task_are_two_traces(traced: Traced) -> None:
    """Async: a node of the first graph ends where this task's context
    cannot be reset, and stays current in it; the second graph is still a trace of its own."""

    async def add(state: Count) -> Count:
        return {"n": state["n"] + 1}

    async def scale(state: Count) -> Count:
        return {"n": state["n"] * 10}

    graph = StateGraph(Count)
    graph.add_node("add", add)
    graph.add_node("scale", scale)
    graph.add_edge(START, "add")
    graph.add_edge("add", "scale")
    graph.add_edge("scale", END)
    app = graph.compile()

    async def in_turns() -> list[Any]:
        streams, chunks = [app.astream({"n": 1}), app.astream({"n": 2})], []
        while streams:
            for stream in list(streams):
                try:
                    chunks.append(await stream.__anext__())
                except StopAsyncIteration:
                    streams.remove(stream)
        return chunks

    assert len(asyncio.run(in_turns())) == 4
    traces = traced.traces(expected=2)
    assert sorted(t.data.spans[0].inputs["n"] for t in traces) == [1, 2]
    for trace in traces:
        assert shape(trace) == (
            "LangGraph",
            "AGENT",
            [("add", "CHAIN", []), ("scale", "CHAIN", [])],
        )
