"""Zero-code web tracing: after tracewire.autolog(), every Starlette/FastAPI app is traced by
TracingMiddleware, installed once and outermost, on real uvicorn."""

from __future__ import annotations

from typing import Any

import httpx
import mlflow
import openai
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import tracewire
from tests.conftest import API_KEY, Traced
from tests.support.web_server import Serve, settled
from tracewire.middleware import TracingMiddleware
from tracewire.testing import OpenAIServer


def zero_code_app(openai_server: OpenAIServer) -> FastAPI:
    app = FastAPI()
    client = openai.AsyncOpenAI(base_url=openai_server.base_url, api_key=API_KEY, max_retries=0)

    @app.post("/ask")
    async def ask(body: dict[str, Any]) -> dict[str, Any]:
        reply = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": body["q"]}]
        )
        if body.get("then_fail"):
            raise RuntimeError("after the call")
        return {"reply": reply.choices[0].message.content}

    async def hello(request: Any) -> PlainTextResponse:
        reply = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "mounted"}]
        )
        return PlainTextResponse(reply.choices[0].message.content)

    app.mount("/sub", Starlette(routes=[Route("/hello", hello)]))
    return app


def test_an_app_with_no_tracewire_line_is_traced_outermost(
    server: Serve, openai_server: OpenAIServer, traced: Traced
) -> None:
    with server(zero_code_app(openai_server)) as url:
        ok = httpx.post(f"{url}/ask", json={"q": "hi"}, headers={"X-Session-ID": "zero"})
        failed = httpx.post(
            f"{url}/ask",
            json={"q": "bye", "then_fail": True},
            headers={"X-Request-ID": "req-unhandled", "Connection": "close"},
        )
        mounted = httpx.get(f"{url}/sub/hello")
    assert ok.json() == {"reply": "Echo: hi"} and mounted.text == "Echo: mounted"
    # Outside ServerErrorMiddleware: the unhandled exception's 500 carries the id too.
    assert failed.status_code == 500 and failed.headers["x-request-id"] == "req-unhandled"
    traces = {t.info.client_request_id: t for t in settled(traced, 3)}
    assert set(traces) == {
        ok.headers["x-request-id"],
        "req-unhandled",
        mounted.headers["x-request-id"],
    }
    # A header names nobody unless the app trusts it (TRACEWIRE_TRUST_IDENTITY_HEADERS).
    assert "mlflow.trace.session" not in traces[ok.headers["x-request-id"]].info.trace_metadata
    assert traces["req-unhandled"].info.state.value == "ERROR"
    for trace in traces.values():  # one root each: the mounted app's is not a second one
        roots = [s.name for s in trace.data.spans if s.parent_id is None]
        assert len(roots) == 1 and roots[0] in ("POST /ask", "GET /sub/hello"), roots


def test_feedback_route_from_the_environment(
    server: Serve, openai_server: OpenAIServer, traced: Traced, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRACEWIRE_FEEDBACK_PATH", "/feedback")
    monkeypatch.setenv("TRACEWIRE_TRUST_IDENTITY_HEADERS", "user=X-User-ID")
    traced.enable()  # settings are read at autolog()
    with server(zero_code_app(openai_server)) as url:
        asked = httpx.post(f"{url}/ask", json={"q": "rate me"})
        sent = httpx.post(
            f"{url}/feedback",
            headers={"X-User-ID": "dana"},
            json={"request_id": asked.headers["x-request-id"], "name": "thumbs", "value": True},
        )
    assert sent.status_code == 202, sent.text
    assert tracewire.flush(30)
    (trace,) = settled(traced, 1)
    (feedback,) = mlflow.get_trace(trace.info.trace_id).info.assessments
    assert (feedback.name, feedback.value, feedback.source.source_id) == ("thumbs", True, "dana")


def test_middleware_added_by_hand_is_not_installed_twice(
    server: Serve, openai_server: OpenAIServer, traced: Traced
) -> None:
    app = zero_code_app(openai_server)
    app.add_middleware(
        TracingMiddleware, request_id_header="X-Correlation-ID", exclude_paths=["/sub"]
    )
    with server(app) as url:
        asked = httpx.post(f"{url}/ask", json={"q": "once"})
        excluded = httpx.get(f"{url}/sub/hello")
    assert "x-correlation-id" in asked.headers and "x-request-id" not in asked.headers
    assert "x-request-id" not in excluded.headers and "x-correlation-id" not in excluded.headers
    traces = settled(traced, 2)  # the asked call's request trace, the excluded call's own
    (request_trace,) = [t for t in traces if t.info.client_request_id]
    assert [s.name for s in request_trace.data.spans if s.parent_id is None] == ["POST /ask"]


@pytest.mark.parametrize("traced", [{"exclude": ["starlette"]}], indirect=True)
def test_excluded_plugin_installs_nothing(
    server: Serve, openai_server: OpenAIServer, traced: Traced
) -> None:
    with server(zero_code_app(openai_server)) as url:
        response = httpx.post(f"{url}/ask", json={"q": "no middleware"})
    assert "x-request-id" not in response.headers
    (trace,) = settled(traced, 1)
    assert [s.name for s in trace.data.spans] == ["chat gpt-4o-mini"]


def test_disabled_plugin_passes_straight_through(
    server: Serve, openai_server: OpenAIServer, traced: Traced
) -> None:
    app = zero_code_app(openai_server)
    with server(app) as url:
        assert "x-request-id" in httpx.post(f"{url}/ask", json={"q": "on"}).headers
        tracewire.disable()
        assert "x-request-id" not in httpx.post(f"{url}/ask", json={"q": "off"}).headers
        traced.enable()
        assert "x-request-id" in httpx.post(f"{url}/ask", json={"q": "on again"}).headers
