"""The LangChain plugin with real langchain-core objects (its fake chat model, made to report
usage and tool calls) and langchain-openai's ChatOpenAI over real HTTP to the local server.
Every case checks the caller's result and reads the trace back through MLflow's API."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import mlflow
import openai
import pytest
from langchain_core.documents import Document
from langchain_core.messages import HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

import tracewire
from tests.conftest import API_KEY, Traced
from tests.support.langchain_fakes import FakeChat, reply
from tracewire.testing import OpenAIServer
from tracewire.testing.openai_server import count_tokens

QUESTION = "What is the capital of France"
# The local server's counts: 3 + words per message in, the words of "Echo: <question>" out.
PROMPT_TOKENS = 3 + count_tokens(QUESTION)
ECHO_TOKENS = count_tokens("Echo: " + QUESTION)
SERVER_USAGE = {
    "input_tokens": PROMPT_TOKENS,
    "output_tokens": ECHO_TOKENS,
    "total_tokens": PROMPT_TOKENS + ECHO_TOKENS,
    "cache_read_input_tokens": 0,
}


def tree(trace: mlflow.entities.Trace) -> dict[str, tuple[str, str | None]]:
    """span name -> (span type, parent span name); names in these cases are unique."""
    by_id = {s.span_id: s for s in trace.data.spans}
    names = [s.name for s in trace.data.spans]
    assert len(names) == len(set(names)), names
    return {
        s.name: (s.span_type, by_id[s.parent_id].name if s.parent_id else None)
        for s in trace.data.spans
    }


def span(trace: mlflow.entities.Trace, name: str) -> Any:
    return next(s for s in trace.data.spans if s.name == name)


@tool
def capital(country: str) -> str:
    """The capital of a country."""
    return {"France": "Paris"}.get(country, "unknown")


class Shelf(BaseRetriever):
    """A retriever over two fixed documents."""

    def _get_relevant_documents(self, query: str, *, run_manager: Any) -> list[Document]:
        return [
            Document(page_content=f"{query} is Paris", metadata={"source": "atlas"}, id="d1"),
            Document(page_content="France is in Europe", metadata={}, id="d2"),
        ]


def chat_openai(server: OpenAIServer, **kwargs: Any) -> ChatOpenAI:
    # A fresh async HTTP client: langchain-openai caches one per base URL, bound to the event
    # loop it first ran in, and each test's asyncio.run() has its own loop.
    return ChatOpenAI(
        model="gpt-4o-mini",
        base_url=server.base_url,
        api_key=API_KEY,
        max_retries=0,
        http_async_client=openai.DefaultAsyncHttpxClient(),
        **kwargs,
    )


# --------------------------------------------------------------------------- chat models


def test_chat_model_messages_tools_tool_calls_and_usage(traced: Traced) -> None:
    call = {"name": "capital", "args": {"country": "France"}, "id": "call_1", "type": "tool_call"}
    model = FakeChat.scripted(reply(tool_calls=[call], input_tokens=12, output_tokens=7))
    result = model.bind_tools([capital]).invoke([HumanMessage(QUESTION)])
    assert result.tool_calls == [call]

    trace = traced.trace()
    chat = trace.data.spans[0]
    assert (chat.name, chat.span_type, chat.parent_id) == ("FakeChat", "CHAT_MODEL", None)
    assert chat.inputs["messages"] == [{"role": "user", "content": QUESTION}]
    assert chat.attributes["mlflow.chat.tools"][0]["function"]["name"] == "capital"
    assert chat.attributes["mlflow.llm.provider"] == "fake"
    assert chat.attributes["mlflow.message.format"] == "langchain"
    message = chat.outputs["generations"][0][0]["message"]
    assert message["tool_calls"] == [call]
    assert chat.attributes["mlflow.chat.tokenUsage"] == {
        "input_tokens": 12,
        "output_tokens": 7,
        "total_tokens": 19,
    }
    assert trace.info.token_usage == {"input_tokens": 12, "output_tokens": 7, "total_tokens": 19}


def test_chain_of_prompt_model_parser_tool_and_retriever(traced: Traced) -> None:
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer from: {context}"), ("user", "{question}")]
    )
    model = FakeChat.scripted(reply("Paris", input_tokens=20, output_tokens=1))

    def answer(question: str) -> str:
        docs = Shelf().invoke(question)
        city = capital.invoke({"country": "France"})
        chain = prompt | model | StrOutputParser()
        return chain.invoke({"question": question, "context": docs[0].page_content + city})

    assert RunnableLambda(answer).invoke("France") == "Paris"

    trace = traced.trace()
    assert tree(trace) == {
        "answer": ("CHAIN", None),
        "Shelf": ("RETRIEVER", "answer"),
        "capital": ("TOOL", "answer"),
        "RunnableSequence": ("CHAIN", "answer"),
        "ChatPromptTemplate": ("CHAIN", "RunnableSequence"),
        "FakeChat": ("CHAT_MODEL", "RunnableSequence"),
        "StrOutputParser": ("CHAIN", "RunnableSequence"),
    }
    root = span(trace, "answer")
    assert (root.inputs, root.outputs) == ("France", "Paris")
    retriever = span(trace, "Shelf")
    assert retriever.inputs == {"query": "France"}
    assert retriever.outputs == [
        {"page_content": "France is Paris", "metadata": {"source": "atlas"}, "id": "d1"},
        {"page_content": "France is in Europe", "metadata": {}, "id": "d2"},
    ]
    tool_span = span(trace, "capital")
    assert (tool_span.inputs, tool_span.outputs) == ({"country": "France"}, "Paris")
    assert span(trace, "FakeChat").inputs["messages"][0] == {
        "role": "system",
        "content": "Answer from: France is ParisParis",
    }
    assert trace.info.token_usage["total_tokens"] == 21


def test_failure_marks_the_span_and_reaches_the_caller_unchanged(traced: Traced) -> None:
    def broken(_: Any) -> None:
        raise KeyError("no such city")

    chain = RunnableLambda(lambda x: x) | RunnableLambda(broken)
    with pytest.raises(KeyError, match="no such city"):
        chain.invoke("x")

    trace = traced.trace()
    assert trace.info.state.value == "ERROR"
    failed = span(trace, "broken")
    assert failed.status.status_code.value == "ERROR"
    assert failed.events[0].attributes["exception.type"] == "KeyError"
    assert span(trace, "RunnableSequence").status.status_code.value == "ERROR"


# --------------------------------------------------------------------------- ChatOpenAI: counted once


def _chat_openai_tree(trace: mlflow.entities.Trace) -> None:
    assert tree(trace) == {
        "ChatOpenAI": ("CHAT_MODEL", None),
        "chat gpt-4o-mini": ("CHAT_MODEL", "ChatOpenAI"),
    }
    outer = span(trace, "ChatOpenAI")
    assert outer.attributes["mlflow.llm.model"] == "gpt-4o-mini"
    assert outer.attributes["mlflow.llm.provider"] == "openai"
    # Both layers see the call; the trace counts it once (the inner span is the outer's child).
    assert outer.attributes["mlflow.chat.tokenUsage"] == SERVER_USAGE
    assert span(trace, "chat gpt-4o-mini").attributes["mlflow.chat.tokenUsage"] == SERVER_USAGE
    assert trace.info.token_usage == SERVER_USAGE
    # Cost likewise: both spans are priced, the trace counts the call once.
    cost = outer.attributes["mlflow.llm.cost"]
    assert cost["total_cost"] > 0
    assert json.loads(trace.info.trace_metadata["mlflow.trace.cost"]) == cost


def test_chat_openai_sync_counts_tokens_once(traced: Traced, openai_server: OpenAIServer) -> None:
    assert chat_openai(openai_server).invoke(QUESTION).content == "Echo: " + QUESTION
    _chat_openai_tree(traced.trace())


def test_chat_openai_async_counts_tokens_once(traced: Traced, openai_server: OpenAIServer) -> None:
    result = asyncio.run(chat_openai(openai_server).ainvoke(QUESTION))
    assert result.content == "Echo: " + QUESTION
    _chat_openai_tree(traced.trace())


def test_chat_openai_streams_count_tokens_once(traced: Traced, openai_server: OpenAIServer) -> None:
    model = chat_openai(openai_server, stream_usage=True)
    chunks = list(model.stream(QUESTION))
    assert "".join(c.content for c in chunks) == "Echo: " + QUESTION

    async def consume() -> str:
        return "".join([c.content async for c in model.astream(QUESTION)])

    assert asyncio.run(consume()) == "Echo: " + QUESTION
    for trace in traced.traces(expected=2):
        _chat_openai_tree(trace)


def test_chat_openai_streaming_with_a_base_url_records_usage(
    traced: Traced, openai_server: OpenAIServer
) -> None:
    """`ChatOpenAI(streaming=True, base_url=...)` asks for no stream usage (LangChain turns it off
    for a custom base URL): tracewire asks, records it on the OpenAI span, and hides it, so
    LangChain's result is what it is untraced."""

    def run() -> list[Any]:
        model = chat_openai(openai_server, streaming=True)
        return [
            model.invoke(QUESTION),
            list(model.stream(QUESTION)),
            asyncio.run(model.ainvoke(QUESTION)),
        ]

    with traced.untraced():
        expected = run()
    openai_server.clear()
    got = run()
    for result, want in zip(got, expected):
        results = result if isinstance(result, list) else [result]
        wants = want if isinstance(want, list) else [want]
        assert [
            (r.content, r.usage_metadata, r.response_metadata.get("finish_reason")) for r in results
        ] == [
            (w.content, w.usage_metadata, w.response_metadata.get("finish_reason")) for w in wants
        ]
    assert got[0].content == "Echo: " + QUESTION and got[0].usage_metadata is None
    assert [r.body.get("stream_options") for r in openai_server.requests] == [
        {"include_usage": True}
    ] * 3
    for trace in traced.traces(expected=3):
        assert tree(trace) == {
            "ChatOpenAI": ("CHAT_MODEL", None),
            "chat gpt-4o-mini": ("CHAT_MODEL", "ChatOpenAI"),
        }
        assert span(trace, "chat gpt-4o-mini").attributes["mlflow.chat.tokenUsage"] == SERVER_USAGE
        assert trace.info.token_usage == SERVER_USAGE
        assert json.loads(trace.info.trace_metadata["mlflow.trace.cost"])["total_cost"] > 0


