"""A FastAPI app with no tracewire line: ``tracewire run`` traces it.

    OPENAI_API_KEY=sk-... tracewire run -- uvicorn app:app --port 8000
    curl -X POST localhost:8000/ask -H 'Content-Type: application/json' \\
         -d '{"question": "What is MLflow?"}'

Every request that calls the model is one trace (the request's span, the OpenAI call under it),
with the request id echoed in ``X-Request-ID``. Behind a gateway that sets ``X-Session-ID`` /
``X-User-ID``, ``TRACEWIRE_TRUST_IDENTITY_HEADERS=session=X-Session-ID,user=X-User-ID`` makes
them the trace's session and user (no header is trusted by default: any client can write one). Any OpenAI-compatible server works too (``OPENAI_BASE_URL``;
``OPENAI_MODEL``, default gpt-4o-mini).
"""

from __future__ import annotations

import os

import openai
from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI(title="zero-code example")
client = openai.AsyncOpenAI()


class Question(BaseModel):
    question: str


@app.post("/ask")
async def ask(body: Question) -> dict[str, str]:
    reply = await client.chat.completions.create(
        model=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"),
        max_tokens=150,
        messages=[{"role": "user", "content": body.question}],
    )
    return {"answer": reply.choices[0].message.content or ""}


@app.get("/health")
async def health() -> dict[str, str]:
    # Calls no model: no trace (the middleware drops requests that traced nothing).
    return {"status": "ok"}
