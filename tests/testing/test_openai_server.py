"""The local OpenAI-compatible server, driven by the real openai client over HTTP."""

from __future__ import annotations

import asyncio
import base64
import enum
import json
import os
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from pydantic import BaseModel

import tracewire.testing.openai_server as server_module
from tracewire.testing import OpenAIServer, count_prompt_tokens, count_tokens, embedding_vector

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "metric": {"type": "boolean"},
                "note": {"type": "string"},
            },
            "required": ["city", "days", "metric"],
        },
    },
}
RESPONSES_WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    **{k: v for k, v in WEATHER_TOOL["function"].items() if k != "name"},
}
EXPECTED_ARGUMENTS = '{"city": "Weather in Paris?", "days": 1, "metric": true}'


@pytest.fixture(scope="module")
def server() -> Iterator[OpenAIServer]:
    with OpenAIServer() as running:
        yield running


@pytest.fixture
def client(server: OpenAIServer) -> Iterator[openai.OpenAI]:
    server.clear()
    with openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as sync_client:
        yield sync_client


def run_async(server: OpenAIServer, scenario: Any) -> Any:
    """Run ``scenario(async_client)`` on a fresh AsyncOpenAI client."""

    async def main() -> Any:
        async with openai.AsyncOpenAI(
            base_url=server.base_url, api_key="sk-test", max_retries=0
        ) as async_client:
            return await scenario(async_client)

    server.clear()
    return asyncio.run(main())


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


# --------------------------------------------------------------------------
# Lifecycle


def test_explicit_start_stop_is_prompt_even_with_idle_keepalive_connections() -> None:
    server = OpenAIServer()
    with pytest.raises(RuntimeError):
        _ = server.port
    server.start()
    assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
    thread = server._thread
    with openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0) as client:
        client.chat.completions.create(model="m", messages=user("hi"))  # leaves a pooled connection
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 1.0
    assert thread is not None and not thread.is_alive() and thread.daemon
    server.stop()  # idempotent


def test_cli_prints_base_url_and_serves() -> None:
    src = Path(server_module.__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "tracewire.testing.openai_server", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        base_url = process.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        with openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0) as client:
            reply = client.chat.completions.create(model="m", messages=user("over the wire"))
        assert reply.choices[0].message.content == "Echo: over the wire"
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=5)
    assert stderr == ""  # no RuntimeWarning from runpy, no request logging


# --------------------------------------------------------------------------
# Chat completions


def test_chat_echoes_last_user_message_with_exact_usage(client: openai.OpenAI) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "what is"}, {"type": "text", "text": "the time?"}],
        },
    ]
    reply = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    assert reply.model == "gpt-4o-mini"
    assert reply.object == "chat.completion"
    choice = reply.choices[0]
    assert choice.message.content == "Echo: what is the time?"
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert count_prompt_tokens(messages) == (3 + 3) + (2 + 3) + (2 + 3) + (4 + 3)
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == count_prompt_tokens(messages)
    assert reply.usage.completion_tokens == count_tokens("Echo: what is the time?") == 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 5
    assert reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    assert reply.usage.completion_tokens_details is not None
    assert reply.usage.completion_tokens_details.reasoning_tokens == 0


def test_cached_models_report_half_the_prompt_as_cached(client: openai.OpenAI) -> None:
    messages = user("one two three four five")
    reply = client.chat.completions.create(model="gpt-4o-cached", messages=messages)
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens == count_prompt_tokens(messages) == 13
    assert reply.usage.prompt_tokens_details.cached_tokens == 6


def test_response_ids_and_request_ids(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="m", messages=user("hi"))
    reply = raw.parse()
    assert reply.id.startswith("chatcmpl-")
    assert raw.headers["x-request-id"].startswith("req_")
    assert reply._request_id == raw.headers["x-request-id"]


