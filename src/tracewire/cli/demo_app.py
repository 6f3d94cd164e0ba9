"""A small FastAPI agent app, traced by tracewire: a LangGraph agent that looks up notes with a
retriever, asks a ChatOpenAI model, and calls a weather tool through LangGraph's ToolNode.

    OPENAI_API_KEY=sk-... uvicorn app:app --port 8000

Any OpenAI-compatible server works too (``OPENAI_BASE_URL``; ``OPENAI_MODEL``, default
gpt-4o-mini). Endpoints:

    POST /chat          {"message": "..."} -> {"reply": "..."}
    POST /chat/stream   the same turn as server-sent events: data: {"token": "..."} ... [DONE]
    POST /feedback      {"request_id": "...", "value": false, "rationale": "..."} (tracewire's)

``X-Session-ID`` (required) names the conversation: it is the LangGraph ``thread_id``, so turns
with the same id continue it, and the trace's session in MLflow; ``X-User-ID`` names the user.
The app trusts both headers, as an app behind a gateway that authenticates users and sets them
would (without one, any client can write them: use your auth, ``identify`` or a session cookie
instead). Every response carries ``X-Request-ID``, the id feedback refers to; feedback on a
user's reply is taken only from that same user.

``tracewire demo`` runs this very file (it ships in the package as tracewire/cli/demo_app.py; a
test keeps the two identical).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import FastAPI, Header
from fastapi.responses import StreamingResponse
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from pydantic import BaseModel

import tracewire
from tracewire.middleware import TracingMiddleware

# Traces every OpenAI, LangChain and LangGraph call, and every request of every FastAPI app.
tracewire.autolog()

NOTES = [
    Document("Paris: the Louvre is closed on Tuesdays; the metro runs until about 1 am."),
    Document("London: most museums are free; carry an umbrella whatever the forecast says."),
    Document("Tokyo: trains stop around midnight; convenience stores sell good umbrellas."),
    Document("Lisbon: trams 28 and 12 climb the hills; many shops close on Sunday."),
]

FORECASTS = {
    "paris": "sunny, 21 C",
    "london": "light rain, 14 C",
    "tokyo": "cloudy, 18 C",
    "lisbon": "clear, 24 C",
}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


class NotesRetriever(BaseRetriever):
    """The notes sharing the most words with the question: a stand-in for a vector store."""

    k: int = 2

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        words = _words(query)
        scored = sorted(
            ((len(words & _words(d.page_content)), i) for i, d in enumerate(NOTES)), reverse=True
        )
        return [NOTES[i] for score, i in scored[: self.k] if score]


@tool
def get_weather(city: str) -> str:
    """Today's weather in a city."""
    for name, forecast in FORECASTS.items():
        # A substring match: a small model may pass "Paris, France" or the whole question.
        if name in city.lower():
            return f"{name.title()}: {forecast}"
    raise LookupError(f"no weather station for {city!r}")


class State(MessagesState):
    notes: str


retriever = NotesRetriever()
model = ChatOpenAI(
    model=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"),
    max_tokens=200,  # type: ignore[call-arg]
    stream_usage=True,
).bind_tools([get_weather])


async def retrieve(state: State) -> dict[str, Any]:
    docs = await retriever.ainvoke(state["messages"][-1].text)
    return {"notes": "\n".join(d.page_content for d in docs) or "(none)"}


async def agent(state: State) -> dict[str, Any]:
    system = SystemMessage(
        "You are a concise travel assistant. Use the weather tool for "
        f"weather questions. Notes:\n{state['notes']}"
    )
    return {"messages": [await model.ainvoke([system, *state["messages"]])]}


builder = StateGraph(State)
builder.add_node("retrieve", retrieve)
builder.add_node("agent", agent)
# A failing tool call raises out of the graph (ToolNode's default): the request fails with a
# 500 and its trace records the error on the tool's span.
builder.add_node("tools", ToolNode([get_weather]))
builder.add_edge(START, "retrieve")
builder.add_edge("retrieve", "agent")
builder.add_conditional_edges("agent", tools_condition)
builder.add_edge("tools", "agent")
# The conversations, by thread_id; a real deployment uses a persistent checkpointer.
graph = builder.compile(checkpointer=InMemorySaver())

app = FastAPI(title="tracewire agent example")
# autolog() already traces this app; adding the middleware by hand sets its options: here the
# feedback route, and the identity headers it trusts (see the docstring).
app.add_middleware(
    TracingMiddleware,
    feedback_path="/feedback",
    trust_identity_headers={"session": "X-Session-ID", "user": "X-User-ID"},
)


class Turn(BaseModel):
    message: str


def _run(turn: Turn, session: str) -> tuple[State, RunnableConfig]:
    """The graph's input and config: the session is the LangGraph thread."""
    return (
        State(messages=[HumanMessage(turn.message)]),  # type: ignore[typeddict-item]
        {"configurable": {"thread_id": session}},
    )


@app.post("/chat")
async def chat(turn: Turn, x_session_id: Annotated[str, Header()]) -> dict[str, str]:
    inputs, config = _run(turn, x_session_id)
    state = await graph.ainvoke(inputs, config)
    return {"reply": state["messages"][-1].text}


@app.post("/chat/stream")
async def chat_stream(turn: Turn, x_session_id: Annotated[str, Header()]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        inputs, config = _run(turn, x_session_id)
        async for chunk, meta in graph.astream(inputs, config, stream_mode="messages"):
            if (
                isinstance(meta, dict)
                and meta.get("langgraph_node") == "agent"
                and isinstance(chunk, AIMessageChunk)
                and chunk.text
            ):
                yield f"data: {json.dumps({'token': chunk.text})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
