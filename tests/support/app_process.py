"""A traced app in a child process, and what the whole-system suites read back: the child's
script (real OpenAI client over HTTP to the local server, tracewire into a real store), its
environment, the traces it stored (exactly once) and the spool it left."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import openai
import pytest
from mlflow import MlflowClient

from tests.conftest import API_KEY
from tests.support.processes import clean_env
from tracewire.export import spool_directory as spools
from tracewire.testing import OpenAIServer

MODEL = "gpt-4o-mini"
# Hang guards. A call only hands its trace to a queue: anything near this means it waited on the
# store. A process that made its calls must be gone within the flush bound (2 s by default) plus
# interpreter shutdown: 10 s is a hang, not a slow machine.
SLOWEST_CALL_S = 2.0
EXIT_AFTER_LAST_CALL_S = 10.0
# The shipper backs off for up to 30 s (full jitter) between retries while the store is down, so
# after an outage the first retry can come 30 s late; then the backlog is shipped.
FLUSH_AFTER_OUTAGE_S = 75.0


# --------------------------------------------------------------------------- helpers


def echo(text: str) -> str:
    return f"Echo: {text}"


def user_text(trace: mlflow.entities.Trace) -> str:
    """The user message of the (one) chat call a trace records."""
    return trace.data.spans[0].inputs["messages"][-1]["content"]


def stored_traces(tracking_uri: str, experiment_name: str) -> list[mlflow.entities.Trace]:
    """Every trace of the experiment, spans included, every page read."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    found: list[mlflow.entities.Trace] = []
    token = None
    while True:
        page = client.search_traces(
            locations=[experiment.experiment_id],
            max_results=500,
            include_spans=True,
            page_token=token,
        )
        found.extend(page)
        token = page.token
        if not token:
            return found


def assert_exactly_once(traces: Sequence[mlflow.entities.Trace], expected: Sequence[str]) -> None:
    """One trace per call, each with its one span: no trace lost, none stored twice."""
    ids = Counter(t.info.trace_id for t in traces)
    duplicates = {i: n for i, n in ids.items() if n > 1}
    assert not duplicates, f"trace ids stored more than once: {duplicates}"
    span_counts = Counter(len(t.data.spans) for t in traces)
    assert set(span_counts) == {1}, f"spans per trace (count -> traces): {dict(span_counts)}"
    seen = Counter(user_text(t) for t in traces)
    want = Counter(expected)
    missing = sorted(want - seen)
    extra = sorted(seen - want)
    assert not missing and not extra, (
        f"{len(traces)} traces stored for {len(expected)} calls; "
        f"{len(missing)} calls have no trace (first: {missing[:5]}), "
        f"{len(extra)} traces are extra or repeated (first: {extra[:5]})"
    )


def spool_summary(directory: Path) -> dict[str, Any]:
    found = spools.status(directory)
    return {
        "spools": len(found),
        "pending": sum(s.pending for s in found),
        "dropped": sum(s.dropped for s in found),
        "bytes": sum(s.bytes for s in found),
        "live": [s.live for s in found],
    }


def wait_for(predicate, timeout: float, interval: float = 0.1) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def child_processes() -> set[int]:
    """Pids of this process's live (non-zombie) children."""
    me = os.getpid()
    children = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == me and fields[0] != "Z":
            children.add(int(entry.name))
    return children


class HungStore:
    """A TCP listener on 127.0.0.1 that accepts every connection and never answers."""

    def __init__(self, port: int = 0) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(128)
        self._sock.settimeout(0.1)
        self.port = int(self._sock.getsockname()[1])
        self.accepted = 0
        self._connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="hung-store", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:  # includes the accept timeout
                continue
            self.accepted += 1
            self._connections.append(conn)  # read nothing, answer nothing, keep it open

    def close(self) -> None:
        """Free the port (for a real server to take over the same URL)."""
        self._stop.set()
        self._thread.join(5)
        for conn in self._connections:
            # Reset instead of a FIN: no TIME_WAIT left on the port.
            conn.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            conn.close()
        self._sock.close()

    def __enter__(self) -> HungStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- subprocesses

