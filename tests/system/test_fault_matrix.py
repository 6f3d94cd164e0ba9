"""The fault matrix: the shipper against a real ``mlflow server`` through a fault-injecting proxy
(tests/support/fault_proxy.py), every fault at every moment of an app's life, the same
invariants checked in every cell.

Faults: connection refused, reset mid-request, a hung server, a slow drip, 500, 502, 503, 429
with ``Retry-After``, 401 and 403 (credentials fixed later), a truncated response, a server
restart, an unresolvable host. Moments, each a cell of one fault's run:

1. before the first contact: the fault is on when the app starts and makes its calls;
2. mid-burst: it comes on between two halves of a burst;
3. at exit: it is on when the app makes its last calls and exits;
4. adopting a dead process's spool: a second app starts while it is still on, takes over what
   the first left (and adds its own calls).

The fault is cleared once the shipper has met it (the proxy saw a request, or a fixed time for
faults with no request to see). Invariants, in every cell: each call returns its reply at once
(none raises or waits on the store); each exit is bounded; once the fault clears, every trace
of every call is stored exactly once, and nothing is left pending or counted as dropped.

Cells run concurrently (a few faults at a time) against one shared server, with short timeouts
(``TRACEWIRE_SHIP_TIMEOUT=2``, ``TRACEWIRE_EXIT_TIMEOUT=10``), so the matrix fits CI's budget;
its table is printed (``pytest -s``). A longer soak belongs in bench/.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.app_process import assert_exactly_once, child_env, stored_traces
from tests.support.fault_proxy import FaultProxy
from tests.support.mlflow_server import MlflowServer, free_port
from tests.support.processes import in_private_mounts, kill, processes_with_env
from tracewire.export import spool_directory as spools

SHIP_TIMEOUT = 5.0
EXIT_TIMEOUT = 10.0
# A call only hands its trace to a queue: one that waited on the store would take the ship
# timeout or more (a hung store: for ever). Below it, what is left is the machine's load (two
# dozen processes share 2 cores here). An exit waits at most the exit timeout, plus the
# interpreter's own shutdown and a loaded machine's slack.
SLOWEST_CALL_S = SHIP_TIMEOUT / 2
SLOWEST_EXIT_S = EXIT_TIMEOUT + 8.0
STORED_WITHIN_S = 90.0
HOSTNAME = "tracewire-matrix-store"

# The app: one command a line on stdin ("calls <tag> <n>", "exit"), one JSON line back a command.
APP = """
    import json, os, sys, time
    import openai, tracewire

    tracewire.autolog()
    client = openai.OpenAI(base_url=os.environ["TEST_OPENAI_BASE_URL"],
                           api_key=os.environ["TEST_API_KEY"], max_retries=0)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = line.split()
        if command[0] == "exit":
            break
        tag, calls = command[1], int(command[2])
        slowest, wrong = 0.0, 0
        for i in range(calls):
            text = f"{tag} {i}"
            started = time.perf_counter()
            reply = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": text}])
            slowest = max(slowest, time.perf_counter() - started)
            wrong += reply.choices[0].message.content != f"Echo: {text}"
        print(json.dumps({"slowest": slowest, "wrong": wrong}), flush=True)
"""


class App:
    """One app process, driven over its stdin."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        assert self._answer().get("ready"), self.describe()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr.extend(self.proc.stderr)

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the app died\n{self.describe()}"
        return json.loads(line)

    def calls(self, tag: str, n: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"calls {tag} {n}\n")
        self.proc.stdin.flush()
        return self._answer()

    def exit(self) -> float:
        """Seconds from the request to exit until the process is gone."""
        assert self.proc.stdin is not None
        started = time.monotonic()
        self.proc.stdin.write("exit\n")
        self.proc.stdin.close()
        self.proc.wait(60)
        return time.monotonic() - started

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def describe(self) -> str:
        return "".join(self.stderr)[-3000:]


@dataclass
class ModelServer:
    base_url: str


@dataclass
class Fault:
    """How to switch one fault on and off, and how to know the shipper met it."""

    name: str
    proxy_fault: dict[str, Any] | None = None  # FaultProxy.set_fault arguments
    special: str | None = None  # "restart" | "dns"