def test_streamed_chat_equals_non_streamed_and_usage_chunk(
    client: openai.OpenAI, server: OpenAIServer
) -> None:
    messages = user("  spaced   out\twords  ")
    plain = client.chat.completions.create(model="m", messages=messages)
    chunks = list(
        client.chat.completions.create(
            model="m", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain.choices[0].message.content == "Echo:   spaced   out\twords  "
    assert len([c for c in chunks if c.choices]) > 4  # really split into pieces
    usage_chunks = [c for c in chunks if not c.choices]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage == plain.usage
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert {c.model for c in chunks} == {"m"} and {c.object for c in chunks} == {
        "chat.completion.chunk"
    }
    # Recorded as sent, stream_options included.
    assert server.requests[-1].body["stream_options"] == {"include_usage": True}


def test_stream_without_include_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="m", messages=user("a b"), stream=True))
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Echo: a b"


def test_chat_tool_call_round_trip(client: openai.OpenAI) -> None:
    messages: list[dict[str, Any]] = user("Weather in Paris?")
    reply = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert (call.id, call.type, call.function.name) == ("call_1", "function", "get_weather")
    assert call.function.arguments == EXPECTED_ARGUMENTS
    assert reply.usage is not None
    assert reply.usage.completion_tokens == count_tokens(EXPECTED_ARGUMENTS) + 1

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"},
    ]
    follow_up = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL])
    assert follow_up.choices[0].message.content == "Result: sunny, 21C"
    assert follow_up.choices[0].finish_reason == "stop"
    assert follow_up.usage is not None
    assert follow_up.usage.prompt_tokens == count_prompt_tokens(messages)

    messages += [
        follow_up.choices[0].message.model_dump(exclude_none=True),
        {"role": "user", "content": "And Rome?"},
    ]
    second = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL])
    assert second.choices[0].message.tool_calls is not None
    assert second.choices[0].message.tool_calls[0].id == "call_2"

    declined = client.chat.completions.create(
        model="m", messages=user("hi"), tools=[WEATHER_TOOL], tool_choice="none"
    )
    assert declined.choices[0].message.content == "Echo: hi"


def test_streamed_tool_call_equals_non_streamed(client: openai.OpenAI) -> None:
    messages = user("Weather in Paris?")
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=messages,
            tools=[WEATHER_TOOL],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    opening = chunks[0].choices[0].delta
    assert opening.role == "assistant" and opening.content is None
    assert opening.tool_calls is not None
    first = opening.tool_calls[0]
    assert first.index == 0 and first.id == "call_1" and first.type == "function"
    assert (
        first.function is not None
        and first.function.name == "get_weather"
        and first.function.arguments == ""
    )
    fragments = [
        c.choices[0].delta.tool_calls[0].function.arguments  # type: ignore[index, union-attr]
        for c in chunks[1:]
        if c.choices and c.choices[0].delta.tool_calls
    ]
    assert len(fragments) > 1 and "".join(fragments) == EXPECTED_ARGUMENTS  # type: ignore[arg-type]
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == count_tokens(EXPECTED_ARGUMENTS) + 1


def test_stream_helper_accumulates_like_create(client: openai.OpenAI) -> None:
    with client.chat.completions.stream(model="m", messages=user("helper test")) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "Echo: helper test"


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Address(BaseModel):
    street: str
    number: int


class Person(BaseModel):
    name: str
    age: int
    height: float
    active: bool
    tags: list[str]
    colour: Colour
    nickname: str | None
    address: Address


def test_chat_parse_with_json_schema(client: openai.OpenAI, server: OpenAIServer) -> None:
    completions = (
        getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    )
    reply = completions(model="m", messages=user("Ada"), response_format=Person)
    parsed = reply.choices[0].message.parsed
    assert parsed == Person(
        name="Ada",
        age=1,
        height=1.0,
        active=True,
        tags=[],
        colour=Colour.RED,
        nickname="Ada",
        address=Address(street="Ada", number=1),
    )
    sent = server.requests[-1].body["response_format"]
    assert sent["type"] == "json_schema"


# --------------------------------------------------------------------------
# Errors


