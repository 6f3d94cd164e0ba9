"""A trace the tracking store refuses (a 4xx: it cannot succeed as it is) is set aside in the
spool, counted and reported, instead of holding up every trace behind it; once its cause is
fixed, ``tracewire spool replay`` sends it again."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from pathlib import Path

import mlflow
from mlflow.entities import TraceInfo, TraceLocation, TraceState

from tests.support.spool_cli import spool_command, spool_status
from tracewire import config
from tracewire.core import span_context
from tracewire.export import destination, encode, hooks, shipper
from tracewire.export import spool_directory as spool
from tracewire.export.spool import Spool


def _encoded(text: str, settings: config.Settings) -> tuple[str, bytes]:
    span = span_context.start_span("chat gpt-4o-mini", "CHAT_MODEL", inputs={"text": text})
    span.end()
    return encode.encode(hooks.Item(ours=span.trace), settings)


def _in_experiment(payload: bytes, experiment_id: str) -> bytes:
    """The same trace as MLflow's own record would spool it: naming its experiment."""
    data = json.loads(payload)
    head = data.pop("head")
    data["head"] = None
    data["info"] = TraceInfo(
        trace_id=head["trace_id"],
        trace_location=TraceLocation.from_experiment_id(experiment_id),
        request_time=head["request_time"],
        execution_duration=head["execution_duration"],
        state=TraceState(head["state"]),
        trace_metadata={},
        tags={"mlflow.traceName": head["name"]},
    ).to_dict()
    return json.dumps(data).encode()


def _ship_all(directory: Path, source: Spool) -> None:
    worker = shipper.Shipper(directory, 10**8, shipper.store_for)
    worker.start()
    worker.take_on(source.path)
    deadline = time.monotonic() + 30
    while source.pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.stop(1)
    assert source.pending() == 0, "the shipper did not get past the refused trace"


def _texts(client: mlflow.MlflowClient, experiment_id: str) -> list[str]:
    found = client.search_traces(locations=[experiment_id], max_results=100)
    return sorted(
        json.loads(t.data.spans[0].to_dict()["attributes"]["mlflow.spanInputs"])["text"]
        for t in found
    )


def test_a_refused_trace_is_set_aside_the_rest_ship_and_replay_sends_it(
    tmp_path: Path, tracking_uri: str
) -> None:
    client = mlflow.MlflowClient(tracking_uri)
    kept = client.create_experiment(f"kept-{uuid.uuid4().hex[:8]}")
    gone = client.create_experiment(f"gone-{uuid.uuid4().hex[:8]}")
    client.delete_experiment(gone)  # the store refuses new traces in it
    settings = dataclasses.replace(config.resolve(), tracking_uri=tracking_uri, experiment_id=kept)
    source = Spool.create(tmp_path, 10**8, destination.destination(settings))
    for i in range(5):
        trace_id, payload = _encoded(f"call {i}", settings)
        source.put(trace_id, _in_experiment(payload, gone) if i == 2 else payload)

    _ship_all(tmp_path, source)

    assert _texts(client, kept) == ["call 0", "call 1", "call 3", "call 4"]
    (status,) = spool_status(tmp_path)["spools"]
    assert (status["pending"], status["rejected"], status["dropped"]) == (0, 1, 0)

    client.restore_experiment(gone)
    replay = spool_command("replay", tmp_path)
    assert replay.returncode == 0 and "1 refused trace(s) queued again" in replay.stdout
    assert source.pending() == 1
    _ship_all(tmp_path, source)
    assert _texts(client, gone) == ["call 2"]
    assert spool_status(tmp_path)["spools"][0]["rejected"] == 0
    source.close()
    assert spool.status(tmp_path) == [], "an empty spool is removed when its process stops"


def test_a_span_name_longer_than_the_store_takes_is_cut_not_refused(
    tmp_path: Path, tracking_uri: str
) -> None:
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.create_experiment(f"long-{uuid.uuid4().hex[:8]}")
    settings = dataclasses.replace(
        config.resolve(), tracking_uri=tracking_uri, experiment_id=experiment
    )
    source = Spool.create(tmp_path, 10**8, destination.destination(settings))
    span = span_context.start_span("x" * 10_000, "CHAIN", inputs={"text": "long name"})
    span.end()
    source.put(*encode.encode(hooks.Item(ours=span.trace), settings))

    _ship_all(tmp_path, source)

    (trace,) = client.search_traces(locations=[experiment], max_results=10)
    assert trace.data.spans[0].name == "x" * 10_000  # the span keeps its name
    assert 0 < len(trace.info.tags["mlflow.traceName"]) <= 4096
    assert spool_status(tmp_path)["spools"][0]["rejected"] == 0
    source.close()