FAULTS = [
    Fault("connection refused", {"kind": "refuse"}),
    Fault("reset mid-request", {"kind": "reset"}),
    Fault("hung server", {"kind": "hang"}),
    Fault("slow drip", {"kind": "drip", "chunk": 16, "delay": 0.05}),
    Fault("500", {"kind": "status", "status": 500}),
    Fault("502", {"kind": "status", "status": 502}),
    Fault("503", {"kind": "status", "status": 503}),
    Fault("429 Retry-After", {"kind": "status", "status": 429, "retry_after": "1"}),
    Fault("401", {"kind": "status", "status": 401}),
    Fault("403", {"kind": "status", "status": 403}),
    Fault("truncated response", {"kind": "truncate", "after": 40}),
    Fault("server restart", special="restart"),
    Fault("unresolvable host", special="dns"),
]


@dataclass
class Cell:
    fault: str
    figures: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


class Harness:
    """One fault's run: its store (the shared server through a proxy, or a server of its own),
    its switch, its apps."""

    def __init__(
        self, fault: Fault, shared: MlflowServer, root: Path, model_server: ModelServer
    ) -> None:
        self.fault = fault
        self.root = root
        root.mkdir()
        self.experiment = f"matrix-{fault.name.replace(' ', '-')}"
        self.server = shared
        self.proxy: FaultProxy | None = None
        self.hosts = root / "hosts"
        if fault.special == "restart":
            self.server = MlflowServer(root / "server", port=free_port()).start()
            uri = self.server.url
        else:
            self.proxy = FaultProxy(shared.port)
            uri = self.proxy.url
        if fault.special == "dns":
            uri = f"http://{HOSTNAME}:{self.proxy.port}"  # type: ignore[union-attr]
            self.hosts.write_text(Path("/etc/hosts").read_text())
        self.env = child_env(
            tracking_uri=uri,
            experiment=self.experiment,
            spool_dir=root / "spool",
            openai_server=model_server,
            TRACEWIRE_SHIP_TIMEOUT=str(SHIP_TIMEOUT),
            TRACEWIRE_EXIT_TIMEOUT=str(EXIT_TIMEOUT),
        )
        (root / "app.py").write_text(textwrap.dedent(APP))
        self.apps: list[App] = []

    def app(self) -> App:
        command = [sys.executable, "app.py"]
        if self.fault.special == "dns":  # its own /etc/hosts, which the harness edits
            command = in_private_mounts(f'mount --bind "{self.hosts}" /etc/hosts', command)
        app = App(command, self.env, self.root)
        self.apps.append(app)
        return app

    def set(self) -> None:
        if self.fault.special == "restart":
            self.server.stop()
        elif self.fault.special == "dns":
            with open(self.hosts, "w") as hosts:  # in place: the bind mount sees the change
                hosts.write(Path("/etc/hosts").read_text())
        else:
            assert self.proxy is not None and self.fault.proxy_fault is not None
            self._seen = self.proxy.count()
            self.proxy.set_fault(**self.fault.proxy_fault)

    def met(self) -> None:
        """Wait until the shipper has met the fault."""
        if (
            self.proxy is None
            or self.fault.special == "dns"
            or self.fault.proxy_fault == {"kind": "refuse"}
        ):
            time.sleep(2.5)  # nothing reaches a proxy to count: the shipper tries within this
            return
        deadline = time.monotonic() + 30
        while self.proxy.count() <= self._seen and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)

    def clear(self) -> None:
        if self.fault.special == "restart":
            self.server.start()
        elif self.fault.special == "dns":
            with open(self.hosts, "a") as hosts:
                hosts.write(f"\n127.0.0.1 {HOSTNAME}\n")
        else:
            assert self.proxy is not None
            self.proxy.clear()

    def stored(self) -> list[Any]:
        return stored_traces(self.server.url, self.experiment)

    def count_stored(self) -> int:
        """Traces of the experiment with their spans, read from the server's sqlite file: a
        cheap poll (MLflow's client would load the harness's process, which serves the apps'
        model calls too)."""
        db = sqlite3.connect(f"{self.server.db_path.as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            return db.execute(
                "SELECT COUNT(DISTINCT s.trace_id) FROM spans s JOIN trace_info t ON "
                "s.trace_id = t.request_id JOIN experiments e ON e.experiment_id = "
                "t.experiment_id WHERE e.name = ?",
                (self.experiment,),
            ).fetchone()[0]
        finally:
            db.close()

    def wait_stored(self, count: int) -> float:
        started = time.monotonic()
        while self.count_stored() < count and time.monotonic() - started < STORED_WITHIN_S:
            time.sleep(0.25)
        return time.monotonic() - started

    def close(self) -> None:
        for app in self.apps:
            app.kill()
        if self.proxy is not None:
            self.proxy.close()
        if self.fault.special == "restart":
            self.server.stop()


