"""Credentials in URIs, query strings and exception text never reach disk or a log: the spool's
bytes (database and -wal), the MLflow store's bytes and stderr are searched for each secret."""

from __future__ import annotations

import base64
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.conftest import API_KEY, Traced
from tests.support.processes import run_command
from tests.support.web_server import serve, settled
from tracewire.middleware import TracingMiddleware
from tracewire.testing import OpenAIServer

PASSWORD, URI_TOKEN = "uri-password-d41f", "uri-token-8c2e"
QUERY_KEY, BASE_URL_TOKEN = "query-key-71b0", "base-url-token-3f9a"


def files_bytes(*paths: Path) -> bytes:
    """Every byte of these files and their sqlite companions (-wal, -shm, -journal)."""
    found = [p for path in paths for p in path.parent.glob(path.name + "*") if p.is_file()]
    assert found, paths
    return b"".join(p.read_bytes() for p in found)


class _Server(http.server.ThreadingHTTPServer):
    """A tracking server that answers MLflow's version probe and drops every other request:
    the store is down, and MLflow's error message repeats the tracking URI."""

    authorization: list[str]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self.server.authorization.append(self.headers.get("Authorization", ""))
        if self.path.split("?")[0].endswith("/version"):
            body = b"3.17.2"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.close_connection = True

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def unavailable_store() -> Iterator[_Server]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.authorization = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


APP = """
import mlflow, tracewire
tracewire.autolog()
with mlflow.start_span("work") as span:
    span.set_inputs({"question": "what is on disk?"})
"""


def test_tracking_uri_credentials_stay_out_of_the_spool_and_every_log(
    tmp_path: Path, unavailable_store: _Server
) -> None:
    port = unavailable_store.server_address[1]
    env = dict(
        os.environ,
        TRACEWIRE_SPOOL_DIR=str(tmp_path / "spool"),
        TRACEWIRE_FLUSH_TIMEOUT="0.5",
        MLFLOW_TRACKING_URI=f"http://user:{PASSWORD}@127.0.0.1:{port}/?token={URI_TOKEN}",
        MLFLOW_EXPERIMENT_NAME="secrets",
    )
    app = run_command([sys.executable, "-c", APP], env)
    assert app.returncode == 0, app.stderr
    # The shipper said the store is down, repeating MLflow's message, and the exit line where
    # the trace stays: both with the URI, neither with its credentials.
    assert f"API request to http://user:***@127.0.0.1:{port}/?token=***" in app.stderr, app.stderr
    assert "1 trace(s) not yet in the tracking store (http://user:***@" in app.stderr
    # The shipper still wrote with the credentials, taken from its environment, not the spool.
    expected = "Basic " + base64.b64encode(f"user:{PASSWORD}".encode()).decode()
    assert expected in unavailable_store.authorization

    spool_files = list((tmp_path / "spool").glob("spool-*.db"))
    assert len(spool_files) == 1
    # The CLI on that spool, side by side (`spool ship` tries the store three times).
    ship, status = (
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tracewire.cli",
                "spool",
                action,
                "--dir",
                str(tmp_path / "spool"),
            ],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for action in ("ship", "status")
    )
    ship_out, ship_err = ship.communicate(timeout=120)
    status_out, status_err = status.communicate(timeout=120)
    assert ship.returncode == 1 and "experiment 'secrets' is unavailable" in ship_err, ship_err
    assert "1 pending" in status_out, status_out

    on_disk = files_bytes(*spool_files)
    assert b"what is on disk?" in on_disk  # the scan does find what is there
    for secret in (PASSWORD, URI_TOKEN):
        for where, text in (
            ("app", app.stderr),
            ("ship", ship_out + ship_err),
            ("status", status_out + status_err),
        ):
            assert secret not in text, (where, text)
        assert secret.encode() not in on_disk, secret


def test_credentials_in_request_parameters_and_errors_stay_out_of_the_store(
    traced: Traced, tracking_uri: str, openai_server: OpenAIServer
) -> None:
    client = openai.OpenAI(base_url=openai_server.base_url, api_key=API_KEY, max_retries=0)
    # A base URL with a token in its query: the server's 404 repeats the URL.
    tokened = openai.OpenAI(
        base_url=f"{openai_server.base_url}/deployments?token={BASE_URL_TOKEN}",
        api_key=API_KEY,
        max_retries=0,
    )

    def chat(request: object) -> JSONResponse:
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hello"}],
            extra_query={"api_key": QUERY_KEY, "api-version": "2024-06-01"},
        )
        tokened.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "again"}]
        )
        return JSONResponse({"ok": True})

    app = TracingMiddleware(Starlette(routes=[Route("/chat", chat, methods=["POST"])]))
    with serve(app) as url:
        response = httpx.post(f"{url}/chat", timeout=30)
    assert response.status_code == 500

    (trace,) = settled(traced, 1)
    root, first, second = trace.data.spans
    assert first.inputs["extra_query"] == {"api_key": "***", "api-version": "2024-06-01"}
    for failed in (root, second):
        (event,) = failed.events
        assert "?token=***" in event.attributes["exception.message"], event.attributes
        assert "?token=***" in failed.status.description

    stored = files_bytes(Path(tracking_uri.removeprefix("sqlite:///")))
    spooled = files_bytes(*Path(os.environ["TRACEWIRE_SPOOL_DIR"]).glob("spool-*.db"))
    assert b"2024-06-01" in stored and b"2024-06-01" in spooled  # the scan finds the rest
    for secret in (QUERY_KEY, BASE_URL_TOKEN):
        assert secret.encode() not in stored, secret
        assert secret.encode() not in spooled, secret


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://mlflow:pg-pass@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
        ("https://ghp_tok@example.com/x", "https://***@example.com/x"),
        (
            "GET https://acct.blob.core.windows.net/c/b?sv=2024&sig=abc%2Bdef&se=1 failed",
            "GET https://acct.blob.core.windows.net/c/b?sv=2024&sig=***&se=1 failed",
        ),
        (
            "url: /x?X-Amz-Credential=AKIA/1&X-Amz-Signature=ff00 (Caused by)",
            "url: /x?X-Amz-Credential=***&X-Amz-Signature=*** (Caused by)",
        ),
        (
            "headers={'Authorization': 'Bearer sk-1', 'Accept': 'application/json'}",
            "headers={'Authorization': '***', 'Accept': 'application/json'}",
        ),
        ('{"api_key": "sk-2", "model": "gpt-4o"}', '{"api_key": "***", "model": "gpt-4o"}'),
        ("OpenAI(api_key='sk-3', timeout=5)", "OpenAI(api_key=***, timeout=5)"),
        ("Cookie: sid=s3cr3t; theme=dark\nnext", "Cookie: ***\nnext"),
        ("sent Bearer eyJhbGciOi.x-y_z to the server", "sent Bearer *** to the server"),
        ("/callback?code=oauth-code&state=ok", "/callback?code=***&state=ok"),
        (
            "no credentials here: http://127.0.0.1:5000/api?experiment_id=3&mode=1",
            "no credentials here: http://127.0.0.1:5000/api?experiment_id=3&mode=1",
        ),
    ],
)
def test_the_scrubber_masks_credentials_and_keeps_the_rest(text: str, expected: str) -> None:
    from tracewire.core import scrub

    assert scrub.text(text) == expected
