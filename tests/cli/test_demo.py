"""`tracewire demo` end to end: a real subprocess in a temp directory, as the README runs it (the
example agent app on uvicorn, the bundled local OpenAI-compatible server, a sqlite store and a
Delta table in the current directory); the traces are read back through MLflow's own API and
the Delta table through deltalake."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tracewire.cli import main
from tracewire.cli.demo import DEFAULT_EXPERIMENT, resolve_tracking_uri
from tracewire.cli.demo_results import RUN_TAG
from tracewire.cli.demo_traffic import SCRIPT, STEPS
from tracewire.report import sources

# Only a hang guard: the demo runs in about ten seconds.
HANG_GUARD = 120

# Set by the test suite (tests/conftest.py) or by a developer's shell; the demo must work without.
_STRIPPED = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_MODEL_CATALOG_URI",
    "TRACEWIRE_STREAM_USAGE_HOSTS",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OPENAI_MODEL",
)


def clean_env(cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _STRIPPED}
    env["TRACEWIRE_TESTING"] = "1"
    # A spool of the run's own: how the test finds every process the run started.
    env["TRACEWIRE_SPOOL_DIR"] = str(cwd / "spool")
    return env


def tracewire_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tracewire.cli", *args],
        cwd=cwd,
        env=clean_env(cwd) if env is None else env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD,
    )


def assert_nothing_left_running(result: subprocess.CompletedProcess[str], spool: Path) -> None:
    """The demo's servers are closed and no process of the run (the shipper included, which
    finishes on its own once the demo has exited) outlives it for long."""
    for port in re.findall(r"http://127\.0\.0\.1:(\d+)", result.stdout):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", int(port)), timeout=1).close()
    marker = f"TRACEWIRE_SPOOL_DIR={spool}".encode()
    deadline = time.monotonic() + 20
    while left := [p for p in Path("/proc").glob("[0-9]*") if _has_env(p, marker)]:
        assert time.monotonic() < deadline, [(p.name, (p / "cmdline").read_bytes()) for p in left]
        time.sleep(0.2)


def _has_env(proc: Path, marker: bytes) -> bool:
    try:
        return marker in (proc / "environ").read_bytes().split(b"\0")
    except OSError:  # gone meanwhile, or not ours
        return False


@dataclass(frozen=True)
class Run:
    cwd: Path
    result: subprocess.CompletedProcess[str]
    seconds: float

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.cwd / 'mlflow.db'}"


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One demo run on the defaults, shared by the tests that look at its results."""
    cwd = tmp_path_factory.mktemp("demo").resolve()
    started = time.monotonic()
    result = tracewire_cli("demo", cwd=cwd)
    return Run(cwd, result, time.monotonic() - started)


def stats_line(out: str, key: str) -> list[str]:
    """The cells of a stats table's row (the first table that has it: by route)."""
    match = re.search(rf"^{re.escape(key)}\s+(.*)$", out, re.M)
    assert match, out
    return match.group(1).split()


@pytest.mark.timeout(HANG_GUARD + 30)
def test_demo_end_to_end(first: Run) -> None:
    result, out = first.result, first.result.stdout
    assert result.returncode == 0, out + result.stderr
    assert result.stderr == "", result.stderr
    assert first.seconds < 60
    assert "the bundled local OpenAI-compatible server at http://127.0.0.1:" in out
    assert "examples/fastapi_agent" in out
    assert f"mlflow ui --backend-store-uri {first.uri}" in out
    delta_path = first.cwd / "tracewire-delta"
    assert f"Delta table (one row per trace): {delta_path}" in out
    # Progress is plain lines when stdout is not a terminal.
    assert "\r" not in out
    assert len(re.findall(rf"^  \[\d/{STEPS}\] ", out, re.M)) == STEPS
    assert "HTTP 500 the weather tool failed, as planned" in out

    # The stats table: traces, error rate, p50, p95, p99, ttfb p50, tokens, cost, feedback.
    everything = stats_line(out, "(all)")
    assert everything[:2] == ["6", "16.7%"] and everything[-1] == "1/2"
    assert int(everything[6].replace(",", "")) > 0 and float(everything[7]) > 0
    assert stats_line(out, "/chat")[:2] == ["5", "20.0%"]
    assert stats_line(out, "/chat/stream")[:2] == ["1", "0.0%"]
    assert_nothing_left_running(result, first.cwd / "spool")


def test_delta_table_holds_the_runs_rows(first: Run) -> None:
    assert first.result.returncode == 0, first.result.stdout + first.result.stderr
    run_id = re.search(rf"{RUN_TAG} = (\w+)", first.result.stdout).group(1)
    rows = sources.from_delta(str(first.cwd / "tracewire-delta"), 0)
    assert len(rows) == len(SCRIPT)
    assert {json.loads(r["tags"])[RUN_TAG] for r in rows} == {run_id}
    sessions = {r["session"] for r in rows}
    assert {s.rsplit("-", 1)[0] for s in sessions} == {"paris", "london", "atlantis"}
    assert {r["user"] for r in rows} == {"ada", "grace", "linus"}
    assert sorted(r["route"] for r in rows) == ["/chat"] * 5 + ["/chat/stream"]
    assert all(r["models"] == ["gpt-4o-mini"] and r["total_tokens"] > 0 for r in rows)

    (failed,) = [r for r in rows if r["state"] == "ERROR"]
    assert failed["http_status"] == 500 and failed["user"] == "linus"
    assert "no weather station for" in failed["error_message"]

    rated = {r["session"].rsplit("-", 1)[0]: r for r in rows if r["feedback_count"]}
    assert set(rated) == {"paris", "london"}
    assert rated["paris"]["feedback_positive"] == 1
    (down,) = json.loads(rated["london"]["assessments"])
    assert (down["name"], down["value"], down["source"]) == ("thumbs", False, "grace")
    assert down["rationale"] == "asked about next week, got today's weather"
    (streamed,) = [r for r in rows if r["route"] == "/chat/stream"]
    assert streamed["time_to_first_byte_ms"] is not None and streamed["output_tokens"] > 0