# --------------------------------------------------------------------------- switches


@pytest.mark.parametrize("traced", [{"capture_content": False}], indirect=True)
def test_capture_content_false_records_no_text(traced: Traced, openai_server: OpenAIServer) -> None:
    secret = "Ultraviolet-Kumquat"
    shelf, model = Shelf(), chat_openai(openai_server)

    def run(question: str) -> str:
        shelf.invoke(question)
        capital.invoke({"country": secret})
        return model.bind_tools([capital]).invoke(question).content

    RunnableLambda(run).invoke(secret)
    trace = traced.trace()
    dumped = json.dumps([s.to_dict() for s in trace.data.spans])
    assert secret not in dumped and "is in Europe" not in dumped
    assert span(trace, "ChatOpenAI").attributes["mlflow.chat.tokenUsage"]["input_tokens"] > 0
    assert span(trace, "Shelf").outputs == {"count": 2}


def test_disable_stops_tracing_and_autolog_resumes_it(traced: Traced) -> None:
    from langchain_core.callbacks.manager import CallbackManager

    model = FakeChat.scripted(reply("hi"))
    tracewire.disable()
    assert CallbackManager.configure().handlers == []  # nothing of ours while disabled
    assert model.invoke("hello").content == "hi"
    traced.enable()
    assert model.invoke("hello").content == "hi"
    assert [s.name for s in traced.trace().data.spans] == ["FakeChat"]


