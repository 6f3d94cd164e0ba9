"""Per-run overhead of tracing a LangGraph agent: tracewire vs MLflow's own LangChain autolog.

What it measures, in one process, on one 3-node graph (plan -> act -> answer, each node one call
of langchain-core's fake chat model reporting token usage; no network, no sleeps):

  (a) baseline   -- the graph untraced;
  (b) tracewire  -- ``tracewire.autolog()``;
  (c) mlflow     -- ``mlflow.langchain.autolog()`` with MLflow's default async exporter (after
                    ``tracewire.disable()`` has given MLflow its own pipeline back);
  (d) hot path   -- ``tracewire.autolog()`` with finished traces dropped instead of exported:
                    what tracing costs the caller's thread alone, without the background
                    export competing for the GIL and the CPU (diagnostic; nothing is stored).

One run is ``graph.invoke(...)``: 7 spans (the graph, 3 nodes, 3 model calls). The modes take
turns for ``--rounds`` rounds and each mode's samples are pooled, so load that comes and goes on
the machine is spread over all modes. From the second round on, the baseline runs with
tracewire's LangChain hook registered but disabled (LangChain cannot unregister it); the
per-round baseline medians show what that costs. Each traced run writes to its own fresh sqlite
store; after it, the pipeline is flushed and the store is read back through MLflow's API to
count the traces persisted, and how many of them are complete (one root and all 7 spans). The
background writers run during the measured runs and compete for the GIL; that cost is part of
the numbers, as in production.

Run:  python bench/langgraph_overhead.py [--runs 1000] [--warmup 100] [--rounds 3] [--json]
(from a checkout without installing: PYTHONPATH=src python bench/langgraph_overhead.py)
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
from pathlib import Path
from typing import Annotated, Any

try:
    import tracewire
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import tracewire

import mlflow
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from mlflow.tracking import MlflowClient
from typing_extensions import TypedDict

from tracewire.export import hooks


class Model(GenericFakeChatModel):
    """langchain-core's fake chat model, answering at once with a fresh message and usage."""

    messages: Any = iter(())

    def _generate(
        self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        return ChatResult(
            generations=[
                ChatGeneration(
                    message=AIMessage(
                        content="Two paperback copies are in stock.",
                        usage_metadata={"input_tokens": 34, "output_tokens": 8, "total_tokens": 42},
                    )
                )
            ]
        )


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def make_graph() -> Any:
    model = Model()

    def node(state: State) -> State:
        return {"messages": [model.invoke(state["messages"])]}

    graph = StateGraph(State)
    for name in ("plan", "act", "answer"):
        graph.add_node(name, node)
    graph.add_edge(START, "plan")
    graph.add_edge("plan", "act")
    graph.add_edge("act", "answer")
    graph.add_edge("answer", END)
    return graph.compile()


INPUT = {"messages": [HumanMessage("Do you have 'The Left Hand of Darkness' in paperback?")]}


def timed_runs(graph: Any, n: int) -> list[float]:
    """Latency of each of ``n`` back-to-back runs, in microseconds."""
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        start = clock()
        graph.invoke(INPUT)
        out.append((clock() - start) / 1000)
    return out


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]  # nearest rank


def use_fresh_store(root: Path, name: str) -> tuple[str, str]:
    directory = root / name
    directory.mkdir()
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    experiment_id = MlflowClient(uri).create_experiment(
        f"bench-{name}", artifact_location=(directory / "artifacts").as_uri()
    )
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    return uri, experiment_id


# One run's spans: the graph, its 3 nodes and their 3 model calls.
SPANS_PER_RUN = 7


def persisted(uri: str, experiment_id: str, since_ms: int) -> tuple[int, int]:
    """(traces started at or after ``since_ms``, of them complete: one root, every span)."""
    client = MlflowClient(uri)
    count = complete = 0
    token = None
    while True:
        page = client.search_traces(
            locations=[experiment_id],
            max_results=500,
            filter_string=f"trace.timestamp_ms >= {since_ms}",
            page_token=token,
        )
        for trace in page:
            count += 1
            roots = [s for s in trace.data.spans if s.parent_id is None]
            complete += len(trace.data.spans) == SPANS_PER_RUN and len(roots) == 1
        token = page.token
        if not token:
            return count, complete


