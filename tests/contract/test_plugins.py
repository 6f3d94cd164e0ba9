"""The contract every plugin in the registry keeps: patch before or after import, never twice,
unpatch exactly, nothing patched after disable(), and the caller's result unchanged whichever
internal step fails.

A plugin added to the registry must add an exerciser below (the test fails otherwise).
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest

import tracewire
from tests.conftest import API_KEY, Traced
from tracewire.core import guard
from tracewire.plugins import registry
from tracewire.plugins.base import HookPlugin, TracewireWrapper, WrappingPlugin
from tracewire.plugins.registry import PLUGINS
from tracewire.testing import OpenAIServer


def _outcome(fn: Callable[[], Any]) -> Any:
    """A call's result in comparable form, or its exception's type and message."""
    try:
        value = fn()
    except Exception as exc:  # the exception is part of what the caller sees
        return ("raised", type(exc).__name__, str(exc))
    if isinstance(value, list):
        return [_outcome(lambda v=v: v) for v in value]
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in ("id", "created", "created_at")}
    return value


def exercise_openai(server: OpenAIServer) -> list[Any]:
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
    messages = [{"role": "user", "content": "hello contract"}]

    async def async_calls() -> list[Any]:
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
        reply = await aclient.chat.completions.create(model="gpt-4o-mini", messages=messages)
        stream = await aclient.chat.completions.create(
            model="gpt-4o-mini", messages=messages, stream=True
        )
        chunks = [c.choices[0].delta.content if c.choices else None async for c in stream]
        return [reply.choices[0].message.content, chunks]

    return [
        _outcome(lambda: client.chat.completions.create(model="gpt-4o-mini", messages=messages)),
        _outcome(
            lambda: [
                c.model_dump(exclude={"id", "created"})
                for c in client.chat.completions.create(
                    model="gpt-4o-mini", messages=messages, stream=True
                )
            ]
        ),
        _outcome(
            lambda: client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=messages
            ).parse()
        ),
        _outcome(
            lambda: [
                c.choices[0].delta.content
                for c in client.chat.completions.with_raw_response.create(
                    model="gpt-4o-mini", messages=messages, stream=True
                ).parse()
                if c.choices
            ]
        ),
        _outcome(
            lambda: [
                e.type for e in client.responses.create(model="gpt-4o", input="hi", stream=True)
            ]
        ),
        _outcome(lambda: client.embeddings.create(model="text-embedding-3-small", input="hi")),
        _outcome(lambda: client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi")),
        _outcome(lambda: client.chat.completions.create(model="error-500", messages=messages)),
        _outcome(
            lambda: [
                c.choices[0].delta.content
                for c in client.chat.completions.create(
                    model="stream-error", messages=messages, stream=True
                )
                if c.choices
            ]
        ),
        _outcome(lambda: asyncio.run(async_calls())),
    ]


def _chat_openai(server: OpenAIServer, model: str = "gpt-4o-mini") -> Any:
    import openai
    from langchain_openai import ChatOpenAI

    # A fresh async HTTP client: langchain-openai caches one bound to its first event loop.
    return ChatOpenAI(
        model=model,
        base_url=server.base_url,
        api_key=API_KEY,
        max_retries=0,
        http_async_client=openai.DefaultAsyncHttpxClient(),
    )


def exercise_langchain(server: OpenAIServer) -> list[Any]:
    from langchain_core.documents import Document
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.runnables import RunnableLambda
    from langchain_core.tools import tool

    @tool
    def shout(text: str) -> str:
        """Shout the text."""
        return text.upper()

    class Shelf(BaseRetriever):
        def _get_relevant_documents(self, query: str, *, run_manager: Any) -> list[Document]:
            return [Document(page_content=query, id="d1")]

    chain = (
        ChatPromptTemplate.from_messages([("user", "{q}")])
        | _chat_openai(server)
        | StrOutputParser()
    )
    q = {"q": "hello contract"}

    async def async_calls() -> list[Any]:
        return [await chain.ainvoke(q), [c async for c in chain.astream(q)]]

    return [
        _outcome(lambda: chain.invoke(q)),
        _outcome(lambda: list(chain.stream(q))),
        _outcome(lambda: shout.invoke({"text": "hi"})),
        _outcome(lambda: [d.page_content for d in Shelf().invoke("hi")]),
        _outcome(lambda: _chat_openai(server, "error-500").invoke("hi")),
        _outcome(lambda: [c.content for c in _chat_openai(server, "stream-error").stream("hi")]),
        _outcome(
            lambda: (RunnableLambda(lambda x: x + 1) | RunnableLambda(lambda x: 1 / 0)).invoke(1)
        ),
        _outcome(lambda: asyncio.run(async_calls())),
    ]


def exercise_langgraph(server: OpenAIServer) -> list[Any]:
    from typing import Annotated

    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import START, StateGraph
    from langgraph.graph.message import add_messages
    from langgraph.types import Command, interrupt
    from typing_extensions import TypedDict

    # The functional form: this module's postponed annotations could not see these imports.
    State = TypedDict(  # noqa: UP013
        "State",
        {
            "messages": Annotated[list[Any], add_messages],
            "approved": str,
        },
        total=False,
    )

    model = _chat_openai(server)
    graph = StateGraph(State)
    graph.add_node("agent", lambda s: {"messages": [model.invoke(s["messages"])]})
    graph.add_node("ask", lambda s: {"approved": interrupt("ok?")})
    graph.add_edge(START, "agent")
    graph.add_edge("agent", "ask")
    app = graph.compile(checkpointer=InMemorySaver())

    def run(inputs: Any, thread: str) -> Any:
        state = app.invoke(inputs, {"configurable": {"thread_id": thread, "user_id": "u"}})
        return [
            [m.content for m in state["messages"]],
            state.get("approved"),
            [i.value for i in state.get("__interrupt__", [])],
        ]

    async def astreamed() -> list[Any]:
        return [
            list(c)
            async for c in app.astream(
                {"messages": [("user", "hi")]},
                {"configurable": {"thread_id": "c"}},
                stream_mode="updates",
            )
            if "agent" not in c
        ]

    return [
        _outcome(lambda: run({"messages": [("user", "hello contract")]}, "a")),
        _outcome(lambda: run(Command(resume="yes"), "a")),
        _outcome(
            lambda: [
                list(c)
                for c in app.stream(
                    {"messages": [("user", "hi")]}, {"configurable": {"thread_id": "b"}}
                )
            ]
        ),
        _outcome(lambda: asyncio.run(astreamed())),
    ]


def exercise_starlette(server: OpenAIServer) -> list[Any]:
    import httpx
    import openai
    from fastapi import FastAPI
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    client = openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
    app = FastAPI()

    @app.get("/ask")
    async def ask(q: str) -> dict[str, Any]:
        reply = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": q}]
        )
        return {"reply": reply.choices[0].message.content}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    app.mount("/sub", Starlette(routes=[Route("/hi", lambda r: PlainTextResponse("hi"))]))

    async def calls() -> list[Any]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            # What the caller sees of a response: status and body (tracewire adds headers).
            return [
                (r.status_code, r.text)
                for r in [
                    await http.get("/ask", params={"q": "hello contract"}),
                    await http.get("/boom"),
                    await http.get("/sub/hi"),
                    await http.get("/nope"),
                ]
            ]

    return [_outcome(lambda: asyncio.run(calls()))]


def exercise_mlflow_agent(server: OpenAIServer) -> list[Any]:
    """A ResponsesAgent through MLflow's pyfunc loader, as ``mlflow models serve`` calls it."""
    import openai
    from mlflow.pyfunc import ResponsesAgent
    from mlflow.pyfunc.loaders.responses_agent import _ResponsesAgentPyfuncWrapper
    from mlflow.types.responses import ResponsesAgentRequest, ResponsesAgentResponse

    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)

    class Agent(ResponsesAgent):  # type: ignore[misc]
        def predict(self, request: ResponsesAgentRequest) -> ResponsesAgentResponse:
            text = request.input[-1].content
            if text == "fail":
                raise ValueError("the agent failed")
            reply = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
            )
            return ResponsesAgentResponse(
                output=[
                    self.create_text_output_item(
                        text=reply.choices[0].message.content or "", id="msg-1"
                    )
                ]
            )

    served = _ResponsesAgentPyfuncWrapper(Agent(), None)

    def ask(text: str) -> Any:
        with tracewire.context(request_id=f"agent-{text}"):
            return served.predict(
                {
                    "input": [{"role": "user", "content": text}],
                    "context": {"conversation_id": "conv-1", "user_id": "user-1"},
                }
            )

    return [_outcome(lambda: ask("hello contract")), _outcome(lambda: ask("fail"))]


