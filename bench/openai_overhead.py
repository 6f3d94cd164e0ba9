"""Per-call overhead of tracing an OpenAI chat completion: tracewire vs MLflow's own autolog.

What it measures, in one process:

  (a) baseline  -- the real ``openai`` client, no tracing;
  (b) tracewire -- ``tracewire.autolog()``;
  (c) mlflow    -- ``mlflow.openai.autolog()`` with MLflow's default async exporter (after
                   ``tracewire.disable()`` has given MLflow its own pipeline back).

Every call is ``client.chat.completions.create(...)`` through an in-process mock transport
(``httpx2.MockTransport``) that returns a realistic chat completion with token usage, so the
numbers are the client's own cost plus the tracer's, with no network. Each traced run writes to
its own fresh sqlite store (and experiment) in a temporary directory. Each mode is warmed up,
then ``--calls`` back-to-back calls are timed one by one. The background writers (tracewire's
worker, MLflow's async logging threads) run *during* the measured calls and compete for the GIL
(2 cores here); that cost is part of the numbers, as it is in production.

The baseline is measured before and after the traced modes (and all modes are repeated
``--rounds`` times, in turn), and the pooled samples are reported. After each traced run the
pipeline is flushed (``tracewire.flush`` / ``mlflow.flush_trace_async_logging``), the flush is
timed, and the store is read back through MLflow's API to count how many of the measured calls'
traces were persisted.

Run:  python bench/openai_overhead.py [--calls 2000] [--warmup 200] [--rounds 1] [--json]
(from a checkout without installing: PYTHONPATH=src python bench/openai_overhead.py)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tracewire
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import tracewire

import httpx2
import mlflow
import openai
from mlflow.tracking import MlflowClient

# The targets: tracewire's added latency as a fraction of MLflow's.
TARGET_MEDIAN_RATIO = 1 / 3
TARGET_P99_RATIO = 1 / 5

MODEL = "gpt-4o-mini"
MESSAGES = [
    {"role": "system", "content": "You are a concise assistant for an online bookshop."},
    {"role": "user", "content": "Do you have 'The Left Hand of Darkness' in paperback?"},
]
COMPLETION = {
    "id": "chatcmpl-BENCH0000000000000000000000",
    "object": "chat.completion",
    "created": 1_735_689_600,
    "model": "gpt-4o-mini-2024-07-18",
    "system_fingerprint": "fp_0ba0d124f1",
    "service_tier": "default",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Yes - we have two paperback copies of The Left Hand of Darkness by "
                "Ursula K. Le Guin in stock (Ace, 2000). Shall I reserve one for you?",
                "refusal": None,
                "annotations": [],
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 34,
        "completion_tokens": 38,
        "total_tokens": 72,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
}


# --------------------------------------------------------------------------- client and timing


def make_client() -> openai.OpenAI:
    """The real OpenAI client over an in-process transport that always returns COMPLETION."""
    body = json.dumps(COMPLETION).encode()
    headers = {"content-type": "application/json", "x-request-id": "req_bench"}

    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers=headers, content=body)

    return openai.OpenAI(
        api_key="sk-bench-not-a-key",
        base_url="https://api.openai.com/v1",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(handler)),
    )


def call(client: openai.OpenAI) -> None:
    client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0.2)


def timed_calls(client: openai.OpenAI, n: int) -> list[float]:
    """Latency of each of ``n`` back-to-back calls, in microseconds."""
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        start = clock()
        call(client)
        out.append((clock() - start) / 1000)
    return out


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]  # nearest rank


# --------------------------------------------------------------------------- stores


@dataclass
class Store:
    uri: str
    experiment_id: str


def fresh_store(root: Path, name: str) -> Store:
    """A new sqlite store with one experiment whose artifacts also stay under ``root``."""
    directory = root / name
    directory.mkdir()
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    experiment_id = MlflowClient(uri).create_experiment(
        f"bench-{name}", artifact_location=(directory / "artifacts").as_uri()
    )
    return Store(uri, experiment_id)


def persisted_since(store: Store, since_ms: int) -> tuple[int, int]:
    """(traces that started at or after ``since_ms``, all traces) in the store, every page read."""
    client = MlflowClient(store.uri)
    recent = total = 0
    token = None
    while True:
        page = client.search_traces(
            locations=[store.experiment_id], max_results=1000, include_spans=False, page_token=token
        )
        for trace in page:
            total += 1
            recent += trace.info.request_time >= since_ms
        token = page.token
        if not token:
            return recent, total


def sample_trace(store: Store, since_ms: int) -> dict[str, Any]:
    """A look at one measured trace: does it hold a span and the token usage?"""
    client = MlflowClient(store.uri)
    page = client.search_traces(
        locations=[store.experiment_id],
        max_results=1,
        filter_string=f"trace.timestamp_ms >= {since_ms}",
    )
    if not page:
        return {}
    trace = page[0]
    usage = trace.info.trace_metadata.get("mlflow.trace.tokenUsage")
    return {"spans": len(trace.data.spans), "token_usage": json.loads(usage) if usage else None}


# --------------------------------------------------------------------------- modes


@dataclass
class Run:
    """One measured run of one mode."""

    mode: str
    samples: list[float]
    persisted: int | None = None  # measured calls whose trace reached the store
    store_total: int | None = None  # everything in the store, warm-up included
    flush_s: float | None = None
    flush_ok: bool | None = None
    sample: dict[str, Any] = field(default_factory=dict)


def use_store(store: Store) -> None:
    """Point both tracewire (env, read at autolog()) and MLflow (fluent API) at ``store``."""
    os.environ["MLFLOW_TRACKING_URI"] = store.uri
    os.environ["MLFLOW_EXPERIMENT_ID"] = store.experiment_id
    mlflow.set_tracking_uri(store.uri)
    mlflow.set_experiment(experiment_id=store.experiment_id)


def run_baseline(client: openai.OpenAI, calls: int, warmup: int) -> Run:
    timed_calls(client, warmup)
    return Run("baseline", timed_calls(client, calls))


def run_traced(
    mode: str,
    client: openai.OpenAI,
    store: Store,
    calls: int,
    warmup: int,
    enable: Callable[[], None],
    flush: Callable[[], bool | None],
    disable: Callable[[], None],
) -> Run:
    """Warm up, flush, measure ``calls`` calls, time the flush, disable, count the store."""
    use_store(store)
    enable()
    try:  # never leave a writer running into a store that is about to be deleted
        timed_calls(client, warmup)
        flush()
        time.sleep(0.01)  # warm-up traces start strictly before `since_ms`
        since_ms = time.time_ns() // 1_000_000
        samples = timed_calls(client, calls)
        start = time.perf_counter()
        flushed = flush()
        flush_s = time.perf_counter() - start
    finally:
        disable()
    persisted, total = persisted_since(store, since_ms)
    return Run(
        mode,
        samples,
        persisted,
        total,
        flush_s,
        None if flushed is None else bool(flushed),
        sample_trace(store, since_ms),
    )


def run_tracewire(
    client: openai.OpenAI, store: Store, calls: int, warmup: int, flush_timeout: float
) -> Run:
    return run_traced(
        "tracewire",
        client,
        store,
        calls,
        warmup,
        enable=tracewire.autolog,
        flush=lambda: tracewire.flush(flush_timeout),
        disable=tracewire.disable,
    )


def run_mlflow(client: openai.OpenAI, store: Store, calls: int, warmup: int) -> Run:
    def flush() -> None:
        mlflow.flush_trace_async_logging()

    return run_traced(
        "mlflow",
        client,
        store,
        calls,
        warmup,
        enable=lambda: mlflow.openai.autolog(silent=True),
        flush=flush,
        disable=lambda: mlflow.openai.autolog(disable=True, silent=True),
    )


# --------------------------------------------------------------------------- report


def tracewire_version() -> str:
    try:
        return importlib.metadata.version("tracewire")
    except importlib.metadata.PackageNotFoundError:
        return "source checkout"


def summarize(runs: list[Run], calls: int, rounds: int) -> dict[str, Any]:
    pooled: dict[str, list[float]] = {}
    for run in runs:
        pooled.setdefault(run.mode, []).extend(run.samples)
    modes = {
        mode: {"median_us": median(s), "p99_us": p99(s), "n": len(s)} for mode, s in pooled.items()
    }
    base = modes["baseline"]
    for mode in ("tracewire", "mlflow"):
        modes[mode]["added_median_us"] = modes[mode]["median_us"] - base["median_us"]
        modes[mode]["added_p99_us"] = modes[mode]["p99_us"] - base["p99_us"]
    baseline_runs = [r for r in runs if r.mode == "baseline"]
    modes["baseline"]["median_us_per_run"] = [median(r.samples) for r in baseline_runs]
    for mode in ("tracewire", "mlflow"):
        modes[mode]["runs"] = [
            {
                "median_us": median(r.samples),
                "p99_us": p99(r.samples),
                "persisted": r.persisted,
                "of": calls,
                "store_total": r.store_total,
                "flush_s": r.flush_s,
                "flush_ok": r.flush_ok,
                "sample_trace": r.sample,
            }
            for r in runs
            if r.mode == mode
        ]
    tw, ml = modes["tracewire"], modes["mlflow"]
    targets = {}
    for stat, target in (("median", TARGET_MEDIAN_RATIO), ("p99", TARGET_P99_RATIO)):
        theirs = ml[f"added_{stat}_us"]
        ratio = tw[f"added_{stat}_us"] / theirs if theirs > 0 else None
        targets[stat] = {
            "ratio": ratio,
            "target": target,
            "met": ratio is not None and ratio <= target,
        }
    return {
        "calls": calls,
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        "versions": {
            "openai": openai.__version__,
            "mlflow": mlflow.__version__,
            "tracewire": tracewire_version(),
        },
        "modes": modes,
        "targets": targets,
    }


def fmt_ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.3f}"


def print_report(result: dict[str, Any]) -> None:
    modes, targets = result["modes"], result["targets"]
    print(
        f"OpenAI chat.completions.create overhead: {result['calls']} calls x "
        f"{result['rounds']} round(s) per mode, {result['cpus']} CPUs "
        f"(load average {result['loadavg_1m_at_end']} at the end), "
        f"openai {result['versions']['openai']}, mlflow {result['versions']['mlflow']}"
    )
    print(f"{'mode':<10} {'median us':>10} {'p99 us':>10} {'+median us':>11} {'+p99 us':>10}")
    for mode in ("baseline", "tracewire", "mlflow"):
        m = modes[mode]
        added = (
            ""
            if mode == "baseline"
            else f" {m['added_median_us']:>11.1f} {m['added_p99_us']:>10.1f}"
        )
        print(f"{mode:<10} {m['median_us']:>10.1f} {m['p99_us']:>10.1f}{added}")
    per_run = ", ".join(f"{v:.1f}" for v in modes["baseline"]["median_us_per_run"])
    print(f"baseline median per run (drift check): {per_run} us")
    print()
    for stat, label in (("median", "median"), ("p99", "p99   ")):
        t = targets[stat]
        print(
            f"tracewire/mlflow added {label}: {fmt_ratio(t['ratio'])}  "
            f"(target <= {t['target']:.3f}: {'MET' if t['met'] else 'NOT MET'})"
        )
    print()
    for mode in ("tracewire", "mlflow"):
        for i, run in enumerate(modes[mode]["runs"], 1):
            flush_ok = "" if run["flush_ok"] is None else f", flush returned {run['flush_ok']}"
            print(
                f"{mode:<10} round {i}: persisted {run['persisted']}/{run['of']} measured "
                f"traces (store total incl. warm-up {run['store_total']}); flush took "
                f"{run['flush_s']:.2f} s{flush_ok}; sample trace {run['sample_trace']}"
            )


def call_arguments(description: str) -> argparse.ArgumentParser:
    """A parser with the options every OpenAI-call bench takes: how many calls, how many warm-up."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--calls", type=int, default=2000, help="measured calls per run")
    parser.add_argument("--warmup", type=int, default=200, help="warm-up calls per run")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = call_arguments(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat baseline/tracewire/mlflow this many times, pooled",
    )
    parser.add_argument(
        "--flush-timeout", type=float, default=60.0, help="seconds tracewire.flush() may wait"
    )
    parser.add_argument("--json", action="store_true", help="also print one JSON object")
    return parser.parse_args(argv)


def quiet_logs() -> None:
    """Store creation logs alembic migrations at INFO; keep warnings (e.g. dropped traces)."""
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet_logs()
    client = make_client()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="tracewire-bench-") as tmp:
        root = Path(tmp)
        for r in range(args.rounds):
            runs.append(run_baseline(client, args.calls, args.warmup))
            runs.append(
                run_tracewire(
                    client,
                    fresh_store(root, f"tracewire-{r}"),
                    args.calls,
                    args.warmup,
                    args.flush_timeout,
                )
            )
            runs.append(
                run_mlflow(client, fresh_store(root, f"mlflow-{r}"), args.calls, args.warmup)
            )
        runs.append(run_baseline(client, args.calls, args.warmup))
        mlflow.flush_trace_async_logging(terminate=True)
    result = summarize(runs, args.calls, args.rounds)
    print_report(result)
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
