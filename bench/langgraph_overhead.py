"""Per-run overhead of tracing a LangGraph agent: tracewire vs MLflow's own LangChain autolog.

What it measures, in one process, on one 3-node graph (plan -> act -> answer, each node one call
of langchain-core's fake chat model reporting token usage; no network, no sleeps):

  (a) baseline   -- the graph untraced, before anything of tracewire is enabled;
  (b) tracewire  -- ``tracewire.autolog()``;
  (c) mlflow     -- ``mlflow.langchain.autolog()`` with MLflow's default async exporter (after
                    ``tracewire.disable()`` has given MLflow its own pipeline back);
  (d) disabled   -- the graph untraced again, after ``tracewire.disable()`` (measured before
                    MLflow's mode): LangChain cannot unregister tracewire's callback hook, so
                    this shows what the hook left behind costs (it adds no handler then).

One run is ``graph.invoke(...)``: about 10 LangChain runs (graph, 3 nodes, their models and
writes), so each mode records about 10 spans per run. Each traced mode writes to its own fresh
sqlite store; after it, the pipeline is flushed and the store is read back through MLflow's API
to count the traces persisted. The background writers run during the measured runs and compete
for the GIL; that cost is part of the numbers, as in production.

Run:  python bench/langgraph_overhead.py [--runs 1000] [--warmup 100] [--json]
(from a checkout without installing: PYTHONPATH=src python bench/langgraph_overhead.py)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable

try:
    import tracewire
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import tracewire

import importlib.metadata
import mlflow
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from mlflow.tracking import MlflowClient
from typing_extensions import TypedDict


class Model(GenericFakeChatModel):
    """langchain-core's fake chat model, answering at once with a fresh message and usage."""

    messages: Any = iter(())

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=AIMessage(
            content="Two paperback copies are in stock.",
            usage_metadata={"input_tokens": 34, "output_tokens": 8, "total_tokens": 42}))])


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
        f"bench-{name}", artifact_location=(directory / "artifacts").as_uri())
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    return uri, experiment_id


def persisted(uri: str, experiment_id: str, since_ms: int) -> tuple[int, int | None]:
    """(traces started at or after ``since_ms``, spans in one of them)."""
    client = MlflowClient(uri)
    count, token, spans = 0, None, None
    while True:
        page = client.search_traces(locations=[experiment_id], max_results=1000,
                                    include_spans=False, page_token=token)
        count += sum(t.info.request_time >= since_ms for t in page)
        token = page.token
        if not token:
            break
    sample = client.search_traces(locations=[experiment_id], max_results=1,
                                  filter_string=f"trace.timestamp_ms >= {since_ms}")
    if sample:
        spans = len(sample[0].data.spans)
    return count, spans


def traced(mode: str, graph: Any, root: Path, runs: int, warmup: int,
           enable: Callable[[], None], flush: Callable[[], Any],
           disable: Callable[[], None]) -> dict[str, Any]:
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
    count, spans = persisted(uri, experiment_id, since_ms)
    return {"samples": samples, "persisted": count, "spans_per_trace": spans}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="measured graph runs per mode")
    parser.add_argument("--warmup", type=int, default=100, help="warm-up runs per mode")
    parser.add_argument("--json", action="store_true", help="also print one JSON object")
    args = parser.parse_args(argv)
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")

    graph = make_graph()
    modes: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="tracewire-bench-") as tmp:
        root = Path(tmp)
        timed_runs(graph, args.warmup)
        modes["baseline"] = {"samples": timed_runs(graph, args.runs)}
        modes["tracewire"] = traced("tracewire", graph, root, args.runs, args.warmup,
                                    tracewire.autolog, lambda: tracewire.flush(60),
                                    tracewire.disable)
        timed_runs(graph, args.warmup)
        modes["disabled"] = {"samples": timed_runs(graph, args.runs)}
        modes["mlflow"] = traced(
            "mlflow", graph, root, args.runs, args.warmup,
            lambda: mlflow.langchain.autolog(silent=True), mlflow.flush_trace_async_logging,
            lambda: mlflow.langchain.autolog(disable=True, silent=True))
        mlflow.flush_trace_async_logging(terminate=True)

    base = modes["baseline"]["samples"]
    result: dict[str, Any] = {"runs": args.runs, "cpus": os.cpu_count(),
                              "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
                              "versions": {"mlflow": mlflow.__version__,
                                           "langgraph": importlib.metadata.version("langgraph")},
                              "modes": {}}
    for mode, data in modes.items():
        samples = data.pop("samples")
        result["modes"][mode] = {
            **data, "median_us": statistics.median(samples), "p99_us": p99(samples),
            "added_median_us": statistics.median(samples) - statistics.median(base),
            "added_p99_us": p99(samples) - p99(base)}
    ours, theirs = result["modes"]["tracewire"], result["modes"]["mlflow"]
    for stat in ("median", "p99"):
        added = theirs[f"added_{stat}_us"]
        result[f"{stat}_ratio"] = ours[f"added_{stat}_us"] / added if added > 0 else None

    print(f"LangGraph 3-node graph overhead: {args.runs} runs per mode, {result['cpus']} CPUs "
          f"(load average {result['loadavg_1m_at_end']} at the end), "
          f"mlflow {mlflow.__version__}, langgraph {result['versions']['langgraph']}")
    print(f"{'mode':<11} {'median us':>10} {'p99 us':>10} {'+median us':>11} {'+p99 us':>10}"
          f"  persisted (spans/trace)")
    for mode, m in result["modes"].items():
        kept = f"  {m['persisted']}/{args.runs} ({m['spans_per_trace']})" if "persisted" in m \
            else ""
        print(f"{mode:<11} {m['median_us']:>10.1f} {m['p99_us']:>10.1f} "
              f"{m['added_median_us']:>11.1f} {m['added_p99_us']:>10.1f}{kept}")
    for stat in ("median", "p99"):
        ratio = result[f"{stat}_ratio"]
        print(f"tracewire/mlflow added {stat}: {'n/a' if ratio is None else f'{ratio:.3f}'}")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
