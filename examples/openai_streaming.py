"""Streamed chat completions with the OpenAI client, sync and async, traced by tracewire.

    OPENAI_API_KEY=sk-... python openai_streaming.py

Each stream is one trace holding the whole reply and its exact token usage, though the code
never asks for usage: tracewire asks on its behalf (``stream_options.include_usage``) and
hides the extra usage chunk from the loop below. Any OpenAI-compatible server works too
(``OPENAI_BASE_URL``; ``OPENAI_MODEL``, default gpt-4o-mini); one that rejects
``stream_options`` gets the request again without it, once, and is not asked again.
"""

from __future__ import annotations

import asyncio
import os

import openai

import tracewire

tracewire.autolog()

MODEL = os.environ.get("OPENAI_MODEL", "gpt-4o-mini")
PROMPT = [{"role": "user", "content": "Write a haiku about tracing."}]


def stream_sync() -> None:
    client = openai.OpenAI()
    stream = client.chat.completions.create(
        model=MODEL, messages=PROMPT, stream=True, max_tokens=100
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


async def stream_async() -> None:
    client = openai.AsyncOpenAI()
    stream = await client.chat.completions.create(
        model=MODEL, messages=PROMPT, stream=True, max_tokens=100
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


# The session and user land on both traces (in MLflow: the trace's session and user).
with tracewire.context(session_id="streaming-example", user_id="ada"):
    stream_sync()
    asyncio.run(stream_async())
# Traces still on their way are stored at exit (or, past TRACEWIRE_FLUSH_TIMEOUT, by the next
# run: they wait in tracewire's on-disk spool).
