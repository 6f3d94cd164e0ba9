"""Export throughput and failure behaviour: tracewire vs MLflow's own async trace logging.

What it measures, in one process run (plus short-lived child processes for the exit cases):

  1. Burst   -- ``--calls`` back-to-back traced ``chat.completions.create`` calls into (a) a fresh
                local sqlite store and (b) a loopback ``mlflow server`` (sqlite backend), with
                ``tracewire.autolog()`` and with ``mlflow.openai.autolog()`` (MLflow's default
                async exporter, back after ``tracewire.disable()``). Reported: how many of the
                calls' traces were persisted once flushed, the time to drain (from the last call
                returning until ``tracewire.flush`` / ``mlflow.flush_trace_async_logging``
                returns; the store is then read back through MLflow's API), the backlog left at
                the end of the burst (counted in the store's sqlite file) and traces/s.
                Into the server also "tracewire web": tracewire with every call inside
                ``tracewire.context(request_id=...)``, as in a web request. Its traces go as
                spans only like the others (many per request), their client request id
                stamped on afterwards by one ``start_trace`` each (export/store.py): its drain
                ratio is taken on "visible" (every trace searchable with its spans, tags,
                session and request-id tag), and "complete" (flush returned: stamped) is
                printed beside it. "visible" is counted in the store's sqlite file while the
                flush runs, for every mode.
  2. Hot path -- the added median/p99 latency per call of those bursts vs an untraced baseline
                measured in the same process (before and after, pooled).
  3. Outage  -- tracewire into the server: per-call latency of ``--outage-calls`` calls with the
                server up, then the same calls with the server stopped; then the server is started
                again and the time until every outage trace is in the store is measured.
  4. Exit    -- a child process makes ``--exit-calls`` traced calls against (a) a healthy
                sqlite store, (b) a port nothing listens on and (c) a listener that accepts and
                never answers, then returns from main; its exit time after the last call is
                measured, and the store (a) or tracewire's spool (b, c: ``spool.status``) is
                read to check every trace was kept. MLflow's own exporter is run the same way,
                killed after ``--kill-after`` seconds, and the same child without tracing gives
                the interpreter's own exit time.
  5. First trace -- a child starts, waits 3 s (an app that has started), makes one traced call
                and keeps running: the time from that call's return until its trace is in the
                store (sqlite, and the server), for tracewire and MLflow.

MLflow reads ``MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE`` when its exporter is created
(``AsyncTraceExportQueue.__init__``, from ``MlflowV3SpanExporter.__init__``, which runs on the
first span after the tracer provider is reset by ``mlflow.set_tracking_uri`` or
``tracewire.disable()``). Each trace takes about 1.2 tasks in that queue (one ``log_trace`` per
trace, one ``log_spans`` per batch of at most 5 spans), so it is raised here, before any exporter
exists, to twice the calls of a run, and the size actually in use is read back and printed.

The calls go through ``httpx2.MockTransport`` exactly as in bench/openai_overhead.py (whose
helpers are imported). Every store and spool lives in one temporary directory, removed at exit
after tracewire has stopped its shipper processes; every server, listener and child process is
stopped even on failure. Other work on the machine moves the absolute numbers: the load average
is printed with them.

Run:  python bench/export_throughput.py [--calls 2000] [--skip-server] [--json]
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import queue
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(_BENCH))  # the sibling benchmark, also under `python -m` or another cwd
sys.path.insert(1, str(_BENCH.parent))  # the repo root: tests/support

import mlflow
import openai
from mlflow.tracking import MlflowClient
from openai_overhead import (
    TARGET_P99_RATIO,
    Store,
    fmt_ratio,
    fresh_store,
    make_client,
    median,
    p99,
    persisted_since,
    quiet_logs,
    sample_trace,
    timed_calls,
    tracewire,
    tracewire_version,
    use_store,
)

from tests.support.processes import kill, processes_with_env
from tracewire.export import spool_directory as spools

# The targets.
TARGET_DRAIN_SPEEDUP = 5.0  # tracewire drains the burst at least 5x faster than MLflow
TARGET_WEB_SPEEDUP = 4.0  # ... and web-request traces (a request id each) at least 4x
TARGET_OUTAGE_DELTA_US = 1000  # median caller latency during an outage at most 1 ms over normal
EXIT_GRACE_S = 2.0  # exit with a dead/hung store within 2 s + the flush bound

QUEUE_ENV = "MLFLOW_ASYNC_TRACE_LOGGING_MAX_QUEUE_SIZE"


# --------------------------------------------------------------------------- small helpers


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def db_path(uri: str) -> Path:
    return Path(uri.removeprefix("sqlite:///"))


def count_in_db(path: Path, experiment_id: str, since_ms: int) -> tuple[int, int]:
    """(traces, traces with at least one span row) of the experiment since ``since_ms``, read
    straight from the store's sqlite file (cheap: used mid-run, where MLflow's API adds load)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        traces, with_spans = db.execute(
            "SELECT COUNT(*), COUNT(DISTINCT s.trace_id) FROM trace_info t "
            "LEFT JOIN spans s ON s.trace_id = t.request_id "
            "WHERE t.experiment_id = ? AND t.timestamp_ms >= ?",
            (int(experiment_id), since_ms),
        ).fetchone()
    finally:
        db.close()
    return traces, with_spans


