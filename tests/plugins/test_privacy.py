"""Secrets never leave; with capture_content=False no prompt or completion text is stored.

Checked on the store's bytes (the sqlite file and its WAL), not on what the API returns."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.conftest import API_KEY, Traced
from tests.support.store import store_bytes
from tracewire.testing import OpenAIServer

PHRASE = "zebra-quartz-lighthouse"


def _all_kinds_of_calls(client: openai.OpenAI, server: OpenAIServer) -> None:
    messages = [{"role": "user", "content": f"tell me about {PHRASE}"}]
    client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    list(client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True))
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=messages,
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "lookup",
                    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
                },
            }
        ],
    )
    client.responses.create(model="gpt-4o", input=f"about {PHRASE}", instructions=PHRASE)
    list(client.responses.create(model="gpt-4o", input=f"about {PHRASE}", stream=True))
    client.embeddings.create(model="text-embedding-3-small", input=PHRASE)
    client.completions.create(model="gpt-3.5-turbo-instruct", prompt=PHRASE)

    async def async_call() -> None:
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
        stream = await aclient.chat.completions.create(
            model="gpt-4o-mini", messages=messages, stream=True
        )
        async for _ in stream:
            pass

    asyncio.run(async_call())


@pytest.mark.parametrize("traced", [{"capture_content": False}], indirect=True)
def test_capture_content_false_stores_no_text(
    traced: Traced, tracking_uri: str, client: openai.OpenAI, openai_server: OpenAIServer
) -> None:
    _all_kinds_of_calls(client, openai_server)
    traces = traced.traces(expected=8)
    assert store_bytes(tracking_uri).count(PHRASE.encode()) == 0
    # Still useful: model, token usage, finish reasons.
    chat = traces[0].data.spans[0]
    assert chat.inputs == {"model": "gpt-4o-mini"}
    assert chat.outputs["finish_reasons"] == ["stop"]
    assert chat.attributes["mlflow.chat.tokenUsage"]["input_tokens"] > 0
    assert all(t.info.token_usage for t in traces)

    # Control: the same scan does find text that is captured.
    control = "control-phrase-walrus"
    traced.settings = {"capture_content": True}
    traced.enable()
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": control}]
    )
    traced.traces(expected=9)
    assert store_bytes(tracking_uri).count(control.encode()) > 0


def test_api_keys_and_auth_headers_are_never_stored(
    traced: Traced, tracking_uri: str, openai_server: OpenAIServer
) -> None:
    bearer = "Bearer hdr-secret-5c1d2e3f"
    client = openai.OpenAI(
        base_url=openai_server.base_url.replace("http://", "http://user:pw-secret-77@"),
        api_key=API_KEY,
        max_retries=0,
        default_headers={"api-key": "azure-key-secret-42"},
    )
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "x"}],
        extra_headers={"Authorization": bearer, "Cookie": "sid=cookie-secret-9"},
    )
    span = traced.trace().data.spans[0]
    assert span.attributes["server.address"] == "127.0.0.1"
    data = store_bytes(tracking_uri)
    for secret in (
        API_KEY,
        "hdr-secret-5c1d2e3f",
        "pw-secret-77",
        "azure-key-secret-42",
        "cookie-secret-9",
    ):
        assert data.count(secret.encode()) == 0, secret
