"""Per-call cost of tracing an OpenAI chat completion: tracewire side by side with its peers.

Configurations, each run in its own fresh interpreter (``python bench/peers.py --child NAME``):

  baseline      the real ``openai`` client, no tracing
  wrapt         a bare ``wrapt`` wrapper around ``Completions.create`` (the floor of any wrapper)
  wrapt+otel    that wrapper opening one OpenTelemetry SDK span with 5 attributes
  otel-v2       OpenTelemetry's ``opentelemetry-instrumentation-openai-v2``, content on
                (latest GenAI conventions, messages on the span)
  openinference ``openinference-instrumentation-openai`` (content on by default)
  openllmetry   ``opentelemetry-instrumentation-openai`` (content on by default)
  tracewire     ``tracewire.autolog()``, content on, traces really stored (fresh sqlite store)
  mlflow        ``mlflow.openai.autolog()`` with its default async exporter (fresh sqlite store)

The OpenTelemetry configurations export through a SimpleSpanProcessor to an exporter that only
counts root spans: their cheapest possible export, which stores nothing. Every configuration
makes the same calls through bench/openai_overhead.py's in-process transport and reply (token
usage with details). Each child warms up, flushes, then times ``--calls`` back-to-back calls and
flushes again; its CPU time (``getrusage``: all threads of the app's process) is taken across
the measured calls and the in-process export of their traces (tracewire: until its worker has
spooled them, not the wait for the store, which is the shipper's work; MLflow: its async
export, which writes the store from the app's process). For tracewire the shipper process's CPU
until the traces are stored is read separately (psutil) and given per trace stored; tracewire's and MLflow's stores are read back through MLflow's API to count
the measured calls' traces.

The configurations take turns for ``--rounds`` rounds (the order rotates each round) and each
one's samples are pooled. Added median / p99 / CPU are against the baseline of the same
invocation; the machine's load average is printed at the start and the end. On a shared
machine, read the ratios.

Run:  python bench/peers.py [--calls 2000] [--warmup 200] [--rounds 3] [--only a,b] [--json]
Quick look (< 1 min): python bench/peers.py --calls 300 --warmup 50 --rounds 1
Needs the peers: pip install -e ".[bench]"
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(_BENCH))

from openai_overhead import (
    call_arguments,
    fresh_store,
    make_client,
    median,
    p99,
    persisted_since,
    quiet_logs,
    timed_calls,
    use_store,
)

CONFIGS = (
    "baseline",
    "wrapt",
    "wrapt+otel",
    "otel-v2",
    "openinference",
    "openllmetry",
    "tracewire",
    "mlflow",
)
PEERS = ("otel-v2", "openinference", "openllmetry", "mlflow")

# The targets for tracewire.
TARGET_ADDED_MEDIAN_US = 100.0
TARGET_ADDED_P99_US = 1000.0
TARGET_CPU_US = 60.0


# --------------------------------------------------------------------------- in the child


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


class _Children:
    """CPU seconds of this process's child processes (tracewire's shipper), read live."""

    def __init__(self) -> None:
        import psutil

        self._me = psutil.Process()

    def cpu_s(self) -> float:
        import psutil

        total = 0.0
        for child in self._me.children(recursive=True):
            try:
                times = child.cpu_times()
            except psutil.Error:  # it exited meanwhile
                continue
            total += times.user + times.system
        return total


def _otel_provider() -> Any:
    """A global TracerProvider whose exporter counts root spans and keeps nothing."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class Counting(SpanExporter):
        roots = 0

        def export(self, spans: Any) -> SpanExportResult:
            for span in spans:
                if span.parent is None:
                    Counting.roots += 1
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Counting()))
    trace.set_tracer_provider(provider)
    return Counting


def _wrap(wrapper: Callable[..., Any]) -> None:
    import wrapt

    wrapt.wrap_function_wrapper("openai.resources.chat.completions", "Completions.create", wrapper)


