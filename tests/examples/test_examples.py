"""Every example runs as is, as a user runs it: a subprocess with the model at the bundled local
OpenAI-compatible server (OPENAI_BASE_URL) and the traces in a temp sqlite store, read back
through MLflow's API."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import pytest

from tests.support.mlflow_server import free_port
from tests.support.processes import TRACEWIRE_RUN, clean_env, run_command
from tracewire.testing import OpenAIServer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
HANG_GUARD = 90


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One store for the module, its schema created once, up front (each test has its own
    experiment)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('examples') / 'mlflow.db'}"
    mlflow.MlflowClient(uri).search_experiments()
    return uri


def example_env(
    store: str, openai_server: OpenAIServer, experiment: str, tmp_path: Path
) -> dict[str, str]:
    return clean_env(
        **{
            "TRACEWIRE_TESTING": "1",
            "MLFLOW_TRACKING_URI": store,
            "MLFLOW_EXPERIMENT_NAME": experiment,
            "MLFLOW_MODEL_CATALOG_URI": "",
            "TRACEWIRE_SPOOL_DIR": str(tmp_path / "spool"),
            # Traces and feedback are stored before exit, even on a busy machine.
            "TRACEWIRE_FLUSH_TIMEOUT": "30",
            "OPENAI_BASE_URL": openai_server.base_url,
            "OPENAI_API_KEY": "sk-examples-unused",
        }
    )


def traces(store: str, experiment: str, expected: int) -> list[mlflow.entities.Trace]:
    client = mlflow.MlflowClient(store)
    found: list[mlflow.entities.Trace] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = client.get_experiment_by_name(experiment)
        found = (
            client.search_traces(
                locations=[info.experiment_id], max_results=100, order_by=["timestamp_ms ASC"]
            )
            if info
            else []
        )
        if len(found) >= expected:
            break
        time.sleep(0.2)
    assert len(found) == expected, [t.info.trace_id for t in found]
    return found


def run_script(path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = run_command([sys.executable, str(path), *args], env, path.parent, HANG_GUARD)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done


@contextlib.contextmanager
def serving(command: list[str], cwd: Path, env: dict[str, str]) -> Iterator[str]:
    """``command`` (given ``--port``) serving on a free port until the block ends; then
    SIGTERM, as a process manager stops it."""
    port = free_port()
    proc = subprocess.Popen(
        [*command, "--port", str(port), "--log-level", "warning"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[
                0
            ].decode(errors="replace")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=HANG_GUARD)[0].decode(errors="replace")
    # uvicorn re-raises the SIGTERM it handled once it has shut down gracefully.
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "Traceback" not in output, output


def test_openai_streaming(store: str, openai_server: OpenAIServer, tmp_path: Path) -> None:
    env = example_env(store, openai_server, "openai-streaming", tmp_path)
    done = run_script(EXAMPLES / "openai_streaming.py", env)
    reply = "Echo: Write a haiku about tracing."
    assert done.stdout.splitlines() == [reply, reply]
    found = traces(store, "openai-streaming", 2)
    for trace in found:
        assert trace.info.trace_metadata["mlflow.trace.session"] == "streaming-example"
        assert trace.info.trace_metadata["mlflow.trace.user"] == "ada"
        # Exact usage, though the example never asked for it.
        assert trace.info.token_usage["output_tokens"] == len(reply.split())
        (span,) = trace.data.spans
        assert reply in str(span.outputs)


def test_langgraph_sessions(store: str, openai_server: OpenAIServer, tmp_path: Path) -> None:
    env = example_env(store, openai_server, "langgraph-sessions", tmp_path)
    done = run_script(EXAMPLES / "langgraph_sessions.py", env)
    assert [line.rsplit(" -> ", 1)[1] for line in done.stdout.splitlines()] == [
        "Result: 465 km",
        "Result: 585 km",
        "Result: 315 km",
        "Result: 315 km",
    ]
    found = traces(store, "langgraph-sessions", 4)
    by_session: dict[str, list[str]] = {}
    for trace in found:
        metadata = trace.info.trace_metadata
        by_session.setdefault(metadata["mlflow.trace.session"], []).append(
            metadata["mlflow.trace.user"]
        )
        types = {s.span_type for s in trace.data.spans}
        assert {"AGENT", "CHAT_MODEL", "TOOL"} <= types, types
    assert by_session == {"trip-to-lyon": ["ada", "ada"], "trip-to-brussels": ["grace", "grace"]}
    # The second turn of a thread carried the first one's history to the model.
    second = [t for t in found if t.info.trace_metadata["mlflow.trace.session"] == "trip-to-lyon"][
        1
    ]
    first_model_call = min(
        (s for s in second.data.spans if s.span_type == "CHAT_MODEL"), key=lambda s: s.start_time_ns
    )
    assert "Paris to Lyon" in str(first_model_call.inputs)


def test_fastapi_agent_and_feedback_client(
    store: str, openai_server: OpenAIServer, tmp_path: Path
) -> None:
    env = example_env(store, openai_server, "fastapi-agent", tmp_path)
    headers = {"X-Session-ID": "trip-7", "X-User-ID": "ada"}
    with serving(
        [sys.executable, "-m", "uvicorn", "app:app"], EXAMPLES / "fastapi_agent", env
    ) as url:
        chat = httpx.post(
            f"{url}/chat", json={"message": "Weather in Paris?"}, headers=headers, timeout=60
        )
        with httpx.stream(
            "POST",
            f"{url}/chat/stream",
            json={"message": "And in Tokyo?"},
            headers=headers,
            timeout=60,
        ) as streamed:
            events = list(streamed.iter_lines())
        feedback = run_script(
            EXAMPLES / "feedback_client.py",
            env,
            chat.headers["x-request-id"],
            "down",
            "--comment",
            "wrong city",
            "--user",
            "ada",
            "--app",
            url,
        )
    assert chat.status_code == 200 and chat.json() == {"reply": "Result: Paris: sunny, 21 C"}
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert [e for e in events if e][-1] == "data: [DONE]"
    assert "".join(e for e in events if e.startswith("data: {")).count("token") > 1
    assert feedback.stdout.startswith("202 ")

    found = traces(store, "fastapi-agent", 2)
    assert next(t.info.client_request_id for t in found) == chat.headers["x-request-id"]
    for trace in found:
        assert trace.info.trace_metadata["mlflow.trace.session"] == "trip-7"
        types = {s.span_type for s in trace.data.spans}
        assert {"AGENT", "RETRIEVER", "CHAT_MODEL", "TOOL"} <= types, types
    assert [s.name for s in found[1].data.spans if s.parent_id is None] == ["POST /chat/stream"]
    # The feedback lands on the chat request's trace once the shipper applies it.
    client = mlflow.MlflowClient(store)
    deadline = time.monotonic() + 30
    while not (assessments := client.get_trace(found[0].info.trace_id).info.assessments):
        assert time.monotonic() < deadline, "the feedback never reached its trace"
        time.sleep(0.2)
    (thumbs,) = assessments
    assert (thumbs.name, thumbs.value, thumbs.rationale) == ("thumbs", False, "wrong city")
    assert thumbs.source.source_id == "ada"


def test_zero_code_app_under_tracewire_run(
    store: str, openai_server: OpenAIServer, tmp_path: Path
) -> None:
    source = (EXAMPLES / "zero_code" / "app.py").read_text()
    assert "import tracewire" not in source and "from tracewire" not in source
    env = example_env(store, openai_server, "zero-code-example", tmp_path)
    env["TRACEWIRE_TRUST_IDENTITY_HEADERS"] = "session=X-Session-ID,user=X-User-ID"
    command = [*TRACEWIRE_RUN, sys.executable, "-m", "uvicorn", "app:app"]
    with serving(command, EXAMPLES / "zero_code", env) as url:
        asked = httpx.post(
            f"{url}/ask",
            json={"question": "What is MLflow?"},
            headers={"X-Session-ID": "zero-1", "X-User-ID": "grace"},
            timeout=60,
        )
        health = httpx.get(f"{url}/health", timeout=30)
    assert asked.json() == {"answer": "Echo: What is MLflow?"}
    assert health.json() == {"status": "ok"}
    (trace,) = traces(store, "zero-code-example", 1)  # the health check traced nothing
    assert trace.info.client_request_id == asked.headers["x-request-id"]
    assert trace.info.trace_metadata["mlflow.trace.session"] == "zero-1"
    assert trace.info.trace_metadata["mlflow.trace.user"] == "grace"
    root = [s for s in trace.data.spans if s.parent_id is None]
    assert [s.name for s in root] == ["POST /ask"]
    assert [s.name for s in trace.data.spans if s.parent_id] == ["chat gpt-4o-mini"]


def test_the_demo_runs_the_example_app() -> None:
    """`tracewire demo` must work from a wheel, so the app ships in the package; the example
    is a link to that one file."""
    shipped = Path(__file__).resolve().parents[2] / "src" / "tracewire" / "cli" / "demo_app.py"
    assert shipped.read_text() == (EXAMPLES / "fastapi_agent" / "app.py").read_text()