EXERCISERS: dict[str, Callable[[OpenAIServer], list[Any]]] = {
    "openai": exercise_openai,
    "langchain": exercise_langchain,
    "langgraph": exercise_langgraph,
    "starlette": exercise_starlette,
    "mlflow_agent": exercise_mlflow_agent,
}

pytestmark = pytest.mark.parametrize("name", sorted(PLUGINS))


def test_every_plugin_has_an_exerciser(name: str) -> None:
    assert name in EXERCISERS


def _targets(name: str) -> list[tuple[Any, str]]:
    plugin = registry.get(name)
    importlib.import_module(plugin.module)
    if isinstance(plugin, HookPlugin):
        return []
    assert isinstance(plugin, WrappingPlugin)
    found = [(owner, attr) for owner, attr, _ in plugin.targets()]
    assert found, f"plugin {name} wraps nothing"
    return found


def _run_python(code: tuple[str, ...], tmp_path: Any) -> None:
    env_code = textwrap.dedent(f"""
        import os, sys
        os.environ["MLFLOW_TRACKING_URI"] = "sqlite:///{tmp_path}/mlflow.db"
        os.environ["TRACEWIRE_TESTING"] = "1"
    """) + "\n".join(textwrap.dedent(part) for part in code)
    result = subprocess.run(
        [sys.executable, "-c", env_code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _attached(name: str) -> str:
    """Code for a fresh process: whether the framework calls into the plugin now."""
    return f"""
        from tracewire.plugins import registry
        attached = registry.get({name!r}).attached()
    """


def test_patch_before_import(name: str, tmp_path: Any) -> None:
    _run_python(
        (
            f"""
        import tracewire
        tracewire.autolog()
        import {registry.get(name).module}
        assert {registry.get(name).module!r} in sys.modules
    """,
            _attached(name),
            "assert attached",
        ),
        tmp_path,
    )


def test_disable_then_first_import_patches_nothing(name: str, tmp_path: Any) -> None:
    _run_python(
        (
            f"""
        import tracewire
        tracewire.autolog()
        tracewire.disable()
        import {registry.get(name).module}
    """,
            _attached(name),
            "assert not attached",
        ),
        tmp_path,
    )


def test_patch_after_import_once_and_unpatch_exactly(name: str, traced: Traced) -> None:
    tracewire.disable()
    originals = {(o, a): vars(o)[a] for o, a in _targets(name)}
    assert not any(isinstance(f, TracewireWrapper) for f in originals.values())
    traced.enable()
    traced.enable()  # idempotent
    for (owner, attr), original in originals.items():
        current = vars(owner)[attr]
        assert isinstance(current, TracewireWrapper)
        assert current.__wrapped__ is original  # wrapped exactly once
    tracewire.disable()
    for (owner, attr), original in originals.items():
        assert vars(owner)[attr] is original
    traced.enable()
    plugin = registry.get(name)
    assert plugin.attached()
    if isinstance(plugin, HookPlugin):  # registered once, kept across disable() (for good)
        assert plugin.registered() == 1
        tracewire.disable()
        assert plugin.registered() == 1 and not plugin.attached()
        traced.enable()
        assert plugin.registered() == 1 and plugin.attached()


def test_every_step_can_fail_without_the_caller_noticing(
    name: str, traced: Traced, openai_server: OpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def exercise(server: OpenAIServer) -> list[Any]:
        # A failed `deactivate` leaves its span current in the caller's context by design (it
        # failed); a fresh context per run keeps that from leaking into the next case.
        return contextvars.copy_context().run(EXERCISERS[name], server)

    with traced.untraced():
        expected = exercise(openai_server)

    seen: set[str] = set()
    monkeypatch.setattr(guard, "fault", lambda step: seen.add(step) or False)
    assert exercise(openai_server) == expected
    assert len(seen) >= 4, seen  # start, activate, deactivate, finish at least

    monkeypatch.setattr(guard, "TESTING", False)  # what production runs with
    for step in sorted(seen):
        monkeypatch.setattr(guard, "fault", lambda s, step=step: s == step)
        assert exercise(openai_server) == expected, f"step {step} leaked into the call"
    monkeypatch.setattr(guard, "fault", lambda s: True)
    assert exercise(openai_server) == expected
    monkeypatch.setattr(guard, "fault", None)
    tracewire.flush(30)
