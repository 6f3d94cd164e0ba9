"""LangGraph conversations as MLflow sessions: each ``thread_id`` is a session, each graph run
one trace in it, with a span per node, model call and tool.

    OPENAI_API_KEY=sk-... python langgraph_sessions.py

Two users hold two-turn conversations; the checkpointer keeps each thread's history, so the
second turn continues the first. In the MLflow UI the traces group by session (the trace's
``mlflow.trace.session``), and ``configurable.user_id`` is the trace's user. Any
OpenAI-compatible server works too (``OPENAI_BASE_URL``; ``OPENAI_MODEL``, default gpt-4o-mini).
"""

from __future__ import annotations

import os

from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition

import tracewire

tracewire.autolog()


@tool
def distance_km(route: str) -> str:
    """The driving distance of a route such as "Paris to Lyon"."""
    known = {"lyon": 465, "bordeaux": 585, "brussels": 315}
    return next((f"{km} km" for city, km in known.items() if city in route.lower()), "unknown")


model = ChatOpenAI(model=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"), max_tokens=150).bind_tools(
    [distance_km]
)


def agent(state: MessagesState) -> dict:
    return {"messages": [model.invoke(state["messages"])]}


builder = StateGraph(MessagesState)
builder.add_node("agent", agent)
builder.add_node("tools", ToolNode([distance_km]))
builder.add_edge(START, "agent")
builder.add_conditional_edges("agent", tools_condition)
builder.add_edge("tools", "agent")
graph = builder.compile(checkpointer=InMemorySaver())

CONVERSATIONS = {
    ("trip-to-lyon", "ada"): [
        "How far is it from Paris to Lyon?",
        "And how far from Paris to Bordeaux?",
    ],
    ("trip-to-brussels", "grace"): [
        "How far is Paris to Brussels?",
        "And back from Brussels to Paris?",
    ],
}

for (thread, user), turns in CONVERSATIONS.items():
    config = {"configurable": {"thread_id": thread, "user_id": user}}
    for question in turns:
        state = graph.invoke({"messages": [HumanMessage(question)]}, config)
        print(f"[{thread}] {question} -> {state['messages'][-1].text}")