def test_traces_in_the_store(first: Run) -> None:
    assert first.result.returncode == 0, first.result.stdout + first.result.stderr
    client = MlflowClient(tracking_uri=first.uri)
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    traces = client.search_traces(locations=[experiment.experiment_id], max_results=100)
    assert len(traces) == len(SCRIPT)
    for trace in traces:
        # The request, the graph, its nodes, the retriever, the model calls and the tool.
        types = {s.span_type for s in trace.data.spans}
        assert {"AGENT", "RETRIEVER", "CHAT_MODEL", "TOOL"} <= types, types
        # The LangGraph thread is the session the client sent.
        session = trace.info.trace_metadata["mlflow.trace.session"]
        assert session.split("-")[0] in ("paris", "london", "atlantis")
    paris = [
        t for t in traces if t.info.trace_metadata["mlflow.trace.session"].startswith("paris-")
    ]
    assert len(paris) == 3
    # The third turn of the session carried the first two to the model.
    last = max(paris, key=lambda t: t.info.request_time)
    model_inputs = str([s.inputs for s in last.data.spans if s.span_type == "CHAT_MODEL"])
    assert "weather in Paris today" in model_inputs and "Louvre" in model_inputs


def test_second_run_with_options_reports_only_its_own_traces(first: Run) -> None:
    """Same store (through --tracking-uri, which wins over MLFLOW_TRACKING_URI) and table, the
    user's own experiment: the second run reports its own traces only."""
    assert first.result.returncode == 0
    env = clean_env(first.cwd)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{first.cwd / 'ignored.db'}"
    env["MLFLOW_EXPERIMENT_NAME"] = "my-experiment"
    second = tracewire_cli(
        "demo",
        "--tracking-uri",
        "sqlite:///mlflow.db",
        "--delta",
        str(first.cwd / "tracewire-delta"),
        cwd=first.cwd,
        env=env,
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert not (first.cwd / "ignored.db").exists()
    assert f"`tracewire stats` of this run ({len(SCRIPT)} traces" in second.stdout
    assert stats_line(second.stdout, "(all)")[0] == str(len(SCRIPT))
    client = MlflowClient(tracking_uri=first.uri)
    for name in (DEFAULT_EXPERIMENT, "my-experiment"):
        experiment = client.get_experiment_by_name(name)
        assert len(
            client.search_traces(locations=[experiment.experiment_id], max_results=100)
        ) == len(SCRIPT)
    assert len(sources.from_delta(str(first.cwd / "tracewire-delta"), 0)) == 2 * len(SCRIPT)


def test_real_without_api_key_fails_clearly(tmp_path: Path) -> None:
    result = tracewire_cli("demo", "--real", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "OPENAI_API_KEY" in lines[0], result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_config_error_is_one_line(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    env["MLFLOW_EXPERIMENT_ID"] = "not-a-number"
    result = tracewire_cli("demo", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "tracewire: error: MLFLOW_EXPERIMENT_ID must be a numeric experiment id, got 'not-a-number'"
    ]


def test_a_tracking_uri_option_mlflow_cannot_use_is_named_in_one_line(tmp_path: Path) -> None:
    # The demo hands the option to its app as MLFLOW_TRACKING_URI: the error names the option.
    result = tracewire_cli("demo", "--tracking-uri", "bad:uri", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        "tracewire: error: --tracking-uri is 'bad:uri', whose scheme 'bad' MLflow has no "
        "tracking store for"
    )
    assert list(tmp_path.iterdir()) == []


def test_failed_request_is_one_line_and_nothing_is_left_running(tmp_path: Path) -> None:
    # The local server answers HTTP 500 for this model: the app's first turn fails.
    env = clean_env(tmp_path)
    env["OPENAI_MODEL"] = "error-500"
    result = tracewire_cli("demo", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tracewire: error: request 1 of the demo failed: HTTP 500")
    # The cause, read from the request's trace: the model call's error.
    assert lines[0].endswith(
        "InternalServerError: Error code: 500 - The server had an error "
        "while processing your request (simulated by model error-500)."
    )
    assert_nothing_left_running(result, tmp_path / "spool")


def test_help(tmp_path: Path) -> None:
    result = tracewire_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "demo" in result.stdout
    demo_help = tracewire_cli("demo", "--help", cwd=tmp_path)
    assert demo_help.returncode == 0
    for option in ("--real", "--tracking-uri", "--delta"):
        assert option in demo_help.stdout


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["no-such-command"]) == 2
    assert main(["demo", "--no-such-option"]) == 2
    assert "usage: tracewire" in capsys.readouterr().err


def test_tracking_uri_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cwd = Path.cwd()
    assert resolve_tracking_uri(None, {}) == f"sqlite:///{cwd / 'mlflow.db'}"
    assert (
        resolve_tracking_uri(None, {"MLFLOW_TRACKING_URI": "http://localhost:5000"})
        == "http://localhost:5000"
    )
    assert (
        resolve_tracking_uri("sqlite:///x.db", {"MLFLOW_TRACKING_URI": "http://h"})
        == f"sqlite:///{cwd / 'x.db'}"
    )
    assert resolve_tracking_uri("sqlite:////abs/y.db", {}) == "sqlite:////abs/y.db"
