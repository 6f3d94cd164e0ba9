"""The OpenAI plugin against the real `openai` client, over real HTTP to the local server.

Every case checks that the caller's result is what it is untraced, and reads the trace back
through MLflow's API: span tree, type, inputs, outputs, token usage, state.
"""

from __future__ import annotations

import asyncio
import gc
import json
from typing import Any
from urllib.parse import urlsplit

import mlflow
import openai
import pydantic
import pytest

import tracewire
from tests.conftest import API_KEY, Traced
from tracewire.core import guard
from tracewire.testing import OpenAIServer
from tracewire.testing.openai_server import count_tokens

USER = [{"role": "user", "content": "What is the capital of France"}]
PROMPT_TOKENS = 3 + count_tokens(USER[0]["content"])
ECHO = "Echo: What is the capital of France"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look a city up",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]

# The server reports its prompt cache (none here): a 0 is kept, as MLflow keeps it.
STREAM_USAGE = {
    "input_tokens": PROMPT_TOKENS,
    "output_tokens": count_tokens(ECHO),
    "total_tokens": PROMPT_TOKENS + count_tokens(ECHO),
    "cache_read_input_tokens": 0,
}

# Server-generated identifiers differ between two calls; everything else must be equal.
_VOLATILE = {"id", "created", "created_at", "item_id", "response_id", "sequence_number"}


