"""`pip install "tracewire[openai]"` alone, into a clean venv, traces into a loopback `mlflow server`.

The package is installed from a copy of the working tree (not editable, so packaging mistakes
show) into a fresh venv that has only what ``tracewire[openai]`` pulls in: MLflow's slim
``mlflow-tracing``, not the full ``mlflow``. Scripts run with that venv's python, in a scrubbed
environment (no PYTHONPATH, no MLFLOW_* / TRACEWIRE_* from the outer run). The tracking server
and the OpenAI-compatible server run in this (outer) process's interpreter, which has the full
``mlflow``; traces are read back through MLflow's own client.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from mlflow.entities import SpanType, TraceState

from tests.support.mlflow_server import MlflowServer
from tracewire.testing import OpenAIServer, count_prompt_tokens, count_tokens

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[3]
EXPERIMENT = "clean-install"
MODEL = "gpt-4o-mini"
# Not installed and not part of the package: leave them out of the copy pip builds from.
_NOT_SHIPPED = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    "mlruns",
    "mlflow.db",
    ".tracewire",
)


@dataclass
class CleanVenv:
    root: Path
    python: Path
    mlflow_distributions: dict[str, str]  # name -> version, every installed "mlflow*" dist
    install_seconds: float

    def run(
        self, script: str, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        path = cwd / "script.py"
        path.write_text(textwrap.dedent(script))
        return subprocess.run(
            [str(self.python), str(path)],
            cwd=cwd,
            env=_clean_env(self, env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _clean_env(venv: CleanVenv | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The outer environment without anything that would leak the outer venv or its settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
        and not k.startswith(("MLFLOW_", "TRACEWIRE_", "OPENAI_", "PYTEST_"))
    }
    if venv is not None:
        env["PATH"] = f"{venv.python.parent}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(venv.root)
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra or {})
    return env


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit code {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"


def _last_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, _output(result)
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory: pytest.TempPathFactory) -> CleanVenv:
    base = tmp_path_factory.mktemp("clean-install")
    # pip builds a local directory in place (build/, *.egg-info): build from a copy, so the
    # working tree other people are editing is never written to.
    source = base / "source"
    shutil.copytree(REPO, source, ignore=_NOT_SHIPPED)
    root = base / "venv"
    started = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "venv", str(root)],
        check=True,
        env=_clean_env(None),
        capture_output=True,
        timeout=120,
    )
    python = root / "bin" / "python"
    install = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            f"{source}[openai]",
        ],
        env=_clean_env(None),
        capture_output=True,
        text=True,
        timeout=480,
    )
    if install.returncode != 0:
        pytest.fail(f'pip install "tracewire[openai]" failed:\n{_output(install)}')
    seconds = time.monotonic() - started

    probe = subprocess.run(
        [
            str(python),
            "-c",
            textwrap.dedent("""
        import importlib.metadata as md, json
        dists = {}
        for dist in md.distributions():
            name = (dist.metadata["Name"] or "").lower().replace("_", "-")
            if name.startswith("mlflow"):
                dists[name] = dist.version
        print(json.dumps(dists))
    """),
        ],
        env=_clean_env(None),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=base,
    )
    assert probe.returncode == 0, _output(probe)
    venv = CleanVenv(root, python, json.loads(probe.stdout), seconds)
    print(
        f"\nclean venv: {root}, created + installed in {seconds:.0f} s, "
        f"mlflow distributions: {venv.mlflow_distributions}"
    )
    return venv


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture(scope="module")
def openai_server() -> Iterator[OpenAIServer]:
    with OpenAIServer() as server:
        yield server


TRACE_SCRIPT = """
    import json, os, sys

    import openai
    import tracewire

    tracewire.autolog()
    client = openai.OpenAI(base_url=os.environ["TEST_OPENAI_BASE_URL"], api_key="sk-test",
                           max_retries=0)
    model = os.environ["TEST_MODEL"]
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello from a clean venv"}])
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Stream it please"}], stream=True))
    flushed = tracewire.flush(30)
    print(json.dumps({
        "tracewire_file": tracewire.__file__,
        "reply": reply.choices[0].message.content,
        "reply_model": reply.model,
        "reply_usage": reply.usage.model_dump(include={"prompt_tokens", "completion_tokens",
                                                        "total_tokens"}),
        "stream_text": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
        "stream_chunks_without_choices": sum(1 for c in chunks if not c.choices),
        "flushed": flushed,
    }))
    sys.exit(0 if flushed else 3)
"""


@pytest.mark.parametrize("select_experiment", ["by-name", "by-id"])
def test_slim_install_traces_into_a_tracking_server(
    select_experiment: str,
    clean_venv: CleanVenv,
    mlflow_server: MlflowServer,
    openai_server: OpenAIServer,
    tmp_path: Path,
) -> None:
    # Only MLflow's slim tracing SDK came in, not the full `mlflow` (SQL store, UI, ML deps).
    assert "mlflow" not in clean_venv.mlflow_distributions, clean_venv.mlflow_distributions
    assert "mlflow-tracing" in clean_venv.mlflow_distributions, clean_venv.mlflow_distributions

    client = MlflowClient(tracking_uri=mlflow_server.url)
    if select_experiment == "by-name":  # tracewire finds or creates the experiment
        name = EXPERIMENT
        selection = {"MLFLOW_EXPERIMENT_NAME": name}
    else:
        name = f"{EXPERIMENT}-by-id"
        selection = {"MLFLOW_EXPERIMENT_ID": client.create_experiment(name)}

    openai_server.clear()
    result = clean_venv.run(
        TRACE_SCRIPT,
        cwd=tmp_path,
        env={
            "MLFLOW_TRACKING_URI": mlflow_server.url,
            **selection,
            "TRACEWIRE_TESTING": "1",
            "TEST_OPENAI_BASE_URL": openai_server.base_url,
            "TEST_MODEL": MODEL,
        },
    )
    assert result.returncode == 0, _output(result)
    # The export worker only logs its failures (and flush() still says True): look for them.
    assert "tracewire: export" not in result.stderr, _output(result)
    out = _last_json(result)

    # The installed package ran, not the source tree.
    assert Path(out["tracewire_file"]).is_relative_to(clean_venv.root), out["tracewire_file"]
    # The user's results are unchanged by tracing.
    assert out["reply"] == "Echo: Hello from a clean venv"
    assert out["reply_model"] == MODEL
    assert out["stream_text"] == "Echo: Stream it please"
    assert out["stream_chunks_without_choices"] == 0  # the usage-only chunk stays hidden
    # Nothing was written next to the script (no local store, no ./mlruns).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["script.py"]

    # What the server reported, per call.
    chat_request, stream_request = [r.body for r in openai_server.requests]
    assert stream_request["stream_options"] == {"include_usage": True}
    expected_usage = [
        (out["reply_usage"]["prompt_tokens"], out["reply_usage"]["completion_tokens"]),
        (count_prompt_tokens(stream_request["messages"]), count_tokens(out["stream_text"])),
    ]
    assert expected_usage[0] == (
        count_prompt_tokens(chat_request["messages"]),
        count_tokens(out["reply"]),
    )

    # Read back through MLflow's own client, against the server.
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"experiment {name!r} does not exist"
    traces = client.search_traces(
        locations=[experiment.experiment_id], order_by=["timestamp_ms ASC"]
    )
    assert len(traces) == 2, [t.info.trace_id for t in traces]

    for trace, (prompt_tokens, completion_tokens) in zip(traces, expected_usage):
        trace = client.get_trace(trace.info.trace_id)  # the full trace, spans included
        assert trace.info.state == TraceState.OK
        assert len(trace.data.spans) == 1, [s.name for s in trace.data.spans]
        span = trace.data.spans[0]
        assert span.span_type == SpanType.CHAT_MODEL
        assert span.parent_id is None
        assert span.status.status_code.value == "OK"
        assert span.get_attribute("mlflow.llm.model") == MODEL
        usage = {
            "input_tokens": prompt_tokens,
            "output_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
        span_usage = span.get_attribute("mlflow.chat.tokenUsage")
        assert {k: span_usage.get(k) for k in usage} == usage, span_usage
        assert {k: (trace.info.token_usage or {}).get(k) for k in usage} == usage, (
            trace.info.token_usage
        )


CONFIG_ERROR_SCRIPT = """
    import json, sys, traceback

    import tracewire

    try:
        tracewire.autolog()
    except tracewire.ConfigError as error:
        print(json.dumps({"raised": "ConfigError", "message": str(error)}))
    except Exception as error:
        traceback.print_exc()
        print(json.dumps({"raised": type(error).__name__, "message": str(error)}))
    else:
        print(json.dumps({"raised": None, "message": ""}))
    import mlflow.tracking._tracking_service.utils as utils
    print(json.dumps({"default_tracking_uri": utils.DEFAULT_TRACKING_URI}))
"""


def test_slim_install_without_tracking_uri_asks_for_local_extra_or_server(
    clean_venv: CleanVenv, tmp_path: Path
) -> None:
    # No MLFLOW_TRACKING_URI: MLflow's default is the local store sqlite:///mlflow.db, which
    # needs the full `mlflow`. autolog() must say so, before anything is patched.
    result = clean_venv.run(CONFIG_ERROR_SCRIPT, cwd=tmp_path, env={"TRACEWIRE_TESTING": "1"})
    assert result.returncode == 0, _output(result)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    outcome, default = lines[0], lines[-1]
    assert default["default_tracking_uri"] == "sqlite:///mlflow.db"
    assert outcome["raised"] == "ConfigError", _output(result)
    assert 'pip install "tracewire[local]"' in outcome["message"]
    assert "MLFLOW_TRACKING_URI" in outcome["message"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["script.py"]  # no mlflow.db, no mlruns


def test_slim_install_stats_says_what_to_install_and_creates_nothing(
    clean_venv: CleanVenv, tmp_path: Path
) -> None:
    # `tracewire stats` in a folder, with the slim SDK only: one line, no traceback, no store.
    result = subprocess.run(
        [str(clean_venv.python), "-m", "tracewire.cli", "stats"],
        cwd=tmp_path,
        env=_clean_env(clean_venv),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and result.stdout == "", _output(result)
    (line,) = result.stderr.splitlines()
    assert line.startswith(
        "tracewire: error: MLflow's default tracking URI is 'sqlite:///mlflow.db' "
        "(MLFLOW_TRACKING_URI is not set), a local MLflow store, which needs "
        "the full `mlflow` package"
    ), line
    assert 'pip install "tracewire[local]"' in line
    assert list(tmp_path.iterdir()) == []