class _Mode:
    """How one configuration is switched on, flushed, and its traces counted."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        self.store = None
        self.counter: Any = None
        self.since_ms = 0

    def enable(self) -> None:
        name = self.name
        if name == "baseline":
            return
        if name == "wrapt":
            _wrap(lambda wrapped, instance, args, kwargs: wrapped(*args, **kwargs))
            return
        if name in ("tracewire", "mlflow"):
            os.environ["TRACEWIRE_SPOOL_DIR"] = str(self.root / "spool")
            self.store = fresh_store(self.root, name)
            use_store(self.store)
            if name == "tracewire":
                import tracewire

                tracewire.autolog()
            else:
                import mlflow

                mlflow.openai.autolog(silent=True)
            return
        self.counter = _otel_provider()
        if name == "wrapt+otel":
            from opentelemetry import trace

            tracer = trace.get_tracer("bench")

            def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
                with tracer.start_as_current_span("chat") as span:
                    span.set_attribute("gen_ai.operation.name", "chat")
                    span.set_attribute("gen_ai.system", "openai")
                    span.set_attribute("gen_ai.request.model", kwargs.get("model", ""))
                    result = wrapped(*args, **kwargs)
                    span.set_attribute("gen_ai.response.model", result.model)
                    span.set_attribute("gen_ai.usage.input_tokens", result.usage.prompt_tokens)
                    return result

            _wrap(wrapper)
        elif name == "otel-v2":
            os.environ["OTEL_SEMCONV_STABILITY_OPT_IN"] = "gen_ai_latest_experimental"
            os.environ["OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"] = "span_only"
            from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor

            OpenAIInstrumentor().instrument()
        elif name == "openinference":
            from openinference.instrumentation.openai import OpenAIInstrumentor

            OpenAIInstrumentor().instrument()
        elif name == "openllmetry":
            from opentelemetry.instrumentation.openai import OpenAIInstrumentor

            OpenAIInstrumentor().instrument()
        else:
            raise SystemExit(f"unknown configuration {name!r}")

    def drain(self) -> None:
        """Wait until this process's export work for the calls so far is done."""
        if self.name == "tracewire":
            from tracewire.export import pipeline

            worker = pipeline._worker  # the worker's own flush: spooled, not yet stored
            assert worker is not None and worker.flush(120)
        else:
            self.flush()

    def flush(self) -> None:
        if self.name == "tracewire":
            import tracewire

            tracewire.flush(120)
        elif self.name == "mlflow":
            import mlflow

            mlflow.flush_trace_async_logging()

    def mark(self) -> None:
        """The measured calls start now: traces counted from here."""
        time.sleep(0.01)  # warm-up traces start strictly before
        self.since_ms = time.time_ns() // 1_000_000
        if self.counter is not None:
            self.counter.roots = 0

    def kept(self) -> int | None:
        if self.store is not None:
            return persisted_since(self.store, self.since_ms)[0]
        if self.counter is not None:
            return self.counter.roots
        return None


def run_child(name: str, calls: int, warmup: int) -> dict[str, Any]:
    quiet_logs()
    with tempfile.TemporaryDirectory(prefix="tracewire-peers-") as tmp:
        mode = _Mode(name, Path(tmp))
        mode.enable()
        client = make_client()
        timed_calls(client, warmup)
        mode.flush()
        mode.mark()
        children = _Children()
        cpu, child_cpu = _cpu_s(), children.cpu_s()
        samples = timed_calls(client, calls)
        mode.drain()
        cpu = _cpu_s() - cpu
        mode.flush()
        child_cpu = children.cpu_s() - child_cpu
        kept = mode.kept()
        if name == "tracewire":
            import tracewire

            tracewire.disable()
        elif name == "mlflow":
            import mlflow

            mlflow.flush_trace_async_logging(terminate=True)
    return {
        "name": name,
        "samples": samples,
        "cpu_s": cpu,
        "child_cpu_s": child_cpu,
        "kept": kept,
        "calls": calls,
    }


# --------------------------------------------------------------------------- in the parent


def run_config(name: str, calls: int, warmup: int) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", name, "--calls", str(calls), "--warmup", str(warmup)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        mine = [r for r in runs if r["name"] == name]
        samples = [s for r in mine for s in r["samples"]]
        calls = sum(r["calls"] for r in mine)
        kept = [r["kept"] for r in mine]
        rows[name] = {
            "median_us": median(samples),
            "p99_us": p99(samples),
            "cpu_us": 1e6 * sum(r["cpu_s"] for r in mine) / calls,
            "kept": None if kept[0] is None else sum(kept),
            "calls": calls,
            "round_medians_us": [median(r["samples"]) for r in mine],
        }
        if name == "tracewire":
            stored = rows[name]["kept"] or 1
            rows[name]["shipper_cpu_us_per_trace"] = (
                1e6 * sum(r["child_cpu_s"] for r in mine) / stored
            )
    base = rows["baseline"]
    for row in rows.values():
        row["added_median_us"] = row["median_us"] - base["median_us"]
        row["added_p99_us"] = row["p99_us"] - base["p99_us"]
        row["added_cpu_us"] = row["cpu_us"] - base["cpu_us"]
        row["median_x"] = row["median_us"] / base["median_us"]
        row["p99_x"] = row["p99_us"] / base["p99_us"]
        row["cpu_x"] = row["cpu_us"] / base["cpu_us"]
    return rows


