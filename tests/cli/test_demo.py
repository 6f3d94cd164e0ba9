"""`tracewire demo` end to end: a real subprocess, the bundled local server, a real sqlite store
in a temp dir; the traces are read back through MLflow's own API."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tracewire.cli import main
from tracewire.cli.demo import CALLS, DEFAULT_EXPERIMENT, Row, format_table, resolve_tracking_uri

# Only a hang guard: the demo runs in a few seconds.
HANG_GUARD = 120

# Set by the test suite (tests/conftest.py) or by a developer's shell; the demo must work without.
_STRIPPED = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID",
             "MLFLOW_MODEL_CATALOG_URI", "TRACEWIRE_STREAM_USAGE_HOSTS", "OPENAI_API_KEY",
             "OPENAI_BASE_URL")


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _STRIPPED}
    env["TRACEWIRE_TESTING"] = "1"
    return env


def tracewire_cli(*args: str, cwd: Path, env: dict[str, str] | None = None
                  ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tracewire.cli", *args], cwd=cwd,
                          env=clean_env() if env is None else env, capture_output=True, text=True,
                          timeout=HANG_GUARD)


@pytest.mark.timeout(HANG_GUARD + 30)
def test_demo_end_to_end(tmp_path: Path) -> None:
    result = tracewire_cli("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "Traceback" not in result.stderr, result.stderr

    db = tmp_path.resolve() / "mlflow.db"
    assert db.is_file()
    uri = f"sqlite:///{db}"
    assert "bundled local OpenAI-compatible server at http://127.0.0.1:" in out
    assert f"mlflow ui --backend-store-uri {uri}" in out
    assert repr(DEFAULT_EXPERIMENT) in out
    # Progress is plain lines when stdout is not a terminal.
    assert "\r" not in out
    assert len(re.findall(rf"^  \[\d/{CALLS}\] ", out, re.M)) == CALLS

    totals = re.search(rf"^\s+total\s+{CALLS} calls\s+(\d+)\s+(\d+)\s+(\d+)\s+(\S+)", out, re.M)
    assert totals, out
    input_tokens, output_tokens, total_tokens = map(int, totals.groups()[:3])
    assert input_tokens > 0 and output_tokens > 0
    assert total_tokens == input_tokens + output_tokens
    assert float(totals.group(4)) > 0  # priced by the store

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    assert experiment is not None
    traces = client.search_traces(locations=[experiment.experiment_id], max_results=100)
    assert len(traces) == CALLS
    run_ids = {t.info.tags.get("demo.run") for t in traces}
    assert len(run_ids) == 1 and None not in run_ids
    assert run_ids.pop() in out

    sessions = {t.info.trace_metadata.get("mlflow.trace.session") for t in traces}
    assert None not in sessions and len(sessions) == 2
    users = {t.info.trace_metadata.get("mlflow.trace.user") for t in traces}
    assert users == {"ada", "grace"}
    assert any(t.info.cost and t.info.cost.get("total_cost", 0) > 0 for t in traces)
    assert sum(t.info.token_usage["total_tokens"] for t in traces) == total_tokens

    names = sorted(t.info.tags["mlflow.traceName"] for t in traces)
    assert names == sorted(["chat gpt-4o-mini"] * 5 + ["embeddings text-embedding-3-small",
                                                       "responses gpt-4o-mini"])
    # The streamed call got exact usage: the demo allows stream usage for the local server.
    streamed = [t for t in traces
                if any(s.inputs and s.inputs.get("stream") for s in t.data.spans)]
    assert len(streamed) == 1
    assert streamed[0].info.token_usage["output_tokens"] > 0


def test_second_run_reports_only_its_own_traces(tmp_path: Path) -> None:
    assert tracewire_cli("demo", cwd=tmp_path).returncode == 0
    second = tracewire_cli("demo", cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"({CALLS} of {CALLS})" in second.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    assert len(client.search_traces(locations=[experiment.experiment_id],
                                    max_results=100)) == 2 * CALLS


def test_tracking_uri_option_and_user_experiment(tmp_path: Path) -> None:
    store = tmp_path.resolve() / "elsewhere.db"
    env = clean_env()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path.resolve() / 'ignored.db'}"
    env["MLFLOW_EXPERIMENT_NAME"] = "my-experiment"
    result = tracewire_cli("demo", "--tracking-uri", f"sqlite:///{store}", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert store.is_file()
    assert not (tmp_path / "ignored.db").exists() and not (tmp_path / "mlflow.db").exists()
    assert f"mlflow ui --backend-store-uri sqlite:///{store}" in result.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("my-experiment")
    assert len(client.search_traces(locations=[experiment.experiment_id])) == CALLS


def test_real_without_api_key_fails_clearly(tmp_path: Path) -> None:
    result = tracewire_cli("demo", "--real", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "OPENAI_API_KEY" in lines[0], result.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_config_error_is_one_line(tmp_path: Path) -> None:
    env = clean_env()
    env["MLFLOW_EXPERIMENT_ID"] = "not-a-number"
    result = tracewire_cli("demo", cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "tracewire: error: MLFLOW_EXPERIMENT_ID must be a numeric experiment id, "
        "got 'not-a-number'"]


def test_help(tmp_path: Path) -> None:
    result = tracewire_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "demo" in result.stdout
    demo_help = tracewire_cli("demo", "--help", cwd=tmp_path)
    assert demo_help.returncode == 0
    assert "--real" in demo_help.stdout and "--tracking-uri" in demo_help.stdout


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["no-such-command"]) == 2
    assert main(["demo", "--no-such-option"]) == 2
    assert "usage: tracewire" in capsys.readouterr().err


def test_tracking_uri_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cwd = Path.cwd()
    assert resolve_tracking_uri(None, {}) == f"sqlite:///{cwd / 'mlflow.db'}"
    assert resolve_tracking_uri(None, {"MLFLOW_TRACKING_URI": "http://localhost:5000"}) == \
        "http://localhost:5000"
    assert resolve_tracking_uri("sqlite:///x.db", {"MLFLOW_TRACKING_URI": "http://h"}) == \
        f"sqlite:///{cwd / 'x.db'}"
    assert resolve_tracking_uri("sqlite:////abs/y.db", {}) == "sqlite:////abs/y.db"


def test_table_shows_dash_for_unpriced_calls() -> None:
    table = format_table([Row("a", "chat m", "s", 3, 2, 5, None, 7),
                          Row("b", "chat n", "s", 1, 1, 2, 0.5, 3)])
    lines = table.splitlines()
    assert lines[2].split()[-2] == "-"
    assert lines[-1].split()[-5:] == ["4", "3", "7", "0.50000000", "10"]


def test_failed_call_is_one_line_and_nothing_is_left_running(tmp_path: Path) -> None:
    # The local server answers HTTP 500 for this model: the demo's first call fails.
    code = ("import sys, tracewire.cli.demo as demo; demo.CHAT_MODEL = 'error-500'; "
            "from tracewire.cli import main; sys.exit(main(['demo']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=HANG_GUARD)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tracewire: error: call 1 of the demo failed: InternalServerError")