def _check_calls(cell: Cell, moment: str, answer: dict[str, Any]) -> None:
    if answer["wrong"]:
        cell.failures.append(f"{moment}: {answer['wrong']} calls returned a wrong reply")
    if answer["slowest"] > SLOWEST_CALL_S:
        cell.failures.append(f"{moment}: a call took {answer['slowest']:.2f} s")


def run_fault(fault: Fault, shared: MlflowServer, root: Path, model_server: ModelServer) -> Cell:
    cell = Cell(fault.name)
    harness = Harness(fault, shared, root, model_server)
    expected: list[str] = []
    try:

        def burst(app: App, tag: str, n: int, moment: str) -> None:
            _check_calls(cell, moment, app.calls(tag, n))
            expected.extend(f"{tag} {i}" for i in range(n))

        def settle(moment: str) -> None:
            cell.figures[f"{moment} stored s"] = harness.wait_stored(len(expected))

        # 1. before the first contact
        harness.set()
        first = harness.app()
        burst(first, "first", 10, "before first contact")
        harness.met()
        harness.clear()
        settle("first contact")
        # 2. mid-burst
        burst(first, "mid-a", 10, "mid-burst")
        harness.set()
        burst(first, "mid-b", 10, "mid-burst")
        harness.met()
        harness.clear()
        settle("mid-burst")
        # 3. at exit
        harness.set()
        burst(first, "exit", 10, "at exit")
        cell.figures["exit s"] = first.exit()
        if cell.figures["exit s"] > SLOWEST_EXIT_S:
            cell.failures.append(f"at exit: the app took {cell.figures['exit s']:.1f} s to exit")
        # 4. adopting the dead process's spool, the fault still on
        second = harness.app()
        burst(second, "adopt", 5, "adopting")
        harness.met()
        harness.clear()
        settle("adopting")
        cell.figures["second exit s"] = second.exit()
        if cell.figures["second exit s"] > SLOWEST_EXIT_S:
            cell.failures.append(
                f"adopting: the second app took {cell.figures['second exit s']:.1f} s to exit"
            )
        try:
            assert_exactly_once(harness.stored(), expected)
        except AssertionError as error:
            cell.failures.append(str(error).splitlines()[0])
        left = spools.status(root / "spool")
        if any(s.pending or s.dropped or s.rejected or s.stamps for s in left):
            cell.failures.append(f"left in the spool: {left}")
    except Exception as error:  # a harness failure is the cell's failure, with the app's log
        cell.failures.append(f"{type(error).__name__}: {error}")
    finally:
        if cell.failures:
            cell.failures.append("app logs: " + " | ".join(a.describe() for a in harness.apps))
        harness.close()
    return cell