def print_report(rows: dict[str, Any], meta: dict[str, Any]) -> None:
    print(
        f"OpenAI chat.completions.create, {meta['calls']} calls x {meta['rounds']} round(s) per "
        f"configuration, each its own process; {meta['cpus']} CPUs; load average "
        f"{meta['load_start']} at the start, {meta['load_end']} at the end"
    )
    print(
        f"{'configuration':<14} {'median':>8} {'+median':>8} {'x':>5} {'p99':>8} {'+p99':>8} "
        f"{'x':>5} {'cpu/call':>9} {'+cpu':>7} {'x':>5}  kept"
    )
    for name, r in rows.items():
        kept = "" if r["kept"] is None else f"{r['kept']}/{r['calls']}"
        print(
            f"{name:<14} {r['median_us']:>8.1f} {r['added_median_us']:>+8.1f} "
            f"{r['median_x']:>5.2f} {r['p99_us']:>8.1f} {r['added_p99_us']:>+8.1f} "
            f"{r['p99_x']:>5.2f} {r['cpu_us']:>9.1f} {r['added_cpu_us']:>+7.1f} "
            f"{r['cpu_x']:>5.2f}  {kept}"
        )
    print(
        "(us per call; x = against the baseline; cpu = the app process, all threads, over "
        "the calls and the flush after them)"
    )
    for name, r in rows.items():
        print(
            f"  {name:<14} round medians: " + ", ".join(f"{m:.1f}" for m in r["round_medians_us"])
        )
    tw = rows.get("tracewire")
    if tw is None:
        return
    print(
        f"tracewire's shipper process: {tw['shipper_cpu_us_per_trace']:.0f} us CPU per trace stored"
    )
    peers = [n for n in PEERS if n in rows]
    for stat, target in (("median", TARGET_ADDED_MEDIAN_US), ("p99", TARGET_ADDED_P99_US)):
        mine = tw[f"added_{stat}_us"]
        best = min((rows[n][f"added_{stat}_us"] for n in peers), default=None)
        beats = best is None or mine < best
        print(
            f"tracewire added {stat} {mine:+.1f} us: target <= {target:.0f} "
            f"{'MET' if mine <= target else 'NOT MET'}; below every peer "
            f"{'YES' if beats else 'NO'} (best peer {best if best is None else f'{best:+.1f}'})"
        )
    print(
        f"tracewire app CPU {tw['added_cpu_us']:+.1f} us per call: target <= "
        f"{TARGET_CPU_US:.0f} {'MET' if tw['added_cpu_us'] <= TARGET_CPU_US else 'NOT MET'}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = call_arguments(__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="turns of every configuration")
    parser.add_argument("--only", help="comma-separated configurations (baseline always runs)")
    parser.add_argument("--json", action="store_true", help="also print one JSON object")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        result = run_child(args.child, args.calls, args.warmup)
        print(json.dumps(result))
        return
    names = list(CONFIGS)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - set(CONFIGS)
        if unknown:
            raise SystemExit(f"unknown configuration(s): {', '.join(sorted(unknown))}")
        names = [n for n in CONFIGS if n == "baseline" or n in wanted]
    load_start = round(os.getloadavg()[0], 2)
    runs = []
    for r in range(args.rounds):
        turn = r % len(names)
        for name in names[turn:] + names[:turn]:
            runs.append(run_config(name, args.calls, args.warmup))
    meta = {
        "calls": args.calls,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "load_start": load_start,
        "load_end": round(os.getloadavg()[0], 2),
    }
    rows = summarize(runs, names)
    print_report(rows, meta)
    if args.json:
        print(json.dumps({**meta, "configurations": rows}))


if __name__ == "__main__":
    main()
