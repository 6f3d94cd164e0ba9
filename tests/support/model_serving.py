"""MLflow's deploy path for tests: models logged from code with ``mlflow.pyfunc.log_model``, served
by ``mlflow models serve -m models:/<id> --env-manager local`` on loopback.

    env = clean_env(MLFLOW_TRACKING_URI=uri, ...)  # clean_env, TRACEWIRE_RUN: processes.py
    ids = log_models(env, tmp_path, {"agent": "agent.py"}, pip_requirements=["openai"])
    server = ModelServer(ids["agent"], env, tmp_path, wrapper=TRACEWIRE_RUN).start()
    try:
        server.wait_ready()
        httpx.post(f"{server.url}/invocations", json=...)
    finally:
        server.stop()

The server runs in a process group of its own (the ``mlflow`` CLI runs ``uvicorn`` as a child,
found on ``PATH``: ``clean_env`` puts the current interpreter's ``bin`` first), optionally under
a wrapper command (``tracewire run --``); its stdout and stderr go to a log file in ``cwd``.
``stop()`` sends SIGTERM to the whole group, then SIGKILL, and is idempotent; the first process
also gets SIGTERM if the thread that started it dies (see mlflow_server._die_with_parent).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

from tests.support.mlflow_server import _die_with_parent, free_port

__all__ = ["ModelServer", "log_models"]


def log_models(
    env: Mapping[str, str],
    cwd: Path,
    models: Mapping[str, str | Path],
    *,
    pip_requirements: Sequence[str],
    experiment: str | None = None,
    timeout: float = 180,
) -> dict[str, str]:
    """Log each ``name -> code file`` as a models-from-code pyfunc model (one process for
    all); the model ids by name. MLflow runs each model's code (and a ResponsesAgent's
    ``predict`` on its input example) while logging it."""
    script = (
        "import json, sys, mlflow\n"
        "models, requirements, experiment = json.loads(sys.argv[1])\n"
        "if experiment: mlflow.set_experiment(experiment)\n"
        "ids = {name: mlflow.pyfunc.log_model(name=name, python_model=code,\n"
        "                                     pip_requirements=requirements).model_id\n"
        "       for name, code in models.items()}\n"
        "print('MODEL_IDS', json.dumps(ids))\n"
    )
    argument = json.dumps(
        [{name: str(code) for name, code in models.items()}, list(pip_requirements), experiment]
    )
    logged = subprocess.run(
        [sys.executable, "-c", script, argument],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert logged.returncode == 0, logged.stderr[-4000:]
    line = next(line for line in logged.stdout.splitlines() if line.startswith("MODEL_IDS "))
    return dict(json.loads(line.split(" ", 1)[1]))


class ModelServer:
    """``[wrapper...] mlflow models serve -m models:/<model_id> --env-manager local`` on
    127.0.0.1, its output in ``cwd / log_name``."""

    def __init__(
        self,
        model_id: str,
        env: Mapping[str, str],
        cwd: Path,
        *,
        wrapper: Sequence[str] = (),
        port: int | None = None,
        log_name: str | None = None,
    ) -> None:
        self.model_id = model_id
        self.env = dict(env)
        self.cwd = cwd
        self.port = port if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
            *wrapper,
            "mlflow",
            "models",
            "serve",
            "-m",
            f"models:/{model_id}",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self.log_path = cwd / (log_name or f"serve-{self.port}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ModelServer:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command,
                env=self.env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        return self

    def wait_ready(self, timeout: float = 90) -> float:
        """Seconds until ``/ping`` answered 200; fails with the log if the server exits or
        does not answer in time."""
        assert self.proc is not None, "not started"
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{' '.join(self.command)} exited with "
                    f"{self.proc.returncode}\n{self.output()[-4000:]}"
                )
            try:
                if httpx.get(f"{self.url}/ping", timeout=1).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(
            f"{self.url} did not answer /ping within {timeout:.0f} s\n{self.output()[-4000:]}"
        )

    def signal_group(self, signum: int) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signum)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM to the process group, SIGKILL to whatever is left; the first process's
        exit status (None if it had to be killed). Idempotent."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        code = self.proc.poll()
        self.signal_group(signal.SIGKILL)  # uvicorn may outlive the CLI
        self.proc.wait()
        return code

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
