"""A FastAPI app with no tracewire import, for tests that start it under ``tracewire run`` in
worker processes: each reply says which worker answered."""

import os

import openai
from fastapi import FastAPI

app = FastAPI()
client = openai.OpenAI(max_retries=0)


@app.get("/ask")
def ask(q: str) -> dict:
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": q}]
    )
    return {"pid": os.getpid(), "reply": reply.choices[0].message.content}