@pytest.mark.parametrize("mlflow_first", [False, True], ids=["after", "before"])
def test_mlflow_langchain_autolog_does_not_trace_twice(traced: Traced, mlflow_first: bool) -> None:
    if mlflow_first:
        tracewire.disable()
    mlflow.langchain.autolog()
    try:
        if mlflow_first:
            traced.enable()
        assert FakeChat.scripted(reply("hi")).invoke("hello").content == "hi"
    finally:
        mlflow.langchain.autolog(disable=True)
    assert [s.name for s in traced.trace().data.spans] == ["FakeChat"]


# --------------------------------------------------------------------------- threads


def test_propagate_carries_the_run_into_a_thread_pool(traced: Traced) -> None:
    model = FakeChat.scripted(reply("hi", input_tokens=1, output_tokens=1))

    def fan_out(_: str, config: Any) -> list[str]:
        with ThreadPoolExecutor(2) as pool:
            carried = pool.submit(tracewire.propagate(lambda: model.invoke("a").content))
            # LangChain's config names the parent run, so this one finds its parent too.
            with_config = pool.submit(lambda: model.invoke("b", config).content)
            lost = pool.submit(lambda: model.invoke("c").content)
            return [carried.result(), with_config.result(), lost.result()]

    assert RunnableLambda(fan_out).invoke("go") == ["hi", "hi", "hi"]
    carried, lost = traced.traces(expected=2)
    assert carried.data.spans[0].name == "fan_out"
    assert sorted(
        (s.name, s.inputs["messages"][0]["content"])
        for s in carried.data.spans
        if s.parent_id is not None
    ) == [("FakeChat", "a"), ("FakeChat", "b")]
    assert all(s.parent_id == carried.data.spans[0].span_id for s in carried.data.spans[1:])
    assert [s.name for s in lost.data.spans] == ["FakeChat"]  # a trace of its own


