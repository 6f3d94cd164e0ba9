"""Delta sync throughput: traces per second from the sqlite tracking store into a local Delta
table, end to end and per stage.

What it measures, in one process run:

  0. Setup   -- ``--traces`` two-span web-request traces (a root span with route, status and time
                to first byte; a chat span with token usage and a model) written into a fresh
                sqlite store through tracewire's store writer (``tracewire.testing.traces``), in
                batches of 1,000. Its rate is printed too: it is MLflow's SQL store writing.
  1. End to end -- ``export.delta.sync`` into a fresh table (read records, fetch spans, build
                rows, merge page by page with the progress mark in each commit), as
                ``tracewire export delta`` runs it. Target: >= 1,000 traces/s.
  2. Stages  -- the same pages again, timed apart: the record pages (no spans), the span fetch,
                building rows, and the write stage alone (``export.delta.write``: the merge of
                pre-built rows into a fresh table, in the sync's pages of 1,000 and as one
                merge). Target for the write stage: >= 10,000 traces/s.
  3. Re-sync -- the same sync again over an unchanged store (every trace compared, none
                written): what the background sync costs each interval over its look-back
                window.

Everything lives in one temporary directory, removed at exit. Other work on the machine moves
the absolute numbers: the load average is printed with them.

Run:  python bench/delta_sync.py [--traces 10000] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_MODEL_CATALOG_URI", "")  # no network: MLflow's built-in prices
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

END_TO_END_TARGET = 1_000
WRITE_TARGET = 10_000


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


def run(traces: int, directory: Path) -> dict[str, Any]:
    import mlflow
    from mlflow.tracing.client import TracingClient

    from tracewire.export import delta, trace_rows
    from tracewire.testing.traces import Synthetic, write

    uri = f"sqlite:///{directory / 'mlflow.db'}"
    experiment = mlflow.MlflowClient(uri).create_experiment("delta-bench")
    start = int(time.time() * 1000) - traces * 1000
    synthetic = [
        Synthetic(
            otel_trace_id=i + 1,
            request_time_ms=start + i * 1000,
            duration_ms=100 + i % 400,
            ttfb_ms=5.0 + i % 50,
            session=f"s{i % 97}",
            user=f"u{i % 31}",
        )
        for i in range(traces)
    ]
    result: dict[str, Any] = {"traces": traces, "loadavg_start": loadavg()}
    _, result["setup_s"] = timed(write, synthetic, uri, experiment, batch=1000)

    report, seconds = timed(
        delta.sync,
        str(directory / "e2e"),
        tracking_uri=uri,
        experiment_ids=[experiment],
        lookback_s=0,
    )
    assert report.written == traces, report
    result["end_to_end_s"] = seconds

    client = TracingClient(uri)
    pages, result["records_s"] = timed(
        lambda: list(
            delta._regrouped(
                delta.trace_records(client, [experiment], 0, delta.SEARCH_PAGE), delta.COMMIT_SIZE
            )
        )
    )
    full, result["spans_s"] = timed(
        lambda: [delta.with_spans(client, [i.trace_id for i in page]) for page in pages]
    )
    rows, result["rows_s"] = timed(lambda: [[trace_rows.row(t) for t in page] for page in full])

    table = delta._open_table(str(directory / "paged"), None)
    _, result["write_paged_s"] = timed(
        lambda: [delta.write(table, page, "bench", i) for i, page in enumerate(rows)]
    )
    table = delta._open_table(str(directory / "one"), None)
    _, result["write_one_s"] = timed(
        delta.write, table, [r for page in rows for r in page], "bench", 1
    )

    report, result["resync_s"] = timed(
        delta.sync,
        str(directory / "e2e"),
        tracking_uri=uri,
        experiment_ids=[experiment],
        lookback_s=traces,
    )
    assert (report.read, report.written) == (traces, 0), report
    result["loadavg_end"] = loadavg()
    for key in [k for k in result if k.endswith("_s")]:
        result[key.removesuffix("_s") + "_per_s"] = traces / result[key]
    return result


def show(r: dict[str, Any]) -> None:
    def line(label: str, key: str, target: int | None = None) -> None:
        rate = r[f"{key}_per_s"]
        goal = (
            (
                f"  {rate / target:.2f}x the {target:,}/s target "
                f"({'met' if rate >= target else 'MISSED'})"
            )
            if target
            else ""
        )
        print(f"  {label:<34} {r[f'{key}_s']:>7.2f} s {rate:>10,.0f} traces/s{goal}")

    print(
        f"Delta sync: {r['traces']:,} two-span traces, sqlite store -> local Delta table; "
        f"load average {'/'.join(map(str, r['loadavg_start']))} at the start, "
        f"{'/'.join(map(str, r['loadavg_end']))} at the end"
    )
    line("0. setup: MLflow SQL store writes", "setup")
    line("1. end to end (export delta)", "end_to_end", END_TO_END_TARGET)
    print("2. stages")
    line("   record pages (no spans)", "records")
    line("   span fetch", "spans")
    line("   rows", "rows")
    line("   write stage, pages of 1,000", "write_paged", WRITE_TARGET)
    line("   write stage, one merge", "write_one", WRITE_TARGET)
    line("3. re-sync, nothing changed", "resync")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=10_000)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="tracewire-delta-bench-"))
    try:
        result = run(args.traces, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(result)) if args.json else show(result)


if __name__ == "__main__":
    main()
