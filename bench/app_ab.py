"""What tracing adds to an OpenAI call in the app's process, against the same calls untraced in
the same process: latency, the caller's thread's CPU and the whole process's CPU.

One process, ``tracewire.autolog()`` on, a fresh sqlite store; the calls of
bench/openai_overhead.py (real client, in-process transport, a reply with usage). Blocks of
``--block`` traced calls and of the same calls with tracewire's wrapper bypassed (the original
``Completions.create``) take turns, ``--rounds`` each, the order swapped every round; after each
block the export worker is flushed (spooled, not yet stored: the store writes are the shipper
process's) and that is counted in the block's CPU. Comparing within one process, interleaved,
cancels most of what moves separate processes' figures apart on a shared machine (the peers
bench runs each configuration in its own process, which is fair to peers but noisier: +-30 µs
between runs of the same code).

``--gap-ms N`` sleeps N ms after each call: a production rate instead of a burst (the worker's
batches are then a few traces, and the caller's and the worker's code run from colder caches).
``--no-export`` drops each finished trace instead of handing it to the export worker: what the
wrapper alone costs the caller's thread. ``--no-ship`` spools the traces but starts no shipper
process: what the app pays when the store writes do not compete with it for the CPU.
``--pin same|apart`` (a diagnostic, Linux) pins the calling thread to the first CPU and the
export worker to the same CPU or to the second, and the shipper (if any) to the last: what the
app pays for the worker running beside its thread rather than between its calls.

Run:  python bench/app_ab.py [--block 300] [--rounds 12] [--gap-ms 0] [--no-export | --no-ship]
                             [--pin same|apart] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(_BENCH))

from openai_overhead import MESSAGES, MODEL, fresh_store, make_client, p99, quiet_logs, use_store


def _block(call: Callable[[], Any], calls: int, gap: float, flush: Callable[[], Any]) -> dict:
    samples = []
    clock = time.perf_counter_ns
    thread0, process0 = time.thread_time(), time.process_time()
    for _ in range(calls):
        start = clock()
        call()
        samples.append((clock() - start) / 1000)
        if gap:
            time.sleep(gap)
    flush()
    return {
        "samples": samples,
        "caller_cpu": time.thread_time() - thread0,
        "process_cpu": time.process_time() - process0,
    }


def _pin(where: str) -> None:
    """Pin this thread, the export worker and the shipper process (see --pin)."""
    import threading

    from tracewire.export import pipeline

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("--pin needs two CPUs")
    os.sched_setaffinity(threading.get_native_id(), {cpus[0]})
    worker = next(t for t in threading.enumerate() if t.name == "tracewire-export")
    assert worker.native_id is not None
    os.sched_setaffinity(worker.native_id, {cpus[0] if where == "same" else cpus[1]})
    shipper = pipeline._shipper._proc if pipeline._shipper is not None else None
    if shipper is not None:
        os.sched_setaffinity(shipper.pid, {cpus[-1]})


def run(
    block: int,
    rounds: int,
    gap_ms: float,
    export: bool = True,
    ship: bool = True,
    pin: str | None = None,
) -> dict[str, Any]:
    quiet_logs()
    root = Path(tempfile.mkdtemp(prefix="tracewire-app-ab-"))
    os.environ["TRACEWIRE_SPOOL_DIR"] = str(root / "spool")
    use_store(fresh_store(root, "app-ab"))

    from openai.resources.chat.completions import Completions

    import tracewire
    from tracewire.export import pipeline

    if not export:
        from tracewire.export import queue

        def drop(self: queue.Worker[Any], item: Any) -> bool:
            item.release()  # as the worker would once it spooled it
            return True

        queue.Worker.submit = drop  # type: ignore[method-assign]
    if not ship:
        from tracewire.export.shipper_process import ShipperProcess

        ShipperProcess.ship = ShipperProcess.notify = lambda *_: None  # type: ignore[method-assign,assignment]
    tracewire.autolog()
    client = make_client()
    completions = client.chat.completions
    original = Completions.create.__wrapped__  # tracewire's wrapper bypassed
    modes: dict[str, Callable[[], Any]] = {
        "untraced": lambda: original(completions, model=MODEL, messages=MESSAGES, temperature=0.2),
        "traced": lambda: completions.create(model=MODEL, messages=MESSAGES, temperature=0.2),
    }
    worker = pipeline._worker
    assert worker is not None

    def flush() -> None:
        assert worker.flush(120), "the export worker did not spool the traces"

    for _ in range(200):
        modes["traced"]()
    flush()
    if pin is not None:
        _pin(pin)
    gap = gap_ms / 1000
    blocks: dict[str, list[dict]] = {name: [] for name in modes}
    for i in range(rounds):
        order = list(modes) if i % 2 == 0 else list(reversed(modes))
        for name in order:
            time.sleep(0.05)  # the shipper's work for the last block starts here, not inside
            blocks[name].append(_block(modes[name], block, gap, flush))
    tracewire.disable()

    result: dict[str, Any] = {
        "block": block,
        "rounds": rounds,
        "gap_ms": gap_ms,
        "export": export,
        "ship": ship,
        "pin": pin,
    }
    for name, runs in blocks.items():
        samples = [s for r in runs for s in r["samples"]]
        calls = len(samples)
        result[name] = {
            "median_us": statistics.median(samples),
            "p99_us": p99(samples),
            "caller_cpu_us": 1e6 * sum(r["caller_cpu"] for r in runs) / calls,
            "process_cpu_us": 1e6 * sum(r["process_cpu"] for r in runs) / calls,
        }
    result["added"] = {
        key: result["traced"][key] - result["untraced"][key] for key in result["traced"]
    }
    result["load"] = os.getloadavg()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--block", type=int, default=300, help="calls per block")
    parser.add_argument("--rounds", type=int, default=12, help="blocks per mode")
    parser.add_argument("--gap-ms", type=float, default=0.0, help="sleep after each call")
    parser.add_argument("--no-export", action="store_true", help="drop the finished traces")
    parser.add_argument("--no-ship", action="store_true", help="spool, start no shipper process")
    parser.add_argument(
        "--pin", choices=("same", "apart"), help="the export worker on the caller's CPU or not"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    result = run(
        args.block,
        args.rounds,
        args.gap_ms,
        export=not args.no_export,
        ship=not args.no_ship,
        pin=args.pin,
    )
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{args.rounds} x {args.block} calls per mode, {args.gap_ms:g} ms after each"
        f"{', traces dropped' if args.no_export else ''}"
        f"{', no shipper' if args.no_ship else ''}"
        f"{f', worker pinned {args.pin}' if args.pin else ''}; load average {result['load'][0]:.2f}"
    )
    print(
        f"{'':10s} {'median':>8s} {'p99':>8s} {'caller CPU':>11s} {'process CPU':>12s}  (µs/call)"
    )
    for name in ("untraced", "traced", "added"):
        row = result[name]
        sign = "+" if name == "added" else ""
        print(
            f"{name:10s} {row['median_us']:{sign}8.1f} {row['p99_us']:{sign}8.1f} "
            f"{row['caller_cpu_us']:{sign}11.1f} {row['process_cpu_us']:{sign}12.1f}"
        )


if __name__ == "__main__":
    main()
