"""TracingMiddleware on real uvicorn with FastAPI and Starlette apps whose handlers call the
OpenAI client against the local test server; traces read back through MLflow."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import mlflow
import openai
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

import tracewire
from tests.conftest import API_KEY, Traced
from tests.support.web_server import Serve, settled
from tracewire.middleware import TracingMiddleware
from tracewire.testing import OpenAIServer

HEX32 = re.compile(r"[0-9a-f]{32}")
# As an app behind a gateway that sets them would: the tests that send them opt in.
TRUSTED = {"session": "X-Session-ID", "user": "X-User-ID"}


def chat_app(openai_server: OpenAIServer, **options: Any) -> FastAPI:
    app = FastAPI()
    sync_client = openai.OpenAI(base_url=openai_server.base_url, api_key=API_KEY, max_retries=0)
    async_client = openai.AsyncOpenAI(
        base_url=openai_server.base_url, api_key=API_KEY, max_retries=0
    )

    def ask(text: str) -> str:
        reply = sync_client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
        )
        return reply.choices[0].message.content or ""

    @app.post("/chat/{room}")
    def chat(room: str, body: dict[str, Any]) -> dict[str, str]:  # a sync endpoint: thread pool
        return {"room": room, "reply": ask(body["text"])}

    @app.post("/achat")
    async def achat(body: dict[str, Any]) -> dict[str, str]:
        reply = await async_client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": body["text"]}]
        )
        return {"reply": reply.choices[0].message.content or ""}

    @app.get("/stream")
    async def stream(tasks: BackgroundTasks) -> StreamingResponse:
        async def tokens() -> Any:
            chunks = await async_client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "stream me"}],
                stream=True,
            )
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content

        tasks.add_task(ask, "after the response")
        return StreamingResponse(tokens(), media_type="text/plain", background=tasks)

    def current_user(request: Request) -> str:  # Depends-based auth never reaches the scope
        user = request.headers.get("x-api-user", "")
        tracewire.set_user(user)
        return user

    @app.post("/me")
    def me(body: dict[str, Any], user: str = Depends(current_user)) -> dict[str, str]:
        return {"user": user, "reply": ask(body["text"])}

    @app.post("/boom")
    def boom() -> None:
        ask("before the crash")
        raise RuntimeError("handler failed")

    @app.get("/sse")
    async def sse() -> StreamingResponse:
        async def events() -> Any:
            reply = await async_client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "tick"}]
            )
            for i in range(200):  # far more than the client reads before it goes away
                yield f"data: {reply.choices[0].message.content} {i}\n\n"
                await asyncio.sleep(0.01)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/spawn")
    async def spawn(body: dict[str, Any]) -> dict[str, str]:
        async def later() -> None:
            await async_client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": body["text"]}]
            )

        app.state.tasks = getattr(app.state, "tasks", set())
        task = asyncio.create_task(later())  # copies the request's context
        app.state.tasks.add(task)
        task.add_done_callback(app.state.tasks.discard)
        await asyncio.sleep(0)  # the task opens its call before the handler returns
        return {"spawned": "yes"}

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


@pytest.fixture
def app_url(server: Serve, openai_server: OpenAIServer, traced: Traced) -> Iterator[str]:
    app = chat_app(openai_server)
    traced_app = TracingMiddleware(app, feedback_path="/feedback", trust_identity_headers=TRUSTED)
    with server(traced_app) as url:
        yield url


def test_a_request_with_an_llm_call_is_one_trace_under_the_request(
    app_url: str, traced: Traced
) -> None:
    response = httpx.post(
        f"{app_url}/chat/lobby",
        json={"text": "hello"},
        headers={"X-Request-ID": "req-abc.1", "X-Session-ID": "sess-1", "X-User-ID": "bob"},
    )
    assert response.status_code == 200
    assert response.json() == {"room": "lobby", "reply": "Echo: hello"}
    assert response.headers["x-request-id"] == "req-abc.1"

    trace = settled(traced, 1)[0]
    assert response.headers["x-trace-id"] == trace.info.trace_id
    assert trace.info.client_request_id == "req-abc.1"
    assert trace.info.trace_metadata["mlflow.trace.session"] == "sess-1"
    assert trace.info.trace_metadata["mlflow.trace.user"] == "bob"
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.name == "POST /chat/{room}"
    assert root.attributes["http.route"] == "/chat/{room}"
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["url.path"] == "/chat/lobby"
    (chat,) = [s for s in trace.data.spans if s.name == "chat gpt-4o-mini"]
    assert chat.parent_id == root.span_id
    assert trace.info.token_usage["total_tokens"] > 0


def test_a_handler_whose_only_traced_work_is_the_users_own_mlflow_spans(
    server: Serve, traced: Traced
) -> None:
    # The request's root is made only when something starts under it: here MLflow spans,
    # which must still nest under it (sync in the thread pool and async), one trace.
    @mlflow.trace(name="lookup")
    def lookup(key: str) -> str:
        return key.upper()

    @mlflow.trace(name="alookup")
    async def alookup(key: str) -> str:
        return key[::-1]

    app = FastAPI()

    @app.get("/sync")
    def sync_route() -> dict[str, str]:
        return {"a": lookup("x"), "b": lookup("y")}

    @app.get("/async")
    async def async_route() -> dict[str, str]:
        return {"a": await alookup("xy")}

    with server(TracingMiddleware(app)) as url:
        first = httpx.get(f"{url}/sync", headers={"X-Request-ID": "only-mlflow-1"})
        second = httpx.get(f"{url}/async", headers={"X-Request-ID": "only-mlflow-2"})
    assert (first.json(), second.json()) == ({"a": "X", "b": "Y"}, {"a": "yx"})
    traces = {t.info.client_request_id: t for t in settled(traced, 2)}
    assert first.headers["x-trace-id"] == traces["only-mlflow-1"].info.trace_id
    for request_id, route, children in (
        ("only-mlflow-1", "/sync", ["lookup", "lookup"]),
        ("only-mlflow-2", "/async", ["alookup"]),
    ):
        trace = traces[request_id]
        (root,) = [s for s in trace.data.spans if s.parent_id is None]
        assert root.name == f"GET {route}"
        assert sorted(s.name for s in trace.data.spans if s.parent_id == root.span_id) == children


def test_async_endpoint_and_generated_request_id(app_url: str, traced: Traced) -> None:
    response = httpx.post(f"{app_url}/achat", json={"text": "hi"})
    request_id = response.headers["x-request-id"]
    assert HEX32.fullmatch(request_id)
    trace = settled(traced, 1)[0]
    assert trace.info.client_request_id == request_id
    assert "mlflow.trace.session" not in trace.info.trace_metadata


def test_a_request_that_traces_nothing_leaves_no_trace(app_url: str, traced: Traced) -> None:
    response = httpx.get(f"{app_url}/health")
    assert response.status_code == 200 and HEX32.fullmatch(response.headers["x-request-id"])
    assert "x-trace-id" not in response.headers
    httpx.post(f"{app_url}/achat", json={"text": "control"})  # ends after the health check did
    (trace,) = settled(traced, 1)
    assert trace.info.client_request_id != response.headers["x-request-id"]


def test_trace_all_requests_and_excluded_paths(
    server: Serve, openai_server: OpenAIServer, traced: Traced
) -> None:
    app = TracingMiddleware(
        chat_app(openai_server), trace_all_requests=True, exclude_paths=["/chat"]
    )
    with server(app) as url:
        assert "x-trace-id" in httpx.get(f"{url}/health").headers
        excluded = httpx.post(f"{url}/chat/x", json={"text": "not traced by the middleware"})
        assert "x-request-id" not in excluded.headers
    traces = settled(traced, 2)
    names = sorted(next(s for s in t.data.spans if s.parent_id is None).name for t in traces)
    assert names == ["GET /health", "chat gpt-4o-mini"]


def test_streaming_response_and_background_task_stay_in_the_request_trace(
    app_url: str, traced: Traced
) -> None:
    with httpx.stream("GET", f"{app_url}/stream") as response:
        body = "".join(response.iter_text())
    assert body == "Echo: stream me"
    (trace,) = settled(traced, 1)
    root = next(s for s in trace.data.spans if s.parent_id is None)
    children = [s for s in trace.data.spans if s.parent_id == root.span_id]
    assert sorted(s.name for s in children) == ["chat gpt-4o-mini", "chat gpt-4o-mini"]
    background = max(children, key=lambda s: s.start_time_ns)
    assert background.inputs["messages"][0]["content"] == "after the response"
    assert root.end_time_ns >= background.end_time_ns, "the root ended before the background task"
    first, last = (
        root.attributes["tracewire.http.time_to_first_byte_ms"],
        root.attributes["tracewire.http.time_to_last_byte_ms"],
    )
    assert 0 < first <= last
    assert trace.info.token_usage["total_tokens"] > 0


def test_client_disconnect_mid_stream_still_ends_the_request_trace(
    app_url: str, traced: Traced
) -> None:
    with httpx.stream("GET", f"{app_url}/sse") as response:
        first = next(response.iter_lines())
    assert first == "data: Echo: tick 0"
    (trace,) = settled(traced, 1)
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.name == "GET /sse" and root.attributes["http.response.status_code"] == 200
    assert root.attributes["tracewire.http.time_to_first_byte_ms"] > 0
    assert [s.name for s in trace.data.spans if s.parent_id == root.span_id] == ["chat gpt-4o-mini"]


def test_a_task_the_handler_spawns_stays_in_the_request_trace(app_url: str, traced: Traced) -> None:
    response = httpx.post(
        f"{app_url}/spawn", json={"text": "fire and forget"}, headers={"X-Session-ID": "spawner"}
    )
    (trace,) = settled(traced, 1)
    assert trace.info.client_request_id == response.headers["x-request-id"]
    assert trace.info.trace_metadata["mlflow.trace.session"] == "spawner"
    root = next(s for s in trace.data.spans if s.parent_id is None)
    (chat,) = [s for s in trace.data.spans if s.name == "chat gpt-4o-mini"]
    assert chat.parent_id == root.span_id
    assert chat.inputs["messages"][0]["content"] == "fire and forget"


@pytest.mark.parametrize("capture_content", [True, False])
def test_request_body_capture_is_capped_redacted_and_off_without_content(
    server: Serve,
    openai_server: OpenAIServer,
    traced: Traced,
    tracking_uri: str,
    capture_content: bool,
) -> None:
    def redact(key: str, value: Any) -> Any:  # every span's inputs/outputs, nested or not
        return json.loads(json.dumps(value).replace("4111-1111", "[card]"))

    tracewire.autolog(capture_content=capture_content, redact=redact)
    app = TracingMiddleware(chat_app(openai_server), capture_request_body=True)
    text = "card 4111-1111 " + "z" * (100 * 1024)
    with server(app) as url:
        httpx.post(f"{url}/achat", json={"text": text})
    (trace,) = settled(traced, 1)
    root = next(s for s in trace.data.spans if s.parent_id is None)
    stored = json.dumps([s.to_dict() for s in trace.data.spans])
    assert "4111-1111" not in stored
    if capture_content:
        assert root.inputs.startswith('{"text":"card [card] zzz')
        assert root.inputs.endswith("[tracewire: request body cut at 65536 bytes]")
    else:  # no body: the root shows the model call's inputs, which hold no text either
        (chat,) = [s for s in trace.data.spans if s.name == "chat gpt-4o-mini"]
        assert root.inputs == chat.inputs == {"model": "gpt-4o-mini"}
        assert "zzzz" not in stored


def test_user_set_by_a_dependency_wins_over_the_client_header(app_url: str, traced: Traced) -> None:
    httpx.post(
        f"{app_url}/me",
        json={"text": "who am I"},
        headers={"X-User-ID": "claimed", "X-API-User": "verified"},
    )
    assert settled(traced, 1)[0].info.trace_metadata["mlflow.trace.user"] == "verified"


def test_unhandled_exception_outermost_echoes_the_id_and_marks_the_trace(
    app_url: str, traced: Traced
) -> None:
    response = httpx.post(f"{app_url}/boom", headers={"X-Request-ID": "req-boom"})
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "req-boom"
    trace = settled(traced, 1)[0]
    assert trace.info.state.value == "ERROR"
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.attributes["http.response.status_code"] == 500
    assert any(
        e.name == "exception" and "handler failed" in e.attributes["exception.message"]
        for e in root.events
    )


def test_w3c_traceparent_continues_the_callers_trace(app_url: str, traced: Traced) -> None:
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    httpx.post(
        f"{app_url}/achat",
        json={"text": "distributed"},
        headers={"traceparent": f"00-{trace_id}-{parent}-01"},
    )
    (trace,) = settled(traced, 1)
    assert trace.info.trace_id == f"tr-{trace_id}"
    root = next(s for s in trace.data.spans if s.name == "POST /achat")
    assert root.parent_id == parent


def test_feedback_round_trip(app_url: str, traced: Traced) -> None:
    response = httpx.post(
        f"{app_url}/chat/a", json={"text": "what is the weather"}, headers={"X-User-ID": "alice"}
    )
    request_id = response.headers["x-request-id"]
    sent = httpx.post(
        f"{app_url}/feedback",
        headers={"X-User-ID": "alice"},
        json={
            "request_id": request_id,
            "name": "thumbs",
            "value": False,
            "rationale": "wrong city",
        },
    )
    assert sent.status_code == 202, sent.text
    assert sent.headers["x-request-id"] != request_id  # the feedback request's own id
    assert tracewire.flush(30)
    trace = mlflow.get_trace(settled(traced, 1)[0].info.trace_id)
    (feedback,) = [a for a in trace.info.assessments if a.name == "thumbs"]
    assert feedback.value is False and feedback.rationale == "wrong city"
    assert feedback.source.source_id == "alice"


@pytest.mark.parametrize(
    "body,status",
    [
        (b"not json", 400),
        (b"[1, 2]", 400),
        (json.dumps({"request_id": "r1"}).encode(), 422),  # no value
        (json.dumps({"request_id": "r1", "value": True, "user": "mallory"}).encode(), 422),
        (json.dumps({"value": True}).encode(), 422),  # neither id
        (json.dumps({"request_id": "r'1", "value": True}).encode(), 422),
        (json.dumps({"request_id": "r1", "value": [1]}).encode(), 422),
        # JSON's readers take these; MLflow cannot store them (a server then fails every read)
        (b'{"request_id": "r1", "value": Infinity}', 422),
        (b'{"request_id": "r1", "value": -1e999}', 422),
        (b'{"request_id": "r1", "value": 1' + b"0" * 400 + b"}", 422),
        (b"{" + b" " * 20_000 + b"}", 413),
    ],
)
def test_malformed_feedback_gets_a_clear_4xx(app_url: str, body: bytes, status: int) -> None:
    response = httpx.post(
        f"{app_url}/feedback", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert response.json()["error"]
    assert httpx.get(f"{app_url}/feedback").status_code == 405


def test_a_langgraph_agent_in_a_handler_is_one_request_trace(
    server: Serve, openai_server: OpenAIServer, traced: Traced
) -> None:
    from typing import Annotated

    from langchain_openai import ChatOpenAI
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.graph import START, StateGraph
    from langgraph.graph.message import add_messages
    from typing_extensions import TypedDict

    State = TypedDict("State", {"messages": Annotated[list[Any], add_messages]})  # noqa: UP013 (postponed annotations)
    model = ChatOpenAI(
        model="gpt-4o-mini", base_url=openai_server.base_url, api_key=API_KEY, max_retries=0
    )
    graph = StateGraph(State)
    graph.add_node("agent", lambda state: {"messages": [model.invoke(state["messages"])]})
    graph.add_edge(START, "agent")
    agent = graph.compile(checkpointer=InMemorySaver())

    app = FastAPI()

    @app.post("/agent")
    def run_agent(body: dict[str, Any], request: Request) -> dict[str, str]:
        state = agent.invoke(
            {"messages": [("user", body["text"])]},
            {"configurable": {"thread_id": request.headers["x-thread"]}},
        )
        return {"reply": state["messages"][-1].content}

    with server(TracingMiddleware(app, trust_identity_headers=TRUSTED)) as url:
        response = httpx.post(
            f"{url}/agent",
            json={"text": "plan my day"},
            headers={"X-Thread": "thread-9", "X-User-ID": "carol"},
        )
    assert response.json() == {"reply": "Echo: plan my day"}
    (trace,) = settled(traced, 1)
    assert trace.info.client_request_id == response.headers["x-request-id"]
    metadata = trace.info.trace_metadata
    assert (metadata["mlflow.trace.user"], metadata["mlflow.trace.session"]) == (
        "carol",
        "thread-9",
    )  # no session header: the graph's thread fills it in
    spans_by_id = {s.span_id: s for s in trace.data.spans}
    (root,) = [s for s in trace.data.spans if s.parent_id is None]
    assert root.name == "POST /agent"

    def path_to_root(span: Any) -> list[str]:
        names = []
        while span is not None:
            names.append(span.name)
            span = spans_by_id.get(span.parent_id)
        return names

    (chat,) = [s for s in trace.data.spans if s.name == "chat gpt-4o-mini"]
    assert path_to_root(chat)[-1] == "POST /agent" and "agent" in path_to_root(chat)
    assert (
        trace.info.token_usage["total_tokens"]
        == chat.attributes["mlflow.chat.tokenUsage"]["total_tokens"]
    )  # counted once, not per layer


# --------------------------------------------------------------------------- Starlette, auth


class _TokenAuth(AuthenticationBackend):
    async def authenticate(self, conn):
        header = conn.headers.get("authorization", "")
        if header.startswith("Bearer "):
            return AuthCredentials(["authenticated"]), SimpleUser(header[7:].split("-")[0])
        return None


def test_starlette_app_with_auth_middleware_websocket_and_lifespan(
    server: Serve, openai_server: OpenAIServer, traced: Traced
) -> None:
    client = openai.OpenAI(base_url=openai_server.base_url, api_key=API_KEY, max_retries=0)
    started = []

    async def ask(request):
        text = (await request.json())["text"]
        reply = await asyncio.to_thread(
            tracewire.propagate(
                lambda: client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
                )
            )
        )
        return JSONResponse({"reply": reply.choices[0].message.content})

    async def echo(websocket):
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        started.append(True)
        yield

    app = Starlette(
        routes=[Route("/ask", ask, methods=["POST"]), WebSocketRoute("/ws", echo)],
        middleware=[Middleware(AuthenticationMiddleware, backend=_TokenAuth())],
        lifespan=lifespan,
    )
    cookie_key = "k" * 32
    traced_app = TracingMiddleware(app, session_cookie="sid", session_cookie_key=cookie_key)
    with server(traced_app) as url:
        # Cookies split over two headers (as HTTP/2 clients send them): the session is in the
        # second one.
        response = httpx.post(
            f"{url}/ask",
            json={"text": "hi"},
            headers=[
                ("Authorization", "Bearer alice-secret-token"),
                ("X-User-ID", "claimed"),
                ("Cookie", "theme=dark"),
                ("Cookie", "sid=raw-session-cookie-value"),
            ],
        )
        assert response.json() == {"reply": "Echo: hi"}
        from websockets.sync.client import connect

        with connect(url.replace("http", "ws") + "/ws") as ws:
            ws.send("ping")
            assert ws.recv() == "ping"
    assert started == [True]
    trace = settled(traced, 1)[0]
    assert trace.info.trace_metadata["mlflow.trace.user"] == "alice"
    session = trace.info.trace_metadata["mlflow.trace.session"]
    assert HEX32.fullmatch(session)
    stored = json.dumps([s.to_dict() for s in trace.data.spans]) + json.dumps(trace.info.to_dict())
    for secret in ("raw-session-cookie-value", "alice-secret-token", API_KEY):
        assert secret not in stored


def test_an_identify_callable_that_raises_costs_only_its_own_ids(
    server: Serve, openai_server: OpenAIServer, traced: Traced, caplog: pytest.LogCaptureFixture
) -> None:
    def identify(scope: Any) -> tuple[str | None, str | None]:
        raise KeyError("no tenant")

    with server(
        TracingMiddleware(
            chat_app(openai_server), identify=identify, trust_identity_headers=TRUSTED
        )
    ) as url:
        response = httpx.post(
            f"{url}/achat",
            json={"text": "hi"},
            headers={"X-Request-ID": "req-id-kept", "X-User-ID": "u1"},
        )
    assert response.status_code == 200 and response.headers["x-request-id"] == "req-id-kept"
    (trace,) = settled(traced, 1)
    assert trace.info.trace_metadata["mlflow.trace.user"] == "u1"
    assert "identify callable raised" in caplog.text


# --------------------------------------------------------------------------- hostile input


HOSTILE = [
    ("x-request-id", b"a" * 8192),
    ("x-request-id", b"abc\r\nX-Injected: 1"),
    ("x-request-id", b"abc\x00def"),
    ("x-request-id", "caf\u00e9".encode("utf-8")),
    ("x-request-id", b"a" * 51),
    ("x-request-id", b"id with spaces"),
    ("x-session-id", b"s" * 8192),
    ("x-session-id", b"bad\r\nvalue"),
    ("x-user-id", b"nul\x00user"),
    ("x-user-id", "\u00fcser".encode("utf-8")),
    ("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7"),  # too short
    ("traceparent", b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01"),  # uppercase
    ("traceparent", b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"),  # zero trace
    ("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),  # zero span
    ("traceparent", b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),  # version ff
    ("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"),
    ("traceparent", b"\xff" * 80),
]


@pytest.mark.parametrize("name,value", HOSTILE)
def test_hostile_headers_are_replaced_never_reflected(
    openai_server: OpenAIServer, traced: Traced, name: str, value: bytes
) -> None:
    """In-process ASGI, so values no HTTP client would send reach the middleware as is."""
    app = TracingMiddleware(chat_app(openai_server), trust_identity_headers=TRUSTED)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b'{"text": "hostile"}', "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/achat",
        "raw_path": b"/achat",
        "query_string": b"",
        "root_path": "",
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 5000),
        "headers": [(b"content-type", b"application/json"), (name.encode(), value)],
    }
    asyncio.run(app(scope, receive, send))

    start = sent[0]
    assert start["status"] == 200
    headers = dict(start["headers"])
    assert HEX32.fullmatch(headers[b"x-request-id"].decode()), headers
    for header_value in headers.values():
        assert value not in header_value
    trace = settled(traced, 1)[0]
    assert HEX32.fullmatch(trace.info.client_request_id)
    assert not {"mlflow.trace.session", "mlflow.trace.user"} & set(trace.info.trace_metadata)
    assert re.fullmatch(r"tr-[0-9a-f]{32}", trace.info.trace_id)
    assert trace.info.trace_id != "tr-4bf92f3577b34da6a3ce929d0e0e4736"


# --------------------------------------------------------------------------- concurrency


def test_500_concurrent_requests_each_trace_carries_exactly_its_own_ids(
    app_url: str, traced: Traced
) -> None:
    big = "x" * (70 * 1024)

    async def one(http: httpx.AsyncClient, i: int) -> str | None:
        headers = {"X-Request-ID": f"req-{i}", "X-Session-ID": f"s-{i}", "X-User-ID": f"u-{i}"}
        if i % 10 == 3:
            # uvicorn drops the connection of an app that raised: not one to reuse.
            response = await http.post("/boom", headers={**headers, "Connection": "close"})
            assert response.status_code == 500
        elif i % 10 == 5:
            async with http.stream("GET", "/stream", headers=headers) as response:
                assert "".join([t async for t in response.aiter_text()]) == "Echo: stream me"
        else:
            text = f"{big if i % 10 == 7 else ''}message {i}"
            response = await http.post("/achat", json={"text": text}, headers=headers)
            assert response.json()["reply"] == f"Echo: {text}"
        assert response.headers["x-request-id"] == f"req-{i}"
        return response.headers.get("x-trace-id")

    async def run() -> list[str | None]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(base_url=app_url, limits=limits, timeout=60) as http:
            return await asyncio.gather(*(one(http, i) for i in range(500)))

    trace_ids = asyncio.run(run())
    traces = settled(traced, 500)
    by_request = {t.info.client_request_id: t for t in traces}
    assert len(by_request) == 500
    mismatches = 0
    for i in range(500):
        trace = by_request[f"req-{i}"]
        metadata = trace.info.trace_metadata
        mismatches += (metadata.get("mlflow.trace.session"), metadata.get("mlflow.trace.user")) != (
            f"s-{i}",
            f"u-{i}",
        )
        if trace_ids[i] is not None:
            mismatches += trace_ids[i] != trace.info.trace_id
        if i % 10 not in (3, 5):  # the one chat call of this request, with this request's text
            (chat,) = [s for s in trace.data.spans if s.name == "chat gpt-4o-mini"]
            mismatches += not chat.inputs["messages"][0]["content"].endswith(f"message {i}")
    assert mismatches == 0


def test_keep_alive_requests_do_not_leak_context(app_url: str, traced: Traced) -> None:
    with httpx.Client(base_url=app_url) as http:  # one connection, reused
        http.post(
            "/achat",
            json={"text": "first"},
            headers={"X-Session-ID": "only-first", "X-User-ID": "first-user"},
        )
        http.post("/achat", json={"text": "second " + "y" * 70_000})
    first, second = settled(traced, 2)
    assert first.info.trace_metadata["mlflow.trace.session"] == "only-first"
    assert not {"mlflow.trace.session", "mlflow.trace.user"} & set(second.info.trace_metadata)
    assert first.info.client_request_id != second.info.client_request_id