# A fresh interpreter that traces TEST_CALLS chat calls (user text "<TEST_TAG> <i>"), then ends as
# TEST_END says, printing one JSON line on stdout:
#   exit          return normally (tracewire's atexit flush runs, bounded);
#   flush-kill    tracewire.flush(TEST_FLUSH_S), report it and the spool, then SIGKILL itself;
#   drain         wait until the spools other processes left in the directory are shipped and
#                 removed (this process ships them: same destination), flush, return normally;
#   wait-marker   wait until the file TEST_CRASH_MARKER exists (see CRASH_HOOK), then return.
# With TEST_REQUEST_IDS set, call i runs under the request id "<TEST_TAG>-<i>".
CHILD_SCRIPT = """
    import json, os, signal, sys, time
    from pathlib import Path

    import openai
    import tracewire
    from tracewire.export import spool_directory as spool

    spool_dir = Path(os.environ["TRACEWIRE_SPOOL_DIR"])
    tag, calls, end = os.environ["TEST_TAG"], int(os.environ["TEST_CALLS"]), os.environ["TEST_END"]

    tracewire.autolog()
    client = openai.OpenAI(base_url=os.environ["TEST_OPENAI_BASE_URL"],
                           api_key=os.environ["TEST_API_KEY"], max_retries=0)
    durations, wrong = [], []
    for i in range(calls):
        text = f"{tag} {i}"
        started = time.perf_counter()
        with tracewire.context(request_id=f"{tag}-{i}" if os.environ.get("TEST_REQUEST_IDS")
                               else None):  # a web request's trace: its id is stamped on
            reply = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": text}])
        durations.append(time.perf_counter() - started)
        if reply.choices[0].message.content != f"Echo: {text}":
            wrong.append(reply.choices[0].message.content)
    out = {"durations": durations, "wrong": wrong}

    def spool_state():
        found = spool.status(spool_dir)
        return {"spools": len(found), "pending": sum(s.pending for s in found),
                "dropped": sum(s.dropped for s in found)}

    if end == "flush-kill":
        out["flushed"] = tracewire.flush(float(os.environ["TEST_FLUSH_S"]))
        out["spool"] = spool_state()
        print(json.dumps(out), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    elif end == "drain":
        # A spool left by another process is removed once shipped: wait until only ours is
        # left (file names only: reading spools while they are removed is another test), then
        # flush ours.
        deadline = time.monotonic() + float(os.environ.get("TEST_DRAIN_S", "90"))
        while len(list(spool_dir.glob("spool-*.db"))) > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        out["flushed"] = tracewire.flush(30)
        out["spool"] = spool_state()
    elif end == "wait-marker":
        marker = Path(os.environ["TEST_CRASH_MARKER"])
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        out["marker"] = marker.exists()
    out["end_wall"] = time.time()
    print(json.dumps(out), flush=True)
"""

# Installed as sitecustomize.py on the PYTHONPATH of a child (and so of any process it starts,
# whichever process ships): the first acknowledgement of a shipped batch records the batch's
# trace ids in TEST_CRASH_MARKER and kills the process instead, so the batch is in the store but
# still in the spool. Only once, across all processes (the marker file is the latch).
CRASH_HOOK = """
    import json, os

    _marker = os.environ.get("TEST_CRASH_MARKER")
    if _marker:
        from tracewire.export import spool as _spool

        _ack = _spool.Spool.ack

        def _crash_before_ack(self, entries, *rest):
            if entries:
                try:
                    fd = os.open(_marker + ".tmp", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    return _ack(self, entries, *rest)
                os.write(fd, json.dumps([e.trace_id for e in entries]).encode())
                os.fsync(fd)
                os.close(fd)
                os.rename(_marker + ".tmp", _marker)
                os.kill(os.getpid(), 9)
            return _ack(self, entries, *rest)

        _spool.Spool.ack = _crash_before_ack
"""


@dataclass
class ChildRun:
    returncode: int
    stdout: str
    stderr: str
    wall: float  # seconds from start to exit, as seen from here
    exited_at: float  # time.time() when it was seen gone
    out: dict[str, Any]  # its JSON line ({} if none)

    def describe(self) -> str:
        return (
            f"exit code {self.returncode} after {self.wall:.1f} s\n--- stdout ---\n"
            f"{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-8000:]}"
        )


def child_env(
    *,
    tracking_uri: str,
    experiment: str,
    spool_dir: Path,
    openai_server: OpenAIServer,
    **extra: str,
) -> dict[str, str]:
    return clean_env(
        **{
            "TRACEWIRE_TESTING": "1",
            "MLFLOW_MODEL_CATALOG_URI": "",
            "MLFLOW_TRACKING_URI": tracking_uri,
            "MLFLOW_EXPERIMENT_NAME": experiment,
            "TRACEWIRE_SPOOL_DIR": str(spool_dir),
            "TEST_OPENAI_BASE_URL": openai_server.base_url,
            "TEST_API_KEY": API_KEY,
            **extra,
        }
    )


def run_child(tmp_path: Path, env: Mapping[str, str], timeout: float = 120) -> ChildRun:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD_SCRIPT))
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(
            f"the child process was still running after {timeout:.0f} s (hang)\n"
            f"--- stdout ---\n{error.stdout}\n--- stderr ---\n{error.stderr}"
        )
    wall = time.monotonic() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return ChildRun(
        proc.returncode,
        proc.stdout,
        proc.stderr,
        wall,
        time.time(),
        json.loads(lines[-1]) if lines else {},
    )


def assert_calls_fine(run: ChildRun, calls: int) -> None:
    assert run.out, run.describe()
    assert run.out["wrong"] == [], run.describe()
    assert len(run.out["durations"]) == calls, run.describe()
    slowest = max(run.out["durations"], default=0.0)
    assert slowest < SLOWEST_CALL_S, f"a traced call took {slowest:.2f} s\n{run.describe()}"


def mock_client() -> openai.OpenAI:
    """The real OpenAI client over an in-process transport that echoes the user's message."""
    import httpx2

    def handler(request: httpx2.Request) -> httpx2.Response:
        text = json.loads(request.content)["messages"][-1]["content"]
        body = {
            "id": "chatcmpl-burst",
            "object": "chat.completion",
            "created": 1_735_689_600,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "logprobs": None,
                    "message": {"role": "assistant", "content": echo(text), "refusal": None},
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        }
        return httpx2.Response(200, json=body, headers={"x-request-id": "req_burst"})

    return openai.OpenAI(
        api_key=API_KEY,
        base_url="https://api.openai.com/v1",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )
