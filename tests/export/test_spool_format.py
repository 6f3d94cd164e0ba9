"""The spool's payload: what the app writes (version 3, raw), what an older tracewire wrote
(version 2, the same with an int trace id; version 1, MLflow's span records) all reach the store
as the same trace.

The app's worker writes our spans as captured (values serialized once, no MLflow record); the
shipper builds MLflow's records from them: the root's lifted inputs and outputs, the previews,
prices. A spool file of format 1 left by a dead process of an older tracewire is adopted and
shipped as before.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import time
from pathlib import Path

from mlflow import MlflowClient

from tracewire import config
from tracewire.core import attributes as keys
from tracewire.core import cost, span_context
from tracewire.export import destination, encode, hooks, shipper, spool, spool_format
from tracewire.testing import traces


def _conversation(question: str) -> hooks.Item:
    """A web request's root (no values of its own) over one chat call, as LangChain records it."""
    root = span_context.start_span("POST /chat", "CHAIN")
    chat = span_context.start_span(
        "chat",
        "CHAT_MODEL",
        inputs={"messages": [{"type": "human", "content": question}]},
        parent=root,
        attributes={
            keys.LLM_MODEL: "my-finetune",
            keys.LLM_PROVIDER: "openai",
            keys.CHAT_USAGE: {keys.INPUT_TOKENS: 10, keys.OUTPUT_TOKENS: 2, keys.TOTAL_TOKENS: 12},
        },
    )
    chat.outputs = {"messages": [{"type": "ai", "content": "Paris."}]}
    chat.end()
    root.end()
    return hooks.Item(ours=root.trace)


def test_the_app_spools_raw_spans_and_the_shipper_builds_the_records_beside_an_old_spool(
    tmp_path: Path, tracking_uri: str
) -> None:
    experiment = MlflowClient(tracking_uri).create_experiment(
        f"format-{os.getpid()}-{time.time_ns()}"
    )
    settings = dataclasses.replace(
        config.resolve(),
        tracking_uri=tracking_uri,
        experiment_id=experiment,
        prices=cost.load({"my-finetune": {"input": 1e-06, "output": 2e-06}}),
    )
    where = destination.destination(settings)

    # What an older tracewire left: a spool of format 1 whose process died.
    old_trace = traces.Synthetic(
        otel_trace_id=0xA1, request_time_ms=1_700_000_000_000, duration_ms=5, route="/old"
    )
    old = spool.Spool.create(tmp_path, 10**8, where)
    old.put(old_trace.trace_id, traces.payload(old_trace))
    db = sqlite3.connect(old.path)
    db.execute("UPDATE meta SET value = '1' WHERE key = 'format_version'")
    db.commit()
    db.close()
    old.close()

    own = spool.Spool.create(tmp_path, 10**8, where)
    trace_id, payload = encode.encode(_conversation("Capital of France?"), settings)
    data = json.loads(payload)
    assert data["v"] == 3 and spool_format.FORMAT_VERSION == 3
    # Version 2, as an older tracewire of format 2 wrote it: the OpenTelemetry id as an int.
    v2_id, v2_payload = encode.encode(_conversation("Capital of Italy?"), settings)
    v2 = json.loads(v2_payload)
    v2["v"], v2["groups"][0][1] = 2, int(v2["groups"][0][1], 16)
    own.put(v2_id, json.dumps(v2).encode())
    raw_chat = data["groups"][0][2][1]
    # Values as plain JSON, not MLflow's attribute text; no MLflow record built in the app.
    assert raw_chat["inputs"] == {"messages": [{"type": "human", "content": "Capital of France?"}]}
    assert raw_chat["attributes"][keys.CHAT_USAGE][keys.INPUT_TOKENS] == 10
    assert "previews" not in data["head"] and keys.LLM_COST not in raw_chat["attributes"]
    own.put(trace_id, payload)

    worker = shipper.Shipper(tmp_path, 10**8, shipper.store_for)
    worker.start()
    worker.take_on(own.path)
    client = MlflowClient(tracking_uri)
    deadline = time.monotonic() + 60
    found: list = []
    while len(found) < 3 and time.monotonic() < deadline:  # the old spool is adopted too
        time.sleep(0.1)
        found = client.search_traces(locations=[experiment], max_results=10)
    worker.stop(1)
    own.close()
    by_id = {t.info.trace_id: t for t in found}
    assert set(by_id) == {trace_id, v2_id, old_trace.trace_id}
    assert by_id[v2_id].info.response_preview == "Paris."
    assert {s.name for s in by_id[v2_id].data.spans} == {"POST /chat", "chat"}

    mine = by_id[trace_id]
    root = next(s for s in mine.data.spans if s.parent_id is None)
    chat = next(s for s in mine.data.spans if s.parent_id is not None)
    assert root.inputs == chat.inputs  # the request's root took the conversation's values
    assert chat.outputs == {"messages": [{"type": "ai", "content": "Paris."}]}
    assert mine.info.request_preview == "Capital of France?"  # LangChain's messages as chat
    assert mine.info.response_preview == "Paris."
    assert chat.attributes[keys.LLM_COST][keys.TOTAL_COST] == 10 * 1e-06 + 2 * 2e-06
    assert json.loads(mine.info.trace_metadata[keys.TRACE_TOKEN_USAGE])["total_tokens"] == 12

    older = by_id[old_trace.trace_id]
    assert {s.name for s in older.data.spans} == {"POST /old", "chat"}
    assert not list(tmp_path.glob("spool-*.db"))  # both shipped and removed