def test_batch_runs_on_langchains_pool_stay_under_their_parent(traced: Traced) -> None:
    model = FakeChat.scripted(reply("hi", input_tokens=1, output_tokens=1))

    def fan_out(_: str) -> list[str]:
        return [m.content for m in model.batch(["a", "b", "c"])]

    assert RunnableLambda(fan_out).invoke("go") == ["hi"] * 3
    trace = traced.trace()
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.name == "fan_out"
    assert sorted(
        s.inputs["messages"][0]["content"] for s in trace.data.spans if s.parent_id == root.span_id
    ) == ["a", "b", "c"]
    assert trace.info.token_usage["total_tokens"] == 6


def test_a_sequences_batch_is_one_trace_per_input_and_leaves_nothing_current(
    traced: Traced,
) -> None:
    """``RunnableSequence.batch`` starts every input's run in the caller's thread, one after
    the other, before any ends: no run may become the next one's parent."""
    from tracewire.core import span_context

    def half(x: int) -> float:
        if x == 0:
            raise ZeroDivisionError("no half of nothing")
        return 1 / x

    chain = RunnableLambda(lambda x: x * 2, name="double") | RunnableLambda(half, name="half")
    results = chain.batch([1, 0, 2], return_exceptions=True)
    assert results[0] == 0.5 and results[2] == 0.25 and isinstance(results[1], ZeroDivisionError)
    assert span_context.current() is None  # nothing of ours left current in the caller's context

    @mlflow.trace
    def after(x: int) -> int:
        return x + 1

    assert after(1) == 2
    traces = traced.traces(expected=4)
    by_input = {t.data.spans[0].inputs: t for t in traces if t.data.spans[0].name != "after"}
    assert sorted(by_input) == [0, 1, 2]
    for x, trace in by_input.items():
        assert tree(trace) == {
            "RunnableSequence": ("CHAIN", None),
            "double": ("CHAIN", "RunnableSequence"),
            "half": ("CHAIN", "RunnableSequence"),
        }
        assert trace.info.state.value == ("ERROR" if x == 0 else "OK")
    assert [t.data.spans[0].name for t in traces].count("after") == 1