def test_error_models_raise_the_matching_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as rate_limited:
        client.chat.completions.create(model="error-429", messages=user("x"))
    assert rate_limited.value.status_code == 429
    assert rate_limited.value.response.headers["retry-after"] == "0"
    assert rate_limited.value.code == "rate_limit_exceeded"
    assert set(rate_limited.value.body) == {"message", "type", "param", "code"}  # type: ignore[arg-type]

    with pytest.raises(openai.InternalServerError) as failed:
        client.responses.create(model="error-500", input="x")
    assert failed.value.status_code == 500 and failed.value.type == "server_error"

    with pytest.raises(openai.RateLimitError):
        client.embeddings.create(model="error-429", input="x")
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="error-429", messages=user("x"), stream=True)


def test_stream_error_raises_mid_stream(client: openai.OpenAI) -> None:
    received = []
    with pytest.raises(openai.APIError) as raised:
        for chunk in client.chat.completions.create(
            model="stream-error", messages=user("a b c d"), stream=True
        ):
            received.append(chunk.choices[0].delta.content)
    assert received == ["", "Echo:", " a"]
    assert "stream-error" in raised.value.message
    # The connection pool survives the aborted stream.
    assert (
        client.chat.completions.create(model="m", messages=user("ok")).choices[0].message.content
        == "Echo: ok"
    )


def test_empty_stream_yields_nothing(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="empty-stream",
        messages=user("x"),
        stream=True,
        stream_options={"include_usage": True},
    )
    assert list(stream) == []
    assert list(client.completions.create(model="empty-stream", prompt="x", stream=True)) == []


