"""The feedback route faces the internet: each attack docs/security.md names, as a client would
make it, against real uvicorn, with the results read back through MLflow and the spool.

The app identifies its users itself (``identify`` reading a bearer token, as its auth would);
``X-User-ID`` / ``X-Session-ID`` are what any client can write."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import tracewire
from tests.conftest import Traced
from tests.support.web_server import Serve, settled
from tracewire import config
from tracewire.export import spool_directory as spool
from tracewire.middleware import TracingMiddleware

TOKENS = {"alice-token": "alice", "bob-token": "bob"}


def _identify(scope: dict[str, Any]) -> tuple[str | None, str | None]:
    headers = dict(scope["headers"])
    token = headers.get(b"authorization", b"").removeprefix(b"Bearer ").decode()
    return None, TOKENS.get(token)


def _app(**options: Any) -> TracingMiddleware:
    async def hello(request: Any) -> PlainTextResponse:
        with mlflow.start_span("work"):  # traced work: the request leaves a trace
            return PlainTextResponse("hi")

    return TracingMiddleware(
        Starlette(routes=[Route("/hello", hello)]), feedback_path="/feedback", **options
    )


def _as(user: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {user}-token"} if user else {}


def _feedback(trace_id: str, name: str) -> list[Any]:
    trace = mlflow.get_trace(trace_id)  # None until the trace is stored
    return [a for a in trace.info.assessments if a.name == name] if trace is not None else []


def _stored_bytes(tracking_uri: str) -> bytes:
    path = Path(tracking_uri.removeprefix("sqlite:///"))
    spools = config.active().spool_dir
    return b"".join(
        p.read_bytes()
        for p in [*path.parent.glob(path.name + "*"), *spools.glob("spool-*")]
        if p.is_file()
    )


# --------------------------------------------------------------- headers name nobody


def test_identity_headers_name_nobody_by_default(
    server: Serve, traced: Traced, tracking_uri: str
) -> None:
    claimed = f"mallory-{uuid.uuid4().hex[:8]}"
    with server(_app()) as url, httpx.Client(base_url=url) as http:
        response = http.get(
            "/hello", headers={"X-User-ID": claimed, "X-Session-ID": f"{claimed}-session"}
        )
        trace_id = response.headers["x-trace-id"]
        posted = http.post(
            "/feedback",
            headers={"X-User-ID": claimed},
            json={"trace_id": trace_id, "name": "thumbs", "value": True},
        )
        assert posted.status_code == 202
    settled(traced, 1)
    metadata = mlflow.get_trace(trace_id).info.trace_metadata
    assert not {"mlflow.trace.user", "mlflow.trace.session"} & set(metadata)
    (thumbs,) = _feedback(trace_id, "thumbs")  # by the trace id its client was given
    assert thumbs.source.source_id == "anonymous"
    assert claimed.encode() not in _stored_bytes(tracking_uri)


def test_identity_headers_are_recorded_where_the_app_trusts_them(
    server: Serve, traced: Traced
) -> None:
    app = _app(trust_identity_headers={"user": "X-Gateway-User", "session": "X-Session-ID"})
    with server(app) as url, httpx.Client(base_url=url) as http:
        response = http.get(
            "/hello",
            headers={
                "X-Gateway-User": "gw-carol",
                "X-Session-ID": "gw-session",
                "X-User-ID": "not-trusted",
            },
        )
        trace_id = response.headers["x-trace-id"]
        # The trusted header is an identity the app established: it owns the trace.
        for user in ("gw-carol", "gw-dave"):
            http.post(
                "/feedback",
                headers={"X-Gateway-User": user},
                json={
                    "request_id": response.headers["x-request-id"],
                    "name": f"from-{user}",
                    "value": True,
                },
            )
    settled(traced, 1)
    metadata = mlflow.get_trace(trace_id).info.trace_metadata
    assert (metadata["mlflow.trace.user"], metadata["mlflow.trace.session"]) == (
        "gw-carol",
        "gw-session",
    )
    (carol,) = _feedback(trace_id, "from-gw-carol")
    assert carol.source.source_id == "gw-carol"
    assert not _feedback(trace_id, "from-gw-dave")


def test_trust_identity_headers_names_only_session_and_user() -> None:
    with pytest.raises(config.ConfigError, match="trust_identity_headers"):
        _app(trust_identity_headers={"tenant": "X-Tenant"})


# ----------------------------------------------- feedback only from the trace's owner


def test_feedback_on_an_identified_trace_comes_only_from_that_identity(
    server: Serve, traced: Traced
) -> None:
    with server(_app(identify=_identify)) as url, httpx.Client(base_url=url) as http:
        response = http.get("/hello", headers=_as("alice"))
        trace_id, request_id = response.headers["x-trace-id"], response.headers["x-request-id"]
        # Another user, and a client the app does not know, holding both ids (leaked, shared
        # in a screenshot): neither id grants them anything.
        for poster in ("bob", None):
            for key in ({"trace_id": trace_id}, {"request_id": request_id}):
                assert (
                    http.post(
                        "/feedback",
                        headers={**_as(poster), "X-User-ID": "alice"},
                        json={**key, "name": "planted", "value": False},
                    ).status_code
                    == 202
                )
        assert (
            http.post(
                "/feedback",
                headers=_as("alice"),
                json={"request_id": request_id, "name": "thumbs", "value": True},
            ).status_code
            == 202
        )
    settled(traced, 1)
    deadline = time.monotonic() + 20
    while not _feedback(trace_id, "thumbs") and time.monotonic() < deadline:
        time.sleep(0.2)
    (thumbs,) = _feedback(trace_id, "thumbs")
    assert thumbs.source.source_id == "alice"
    assert not _feedback(trace_id, "planted")
    # Those by trace id are refused outright, and counted.
    deadline = time.monotonic() + 20
    while (
        refused := sum(
            s.feedback_drops.get("refused", 0) for s in spool.status(config.active().spool_dir)
        )
    ) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert refused >= 2


# --------------------------------------------------------- request ids a client chose


def test_a_request_id_another_client_chose_too_never_takes_its_feedback(
    server: Serve, traced: Traced
) -> None:
    shared, anonymous = f"shared-{uuid.uuid4().hex[:8]}", f"anon-{uuid.uuid4().hex[:8]}"
    with server(_app(identify=_identify)) as url, httpx.Client(base_url=url) as http:
        alice = http.get("/hello", headers={**_as("alice"), "X-Request-ID": shared})
        bob = http.get("/hello", headers={**_as("bob"), "X-Request-ID": shared})  # the newest
        first = http.get("/hello", headers={"X-Request-ID": anonymous})
        second = http.get("/hello", headers={"X-Request-ID": anonymous})
        assert alice.headers["x-request-id"] == bob.headers["x-request-id"] == shared
        for who in ("alice", "bob"):
            http.post(
                "/feedback",
                headers=_as(who),
                json={"request_id": shared, "name": f"by-{who}", "value": True},
            )
        # Nobody identified and a request id the client chose: no feedback by it, only by
        # the trace id, which each client alone was given.
        http.post("/feedback", json={"request_id": anonymous, "name": "by-id", "value": True})
        http.post(
            "/feedback",
            json={"trace_id": first.headers["x-trace-id"], "name": "mine", "value": True},
        )
    settled(traced, 4)
    alice_trace, bob_trace = alice.headers["x-trace-id"], bob.headers["x-trace-id"]
    assert [a.source.source_id for a in _feedback(alice_trace, "by-alice")] == ["alice"]
    assert [a.source.source_id for a in _feedback(bob_trace, "by-bob")] == ["bob"]
    assert not _feedback(alice_trace, "by-bob") and not _feedback(bob_trace, "by-alice")
    for response in (first, second):
        assert not _feedback(response.headers["x-trace-id"], "by-id")
    assert _feedback(first.headers["x-trace-id"], "mine")
    assert not _feedback(second.headers["x-trace-id"], "mine")


# --------------------------------------------------------------------------- flooding


def test_a_flood_of_feedback_for_no_trace_is_bounded_counted_and_shown(
    server: Serve,
    traced: Traced,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tracewire.disable()
    monkeypatch.setenv("TRACEWIRE_FEEDBACK_MAX_PENDING", "50")
    monkeypatch.setenv("TRACEWIRE_FEEDBACK_RETENTION", "30")  # the flood's leftovers go soon
    traced.enable()
    flood = 300
    with server(_app()) as url, httpx.Client(base_url=url) as http:
        for _ in range(flood):
            assert (
                http.post(
                    "/feedback",
                    json={"request_id": uuid.uuid4().hex, "value": False, "rationale": "x" * 2000},
                ).status_code
                == 202
            )
        # Real feedback afterwards, on a real trace (its request id is the middleware's own).
        response = http.get("/hello")
        sent = time.monotonic()
        http.post(
            "/feedback",
            json={"request_id": response.headers["x-request-id"], "name": "thumbs", "value": True},
        )
        trace_id = response.headers["x-trace-id"]
        while not _feedback(trace_id, "thumbs") and time.monotonic() - sent < 30:
            time.sleep(0.2)
        applied_after = time.monotonic() - sent
    assert _feedback(trace_id, "thumbs"), "the real feedback was not applied within 30 s"
    print(f"real feedback applied {applied_after:.1f} s after it was sent")
    assert applied_after < 10, applied_after

    (status,) = [s for s in spool.status(config.active().spool_dir) if s.live]
    assert status.feedback_pending <= 50
    assert status.feedback_bytes <= 50 * 2400
    assert status.feedback_drops["budget"] >= flood - 50
    command = [
        sys.executable,
        "-m",
        "tracewire.cli",
        "spool",
        "status",
        "--dir",
        str(status.path.parent),
    ]
    text = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "feedback waiting for its trace" in text and "budget" in text, text
    listed = json.loads(
        subprocess.run(
            [*command, "--json"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    )
    (mine,) = [s for s in listed["spools"] if s["path"] == str(status.path)]
    assert mine["feedback_drops"]["budget"] >= flood - 50

    tracewire.disable()  # the exit line says what became of the feedback too
    assert "feedback" in capsys.readouterr().err
