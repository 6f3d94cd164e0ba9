"""What ``tracewire demo`` reads back once its traffic is done: this run's traces (found by the
run's tag), synced into the Delta table and read from it, the stats tables it prints, and why a
failed request failed."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
from typing import Any, TextIO

from tracewire.cli import CLIError

# Set on every trace of a run (through TRACEWIRE_TAGS) to the run's id.
RUN_TAG = "demo.run"


def experiment_id(uri: str) -> str:
    """The id of the experiment the traces went to."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    configured = os.environ.get("MLFLOW_EXPERIMENT_ID", "").strip()
    if configured:
        return configured
    name = os.environ["MLFLOW_EXPERIMENT_NAME"].strip()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise CLIError(f"no experiment named {name!r} in {uri}: no trace reached the store")
    return str(experiment.experiment_id)


def cause(uri: str, run_id: str, request_id: str) -> str | None:
    """Why a request failed, from its trace: the error of the failed span that started last
    (the innermost: the tool, the model call), if the trace is in the store and can be read."""
    from mlflow import MlflowClient

    with contextlib.suppress(Exception):  # the request's failure is the error to report
        traces = MlflowClient(tracking_uri=uri).search_traces(
            locations=[experiment_id(uri)],
            filter_string=f"tag.`{RUN_TAG}` = '{run_id}'",
            max_results=100,
        )
        for trace in traces:
            if trace.info.client_request_id != request_id:
                continue
            failed = [s for s in trace.data.spans if s.status.status_code == "ERROR"]
            if failed:
                return max(failed, key=lambda s: s.start_time_ns).status.description or None
    return None


def sync_and_read(uri: str, delta_path: str, run_id: str, since_ms: int) -> list[dict[str, Any]]:
    """Sync the experiment into the Delta table (what `tracewire export delta` does), then
    read back this run's rows from it (what `tracewire stats --delta` reads)."""
    from tracewire import config
    from tracewire.export import delta
    from tracewire.report import sources

    delta.sync(
        delta_path,
        tracking_uri=uri,
        experiment_ids=[experiment_id(uri)],
        lookback_s=config.resolve().feedback_retention,
    )
    return [
        row
        for row in sources.from_delta(delta_path, since_ms)
        if json.loads(row["tags"] or "{}").get(RUN_TAG) == run_id
    ]


def ui_hint(uri: str) -> str:
    """How to look at the traces in ``uri``."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme in ("http", "https"):
        return f"open {uri} in a browser"
    if scheme == "databricks":
        return "open the experiment in your Databricks workspace"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


def write_summary(
    out: TextIO, rows: list[dict[str, Any]], uri: str, delta_path: str, experiment: str, run_id: str
) -> None:
    """The `tracewire stats` tables of this run's ``rows``, and where to look further."""
    from tracewire.report import aggregate, render

    out.write(
        f"\n`tracewire stats` of this run ({len(rows)} traces, read from the Delta table):\n\n"
    )
    out.writelines(
        render.table(aggregate.aggregate(rows, by), by) + "\n\n" for by in ("route", "session")
    )
    out.write(
        f"Delta table (one row per trace): {delta_path}\n"
        f"  tracewire stats --delta {shlex.quote(delta_path)} --by user\n\n"
        "See the traces in the MLflow UI:\n"
        f"  {ui_hint(uri)}\n"
    )
    if ui_hint(uri).startswith("mlflow ui"):
        out.write("  then open http://127.0.0.1:5000\n")
    out.write(f"  experiment {experiment!r} -> Traces (search: tag.`{RUN_TAG}` = '{run_id}')\n")
    out.flush()