def test_propagate_carries_the_run_into_run_in_executor(traced: Traced, client: Any) -> None:
    def ask() -> str:
        return (
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": QUESTION}]
            )
            .choices[0]
            .message.content
        )

    async def step(_: str) -> list[str]:
        loop = asyncio.get_running_loop()
        carried = await loop.run_in_executor(None, tracewire.propagate(ask))
        lost = await loop.run_in_executor(None, ask)
        return [carried, lost]

    assert asyncio.run(RunnableLambda(step).ainvoke("go")) == ["Echo: " + QUESTION] * 2
    carried, lost = traced.traces(expected=2)
    assert tree(carried) == {"step": ("CHAIN", None), "chat gpt-4o-mini": ("CHAT_MODEL", "step")}
    assert carried.info.token_usage == SERVER_USAGE
    assert [s.name for s in lost.data.spans] == ["chat gpt-4o-mini"]


def test_a_run_that_ends_in_another_context_ends_cleanly(traced: Traced) -> None:
    import contextvars

    from langchain_core.callbacks.manager import CallbackManager

    from tracewire.core import span_context

    started, ended = contextvars.copy_context(), contextvars.copy_context()
    manager = CallbackManager.configure()
    run = started.run(manager.on_chain_start, None, {"x": 1}, name="split")
    assert started.run(span_context.current) is not None
    ended.run(run.on_chain_end, {"y": 2})  # its context token cannot be reset here: no error
    assert ended.run(span_context.current) is None and span_context.current() is None
    span = traced.trace().data.spans[0]
    assert (span.name, span.inputs, span.outputs) == ("split", {"x": 1}, {"y": 2})


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_parallel_branches_nest_under_their_branch(traced: Traced, asynchronous: bool) -> None:
    from langchain_core.runnables import RunnableParallel

    model = FakeChat.scripted(reply("hi", input_tokens=1, output_tokens=1))
    parallel = RunnableParallel(
        left=RunnableLambda(lambda x: x + "L", name="left") | model,
        right=RunnableLambda(lambda x: x + "R", name="right") | model,
    )
    result = asyncio.run(parallel.ainvoke("go")) if asynchronous else parallel.invoke("go")
    assert {k: v.content for k, v in result.items()} == {"left": "hi", "right": "hi"}

    trace = traced.trace()
    by_id = {s.span_id: s for s in trace.data.spans}
    chats = [s for s in trace.data.spans if s.name == "FakeChat"]
    # Each model call sits in its own branch's sequence, next to that branch's lambda.
    for chat in chats:
        siblings = {s.name for s in trace.data.spans if s.parent_id == chat.parent_id}
        prompt = chat.inputs["messages"][0]["content"]
        assert siblings == {"FakeChat", "left" if prompt == "goL" else "right"}
        assert by_id[by_id[chat.parent_id].parent_id].name == "RunnableParallel<left,right>"
    assert trace.info.token_usage["total_tokens"] == 4


def test_llm_usage_from_llm_output(traced: Traced) -> None:
    from langchain_core.language_models.fake import FakeListLLM
    from langchain_core.outputs import Generation, LLMResult

    class CountingLLM(FakeListLLM):
        """A completion model that reports usage the older way: in ``llm_output``."""

        def _generate(
            self, prompts: list[str], stop: Any = None, run_manager: Any = None, **kwargs: Any
        ) -> LLMResult:
            return LLMResult(
                generations=[[Generation(text="Paris")] for _ in prompts],
                llm_output={
                    "model_name": "fake-instruct",
                    "token_usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
                },
            )

    assert CountingLLM(responses=[]).invoke(QUESTION) == "Paris"
    trace = traced.trace()
    llm = trace.data.spans[0]
    assert (llm.name, llm.span_type) == ("CountingLLM", "LLM")
    assert llm.inputs == {"prompts": [QUESTION]}
    assert llm.outputs["generations"][0][0]["text"] == "Paris"
    assert llm.attributes["mlflow.llm.model"] == "fake-instruct"
    assert trace.info.token_usage == {"input_tokens": 5, "output_tokens": 1, "total_tokens": 6}
