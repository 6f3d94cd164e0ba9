"""A ResponsesAgent served by MLflow's own scoring app (on real uvicorn): the session and user
named in the agent request's ``context`` become the trace's, as a client's claim (over its
headers); what the app establishes wins, a LangGraph run's thread id included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import mlflow
import pytest

from tests.conftest import Traced
from tests.support.web_server import Serve, settled

AGENT = """
import mlflow, tracewire
from mlflow.pyfunc import ResponsesAgent
from mlflow.types.responses import ResponsesAgentRequest, ResponsesAgentResponse


class Agent(ResponsesAgent):
    def predict(self, request: ResponsesAgentRequest) -> ResponsesAgentResponse:
        text = request.input[-1].content
        if text == "fail":
            raise ValueError("the agent failed")
        if text.startswith("as app user "):
            tracewire.set_user(text.removeprefix("as app user "))
        if text.startswith("graph thread "):
            from langgraph.graph import END, START, MessagesState, StateGraph
            graph = StateGraph(MessagesState)
            graph.add_node("echo", lambda state: {"messages": [("ai", "graph says hi")]})
            graph.add_edge(START, "echo")
            graph.add_edge("echo", END)
            graph.compile().invoke({"messages": [("user", text)]}, {"configurable": {
                "thread_id": text.removeprefix("graph thread ")}})
        return ResponsesAgentResponse(output=[self.create_text_output_item(
            text=f"answer to {text}", id="msg-1")])


mlflow.models.set_model(Agent())
"""


@pytest.fixture
def scoring_url(server: Serve, traced: Traced, tmp_path: Path) -> Any:
    from mlflow.pyfunc import scoring_server

    (tmp_path / "agent.py").write_text(AGENT)
    mlflow.pyfunc.save_model(tmp_path / "model", python_model=str(tmp_path / "agent.py"))
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    with server(scoring_server.init(model)) as url:  # the app `mlflow models serve` runs
        yield url


def _ask(
    url: str,
    text: str,
    context: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    body: dict[str, Any] = {"input": [{"role": "user", "content": text}]}
    if context is not None:
        body["context"] = context
    response = httpx.post(f"{url}/invocations", json=body, headers=headers or {}, timeout=30)
    assert response.status_code == 200, response.text
    return response


def _identity(trace: Any) -> tuple[str | None, str | None]:
    metadata = trace.info.trace_metadata
    return metadata.get("mlflow.trace.session"), metadata.get("mlflow.trace.user")


def test_the_agent_requests_context_names_the_session_and_user(
    scoring_url: str, traced: Traced
) -> None:
    _ask(scoring_url, "hello", {"conversation_id": "conv-1", "user_id": "ann"})
    _ask(
        scoring_url,
        "hello",
        {"conversation_id": "conv-2", "user_id": "bob"},
        headers={"X-Session-ID": "header-session", "X-User-ID": "header-user"},
    )
    _ask(scoring_url, "hello", headers={"X-Session-ID": "header-only"})
    first, second, third = settled(traced, 3)
    assert _identity(first) == ("conv-1", "ann")
    assert _identity(second) == ("conv-2", "bob")
    assert _identity(third) == (None, None)  # no header is trusted by default
    assert first.info.request_preview == "hello"
    assert first.info.response_preview == "answer to hello"


def test_what_the_app_establishes_wins_over_the_agent_requests_context(
    scoring_url: str, traced: Traced
) -> None:
    _ask(scoring_url, "as app user carol", {"conversation_id": "conv-3", "user_id": "claimed"})
    _ask(scoring_url, "graph thread thread-9", {"conversation_id": "conv-4", "user_id": "dan"})
    by_user, by_graph = settled(traced, 2)
    assert _identity(by_user) == ("conv-3", "carol")
    assert _identity(by_graph) == ("thread-9", "dan")  # the run's thread is the app's choice


def test_a_failed_agent_answered_with_a_400_is_an_error_trace(
    scoring_url: str, traced: Traced
) -> None:
    response = httpx.post(
        f"{scoring_url}/invocations",
        timeout=30,
        json={"input": [{"role": "user", "content": "fail"}]},
    )
    assert response.status_code == 400, response.text
    (trace,) = settled(traced, 1)
    assert trace.info.state.value == "ERROR"
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.status.description.startswith("HTTP 400: ")
    assert "the agent failed" in root.status.description