def mlflow_queue_size() -> int | None:
    """The maxsize of the async queue of MLflow's current exporter (private API, reporting only)."""
    try:
        from mlflow.tracing.provider import _get_trace_exporter

        return _get_trace_exporter()._async_queue._queue.maxsize
    except (ImportError, AttributeError):
        return None


class HungListener:
    """A TCP listener on loopback that accepts connections and never answers them."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._held: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="hung-listener", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._held.append(conn)  # read nothing, answer nothing

    def close(self) -> None:
        self._closed = True
        for conn in [self._sock, *self._held]:
            try:
                conn.close()
            except OSError:
                pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- 1 + 2: bursts


@dataclass
class Burst:
    store: str  # "sqlite" | "server"
    mode: str  # "tracewire" | "tracewire web" | "mlflow"
    calls: int
    samples: list[float] = field(repr=False)
    burst_s: float  # first call started -> last call returned
    at_burst_end: int  # of the calls' traces, already in the store then
    drain_s: float  # last call returned -> flush returned
    visible_s: float | None  # last call returned -> every trace in the store, with spans
    flush_ok: bool | None
    persisted: int  # read back through MLflow's API
    with_spans: int  # ... of which have span rows in the database
    store_total: int
    sample: dict[str, Any]
    queue_size: int | None = None  # MLflow's async queue, as read from its exporter
    loadavg_1m: float | None = None  # when the drain ended

    @property
    def backlog(self) -> int:
        return self.persisted - self.at_burst_end

    @property
    def drain_rate(self) -> float | None:
        return self.backlog / self.drain_s if self.drain_s > 0 else None

    @property
    def sustained_rate(self) -> float:
        return self.persisted / (self.burst_s + self.drain_s)


def timed_web_calls(client: openai.OpenAI, n: int) -> list[float]:
    """timed_calls, each call with a request id of its own, as the middleware gives it."""
    samples: list[float] = []
    for i in range(n):
        with tracewire.context(request_id=f"bench-{time.time_ns()}-{i}"):
            samples += timed_calls(client, 1)
    return samples


def run_burst(
    store_kind: str,
    mode: str,
    client: openai.OpenAI,
    store: Store,
    read: Store,
    calls: int,
    warmup: int,
    enable: Callable[[], None],
    flush: Callable[[], bool | None],
    disable: Callable[[], None],
    timed: Callable[[openai.OpenAI, int], list[float]] = timed_calls,
) -> Burst:
    """As openai_overhead.run_traced, plus the store's count at the end of the burst. Traces go
    to ``store`` and are read back from ``read``, the same store opened locally (for a server,
    its sqlite backend: MLflow's REST API caps search pages below what persisted_since asks)."""
    db = db_path(read.uri)
    use_store(store)
    enable()
    try:  # never leave a writer running into a store that is about to be deleted
        timed(client, warmup)
        flush()
        time.sleep(0.01)  # warm-up traces start strictly before `since_ms`
        since_ms = time.time_ns() // 1_000_000
        start = time.perf_counter()
        samples = timed(client, calls)
        ended = time.perf_counter()
        at_end, _ = count_in_db(db, store.experiment_id, since_ms)
        drain_start = time.perf_counter()
        flushing = FlushThread(flush)
        visible_s = None
        while visible_s is None:
            done = not flushing.is_alive()
            if count_in_db(db, store.experiment_id, since_ms)[1] >= calls:
                visible_s = time.perf_counter() - drain_start
            elif done:
                break  # flushed, and not all there: counted below
            time.sleep(0.02)
        flushing.join()
        flushed, drain_s = flushing.result, flushing.seconds
        queue_size = mlflow_queue_size() if mode == "mlflow" else None
        load = loadavg()[0]
    finally:
        disable()
    persisted, total = persisted_since(read, since_ms)
    _, with_spans = count_in_db(db, read.experiment_id, since_ms)
    return Burst(
        store_kind,
        mode,
        calls,
        samples,
        ended - start,
        at_end,
        drain_s,
        visible_s,
        None if flushed is None else bool(flushed),
        persisted,
        with_spans,
        total,
        sample_trace(read, since_ms),
        queue_size,
        load,
    )


class FlushThread(threading.Thread):
    """The flush, timed, while the caller watches the store fill."""

    def __init__(self, flush: Callable[[], bool | None]) -> None:
        super().__init__(name="bench-flush", daemon=True)
        self._flush = flush
        self.result: bool | None = None
        self.seconds = 0.0
        self.start()

    def run(self) -> None:
        started = time.perf_counter()
        self.result = self._flush()
        self.seconds = time.perf_counter() - started


def burst_pair(
    store_kind: str,
    client: openai.OpenAI,
    stores: Callable[[str], tuple[Store, Store]],
    args: argparse.Namespace,
) -> list[Burst]:
    """tracewire (into a server also "tracewire web"), then MLflow, each into a store of its
    own; ``stores(name)`` gives (where to send, where to read back)."""

    def traced(mode: str, timed: Callable[[openai.OpenAI, int], list[float]]) -> Burst:
        return run_burst(
            store_kind,
            mode,
            client,
            *stores(mode.replace(" ", "-")),
            args.calls,
            args.warmup,
            enable=tracewire.autolog,
            flush=lambda: tracewire.flush(args.flush_timeout),
            disable=tracewire.disable,
            timed=timed,
        )

    return [
        traced("tracewire", timed_calls),
        *([traced("tracewire web", timed_web_calls)] if store_kind == "server" else []),
        run_burst(
            store_kind,
            "mlflow",
            client,
            *stores("mlflow"),
            args.calls,
            args.warmup,
            enable=lambda: mlflow.openai.autolog(silent=True),
            flush=mlflow.flush_trace_async_logging,
            disable=lambda: mlflow.openai.autolog(disable=True, silent=True),
        ),
    ]


def server_store(server: Any, name: str) -> tuple[Store, Store]:
    """A new experiment on the server: (its REST URI, its sqlite backend opened locally)."""
    experiment_id = MlflowClient(server.url).create_experiment(f"bench-{name}")
    return Store(server.url, experiment_id), Store(server.backend_store_uri, experiment_id)


# --------------------------------------------------------------------------- 3: outage


def run_outage(
    client: openai.OpenAI, server: Any, calls: int, warmup: int, flush_timeout: float
) -> dict[str, Any]:
    store, read = server_store(server, "outage")
    use_store(store)
    tracewire.autolog()
    try:
        timed_calls(client, warmup)
        tracewire.flush(flush_timeout)
        time.sleep(0.01)
        since_ms = time.time_ns() // 1_000_000
        normal = timed_calls(client, calls)
        tracewire.flush(flush_timeout)  # the outage traces are counted on their own below
        time.sleep(0.01)
        outage_ms = time.time_ns() // 1_000_000
        down = time.perf_counter()
        server.stop()
        down_calls = timed_calls(client, calls)
        restart = time.perf_counter()
        server.start()
        up = time.perf_counter()
        flushed = tracewire.flush(flush_timeout)
        arrived_s = time.perf_counter() - up
    finally:
        tracewire.disable()
    outage_persisted, _ = persisted_since(read, outage_ms)
    all_persisted, _ = persisted_since(read, since_ms)
    _, with_spans = count_in_db(server.db_path, read.experiment_id, outage_ms)
    return {
        "calls": calls,
        "normal": {"median_us": median(normal), "p99_us": p99(normal)},
        "outage": {
            "median_us": median(down_calls),
            "p99_us": p99(down_calls),
            "max_us": max(down_calls),
        },
        "median_delta_us": median(down_calls) - median(normal),
        "server_down_s": up - down,
        "server_restart_s": up - restart,
        "arrived_after_restart_s": arrived_s,
        "flush_ok": bool(flushed),
        "outage_persisted": outage_persisted,
        "outage_with_spans": with_spans,
        "all_persisted": all_persisted,
        "all_expected": 2 * calls,
    }


# --------------------------------------------------------------------------- 4: exit


def child_main(args: argparse.Namespace) -> None:
    """In the child: trace ``--exit-calls`` calls, report, and return (the interpreter exits);
    with ``--first-trace``, start, wait 3 s, make one call, report and keep running."""
    quiet_logs()
    client = make_client()
    if args.child == "tracewire":
        tracewire.autolog()
    elif args.child == "mlflow":
        mlflow.openai.autolog(silent=True)
    # "untraced": no tracing at all, for the interpreter's own exit time
    if args.first_trace:
        time.sleep(3.0)  # an app that has started; then its first request
    samples = timed_calls(client, 1 if args.first_trace else args.exit_calls)
    print(
        json.dumps(
            {"done": time.monotonic(), "median_us": median(samples), "max_us": max(samples)}
        ),
        flush=True,
    )
    if args.first_trace:
        time.sleep(60)  # still serving, until the parent has seen the trace and kills it


def run_first_trace(
    mode: str, store_kind: str, store: Store, db: Path, root: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Seconds from the first call's return until its trace is in the store (with spans)."""
    work = root / f"first-{mode}-{store_kind}"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        {
            "MLFLOW_TRACKING_URI": store.uri,
            "MLFLOW_EXPERIMENT_ID": store.experiment_id,
            "TRACEWIRE_SPOOL_DIR": str(work / "spool"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    since_ms = time.time_ns() // 1_000_000
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--first-trace"],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    result: dict[str, Any] = {"mode": mode, "store": store_kind, "seconds": None}
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith(b"{"):
            return result
        done = json.loads(line)["done"]
        deadline = done + 60
        while time.monotonic() < deadline:
            if count_in_db(db, store.experiment_id, since_ms)[1] >= 1:
                result["seconds"] = time.monotonic() - done  # CLOCK_MONOTONIC: system-wide
                break
            time.sleep(0.01)
    finally:
        kill_group(proc)
        proc.stdout.close()  # type: ignore[union-attr]
        kill(processes_with_env("TRACEWIRE_SPOOL_DIR", str(work / "spool")))
    return result


def _lines(stream: Any, out: queue.Queue[str | None]) -> None:
    for line in iter(stream.readline, b""):
        out.put(line.decode(errors="replace"))
    out.put(None)


def run_exit_case(
    mode: str, store_kind: str, uri: str, root: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """A child makes the calls and returns from main; how long until it has exited?"""
    work = root / f"exit-{mode}-{store_kind.replace(' ', '-')}"
    spool_dir = work / "spool"
    work.mkdir()
    since_ms = time.time_ns() // 1_000_000
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # MLflow defaults
    env.update(
        {"MLFLOW_TRACKING_URI": uri, "TRACEWIRE_SPOOL_DIR": str(spool_dir), "PYTHONUNBUFFERED": "1"}
    )
    result: dict[str, Any] = {"mode": mode, "store": store_kind, "calls": args.exit_calls}
    log_path = work / "child.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                mode,
                "--exit-calls",
                str(args.exit_calls),
            ],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
        )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        report = None
        deadline = time.monotonic() + args.kill_after + 60  # start-up (imports) + the calls
        while report is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            if line.startswith("{"):
                report = json.loads(line)
        if report is None:
            result["error"] = "the calls did not finish"
            kill_group(proc)
            return result
        result.update(call_median_us=report["median_us"], call_max_us=report["max_us"])
        try:
            proc.wait(timeout=max(0.0, report["done"] + args.kill_after - time.monotonic()))
            # CLOCK_MONOTONIC is system-wide on Linux: the child's timestamp is comparable.
            result["exit_s"] = time.monotonic() - report["done"]
            result["killed"] = False
            result["returncode"] = proc.returncode
        except subprocess.TimeoutExpired:
            kill_group(proc)
            result["exit_s"] = None
            result["killed"] = True
    finally:
        kill_group(proc)
        proc.stdout.close()
        if mode == "tracewire":
            result.update(shipper_cleanup(spool_dir))
    if uri.startswith("sqlite:"):  # a healthy store: what it holds once the child is gone
        result["stored"] = count_in_db(db_path(uri), "0", since_ms)[1]
    if mode == "tracewire":
        found = spools.status(spool_dir)
        result["spool"] = {
            "files": len(found),
            "pending": sum(s.pending for s in found),
            "dropped": sum(s.dropped for s in found),
            "live": any(s.live for s in found),
        }
    if proc.returncode not in (0, None, -signal.SIGKILL):
        result["log_tail"] = log_path.read_text(errors="replace")[-2000:]
    return result


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


def shipper_cleanup(spool_dir: Path) -> dict[str, Any]:
    """The child's shipper (its own session) should be gone with the child; kill any that is not
    after a short wait, and say so."""
    deadline = time.monotonic() + 3.0
    left = processes_with_env("TRACEWIRE_SPOOL_DIR", str(spool_dir))
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = processes_with_env("TRACEWIRE_SPOOL_DIR", str(spool_dir))
    kill(left)
    return {"shipper_left_after_3s": len(left)}


# --------------------------------------------------------------------------- report


def hot_path(bursts: list[Burst], baseline: list[float]) -> dict[str, Any]:
    base_med, base_p99 = median(baseline), p99(baseline)
    out: dict[str, Any] = {
        "baseline": {"median_us": base_med, "p99_us": base_p99, "n": len(baseline)}
    }
    for b in bursts:
        if b.mode == "tracewire web":
            continue  # a drain figure: its calls ran with a context manager around each
        out.setdefault(b.store, {})[b.mode] = {
            "median_us": median(b.samples),
            "p99_us": p99(b.samples),
            "added_median_us": median(b.samples) - base_med,
            "added_p99_us": p99(b.samples) - base_p99,
        }
    for store in {b.store for b in bursts}:
        tw, ml = out[store]["tracewire"], out[store]["mlflow"]
        ratio = (tw["added_p99_us"] / ml["added_p99_us"]) if ml["added_p99_us"] > 0 else None
        out[store]["p99_ratio"] = ratio
        out[store]["p99_met"] = ratio is not None and ratio <= TARGET_P99_RATIO
        ratio = tw["added_median_us"] / ml["added_median_us"] if ml["added_median_us"] > 0 else None
        out[store]["median_ratio"] = ratio
    return out


def burst_summary(bursts: list[Burst]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for b in bursts:
        row = {k: v for k, v in asdict(b).items() if k != "samples"}
        row.update(backlog=b.backlog, drain_rate=b.drain_rate, sustained_rate=b.sustained_rate)
        out.setdefault(b.store, {})[b.mode] = row
    for modes in out.values():
        tw, ml = modes["tracewire"], modes["mlflow"]
        speedup = ml["drain_s"] / tw["drain_s"] if tw["drain_s"] > 0 else None
        modes["drain_speedup"] = speedup
        modes["all_persisted"] = tw["persisted"] == tw["calls"] == tw["with_spans"]
        modes["drain_met"] = speedup is not None and speedup >= TARGET_DRAIN_SPEEDUP
        if (web := modes.get("tracewire web")) is not None:
            visible = web["visible_s"]
            modes["web_drain_speedup"] = (
                ml["visible_s"] / visible if visible and ml["visible_s"] else None
            )
            modes["web_drain_met"] = (modes["web_drain_speedup"] or 0) >= TARGET_WEB_SPEEDUP
    return out


def fmt_s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def met(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def print_report(r: dict[str, Any]) -> None:
    print(
        f"Export throughput: {r['calls']} back-to-back chat.completions.create calls per burst "
        f"(mock transport), {r['cpus']} CPUs, load average (1/5/15 min) "
        f"{'/'.join(map(str, r['loadavg_start']))} at the start, "
        f"{'/'.join(map(str, r['loadavg_end']))} at the end; openai {r['versions']['openai']}, "
        f"mlflow {r['versions']['mlflow']}, tracewire {r['versions']['tracewire']}; "
        f"{QUEUE_ENV}={r['mlflow_queue_env']}; runtime {r['runtime_s']:.0f} s"
    )
    print()
    print(
        "1. Burst: persisted once flushed; drain = last call returned -> flush returned; "
        "visible = last call returned -> every trace in the store"
    )
    print(
        f"{'store':<7} {'mode':<13} {'persisted':>11} {'w/ spans':>9} {'burst s':>8} "
        f"{'backlog':>8} {'drain s':>8} {'visible s':>10} {'drain/s':>8} "
        f"{'end-to-end/s':>13}  load 1m"
    )
    for store, modes in r["burst"].items():
        for mode in ("tracewire", "tracewire web", "mlflow"):
            if mode not in modes:
                continue
            b = modes[mode]
            rate = "n/a" if b["drain_rate"] is None else f"{b['drain_rate']:.1f}"
            print(
                f"{store:<7} {mode:<13} {b['persisted']:>5}/{b['calls']:<5} "
                f"{b['with_spans']:>9} {b['burst_s']:>8.2f} {b['backlog']:>8} "
                f"{b['drain_s']:>8.2f} {fmt_s(b['visible_s']):>10} {rate:>8} "
                f"{b['sustained_rate']:>13.1f}  {b['loadavg_1m']}"
            )
        tw, ml = modes["tracewire"], modes["mlflow"]
        flush = f"tracewire.flush returned {tw['flush_ok']}"
        print(
            f"{store:<7} every trace persisted: {met(modes['all_persisted'])}; "
            f"drain mlflow/tracewire: {fmt_ratio(modes['drain_speedup'])}x "
            f"(target >= {TARGET_DRAIN_SPEEDUP:.0f}x: {met(modes['drain_met'])}); {flush}; "
            f"mlflow async queue in use: {ml['queue_size']}"
        )
        if "web_drain_speedup" in modes:
            web = modes["tracewire web"]
            print(
                f"{store:<7} with a request id on every trace (web requests): visible "
                f"mlflow/tracewire {fmt_ratio(modes['web_drain_speedup'])}x (target >= "
                f"{TARGET_WEB_SPEEDUP:.0f}x: {met(modes['web_drain_met'])}); complete "
                f"(client request ids stamped, flush returned) after "
                f"{web['drain_s']:.2f} s, mlflow/tracewire "
                f"{fmt_ratio(ml['drain_s'] / web['drain_s'] if web['drain_s'] else None)}x"
            )
        print(f"{store:<7} sample trace: tracewire {tw['sample']}, mlflow {ml['sample']}")
    print(
        "   (backlog: the burst's traces not yet in the store when its last call returned; "
        "drain/s = backlog / drain s;\n    end-to-end/s = persisted / (burst s + drain s))"
    )
    print()
    h = r["hot_path"]
    base = h["baseline"]
    print(
        f"2. Hot path during the burst, per call (untraced baseline: median "
        f"{base['median_us']:.1f} us, p99 {base['p99_us']:.1f} us, n={base['n']})"
    )
    print(
        f"{'store':<7} {'mode':<10} {'median us':>10} {'p99 us':>10} {'+median us':>11} "
        f"{'+p99 us':>10}"
    )
    for store in r["burst"]:
        for mode in ("tracewire", "mlflow"):
            m = h[store][mode]
            print(
                f"{store:<7} {mode:<10} {m['median_us']:>10.1f} {m['p99_us']:>10.1f} "
                f"{m['added_median_us']:>11.1f} {m['added_p99_us']:>10.1f}"
            )
        print(
            f"{store:<7} tracewire/mlflow added median {fmt_ratio(h[store]['median_ratio'])}, "
            f"added p99 {fmt_ratio(h[store]['p99_ratio'])} (target <= "
            f"{TARGET_P99_RATIO:.3f}: {met(h[store]['p99_met'])})"
        )
    print()
    o = r.get("outage")
    if o is None:
        print("3. Outage: skipped (--skip-server)")
    else:
        print(
            f"3. Outage (tracewire -> mlflow server, {o['calls']} calls each): median "
            f"{o['normal']['median_us']:.1f} us (p99 {o['normal']['p99_us']:.1f}) with the "
            f"server up, {o['outage']['median_us']:.1f} us (p99 {o['outage']['p99_us']:.1f}, "
            f"max {o['outage']['max_us']:.1f}) with it down"
        )
        within = o["median_delta_us"] <= TARGET_OUTAGE_DELTA_US  # faster than normal is fine
        print(
            f"   median delta {o['median_delta_us']:+.1f} us (target within "
            f"{TARGET_OUTAGE_DELTA_US} us: {met(within)}); server down "
            f"{o['server_down_s']:.1f} s (restart took {o['server_restart_s']:.1f} s)"
        )
        print(
            f"   after the restart all outage traces arrived in "
            f"{o['arrived_after_restart_s']:.2f} s (flush returned {o['flush_ok']}): "
            f"{o['outage_persisted']}/{o['calls']} outage traces ({o['outage_with_spans']} "
            f"with spans), {o['all_persisted']}/{o['all_expected']} of the run"
        )
    print()
    bound = EXIT_GRACE_S + r["flush_timeout"]
    print(
        f"4. Exit after {r['exit_calls']} traced calls with the store healthy, dead or hung "
        f"(targets for tracewire: healthy, every trace stored before the exit; dead or hung, "
        f"exit within {bound:.0f} s of the last call, traces kept in the spool)"
    )
    print(
        f"{'store':<10} {'mode':<10} {'call median us':>15} {'call max us':>12} "
        f"{'exit after':>12}  spool / notes"
    )
    for case in r["exit"]:
        if "error" in case:
            print(f"{case['store']:<10} {case['mode']:<10} {case['error']}")
            continue
        exit_s = (
            f">{r['kill_after']:.0f} s (killed)" if case["killed"] else f"{case['exit_s']:.2f} s"
        )
        notes = ""
        if case["mode"] == "untraced":
            notes = "no tracing: the interpreter's own exit (module teardown)"
        if "stored" in case:
            notes = f"{case['stored']}/{case['calls']} stored when it had exited"
        if case["mode"] == "tracewire":
            s = case["spool"]
            ok = (
                (not case["killed"] and case.get("stored") == case["calls"])
                if "stored" in case
                else (
                    not case["killed"] and case["exit_s"] <= bound and s["pending"] == case["calls"]
                )
            )
            notes += (
                f"{'; ' if notes else ''}{s['pending']}/{case['calls']} pending in "
                f"{s['files']} spool file(s), dropped {s['dropped']}, owner live "
                f"{s['live']}; shippers left after 3 s: {case['shipper_left_after_3s']}; "
                f"{met(ok)}"
            )
        if case.get("returncode") not in (None, 0):
            notes += f" exit code {case['returncode']}"
        print(
            f"{case['store']:<10} {case['mode']:<10} {case['call_median_us']:>15.1f} "
            f"{case['call_max_us']:>12.1f} {exit_s:>12}  {notes}"
        )
    print()
    print(
        "5. First trace: an app starts, waits 3 s, makes one call; its trace is in the store "
        "after (target for tracewire: within 1 s)"
    )
    for case in r.get("first_trace", []):
        print(f"{case['store']:<10} {case['mode']:<10} {fmt_s(case['seconds'])} s")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per burst")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up calls per run")
    parser.add_argument(
        "--outage-calls",
        type=int,
        default=500,
        help="calls with the server up, then the same with it down",
    )
    parser.add_argument("--exit-calls", type=int, default=50, help="calls in each exit child")
    parser.add_argument(
        "--kill-after",
        type=float,
        default=20.0,
        help="seconds after its last call before an exit child is killed",
    )
    parser.add_argument(
        "--flush-timeout",
        type=float,
        default=300.0,
        help="seconds tracewire.flush() may wait for a burst to drain",
    )
    parser.add_argument(
        "--skip-server",
        action="store_true",
        help="no mlflow server: sqlite burst and the exit cases only",
    )
    parser.add_argument("--json", action="store_true", help="also print one JSON object")
    parser.add_argument(
        "--child", choices=("tracewire", "mlflow", "untraced"), help=argparse.SUPPRESS
    )
    parser.add_argument("--first-trace", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return None
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="tracewire-bench-"))
    spool_dir = root / "spool"

    # Registered before tracewire's own atexit hook, so it runs after it (LIFO): by then
    # tracewire has stopped its shipper processes, and the temp dir can go.
    def cleanup() -> None:
        kill(processes_with_env("TRACEWIRE_SPOOL_DIR", str(spool_dir)))
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(cleanup)
    os.environ["TRACEWIRE_SPOOL_DIR"] = str(spool_dir)
    # Before any MLflow exporter exists (see the module docstring).
    os.environ[QUEUE_ENV] = str(max(1000, 2 * (args.calls + args.warmup)))
    quiet_logs()
    result: dict[str, Any] = {
        "calls": args.calls,
        "warmup": args.warmup,
        "cpus": os.cpu_count(),
        "loadavg_start": loadavg(),
        "mlflow_queue_env": os.environ[QUEUE_ENV],
        "flush_timeout": tracewire_flush_bound(),
        "exit_calls": args.exit_calls,
        "kill_after": args.kill_after,
        "versions": {
            "openai": openai.__version__,
            "mlflow": mlflow.__version__,
            "tracewire": tracewire_version(),
        },
    }
    client = make_client()
    bursts: list[Burst] = []
    baseline: list[float] = []
    server = None
    listener = None
    try:
        timed_calls(client, args.warmup)
        baseline += timed_calls(client, args.calls)

        def local(name: str) -> tuple[Store, Store]:
            store = fresh_store(root, f"sqlite-{name}")
            return store, store

        bursts += burst_pair("sqlite", client, local, args)
        result["first_trace"] = []
        for mode in ("tracewire", "mlflow"):
            store = fresh_store(root, f"first-{mode}")
            result["first_trace"].append(
                run_first_trace(mode, "sqlite", store, db_path(store.uri), root, args)
            )
        if not args.skip_server:
            from tests.support.mlflow_server import MlflowServer

            server = MlflowServer(root / "server").start()
            bursts += burst_pair("server", client, lambda name: server_store(server, name), args)
            for mode in ("tracewire", "mlflow"):
                sent, read = server_store(server, f"first-{mode}")
                result["first_trace"].append(
                    run_first_trace(mode, "server", sent, db_path(read.uri), root, args)
                )
            result["outage"] = run_outage(
                client, server, args.outage_calls, args.warmup, args.flush_timeout
            )
            server.stop()
        timed_calls(client, args.warmup)
        baseline += timed_calls(client, args.calls)
        mlflow.flush_trace_async_logging(terminate=True)

        listener = HungListener()
        # The same child without tracing: how long the interpreter itself takes to exit.
        result["exit"] = [
            run_exit_case("untraced", "dead port", f"http://127.0.0.1:{free_port()}", root, args)
        ]
        for store_kind, uri in (
            ("healthy", None),
            ("dead port", f"http://127.0.0.1:{free_port()}"),
            ("hung", f"http://127.0.0.1:{listener.port}"),
        ):
            for mode in ("tracewire", "mlflow"):
                target = uri or fresh_store(root, f"exit-{mode}").uri  # healthy: experiment 0
                result["exit"].append(run_exit_case(mode, store_kind, target, root, args))
    finally:
        if server is not None:
            server.stop()
        if listener is not None:
            listener.close()
    result["burst"] = burst_summary(bursts)
    result["hot_path"] = hot_path(bursts, baseline)
    result["loadavg_end"] = loadavg()
    result["runtime_s"] = time.perf_counter() - started
    print_report(result)
    if args.json:
        print(json.dumps(result))
    return result


def tracewire_flush_bound() -> float:
    """The flush bound tracewire applies at exit (TRACEWIRE_FLUSH_TIMEOUT, default 2 s)."""
    from tracewire import config

    return config.resolve().flush_timeout


if __name__ == "__main__":
    main()
