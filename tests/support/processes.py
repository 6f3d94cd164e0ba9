"""Processes the suites start as a user would: an environment without the suite's own settings,
a command run to its end, a command in a private mount namespace, and an app served by workers
under ``tracewire run``, stopped as a process manager stops it; and the processes a test must
find by their environment (an app's shippers), to kill them. bench/export_throughput.py uses
these too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx
import pytest

TRACEWIRE_RUN = (sys.executable, "-m", "tracewire.cli", "run", "--")
_BIN = str(Path(sys.executable).parent)  # `mlflow`, and the `uvicorn` it runs


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the suite's MLflow, tracewire, pytest and OpenAI
    settings (a child gets exactly the ones a test gives it), the interpreter's ``bin`` first on
    ``PATH``, and ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "TRACEWIRE_", "PYTEST_", "OPENAI_"))
    }
    env["PATH"] = os.pathsep.join(filter(None, [_BIN, env.get("PATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_command(
    command: Sequence[str],
    env: Mapping[str, str],
    cwd: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """``command`` run to its end, its output captured as text; ``timeout`` is a hang guard."""
    return subprocess.run(
        list(command),
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def in_private_mounts(mounts: str, command: Sequence[str]) -> list[str]:
    """``command`` in a mount namespace of its own (needs root), after the shell commands
    ``mounts``: what they mount, no other process sees."""
    return [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        f'{mounts} && exec "$@"',
        "sh",
        *command,
    ]


def uvicorn_workers(app: str, port: int) -> list[str]:
    """The arguments after ``python`` that serve ``app`` with two uvicorn workers on ``port``."""
    return ["-m", "uvicorn", app, "--workers", "2", "--port", str(port), "--log-level", "warning"]


def start_under_tracewire_run(
    arguments: Sequence[str], cwd: Path, env: Mapping[str, str]
) -> subprocess.Popen[bytes]:
    """``tracewire run -- python <arguments>`` in a session of its own (the server, its workers
    and their shippers are one process group), its output on one pipe."""
    return subprocess.Popen(
        [*TRACEWIRE_RUN, sys.executable, *arguments],
        env=dict(env),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_answering(url: str, timeout: float = 60) -> None:
    """Until the app at ``url`` answers HTTP (its ``/docs`` page)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(f"{url}/docs", timeout=1)
            return
        except httpx.HTTPError:
            assert time.monotonic() < deadline, f"the app did not answer within {timeout:.0f} s"
            time.sleep(0.2)


def stop_group(proc: subprocess.Popen[bytes]) -> str:
    """SIGTERM to the process group ``proc`` leads, as a process manager stops an app; its
    output. Fails the test if the group has not stopped 30 s later."""
    if proc.returncode is not None:
        return ""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.communicate(timeout=30)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0].decode(errors="replace")
        pytest.fail(f"the app did not stop within 30 s of SIGTERM\n{output}")


def processes_with_env(key: str, value: str) -> list[int]:
    """The pids of this user's other processes whose environment has ``key=value`` exactly (an
    app's shippers, which run in a session of their own, inherit its TRACEWIRE_SPOOL_DIR)."""
    wanted = f"{key}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if wanted in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill(pids: Sequence[int]) -> None:
    """SIGKILL to each of ``pids`` that is still there."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