def traced(
    mode: str,
    graph: Any,
    root: Path,
    runs: int,
    warmup: int,
    enable: Callable[[], None],
    flush: Callable[[], Any],
    disable: Callable[[], None],
) -> dict[str, Any]:
    uri, experiment_id = use_fresh_store(root, mode)
    enable()
    try:
        timed_runs(graph, warmup)
        flush()
        time.sleep(0.01)
        since_ms = time.time_ns() // 1_000_000
        samples = timed_runs(graph, runs)
        flush()
    finally:
        disable()
    count, complete = persisted(uri, experiment_id, since_ms)
    return {"samples": samples, "persisted": count, "complete": complete}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="measured graph runs per mode")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up runs per mode")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="repeat baseline/tracewire/mlflow this many times, pooled",
    )
    parser.add_argument("--json", action="store_true", help="also print one JSON object")
    args = parser.parse_args(argv)
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")

    graph = make_graph()
    modes: dict[str, dict[str, Any]] = {
        m: {"samples": [], "rounds": []} for m in ("baseline", "tracewire", "mlflow", "hot path")
    }

    def record(mode: str, data: dict[str, Any]) -> None:
        modes[mode]["samples"].extend(data.pop("samples"))
        modes[mode]["rounds"].append(data)

    with tempfile.TemporaryDirectory(prefix="tracewire-bench-") as tmp:
        root = Path(tmp)
        for r in range(args.rounds):
            timed_runs(graph, args.warmup)
            samples = timed_runs(graph, args.runs)
            record("baseline", {"samples": samples, "median_us": statistics.median(samples)})
            record(
                "tracewire",
                traced(
                    f"tracewire-{r}",
                    graph,
                    root,
                    args.runs,
                    args.warmup,
                    tracewire.autolog,
                    lambda: tracewire.flush(60),
                    tracewire.disable,
                ),
            )
            record(
                "mlflow",
                traced(
                    f"mlflow-{r}",
                    graph,
                    root,
                    args.runs,
                    args.warmup,
                    lambda: mlflow.langchain.autolog(silent=True),
                    mlflow.flush_trace_async_logging,
                    lambda: mlflow.langchain.autolog(disable=True, silent=True),
                ),
            )
            tracewire.autolog()
            export, hooks.bridge.submit = hooks.bridge.submit, lambda item: None
            try:
                timed_runs(graph, args.warmup)
                record("hot path", {"samples": timed_runs(graph, args.runs)})
            finally:
                hooks.bridge.submit = export
                tracewire.disable()
        mlflow.flush_trace_async_logging(terminate=True)

    base = modes["baseline"]["samples"]
    result: dict[str, Any] = {
        "runs": args.runs,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        "versions": {
            "mlflow": mlflow.__version__,
            "langgraph": importlib.metadata.version("langgraph"),
        },
        "modes": {},
    }
    for mode, data in modes.items():
        samples = data.pop("samples")
        result["modes"][mode] = {
            **data,
            "median_us": statistics.median(samples),
            "p99_us": p99(samples),
            "added_median_us": statistics.median(samples) - statistics.median(base),
            "added_p99_us": p99(samples) - p99(base),
        }
    ours, theirs = result["modes"]["tracewire"], result["modes"]["mlflow"]
    for stat in ("median", "p99"):
        added = theirs[f"added_{stat}_us"]
        result[f"{stat}_ratio"] = ours[f"added_{stat}_us"] / added if added > 0 else None

    print(
        f"LangGraph 3-node graph overhead: {args.runs} runs x {args.rounds} round(s) per mode, "
        f"{result['cpus']} CPUs (load average {result['loadavg_1m_at_end']} at the end), "
        f"mlflow {mlflow.__version__}, langgraph {result['versions']['langgraph']}"
    )
    print(f"{'mode':<10} {'median us':>10} {'p99 us':>10} {'+median us':>11} {'+p99 us':>10}")
    for mode, m in result["modes"].items():
        print(
            f"{mode:<10} {m['median_us']:>10.1f} {m['p99_us']:>10.1f} "
            f"{m['added_median_us']:>11.1f} {m['added_p99_us']:>10.1f}"
        )
    for stat in ("median", "p99"):
        ratio = result[f"{stat}_ratio"]
        print(f"tracewire/mlflow added {stat}: {'n/a' if ratio is None else f'{ratio:.3f}'}")
    drift = ", ".join(f"{r['median_us']:.0f}" for r in result["modes"]["baseline"]["rounds"])
    print(
        f"baseline median per round (drift check; rounds after the first run with tracewire's "
        f"inert hook registered): {drift} us"
    )
    for mode in ("tracewire", "mlflow"):
        kept = ", ".join(
            f"{r['persisted']} ({r['complete']} complete)" for r in result["modes"][mode]["rounds"]
        )
        print(f"{mode}: traces persisted of {args.runs} per round: {kept}")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