@pytest.fixture(scope="module")
def model_server() -> Iterator[ModelServer]:
    """The local OpenAI-compatible server in a process of its own: in this one it would share
    the GIL with the harness's threads, and the apps' calls would wait on them."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tracewire.testing.openai_server"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    try:
        yield ModelServer(proc.stdout.readline().strip())
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with MlflowServer(tmp_path_factory.mktemp("matrix-server"), hosts=(HOSTNAME,)) as server:
        yield server


@pytest.mark.timeout(600)
def test_fault_matrix(
    shared_server: MlflowServer, model_server: ModelServer, tmp_path: Path
) -> None:
    assert shutil.which("unshare") is not None and os.geteuid() == 0, (
        "the unresolvable-host cells edit a private /etc/hosts: they need unshare and root"
    )
    started = time.monotonic()
    with ThreadPoolExecutor(len(FAULTS)) as pool:  # mostly waiting: all at once
        cells = list(
            pool.map(
                lambda fault: run_fault(
                    fault, shared_server, tmp_path / fault.name.replace(" ", "-"), model_server
                ),
                FAULTS,
            )
        )
    print(f"\nfault matrix: {len(cells)} faults x 4 moments in {time.monotonic() - started:.0f} s")
    for cell in cells:
        figures = ", ".join(f"{k} {v:.1f}" for k, v in cell.figures.items())
        print(f"  {cell.fault:<20} {'ok' if not cell.failures else 'FAILED'}: {figures}")
    failed = {cell.fault: cell.failures for cell in cells if cell.failures}
    assert not failed, json.dumps(failed, indent=1)[:20_000]


def test_a_429s_retry_after_is_waited_for(
    shared_server: MlflowServer, model_server: ModelServer, tmp_path: Path
) -> None:
    """A throttled store says when to come back: the shipper's next try waits at least that
    long, whatever its own backoff would have chosen (a first failure: at most 1 s)."""
    with FaultProxy(shared_server.port) as proxy:
        env = child_env(
            tracking_uri=proxy.url,
            experiment="retry-after",
            spool_dir=tmp_path / "spool",
            openai_server=model_server,
            TRACEWIRE_SHIP_TIMEOUT=str(SHIP_TIMEOUT),
        )
        (tmp_path / "app.py").write_text(textwrap.dedent(APP))
        app = App([sys.executable, "app.py"], env, tmp_path)
        try:
            assert app.calls("warm", 1)["wrong"] == 0  # the store is open, the shipper idle
            deadline = time.monotonic() + 30
            while len(stored_traces(shared_server.url, "retry-after")) < 1:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            spans = "/v1/traces"
            before = proxy.count(spans)
            proxy.set_fault("status", status=429, retry_after="3", path_prefix=spans, times=1)
            app.calls("throttled", 1)
            seen: list[float] = []
            deadline = time.monotonic() + 30
            while len(seen) < 2 and time.monotonic() < deadline:
                if proxy.count(spans) > before + len(seen):
                    seen.append(time.monotonic())
                time.sleep(0.01)
            assert len(seen) == 2, "the shipper did not try again"
            print(f"\n429 with Retry-After: 3: next try after {seen[1] - seen[0]:.2f} s")
            assert seen[1] - seen[0] >= 2.9
            deadline = time.monotonic() + 30
            while len(stored_traces(shared_server.url, "retry-after")) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            app.exit()
        finally:
            app.kill()


def test_kill_9_at_random_moments_loses_only_what_was_still_in_memory(
    tmp_path: Path, model_server: ModelServer
) -> None:
    """An app and its shipper killed together (a container's OOM kill) at random moments of a
    burst into a healthy store: what was stored stays stored, what was spooled is stored by the
    next process, nothing twice, nothing left on disk."""
    import random

    from tests.support.app_process import CHILD_SCRIPT, run_child

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spool_dir = tmp_path / "spool"
    env = child_env(
        tracking_uri=uri,
        experiment="kill-9",
        spool_dir=spool_dir,
        openai_server=model_server,
        TEST_CRASH_MARKER=str(tmp_path / "never"),
    )
    (tmp_path / "child.py").write_text(textwrap.dedent(CHILD_SCRIPT))
    must_be_stored: set[str] = set()
    for round_ in range(3):
        delay = rng.uniform(0.5, 4.0)  # importing, starting, calling or shipping
        app = subprocess.Popen(
            [sys.executable, "child.py"],
            cwd=tmp_path,
            env={
                **env,
                "TEST_TAG": f"round{round_}",
                "TEST_CALLS": "400",
                "TEST_END": "wait-marker",
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(delay)
        kill(processes_with_env("TRACEWIRE_SPOOL_DIR", str(spool_dir)))
        app.wait(30)
        must_be_stored |= {t.info.trace_id for t in stored_traces(uri, "kill-9")}
        for db in spool_dir.glob("spool-*.db"):
            with sqlite3.connect(db) as spooled:
                must_be_stored |= {row[0] for row in spooled.execute("SELECT trace_id FROM traces")}
        print(
            f"\nkill -9 at {delay:.2f} s (seed {seed}): {len(must_be_stored)} traces stored or "
            "spooled so far"
        )
    drained = run_child(
        tmp_path, {**env, "TEST_TAG": "after", "TEST_CALLS": "1", "TEST_END": "drain"}, timeout=180
    )
    assert drained.returncode == 0, drained.describe()
    stored = stored_traces(uri, "kill-9")
    ids = [t.info.trace_id for t in stored]
    assert len(ids) == len(set(ids)), "a trace was stored twice"
    assert must_be_stored <= set(ids), f"{len(must_be_stored - set(ids))} spooled traces lost"
    assert not [s for s in spools.status(spool_dir) if s.pending], spools.status(spool_dir)
