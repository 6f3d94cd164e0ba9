"""Our spans and the user's own MLflow spans end up in one trace, parented correctly, in either
nesting order, sync and async."""

from __future__ import annotations

import asyncio

import mlflow
import openai

from tests.conftest import Traced
from tracewire.core import span_context

USER = [{"role": "user", "content": "nest me"}]


def _tree(trace: mlflow.entities.Trace) -> dict[str, str | None]:
    """span name -> parent span name."""
    by_id = {s.span_id: s for s in trace.data.spans}
    return {s.name: (by_id[s.parent_id].name if s.parent_id else None) for s in trace.data.spans}


def test_user_span_inside_ours_and_ours_inside_it(traced: Traced, client: openai.OpenAI) -> None:
    @mlflow.trace(name="user_step")
    def user_step() -> str:
        reply = client.chat.completions.create(model="gpt-4o-mini", messages=USER)
        return reply.choices[0].message.content

    outer = span_context.start_span("outer", "CHAIN")
    tokens = span_context.activate(outer)
    try:
        assert user_step() == "Echo: nest me"
    finally:
        span_context.deactivate(tokens)
        outer.end()

    trace = traced.trace()
    assert _tree(trace) == {"outer": None, "user_step": "outer", "chat gpt-4o-mini": "user_step"}
    assert trace.info.trace_id == outer.trace.trace_id
    assert trace.info.token_usage["input_tokens"] == 3 + 2


def test_ours_inside_user_span_inside_ours_inside_user_root(
    traced: Traced, client: openai.OpenAI
) -> None:
    with mlflow.start_span("user_root"):
        middle = span_context.start_span("ours", "CHAIN")
        tokens = span_context.activate(middle)
        try:
            with mlflow.start_span("user_inner"):
                client.chat.completions.create(model="gpt-4o-mini", messages=USER)
        finally:
            span_context.deactivate(tokens)
            middle.end()

    trace = traced.trace()
    assert _tree(trace) == {
        "user_root": None,
        "ours": "user_root",
        "user_inner": "ours",
        "chat gpt-4o-mini": "user_inner",
    }
    assert trace.info.token_usage["total_tokens"] > 0


def test_async_user_span_inside_ours(traced: Traced, aclient) -> None:  # type: ignore[no-untyped-def]
    @mlflow.trace(name="async_step")
    async def async_step() -> str:
        reply = await aclient().chat.completions.create(model="gpt-4o-mini", messages=USER)
        return reply.choices[0].message.content

    async def run() -> list[str]:
        outer = span_context.start_span("outer", "CHAIN")
        tokens = span_context.activate(outer)
        try:
            return await asyncio.gather(async_step(), async_step())
        finally:
            span_context.deactivate(tokens)
            outer.end()

    assert asyncio.run(run()) == ["Echo: nest me"] * 2
    trace = traced.trace()
    names = sorted(s.name for s in trace.data.spans)
    assert names == ["async_step", "async_step", "chat gpt-4o-mini", "chat gpt-4o-mini", "outer"]
    by_id = {s.span_id: s for s in trace.data.spans}
    for span in trace.data.spans:
        if span.name == "chat gpt-4o-mini":
            assert by_id[span.parent_id].name == "async_step"


def test_user_only_traces_go_through_our_pipeline(traced: Traced) -> None:
    @mlflow.trace
    def plain(x: int) -> int:
        return x + 1

    assert plain(1) == 2
    trace = traced.trace()
    assert [s.name for s in trace.data.spans] == ["plain"]
    assert trace.data.spans[0].outputs == 2


def test_concurrent_roots_do_not_mix(traced: Traced, aclient) -> None:  # type: ignore[no-untyped-def]
    async def one(i: int) -> None:
        outer = span_context.start_span(f"root-{i}", "CHAIN")
        tokens = span_context.activate(outer)
        try:
            await aclient().chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"n{i}"}]
            )
        finally:
            span_context.deactivate(tokens)
            outer.end()

    async def run() -> None:
        await asyncio.gather(*(one(i) for i in range(20)))

    asyncio.run(run())
    traces = traced.traces(expected=20)
    for trace in traces:
        root = next(s for s in trace.data.spans if s.parent_id is None)
        i = root.name.split("-")[1]
        child = next(s for s in trace.data.spans if s.parent_id == root.span_id)
        assert child.inputs["messages"][0]["content"] == f"n{i}"


def test_a_span_ended_where_its_context_was_not_reset_is_no_ones_parent(
    traced: Traced, client: openai.OpenAI
) -> None:
    """A span ended from another context (an async stream closed by another
    task) stays current here; ours, the user's and the OpenAI client's spans started next nest
    under the nearest span still open, never under the ended one."""
    outer = span_context.start_span("outer", "CHAIN")
    outer_tokens = span_context.activate(outer)
    try:
        inner = span_context.start_span("inner", "CHAIN")
        span_context.activate(inner)  # never deactivated here: its end comes from elsewhere
        inner.end()
        assert span_context.current() is outer
        with mlflow.start_span("user_step"):
            client.chat.completions.create(model="gpt-4o-mini", messages=USER)
        ours = span_context.start_span("ours", "CHAIN")
        ours.end()
    finally:
        span_context.deactivate(outer_tokens)
        outer.end()

    trace = traced.trace()
    assert _tree(trace) == {
        "outer": None,
        "inner": "outer",
        "user_step": "outer",
        "chat gpt-4o-mini": "user_step",
        "ours": "outer",
    }