def test_unknown_path_and_invalid_json(client: openai.OpenAI, server: OpenAIServer) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.post("/nope", cast_to=object, body={"model": "m"})
    assert not_found.value.body["message"] == "Invalid URL (POST /v1/nope)"  # type: ignore[index]

    request = urllib.request.Request(
        f"{server.base_url}/chat/completions",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(request, timeout=5)
    with bad.value:  # an HTTPError owns the response socket
        assert bad.value.code == 400
        error = json.loads(bad.value.read())["error"]
    assert (
        set(error) == {"message", "type", "param", "code"}
        and error["type"] == "invalid_request_error"
    )
    assert server.requests[-1].body is None and server.requests[-1].path == "/v1/chat/completions"

    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{server.base_url}/models", timeout=5)
    with missing.value:
        assert missing.value.code == 404


# --------------------------------------------------------------------------
# Strict servers: unknown arguments rejected


def test_reject_unknown_args_rejects_stream_options_like_strict_servers() -> None:
    with (
        OpenAIServer(reject_unknown_args=True) as strict,
        openai.OpenAI(base_url=strict.base_url, api_key="sk-test", max_retries=0) as client,
    ):
        with pytest.raises(openai.BadRequestError) as rejected:
            client.chat.completions.create(
                model="m", messages=user("hi"), stream=True, stream_options={"include_usage": True}
            )
        assert rejected.value.status_code == 400
        assert rejected.value.body == {  # what the openai client keeps: the error object
            "message": "Unrecognized request argument supplied: stream_options",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
        assert strict.requests[-1].body["stream_options"] == {"include_usage": True}  # recorded
        # Checked before anything else (a missing model would be a different 400).
        with pytest.raises(
            openai.BadRequestError, match="arguments supplied: stream_options, top_k"
        ):
            client.completions.create(
                model="",
                prompt="hi",
                stream=True,
                extra_body={"top_k": 1},
                stream_options={"include_usage": True},
            )

        # Everything OpenAI's client sends without stream_options is served as usual.
        chunks = list(
            client.chat.completions.create(
                model="m",
                messages=user("hi"),
                stream=True,
                tools=[WEATHER_TOOL],
                temperature=0,
                max_completion_tokens=5,
                seed=1,
                parallel_tool_calls=False,
            )
        )
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert (
            client.completions.create(model="m", prompt="hi", max_tokens=5).choices[0].text
            == "Echo: hi"
        )
        # Responses and embeddings accept every argument.
        assert (
            client.responses.create(model="m", input="hi", extra_body={"top_k": 1}).output_text
            == "Echo: hi"
        )
        assert client.embeddings.create(model="e", input="hi", extra_body={"top_k": 1}).data


def test_reject_unknown_args_pydantic_style_answers_422() -> None:
    with (
        OpenAIServer(reject_unknown_args="pydantic") as strict,
        openai.OpenAI(base_url=strict.base_url, api_key="sk-test", max_retries=0) as client,
    ):
        with pytest.raises(openai.UnprocessableEntityError) as rejected:
            list(
                client.chat.completions.create(
                    model="m",
                    messages=user("hi"),
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
        assert rejected.value.status_code == 422
        assert rejected.value.body == {
            "detail": [
                {
                    "type": "extra_forbidden",
                    "loc": ["body", "stream_options"],
                    "msg": "Extra inputs are not permitted",
                    "input": {"include_usage": True},
                }
            ]
        }
        reply = client.chat.completions.create(model="m", messages=user("hi"))
        assert reply.choices[0].message.content == "Echo: hi"
    with pytest.raises(ValueError, match="reject_unknown_args"):
        OpenAIServer(reject_unknown_args="strict")


def test_cli_reject_unknown_args() -> None:
    src = Path(server_module.__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "tracewire.testing.openai_server", "--reject-unknown-args"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert process.stdout is not None
        base_url = process.stdout.readline().strip()
        with openai.OpenAI(base_url=base_url, api_key="sk-test", max_retries=0) as client:
            with pytest.raises(openai.BadRequestError, match="supplied: stream_options"):
                client.chat.completions.create(
                    model="m",
                    messages=user("x"),
                    stream=True,
                    stream_options={"include_usage": True},
                )
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=5)
    assert stderr == ""


# --------------------------------------------------------------------------
# Responses API


def test_responses_text_with_instructions(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="gpt-4.1", input="tell me a story", instructions="Be kind to me."
    )
    assert response.model == "gpt-4.1" and response.status == "completed"
    assert response.output_text == "Echo: tell me a story"
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text"
    assert response.usage is not None
    expected_input = count_prompt_tokens(
        [
            {"role": "system", "content": "Be kind to me."},
            {"role": "user", "content": "tell me a story"},
        ]
    )
    assert response.usage.input_tokens == expected_input == 4 + 3 + 4 + 3
    assert response.usage.output_tokens == 5
    assert response.usage.total_tokens == expected_input + 5
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.output_tokens_details.reasoning_tokens == 0


def test_responses_list_input_and_cached_model(client: openai.OpenAI) -> None:
    items = [
        {"role": "user", "content": "earlier words here"},
        {"role": "assistant", "content": "sure"},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "latest question"}],
        },
    ]
    response = client.responses.create(model="x-cached", input=items)  # type: ignore[arg-type]
    assert response.output_text == "Echo: latest question"
    assert response.usage is not None
    assert response.usage.input_tokens == count_prompt_tokens(items) == 15
    assert response.usage.input_tokens_details.cached_tokens == 7


def test_responses_function_call_round_trip(client: openai.OpenAI) -> None:
    items: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    response = client.responses.create(model="m", input=items, tools=[RESPONSES_WEATHER_TOOL])  # type: ignore[list-item]
    call = response.output[0]
    assert call.type == "function_call"
    assert (call.call_id, call.name, call.arguments) == (
        "call_1",
        "get_weather",
        EXPECTED_ARGUMENTS,
    )
    assert response.usage is not None
    assert response.usage.output_tokens == count_tokens(EXPECTED_ARGUMENTS) + 1

    items += [
        call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": "call_1", "output": "rainy"},
    ]
    follow_up = client.responses.create(model="m", input=items, tools=[RESPONSES_WEATHER_TOOL])  # type: ignore[list-item]
    assert follow_up.output_text == "Result: rainy"
    assert follow_up.usage is not None
    assert follow_up.usage.input_tokens == count_prompt_tokens(items)


TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def test_responses_stream_event_sequence(client: openai.OpenAI) -> None:
    plain = client.responses.create(model="m", input="three little words")
    events = list(client.responses.create(model="m", input="three little words", stream=True))
    assert [e.type for e in events] == TEXT_EVENTS
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == plain.output_text == "Echo: three little words"
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.output_text == plain.output_text
    assert completed.response.usage == plain.usage


def test_responses_stream_helper_and_function_call_stream(client: openai.OpenAI) -> None:
    with client.responses.stream(model="m", input="helper words") as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.output_text == "Echo: helper words"

    events = list(
        client.responses.create(
            model="m", input="Weather in Paris?", tools=[RESPONSES_WEATHER_TOOL], stream=True
        )  # type: ignore[list-item]
    )
    assert events[2].type == "response.output_item.added" and events[2].item.type == "function_call"
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 1 and "".join(deltas) == EXPECTED_ARGUMENTS
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done[0].arguments == EXPECTED_ARGUMENTS
    assert events[-1].type == "response.completed" and events[-1].response.usage is not None


def test_responses_parse_with_text_format(client: openai.OpenAI) -> None:
    parsed = client.responses.parse(model="m", input="Ada", text_format=Address)
    assert parsed.output_parsed == Address(street="Ada", number=1)


def test_responses_stream_error_raises(client: openai.OpenAI) -> None:
    seen = []
    with pytest.raises(openai.APIError) as raised:
        for event in client.responses.create(model="stream-error", input="a b c", stream=True):
            seen.append(event.type)
    assert seen == TEXT_EVENTS[:6]
    assert raised.value.code == "stream_error"
    assert list(client.responses.create(model="empty-stream", input="x", stream=True)) == []


# --------------------------------------------------------------------------
# Embeddings


def test_embeddings_float_and_base64_agree(client: openai.OpenAI, server: OpenAIServer) -> None:
    default = client.embeddings.create(model="text-embedding-3-small", input=["hello world", "bye"])
    assert server.requests[-1].body["encoding_format"] == "base64"  # the client's own default
    floats = client.embeddings.create(
        model="text-embedding-3-small", input=["hello world", "bye"], encoding_format="float"
    )
    assert [d.embedding for d in default.data] == [d.embedding for d in floats.data]
    assert floats.data[0].embedding == embedding_vector("hello world")
    assert len(floats.data[1].embedding) == 8 and floats.data[1].index == 1
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == 3
    assert floats.data[0].embedding != floats.data[1].embedding

    raw = client.embeddings.create(model="e", input="hello world", encoding_format="base64")
    decoded = struct.unpack("<8f", base64.b64decode(raw.data[0].embedding))  # type: ignore[arg-type]
    assert list(decoded) == embedding_vector("hello world")


def test_embeddings_dimensions_and_token_arrays(client: openai.OpenAI) -> None:
    sized = client.embeddings.create(model="e", input="x", dimensions=20)
    assert sized.data[0].embedding == embedding_vector("x", 20)
    assert all(-1.0 <= v < 1.0 for v in sized.data[0].embedding)
    tokens = client.embeddings.create(model="e", input=[[1, 2, 3], [4]], encoding_format="float")
    assert tokens.usage.prompt_tokens == 4
    assert tokens.data[0].embedding == embedding_vector([1, 2, 3])
    single = client.embeddings.create(model="e", input=[5, 6], encoding_format="float")
    assert len(single.data) == 1 and single.usage.prompt_tokens == 2


# --------------------------------------------------------------------------
# Legacy completions


def test_legacy_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="davinci-002", prompt=["one two", "three"])
    assert [c.text for c in reply.choices] == ["Echo: one two", "Echo: three"]
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 5)

    chunks = list(
        client.completions.create(
            model="davinci-002",
            prompt="one two",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Echo: one two"
    assert [c for c in chunks if not c.choices] == [chunks[-1]]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 2 + 3
    assert chunks[-2].choices[0].finish_reason == "stop"


# --------------------------------------------------------------------------
# Recording


def test_requests_are_recorded_and_clearable(client: openai.OpenAI, server: OpenAIServer) -> None:
    client.chat.completions.create(
        model="m", messages=user("rec"), stream=True, stream_options={"include_usage": True}
    ).close()
    client.embeddings.create(model="e", input="rec")
    recorded = server.requests
    assert [r.path for r in recorded] == ["/v1/chat/completions", "/v1/embeddings"]
    assert recorded[0].method == "POST"
    assert recorded[0].headers["authorization"] == "Bearer sk-test"
    assert all(name == name.lower() for name in recorded[0].headers)
    assert recorded[0].body == {
        "messages": user("rec"),
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    server.clear()
    assert server.requests == []


# --------------------------------------------------------------------------
# Async client


def test_async_chat_stream_equals_create_and_errors(server: OpenAIServer) -> None:
    async def scenario(client: openai.AsyncOpenAI) -> None:
        plain = await client.chat.completions.create(model="m", messages=user("async words"))
        stream = await client.chat.completions.create(
            model="m",
            messages=user("async words"),
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        assert (
            "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            == "Echo: async words"
        )
        assert plain.choices[0].message.content == "Echo: async words"
        assert [c for c in chunks if not c.choices] == [chunks[-1]] and chunks[
            -1
        ].usage == plain.usage

        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="error-429", messages=user("x"))
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="error-500", messages=user("x"))
        failing = await client.chat.completions.create(
            model="stream-error", messages=user("a b c"), stream=True
        )
        with pytest.raises(openai.APIError):
            async for _ in failing:
                pass
        empty = await client.chat.completions.create(
            model="empty-stream", messages=user("x"), stream=True
        )
        assert [c async for c in empty] == []

    run_async(server, scenario)


def test_async_responses_embeddings_and_completions(server: OpenAIServer) -> None:
    async def scenario(client: openai.AsyncOpenAI) -> None:
        events = [
            e
            async for e in await client.responses.create(model="m", input="async a b", stream=True)
        ]
        assert events[-1].type == "response.completed"
        assert (
            events[-1].response.usage is not None and events[-1].response.usage.output_tokens == 4
        )
        assert (
            "".join(e.delta for e in events if e.type == "response.output_text.delta")
            == "Echo: async a b"
        )
        with pytest.raises(openai.APIError):
            async for _ in await client.responses.create(
                model="stream-error", input="x y z", stream=True
            ):
                pass

        default = await client.embeddings.create(model="e", input="vec")
        floats = await client.embeddings.create(model="e", input="vec", encoding_format="float")
        assert default.data[0].embedding == floats.data[0].embedding == embedding_vector("vec")

        completion = await client.completions.create(model="m", prompt="hi")
        assert completion.choices[0].text == "Echo: hi"

        tool_reply = await client.chat.completions.create(
            model="m",
            messages=user("Weather in Paris?"),
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
        )
        assert tool_reply.choices[0].message.tool_calls is not None
        assert tool_reply.choices[0].message.tool_calls[0].function.arguments == EXPECTED_ARGUMENTS

    run_async(server, scenario)


# --------------------------------------------------------------------------
# Concurrency


def test_two_hundred_concurrent_requests(client: openai.OpenAI, server: OpenAIServer) -> None:
    def call(i: int) -> str:
        if i % 2:
            stream = client.chat.completions.create(
                model="m", messages=user(f"req {i}"), stream=True
            )
            return "".join(c.choices[0].delta.content or "" for c in stream)
        return (
            client.chat.completions.create(model="m", messages=user(f"req {i}"))
            .choices[0]
            .message.content
            or ""
        )

    with ThreadPoolExecutor(max_workers=100) as pool:
        results = list(pool.map(call, range(200)))
    assert results == [f"Echo: req {i}" for i in range(200)]
    assert len(server.requests) == 200


def test_two_hundred_concurrent_async_requests(server: OpenAIServer) -> None:
    async def scenario(client: openai.AsyncOpenAI) -> list[str]:
        replies = await asyncio.gather(
            *(client.chat.completions.create(model="m", messages=user(f"a{i}")) for i in range(200))
        )
        return [r.choices[0].message.content or "" for r in replies]

    assert run_async(server, scenario) == [f"Echo: a{i}" for i in range(200)]