def normalized(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    if isinstance(value, dict):
        return {k: normalized(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [normalized(v) for v in value]
    return value


def usage(trace: mlflow.entities.Trace) -> dict[str, int]:
    return {k: v for k, v in trace.info.token_usage.items()}


def only_span(trace: mlflow.entities.Trace) -> Any:
    assert len(trace.data.spans) == 1
    return trace.data.spans[0]


# --------------------------------------------------------------------------- chat completions


def test_chat_create_sync(traced: Traced, client: openai.OpenAI) -> None:
    with traced.untraced():
        expected = client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    result = client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert normalized(result) == normalized(expected)

    trace = traced.trace()
    span = only_span(trace)
    assert span.span_type == "CHAT_MODEL"
    assert span.name == "chat gpt-4o-mini"
    assert span.parent_id is None
    assert span.inputs == {"model": "gpt-4o-mini", "messages": USER}
    assert span.outputs["choices"][0]["message"]["content"] == ECHO
    assert span.attributes["mlflow.llm.model"] == "gpt-4o-mini"
    assert span.attributes["mlflow.llm.provider"] == "openai"
    assert span.attributes["gen_ai.response.model"] == result.model
    assert span.attributes["mlflow.chat.tokenUsage"] == STREAM_USAGE
    assert usage(trace) == span.attributes["mlflow.chat.tokenUsage"]
    assert trace.info.state.value == "OK"


def test_chat_create_async(traced: Traced, aclient: Any) -> None:
    async def call() -> Any:
        return await aclient().chat.completions.create(model="gpt-4o-mini", messages=USER)

    with traced.untraced():
        expected = asyncio.run(call())
    assert normalized(asyncio.run(call())) == normalized(expected)
    span = only_span(traced.trace())
    assert span.outputs["choices"][0]["message"]["content"] == ECHO
    assert span.attributes["mlflow.chat.tokenUsage"]["input_tokens"] == PROMPT_TOKENS


def test_chat_tool_call_and_cached_tokens(traced: Traced, client: openai.OpenAI) -> None:
    with traced.untraced():
        expected = client.chat.completions.create(model="gpt-4o-cached", messages=USER, tools=TOOLS)
    result = client.chat.completions.create(model="gpt-4o-cached", messages=USER, tools=TOOLS)
    assert normalized(result) == normalized(expected)
    assert result.choices[0].message.tool_calls[0].function.name == "lookup"

    span = only_span(traced.trace())
    assert span.attributes["mlflow.chat.tools"] == TOOLS
    tool_call = span.outputs["choices"][0]["message"]["tool_calls"][0]
    assert tool_call["function"]["name"] == "lookup"
    assert json.loads(tool_call["function"]["arguments"]) == {"city": USER[0]["content"]}
    assert (
        span.attributes["mlflow.chat.tokenUsage"]["cache_read_input_tokens"] == PROMPT_TOKENS // 2
    )


class Capital(pydantic.BaseModel):
    city: str
    population: int


def test_a_reply_that_cannot_be_recorded_still_ends_its_span(
    traced: Traced, client: openai.OpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tracewire.plugins import openai_call

    def unreadable(usage: Any) -> Any:
        raise RuntimeError("odd usage")

    monkeypatch.setattr(guard, "TESTING", False)  # what production runs with
    monkeypatch.setattr(openai_call.usage, "from_openai", unreadable)
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content
    trace = traced.trace()  # stored: the span ended, its trace did not wait for the timeout
    assert trace.data.spans[0].name == "chat gpt-4o-mini"


def test_chat_parse(traced: Traced, client: openai.OpenAI) -> None:
    with traced.untraced():
        expected = client.chat.completions.parse(
            model="gpt-4o", messages=USER, response_format=Capital
        )
    result = client.chat.completions.parse(model="gpt-4o", messages=USER, response_format=Capital)
    assert result.choices[0].message.parsed == expected.choices[0].message.parsed
    span = only_span(traced.trace())
    assert span.span_type == "CHAT_MODEL"
    assert json.loads(span.outputs["choices"][0]["message"]["content"])["population"] == 1
    assert span.attributes["mlflow.chat.tokenUsage"]["input_tokens"] == PROMPT_TOKENS


# --------------------------------------------------------------------------- chat streaming


def _stream(client: openai.OpenAI, **kwargs: Any) -> list[Any]:
    return list(
        client.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True, **kwargs)
    )


def test_stream_gets_usage_without_the_caller_seeing_it(
    traced: Traced, client: openai.OpenAI, openai_server: OpenAIServer
) -> None:
    with traced.untraced():
        expected = _stream(client)
    openai_server.clear()
    chunks = _stream(client)
    # The caller sees the same chunks: count, content, finish reasons...
    assert len(chunks) == len(expected)
    assert [normalized(c.choices) for c in chunks] == [normalized(c.choices) for c in expected]
    # ... and the same JSON, but for the `"usage": null` the server adds once asked for usage.
    for got, want in zip(chunks, expected):
        as_json = json.loads(got.to_json())
        assert as_json.pop("usage") is None
        assert normalized(as_json) == normalized(json.loads(want.to_json()))
    assert openai_server.requests[-1].body["stream_options"] == {"include_usage": True}

    trace = traced.trace()
    span = only_span(trace)
    assert span.outputs["choices"][0]["message"]["content"] == ECHO
    assert span.outputs["choices"][0]["finish_reason"] == "stop"
    assert span.attributes["gen_ai.response.model"] == chunks[0].model  # as a reply's is
    assert span.attributes["mlflow.chat.tokenUsage"] == STREAM_USAGE
    assert usage(trace) == STREAM_USAGE
    # Priced too: the store's built-in table knows gpt-4o-mini.
    assert json.loads(trace.info.trace_metadata["mlflow.trace.cost"])["total_cost"] > 0


def test_stream_with_callers_include_usage_is_untouched(
    traced: Traced, client: openai.OpenAI
) -> None:
    with traced.untraced():
        expected = _stream(client, stream_options={"include_usage": True})
    chunks = _stream(client, stream_options={"include_usage": True})
    assert [normalized(c) for c in chunks] == [normalized(c) for c in expected]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    span = only_span(traced.trace())
    assert span.attributes["mlflow.chat.tokenUsage"]["output_tokens"] == count_tokens(ECHO)


@pytest.mark.parametrize("traced", [{"stream_usage": False}], indirect=True)
def test_stream_usage_opt_out(
    traced: Traced, client: openai.OpenAI, openai_server: OpenAIServer
) -> None:
    openai_server.clear()
    chunks = _stream(client)
    assert "stream_options" not in openai_server.requests[-1].body
    assert all(c.usage is None for c in chunks)
    span = only_span(traced.trace())
    assert span.outputs["choices"][0]["message"]["content"] == ECHO
    assert "mlflow.chat.tokenUsage" not in span.attributes


@pytest.mark.parametrize(
    "hosts,asked",
    [
        ("127.0.0.1", True),
        ("*", True),
        ("api.openai.com,.0.0.1", True),
        ("*,!api.openai.com", True),
        ("api.openai.com", False),
        ("none", False),
        ("!127.0.0.1", False),
        ("*,!127.0.0.1", False),
    ],
)
def test_stream_usage_hosts_overrides_which_hosts_are_asked(
    traced: Traced,
    client: openai.OpenAI,
    openai_server: OpenAIServer,
    monkeypatch: pytest.MonkeyPatch,
    hosts: str,
    asked: bool,
) -> None:
    monkeypatch.setenv("TRACEWIRE_STREAM_USAGE_HOSTS", hosts)
    traced.enable()  # re-read the settings
    openai_server.clear()
    chunks = _stream(client)
    assert ("stream_options" in openai_server.requests[-1].body) is asked
    assert all(c.choices for c in chunks)
    span = only_span(traced.trace())
    assert ("mlflow.chat.tokenUsage" in span.attributes) is asked


@pytest.mark.parametrize(
    "hosts", ["http://127.0.0.1:8000/v1", "localhost:8000", "none,127.0.0.1", "!"]
)
def test_invalid_stream_usage_hosts_fails_at_autolog_naming_it(
    tracking_uri: str, monkeypatch: pytest.MonkeyPatch, hosts: str
) -> None:
    monkeypatch.setenv("TRACEWIRE_STREAM_USAGE_HOSTS", hosts)
    with pytest.raises(tracewire.ConfigError, match="TRACEWIRE_STREAM_USAGE_HOSTS"):
        tracewire.autolog()


def test_callers_stream_options_and_extra_body_are_never_touched(
    traced: Traced, client: openai.OpenAI, openai_server: OpenAIServer
) -> None:
    """The caller's own stream_options (even without include_usage), or stream_options in its
    extra_body (which wins in the body the client sends), go out exactly as given."""
    cases: list[dict[str, Any]] = [
        {"stream_options": {"include_usage": False}},
        {"extra_body": {"stream_options": {"include_usage": True}}},
        {"extra_body": {"top_k": 3}},  # an extra_body without stream_options: usage is asked
    ]
    with traced.untraced():
        expected = [_stream(client, **case) for case in cases]
    openai_server.clear()
    got = [_stream(client, **case) for case in cases]
    bodies = [r.body for r in openai_server.requests]
    assert bodies[0]["stream_options"] == {"include_usage": False}
    assert bodies[1]["stream_options"] == {"include_usage": True}
    assert bodies[2]["stream_options"] == {"include_usage": True} and bodies[2]["top_k"] == 3
    for chunks, want in zip(got, expected):
        assert [normalized(c.choices) for c in chunks] == [normalized(c.choices) for c in want]
    # The caller's own usage chunk is the caller's; ours is hidden.
    assert got[1][-1].choices == [] and got[1][-1].usage.completion_tokens == count_tokens(ECHO)
    assert all(c.choices for c in got[0] + got[2])
    spans_ = [only_span(t) for t in traced.traces(expected=3)]
    assert "mlflow.chat.tokenUsage" not in spans_[0].attributes
    assert spans_[1].attributes["mlflow.chat.tokenUsage"] == STREAM_USAGE
    assert spans_[2].attributes["mlflow.chat.tokenUsage"] == STREAM_USAGE


def test_stream_helper_gets_usage_without_the_caller_seeing_it(
    traced: Traced, openai_server: OpenAIServer
) -> None:
    """`.stream()` passes `stream_options=omit`: not a choice of the caller's."""

    def run() -> tuple[list[str], Any]:
        client = openai.OpenAI(base_url=openai_server.base_url, api_key=API_KEY, max_retries=0)
        with client.chat.completions.stream(model="gpt-4o-mini", messages=USER) as stream:
            events = [e.type for e in stream]
            return events, stream.get_final_completion()

    with traced.untraced():
        expected_events, expected = run()
    events, final = run()
    assert events == expected_events
    assert normalized(final) == normalized(expected) and final.usage is None
    assert only_span(traced.trace()).attributes["mlflow.chat.tokenUsage"] == STREAM_USAGE


def test_with_streaming_response_body_is_the_callers(
    traced: Traced, openai_server: OpenAIServer
) -> None:
    """`.with_streaming_response`: the caller reads the raw body itself, so nothing is added."""

    def run() -> list[Any]:
        # A client of its own: `.with_streaming_response` binds `create` on first use.
        client = openai.OpenAI(base_url=openai_server.base_url, api_key=API_KEY, max_retries=0)
        with client.chat.completions.with_streaming_response.create(
            model="gpt-4o-mini", messages=USER, stream=True
        ) as response:
            return [
                normalized(json.loads(line.removeprefix("data: ")))
                for line in response.iter_lines()
                if line and line != "data: [DONE]"
            ]

    with traced.untraced():
        expected = run()
    openai_server.clear()
    assert run() == expected
    assert "stream_options" not in openai_server.requests[-1].body
    assert only_span(traced.trace()).span_type == "CHAT_MODEL"


# --------------------------------------------------------------------------- servers rejecting it


@pytest.fixture
def strict_server(request: pytest.FixtureRequest) -> Any:
    """A server of its own (a new port: rejections are remembered per host and port, for the
    process) that rejects `stream_options` like strict OpenAI-compatible servers do."""
    with OpenAIServer(reject_unknown_args=getattr(request, "param", "openai")) as server:
        yield server


def _rejections(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "rejected stream_options" in r.getMessage()]


@pytest.mark.parametrize("strict_server", ["openai", "pydantic"], indirect=True)
def test_server_rejecting_stream_options_gets_the_callers_request(
    traced: Traced,
    strict_server: OpenAIServer,
    openai_server: OpenAIServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = openai.OpenAI(base_url=strict_server.base_url, api_key=API_KEY, max_retries=0)
    with traced.untraced():
        expected = _stream(client)
    strict_server.clear()
    caplog.set_level("WARNING", logger="tracewire")

    first = _stream(client)
    # Exactly the chunks it gets untraced: no usage chunk, no "usage": null either.
    assert [normalized(json.loads(c.to_json())) for c in first] == [
        normalized(json.loads(c.to_json())) for c in expected
    ]
    asked, sent = strict_server.requests
    assert asked.body["stream_options"] == {"include_usage": True}
    assert sent.body == {"model": "gpt-4o-mini", "messages": USER, "stream": True}
    port = urlsplit(strict_server.base_url).port
    assert len(_rejections(caplog)) == 1 and f"127.0.0.1:{port}" in _rejections(caplog)[0]

    # Remembered: the next call is one request, without the argument; no second log line.
    strict_server.clear()
    second = _stream(client)
    assert [normalized(c.choices) for c in second] == [normalized(c.choices) for c in expected]
    assert [r.body for r in strict_server.requests] == [sent.body]
    assert len(_rejections(caplog)) == 1
    # Remembered by host and port: another server on 127.0.0.1 is still asked.
    openai_server.clear()
    _stream(openai.OpenAI(base_url=openai_server.base_url, api_key=API_KEY, max_retries=0))
    assert openai_server.requests[-1].body["stream_options"] == {"include_usage": True}

    traces = traced.traces(expected=3)
    for trace in traces[:2]:  # one span per call, the rejection nowhere in it
        span = only_span(trace)
        assert trace.info.state.value == "OK" and span.events == []
        assert span.outputs["choices"][0]["message"]["content"] == ECHO
        assert "mlflow.chat.tokenUsage" not in span.attributes
        assert "stream_options" not in span.inputs
    assert only_span(traces[2]).attributes["mlflow.chat.tokenUsage"] == STREAM_USAGE


def test_server_rejecting_stream_options_async_and_raw(
    traced: Traced, strict_server: OpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def call() -> list[str]:
        client = openai.AsyncOpenAI(base_url=strict_server.base_url, api_key=API_KEY, max_retries=0)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=USER, stream=True
        )
        return [c.choices[0].delta.content or "" async for c in stream if c.choices]

    caplog.set_level("WARNING", logger="tracewire")
    assert "".join(asyncio.run(call())) == ECHO
    assert len(strict_server.requests) == 2
    client = openai.OpenAI(base_url=strict_server.base_url, api_key=API_KEY, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=USER, stream=True
    )
    assert raw.http_response.status_code == 200
    assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices) == ECHO
    assert len(strict_server.requests) == 3  # remembered across sync and async clients
    assert len(_rejections(caplog)) == 1
    for trace in traced.traces(expected=2):
        assert only_span(trace).outputs["choices"][0]["message"]["content"] == ECHO


@pytest.mark.parametrize("failing", ["_remember_refusal", "every step"])
def test_rejection_stays_hidden_when_our_steps_fail(
    traced: Traced, strict_server: OpenAIServer, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """What production runs with (internal errors logged, not raised): whichever of our steps
    fails, the caller gets its stream and never the rejection."""
    client = openai.OpenAI(base_url=strict_server.base_url, api_key=API_KEY, max_retries=0)
    with traced.untraced():
        expected = [normalized(c) for c in _stream(client)]
    monkeypatch.setattr(guard, "TESTING", False)
    monkeypatch.setattr(guard, "fault", lambda step: failing == "every step" or step == failing)
    for _ in range(2):
        assert [normalized(c) for c in _stream(client)] == expected
    monkeypatch.setattr(guard, "fault", None)
    # A failed _remember_refusal remembers nothing: each call is rejected, then resent.
    assert len(strict_server.requests) == (1 + 4 if failing == "_remember_refusal" else 1 + 2)
    tracewire.flush(30)


def _error_of(call: Any) -> BaseException:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value


def _same_error(got: BaseException, want: BaseException) -> None:
    assert type(got) is type(want)
    assert str(got) == str(want) and got.body == want.body  # type: ignore[attr-defined]
    assert got.__cause__ is None and got.__suppress_context__  # as the openai client raises it
    error: BaseException | None = got
    while error is not None:  # our rejection is nowhere in what the caller gets
        assert "stream_options" not in str(error) + repr(getattr(error, "body", None))
        error = error.__context__


def test_other_bad_request_reaches_the_caller_unchanged_once(
    traced: Traced, client: openai.OpenAI, openai_server: OpenAIServer
) -> None:
    """A 400 that is not about stream_options: the call is made once, its error is the caller's."""

    def call() -> Any:
        return client.chat.completions.create(model="", messages=USER, stream=True)

    with traced.untraced():
        expected = _error_of(call)
    openai_server.clear()
    _same_error(_error_of(call), expected)
    assert len(openai_server.requests) == 1
    span = only_span(traced.trace())
    assert span.status.status_code == "ERROR" and len(span.events) == 1
    assert span.events[0].attributes["exception.type"] == "BadRequestError"


def test_error_on_the_retry_is_what_the_caller_gets_untraced(
    traced: Traced, strict_server: OpenAIServer
) -> None:
    """Rejected for stream_options, then the caller's own request fails for its own reason: the
    caller sees that second error, exactly as untraced, and the span records it alone."""
    client = openai.OpenAI(base_url=strict_server.base_url, api_key=API_KEY, max_retries=0)

    def call() -> Any:
        return client.chat.completions.create(model="", messages=USER, stream=True)

    with traced.untraced():
        expected = _error_of(call)
    assert "model parameter" in str(expected)
    strict_server.clear()
    _same_error(_error_of(call), expected)
    assert ["stream_options" in r.body for r in strict_server.requests] == [True, False]
    span = only_span(traced.trace())
    assert span.status.status_code == "ERROR" and len(span.events) == 1
    assert "stream_options" not in json.dumps(span.events[0].attributes)


@pytest.mark.parametrize(
    "how",
    [
        {"stream_options": {"include_usage": True}},
        {"extra_body": {"stream_options": {"include_usage": True}}},
    ],
)
def test_rejection_of_the_callers_own_stream_options_reaches_it_once(
    traced: Traced,
    strict_server: OpenAIServer,
    how: dict[str, Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = openai.OpenAI(base_url=strict_server.base_url, api_key=API_KEY, max_retries=0)

    def call() -> Any:
        return _stream(client, **how)

    with traced.untraced():
        expected = _error_of(call)
    strict_server.clear()
    got = _error_of(call)
    assert type(got) is type(expected) and str(got) == str(expected)
    assert "stream_options" in str(got)
    assert len(strict_server.requests) == 1
    assert _rejections(caplog) == []
    assert only_span(traced.trace()).status.status_code == "ERROR"


def test_rate_limit_and_openai_retries_are_left_to_the_client(
    traced: Traced, openai_server: OpenAIServer
) -> None:
    """A 429 is not a rejection: openai's own retries run as untraced, the caller gets its
    RateLimitError, and tracewire sends nothing more."""
    client = openai.OpenAI(base_url=openai_server.base_url, api_key=API_KEY, max_retries=2)

    def call() -> Any:
        return client.chat.completions.create(model="error-429", messages=USER, stream=True)

    with traced.untraced():
        openai_server.clear()
        expected = _error_of(call)
        untraced_requests = len(openai_server.requests)
    openai_server.clear()
    _same_error(_error_of(call), expected)
    assert untraced_requests == 3 and len(openai_server.requests) == 3
    assert only_span(traced.trace()).events[0].attributes["exception.type"] == "RateLimitError"


def test_stream_tool_call(traced: Traced, client: openai.OpenAI) -> None:
    chunks = _stream(client, tools=TOOLS)
    assert any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    span = only_span(traced.trace())
    message = span.outputs["choices"][0]["message"]
    assert message["tool_calls"][0]["id"] == "call_1"
    assert json.loads(message["tool_calls"][0]["function"]["arguments"]) == {
        "city": USER[0]["content"]
    }
    assert span.outputs["choices"][0]["finish_reason"] == "tool_calls"


def test_stream_broken_out_of_early_ends_span_when_collected(
    traced: Traced, client: openai.OpenAI
) -> None:
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True)
    first = next(iter(stream))
    assert first.choices[0].delta.role == "assistant"
    assert traced.traces() == []  # the span lives while the stream does
    del stream
    gc.collect()
    span = only_span(traced.trace())
    assert span.span_type == "CHAT_MODEL"
    assert span.end_time_ns >= span.start_time_ns


def test_stream_closed_early(traced: Traced, client: openai.OpenAI) -> None:
    with client.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True) as stream:
        for _ in stream:
            break
    trace = traced.trace()
    assert trace.info.state.value == "OK"


def test_stream_error_mid_stream(traced: Traced, client: openai.OpenAI) -> None:
    received = []
    with pytest.raises(openai.APIError):
        for chunk in client.chat.completions.create(
            model="stream-error", messages=USER, stream=True
        ):
            received.append(chunk)
    assert len(received) >= 1
    trace = traced.trace()
    span = only_span(trace)
    assert span.status.status_code == "ERROR"
    assert trace.info.state.value == "ERROR"
    assert span.events[0].name == "exception"


def test_empty_stream(traced: Traced, client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="empty-stream", messages=USER, stream=True))
    assert chunks == []
    span = only_span(traced.trace())
    assert span.outputs["choices"] == []


def test_stream_async(traced: Traced, aclient: Any) -> None:
    async def call() -> list[Any]:
        stream = await aclient().chat.completions.create(
            model="gpt-4o-mini", messages=USER, stream=True
        )
        return [chunk async for chunk in stream]

    with traced.untraced():
        expected = asyncio.run(call())
    chunks = asyncio.run(call())
    assert [normalized(c.choices) for c in chunks] == [normalized(c.choices) for c in expected]
    assert all(c.choices for c in chunks)
    trace = traced.trace()
    span = only_span(trace)
    assert span.outputs["choices"][0]["message"]["content"] == ECHO
    assert span.attributes["mlflow.chat.tokenUsage"] == STREAM_USAGE
    assert usage(trace) == STREAM_USAGE


# --------------------------------------------------------------------------- raw responses


def test_with_raw_response(traced: Traced, client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=USER)
    assert raw.http_response.status_code == 200
    parsed = raw.parse()
    assert parsed.choices[0].message.content == ECHO
    span = only_span(traced.trace())
    assert span.outputs["choices"][0]["message"]["content"] == ECHO
    assert span.attributes["mlflow.chat.tokenUsage"]["input_tokens"] == PROMPT_TOKENS


def test_with_raw_response_stream(traced: Traced, client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=USER, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == ECHO
    span = only_span(traced.trace())
    assert span.outputs["choices"][0]["message"]["content"] == ECHO
    assert span.attributes["mlflow.chat.tokenUsage"]["output_tokens"] == count_tokens(ECHO)


# --------------------------------------------------------------------------- Responses API


def test_responses_create(traced: Traced, client: openai.OpenAI) -> None:
    with traced.untraced():
        expected = client.responses.create(model="gpt-4o", input="What is the capital of France")
    result = client.responses.create(model="gpt-4o", input="What is the capital of France")
    assert normalized(result) == normalized(expected)
    assert result.output_text == ECHO
    span = only_span(traced.trace())
    assert span.span_type == "CHAT_MODEL"
    assert span.name == "responses gpt-4o"
    assert span.inputs["input"] == "What is the capital of France"
    assert span.outputs["output"][0]["content"][0]["text"] == ECHO
    assert span.attributes["mlflow.chat.tokenUsage"] == STREAM_USAGE


def test_responses_function_call(traced: Traced, client: openai.OpenAI) -> None:
    tools = [
        {
            "type": "function",
            "name": "lookup",
            "description": "Look a city up",
            "parameters": TOOLS[0]["function"]["parameters"],
        }
    ]
    result = client.responses.create(model="gpt-4o", input=USER, tools=tools)
    assert result.output[0].type == "function_call"
    span = only_span(traced.trace())
    assert span.outputs["output"][0]["name"] == "lookup"


def test_responses_stream(traced: Traced, client: openai.OpenAI) -> None:
    with traced.untraced():
        expected = list(client.responses.create(model="gpt-4o", input="hello there", stream=True))
    events = list(client.responses.create(model="gpt-4o", input="hello there", stream=True))
    assert [e.type for e in events] == [e.type for e in expected]
    span = only_span(traced.trace())
    assert span.outputs["output"][0]["content"][0]["text"] == "Echo: hello there"
    assert span.attributes["gen_ai.response.model"] == events[0].response.model
    assert span.attributes["mlflow.chat.tokenUsage"]["output_tokens"] == count_tokens(
        "Echo: hello there"
    )


def test_responses_parse(traced: Traced, client: openai.OpenAI) -> None:
    result = client.responses.parse(model="gpt-4o", input="Paris", text_format=Capital)
    assert result.output_parsed == Capital(city="Paris", population=1)
    span = only_span(traced.trace())
    assert span.attributes["mlflow.chat.tokenUsage"]["input_tokens"] == 3 + 1


# --------------------------------------------------------------------------- embeddings, legacy


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embeddings(traced: Traced, client: openai.OpenAI, encoding: str) -> None:
    kwargs = {"encoding_format": encoding} if encoding == "float" else {}
    with traced.untraced():
        expected = client.embeddings.create(
            model="text-embedding-3-small", input=["one two", "three"], **kwargs
        )
    result = client.embeddings.create(
        model="text-embedding-3-small", input=["one two", "three"], **kwargs
    )
    assert normalized(result) == normalized(expected)
    span = only_span(traced.trace())
    assert span.span_type == "EMBEDDING"
    assert span.outputs == {"model": "text-embedding-3-small", "count": 2, "dimensions": 8}
    assert span.attributes["mlflow.chat.tokenUsage"] == {
        "input_tokens": 3,
        "output_tokens": 0,
        "total_tokens": 3,
    }


def test_legacy_completions(traced: Traced, client: openai.OpenAI) -> None:
    result = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi")
    assert result.choices[0].text == "Echo: Say hi"
    chunks = list(
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi", stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Echo: Say hi"
    plain, streamed = traced.traces(expected=2)
    for trace in (plain, streamed):
        span = only_span(trace)
        assert span.span_type == "LLM"
        assert span.name == "text_completion gpt-3.5-turbo-instruct"
    assert only_span(plain).attributes["mlflow.chat.tokenUsage"]["input_tokens"] == 2
    assert only_span(streamed).outputs["choices"][0]["text"] == "Echo: Say hi"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "model,error", [("error-429", openai.RateLimitError), ("error-500", openai.InternalServerError)]
)
def test_http_errors_reach_the_caller_unchanged(
    traced: Traced, client: openai.OpenAI, model: str, error: type
) -> None:
    with traced.untraced():
        with pytest.raises(error) as untraced_error:
            client.chat.completions.create(model=model, messages=USER)
    with pytest.raises(error) as traced_error:
        client.chat.completions.create(model=model, messages=USER)
    assert type(traced_error.value) is type(untraced_error.value)
    assert str(traced_error.value) == str(untraced_error.value)
    trace = traced.trace()
    span = only_span(trace)
    assert span.status.status_code == "ERROR"
    assert trace.info.state.value == "ERROR"
    assert span.events[0].attributes["exception.type"] == error.__name__


def test_timeout_marks_error(traced: Traced, openai_server: OpenAIServer) -> None:
    client = openai.OpenAI(
        base_url="http://127.0.0.1:9/v1", api_key="sk-x", max_retries=0, timeout=2
    )
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert only_span(traced.trace()).status.status_code == "ERROR"


# --------------------------------------------------------------------------- nesting, clients


def test_user_span_is_the_parent(traced: Traced, client: openai.OpenAI) -> None:
    @mlflow.trace(name="agent")
    def agent() -> str:
        first = client.chat.completions.create(model="gpt-4o-mini", messages=USER)
        second = client.chat.completions.create(model="gpt-4o-mini", messages=USER)
        return first.choices[0].message.content + second.choices[0].message.content

    assert agent() == ECHO * 2
    trace = traced.trace()
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.name == "agent"
    children = [s for s in trace.data.spans if s.parent_id == root.span_id]
    assert [s.span_type for s in children] == ["CHAT_MODEL", "CHAT_MODEL"]
    assert trace.info.token_usage["input_tokens"] == 2 * PROMPT_TOKENS


def test_message_list_is_recorded_as_sent(traced: Traced, client: openai.OpenAI) -> None:
    messages = list(USER)
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    messages.append(reply.choices[0].message.model_dump())  # what chat loops do next
    assert only_span(traced.trace()).inputs["messages"] == USER


def test_azure_client_is_traced(traced: Traced, openai_server: OpenAIServer) -> None:
    client = openai.AzureOpenAI(
        base_url=openai_server.base_url,
        api_key="azure-key",
        api_version="2024-10-21",
        max_retries=0,
    )
    result = client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    assert result.choices[0].message.content == ECHO
    span = only_span(traced.trace())
    assert span.attributes["mlflow.llm.provider"] == "azure"


@pytest.mark.parametrize("mlflow_first", [True, False])
def test_mlflow_openai_autolog_does_not_trace_twice(
    traced: Traced, client: openai.OpenAI, mlflow_first: bool, caplog: pytest.LogCaptureFixture
) -> None:
    import mlflow.openai

    if mlflow_first:
        tracewire.disable()
        mlflow.openai.autolog()
        traced.enable()
    else:
        mlflow.openai.autolog()
    try:
        client.chat.completions.create(model="gpt-4o-mini", messages=USER)
        client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    finally:
        mlflow.openai.autolog(disable=True)
    for trace in traced.traces(expected=2):
        span = only_span(trace)
        assert span.name == "chat gpt-4o-mini"  # tracewire's span, not MLflow's
    assert sum("switched off" in r.message for r in caplog.records) == 1
