"""A web request's trace in MLflow's own terms: what MLflow's trace APIs set inside the request
lands on it, a failed request is an ERROR trace, the trace list shows the conversation, and a
trace made in a logged model's context is linked to it. Real uvicorn, the real OpenAI client
against the local server, the real store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import mlflow
import openai
import pytest
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse

import tracewire
from tests.conftest import API_KEY, Traced
from tests.support.web_server import Serve, settled
from tracewire.middleware import TracingMiddleware
from tracewire.testing import OpenAIServer


def agent_app(openai_server: OpenAIServer) -> FastAPI:
    app = FastAPI()
    client = openai.OpenAI(base_url=openai_server.base_url, api_key=API_KEY, max_retries=0)

    def ask(text: str) -> str:
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
        )
        return reply.choices[0].message.content or ""

    @app.post("/annotated")
    def annotated(body: dict[str, Any]) -> dict[str, Any]:
        # MLflow's documented way to annotate the current trace, before and after traced work.
        mlflow.update_current_trace(
            tags={"fruit": "apple"},
            metadata={"app.commit": "abc123"},
            session_id="conversation-7",
            user="alice",
        )
        reply = ask(body["text"])
        span = mlflow.get_current_active_span()
        span.set_attribute("app.route_kind", "annotated")
        mlflow.update_current_trace(tags={"answered": "yes"})
        return {"reply": reply, "trace_id": mlflow.get_active_trace_id()}

    @app.post("/custom")
    def custom(body: dict[str, Any]) -> dict[str, str]:
        reply = ask(body["text"])
        mlflow.update_current_trace(
            request_preview="custom question",
            response_preview="custom answer",
            state="ERROR",
            client_request_id="app-chosen-id",
        )
        span = mlflow.get_current_active_span()
        span.set_outputs({"answer": reply})
        span.add_event(mlflow.entities.SpanEvent("checkpoint", attributes={"step": 2}))
        return {"reply": reply}

    @app.post("/ask")
    def ask_route(body: dict[str, Any]) -> dict[str, str]:
        return {"reply": ask(body["text"])}

    @app.post("/upstream-failed")
    def upstream_failed(body: dict[str, Any]) -> JSONResponse:
        try:
            ask(body["text"])
            client.chat.completions.create(model="error-500", messages=[])
        except openai.APIError:
            return JSONResponse({"error": "the model failed"}, status_code=502)
        return JSONResponse({}, status_code=200)

    @app.post("/bad-request")
    def bad_request(body: dict[str, Any]) -> JSONResponse:
        try:
            client.chat.completions.create(model="error-500", messages=[])
        except openai.APIError:
            return JSONResponse({"error": "your agent failed"}, status_code=400)
        return JSONResponse({}, status_code=200)

    @app.post("/not-found")
    def not_found(body: dict[str, Any]) -> None:
        ask(body["text"])
        raise HTTPException(status_code=404)

    return app


@pytest.fixture
def url(server: Serve, openai_server: OpenAIServer, traced: Traced) -> Any:
    with server(
        TracingMiddleware(
            agent_app(openai_server),
            trust_identity_headers={"session": "X-Session-ID", "user": "X-User-ID"},
        )
    ) as url:
        yield url


def test_mlflow_trace_apis_inside_a_request_land_on_its_trace(url: str, traced: Traced) -> None:
    response = httpx.post(
        f"{url}/annotated",
        json={"text": "hello"},
        headers={"X-Session-ID": "from-header", "X-User-ID": "mallory"},
    )
    assert response.status_code == 200, response.text
    (trace,) = settled(traced, 1)
    assert response.json()["trace_id"] == response.headers["x-trace-id"] == trace.info.trace_id
    assert trace.info.tags["fruit"] == "apple" and trace.info.tags["answered"] == "yes"
    assert trace.info.trace_metadata["app.commit"] == "abc123"
    # What the app set through MLflow's API wins over what the client claimed in headers.
    assert trace.info.trace_metadata["mlflow.trace.session"] == "conversation-7"
    assert trace.info.trace_metadata["mlflow.trace.user"] == "alice"
    assert trace.info.client_request_id == response.headers["x-request-id"]
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.attributes["app.route_kind"] == "annotated"
    assert [s.name for s in trace.data.spans if s.parent_id == root.span_id] == ["chat gpt-4o-mini"]


def test_what_the_app_sets_through_mlflow_wins_and_goes_through_any_store(
    url: str, traced: Traced
) -> None:
    response = httpx.post(f"{url}/custom", json={"text": "hello"})
    assert response.status_code == 200, response.text
    (trace,) = settled(traced, 1)
    assert trace.info.request_preview == "custom question"
    assert trace.info.response_preview == "custom answer"
    assert trace.info.state.value == "ERROR"  # the trace's state, not the root span's status
    assert trace.info.client_request_id == "app-chosen-id"
    assert trace.info.tags["tracewire.request_id"] == response.headers["x-request-id"]
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.status.status_code == "OK"
    assert root.outputs == {"answer": "Echo: hello"}
    assert [(e.name, e.attributes) for e in root.events] == [("checkpoint", {"step": 2})]


def test_the_trace_list_shows_the_conversation(url: str, traced: Traced) -> None:
    httpx.post(f"{url}/ask", json={"text": "what is the capital of France?"})
    (trace,) = settled(traced, 1)
    assert trace.info.request_preview == "what is the capital of France?"
    assert trace.info.response_preview == "Echo: what is the capital of France?"
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert trace.data.request is not None and trace.data.response is not None  # evaluation
    assert root.inputs["messages"][0]["content"] == "what is the capital of France?"


@pytest.mark.parametrize("traced", [{"sample_rate": 0.01}], indirect=True)
def test_a_5xx_answer_is_an_error_trace_and_always_kept(url: str, traced: Traced) -> None:
    for i in range(10):
        assert httpx.post(f"{url}/upstream-failed", json={"text": f"q{i}"}).status_code == 502
    traces = settled(traced, 10)  # sampling at 1% keeps every failed request
    for trace in traces:
        assert trace.info.state.value == "ERROR"
        root = next(s for s in trace.data.spans if s.parent_id is None)
        assert root.status.status_code == "ERROR"
        assert root.status.description.startswith("HTTP 502: ")
        assert root.attributes["http.response.status_code"] == 502


def test_a_4xx_is_an_error_only_when_the_apps_traced_work_failed(url: str, traced: Traced) -> None:
    assert httpx.post(f"{url}/bad-request", json={}).status_code == 400
    assert httpx.post(f"{url}/not-found", json={"text": "x"}).status_code == 404
    failed, missing = settled(traced, 2)
    assert failed.info.state.value == "ERROR"
    assert missing.info.state.value == "OK"  # the client's mistake, not the app's failure


def test_traces_of_an_active_model_are_linked_to_it(
    url: str, traced: Traced, tracking_uri: str
) -> None:
    model = mlflow.set_active_model(name=f"agent-{traced.experiment_name[-8:]}")
    try:
        httpx.post(f"{url}/ask", json={"text": "linked"})
        (trace,) = settled(traced, 1)
    finally:
        mlflow.clear_active_model()
    assert trace.info.trace_metadata["mlflow.modelId"] == model.model_id
    found = mlflow.search_traces(model_id=model.model_id, return_type="list")
    assert [t.info.trace_id for t in found] == [trace.info.trace_id]


def test_outside_a_request_the_apis_work_on_our_spans_too(
    traced: Traced, openai_server: OpenAIServer
) -> None:
    client = openai.OpenAI(base_url=openai_server.base_url, api_key=API_KEY, max_retries=0)
    with tracewire.context(request_id="script-1"):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    assert mlflow.get_current_active_span() is None  # nothing active here
    trace = traced.trace()
    assert trace.info.client_request_id == "script-1"
    assert trace.info.request_preview == "hi"


def test_run_and_model_links_are_what_was_active_when_the_trace_began(
    traced: Traced, client: openai.OpenAI, tmp_path: Path
) -> None:
    """As MLflow links its own traces: to the run and the active model of the moment the trace
    starts, even when they end at once (an evaluation loop's last row, a short script)."""

    def ask(text: str) -> None:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
        )

    runs = mlflow.create_experiment(
        f"runs-{traced.experiment_name}", artifact_location=tmp_path.as_uri()
    )
    model = mlflow.set_active_model(name=f"agent-{traced.experiment_name[-8:]}")
    with mlflow.start_run(experiment_id=runs) as run:
        ask("in the run, first")
        ask("in the run, last")
    mlflow.clear_active_model()
    ask("after both")
    first, last, after = traced.traces(expected=3)
    for trace in (first, last):
        assert trace.info.trace_metadata.get("mlflow.sourceRun") == run.info.run_id
        assert trace.info.trace_metadata.get("mlflow.modelId") == model.model_id
    assert "mlflow.sourceRun" not in after.info.trace_metadata
    assert "mlflow.modelId" not in after.info.trace_metadata
