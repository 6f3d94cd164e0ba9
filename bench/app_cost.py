"""Where a traced OpenAI call's cost goes in the app's process: the export worker's steps, and
which calls a worker batch slows down.

One process, the same calls, transport and reply as bench/openai_overhead.py, into a fresh
sqlite store. Each step of the worker's batch (``export/pipeline.py::_spool_batch``) is timed on
the worker thread with ``time.thread_time_ns`` (CPU, not wall); every call's start and end and
every batch's start and end are recorded, so the report says how many of the slow calls (more
than ``--slow-us`` over the median) ran while a batch was being handled, and how many ran
during a garbage collection. (Stopping the shipper process during the calls is no way to see
what its CPU costs the app: stopped inside a spool transaction, it holds up the worker too.)

Run:  python bench/app_cost.py [--calls 2000] [--slow-us 500]
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

_BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(_BENCH))

from openai_overhead import call, call_arguments, fresh_store, make_client, quiet_logs, use_store

Interval = tuple[float, float]


def _timed(cpu: Counter[str], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            cpu[name] += time.thread_time_ns() - started

    return timed


def _overlapping(calls: list[Interval], intervals: list[Interval]) -> int:
    return sum(1 for a, b in calls if any(s < b and e > a for s, e in intervals))


def main() -> None:
    parser = call_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--slow-us", type=float, default=500.0)
    args = parser.parse_args()
    quiet_logs()
    root = Path(tempfile.mkdtemp(prefix="tracewire-app-cost-"))
    os.environ["TRACEWIRE_SPOOL_DIR"] = str(root / "spool")
    use_store(fresh_store(root, "app-cost"))

    import tracewire
    from tracewire.export import encode, pipeline, spool

    cpu: Counter[str] = Counter()
    batches: list[Interval] = []
    for name in ("settle", "sampled_out", "encode", "_record", "_raw", "_serialize"):
        setattr(encode, name, _timed(cpu, name, getattr(encode, name)))
    spool.Spool.put_many = _timed(cpu, "put_many", spool.Spool.put_many)  # type: ignore[method-assign]
    handle = _timed(cpu, "batch", pipeline._spool_batch)

    def batch(items: Any) -> int:
        started = time.perf_counter()
        try:
            return int(handle(items))
        finally:
            batches.append((started, time.perf_counter()))

    pipeline._spool_batch = batch  # before autolog(): the worker takes it as its handler
    tracewire.autolog()
    client = make_client()
    for _ in range(args.warmup):
        call(client)
    tracewire.flush(120)
    cpu.clear()
    batches.clear()
    collections: list[Interval] = []
    started_gc = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started_gc[0] = time.perf_counter()
        else:
            collections.append((started_gc[0], time.perf_counter()))

    gc.callbacks.append(on_gc)
    calls: list[Interval] = []
    for _ in range(args.calls):
        started = time.perf_counter()
        call(client)
        calls.append((started, time.perf_counter()))
    gc.callbacks.remove(on_gc)
    worker = pipeline._worker
    assert worker is not None and worker.flush(120)

    took = sorted((b - a) * 1e6 for a, b in calls)
    median, p99 = took[len(took) // 2], took[int(len(took) * 0.99)]
    slow = [(a, b) for a, b in calls if (b - a) * 1e6 > median + args.slow_us]
    traces = args.calls
    print(f"{traces} calls: median {median:.0f} µs, p99 {p99:.0f} µs, max {took[-1]:.0f} µs")
    print("export worker CPU per trace (thread_time):")
    for name in ("batch", "encode", "_serialize", "_record", "_raw", "settle", "sampled_out"):
        print(f"  {name:12s} {cpu[name] / traces / 1000:6.1f} µs")
    print(f"  {'put_many':12s} {cpu['put_many'] / traces / 1000:6.1f} µs")
    mean_batch = sum(b - a for a, b in batches) / max(1, len(batches)) * 1e3
    print(
        f"{len(batches)} batches, {traces / max(1, len(batches)):.1f} traces and {mean_batch:.2f} ms each"
    )
    print(
        f"slow calls (over median + {args.slow_us:.0f} µs): {len(slow)}; during a worker batch: "
        f"{_overlapping(slow, batches)}; during a garbage collection: "
        f"{_overlapping(slow, collections)}; calls during a batch: {_overlapping(calls, batches)}"
    )
    tracewire.disable()


if __name__ == "__main__":
    main()
