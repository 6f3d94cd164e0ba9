"""A trace shipped to a tracking server has the same record as one written to a database store.

Into a tracking server a trace of ours goes as spans only: the server makes its record from the
root span's attributes, many traces per request (export/decode.py::_record_in_root_span). A web
request's client request id, which no span attribute carries, rides as the tag
``tracewire.request_id`` and is stamped on afterwards by a ``start_trace`` the server merges.
Into a database store the record is written directly. Here the same calls go both ways (a real
``mlflow server`` on loopback, a sqlite store) and every field a user reads back is compared:
name, tags, session, user, client request id, token usage, previews, state, spans.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlflow
import openai
import pytest
from mlflow import MlflowClient
from mlflow.tracing.constant import SpanAttributeKey

import tracewire
from tests.support.mlflow_server import MlflowServer
from tracewire.core import attributes as keys

MODEL = "gpt-4o-mini"


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    with MlflowServer(tmp_path / "mlflow-server") as server:
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "server-record")
        monkeypatch.setenv("TRACEWIRE_SPOOL_DIR", str(tmp_path / "spool"))
        monkeypatch.setenv("TRACEWIRE_ENVIRONMENT", "staging")
        yield server


def _call(client: openai.OpenAI, model: str, text: str) -> None:
    try:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}])
    except openai.InternalServerError:
        pass  # the error case: the trace records it


def _record(info: Any) -> dict[str, Any]:
    """What a user reads back of a trace, minus what differs by construction (ids, times)."""
    metadata = info.trace_metadata
    return {
        "name": info.tags.get(keys.TRACE_NAME),
        "tags": {k: v for k, v in info.tags.items() if not k.startswith("mlflow.")},
        "session": metadata.get(keys.TRACE_SESSION),
        "user": metadata.get(keys.TRACE_USER),
        "tokens": metadata.get(keys.TRACE_TOKEN_USAGE),
        # MLflow's own (source, model link) and the app's, minus the store's bookkeeping.
        "metadata": {
            k: v
            for k, v in metadata.items()
            if not k.startswith(("mlflow.trace", "mlflow.spans", "mlflow.size"))
        },
        "request_preview": info.request_preview,
        "response_preview": info.response_preview,
        "state": info.state.value,
    }


def _run_calls(
    uri: str, client: openai.OpenAI, monkeypatch: pytest.MonkeyPatch, model_id: str
) -> list[Any]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ACTIVE_MODEL_ID", model_id)  # as a deployment sets it
    tracewire.autolog(tags={"team": "search"})

    def calls() -> None:
        for model in (MODEL, "error-500"):
            with (
                tracewire.context(session_id="s-1", user_id="u-1", tags={"turn": "1"}),
                mlflow.tracing.context(metadata={"app.commit": "abc123"}),
            ):
                _call(client, model, f"{model} no request id")
            with tracewire.context(
                request_id=f"req-{model}", session_id="s-1", user_id="u-1", tags={"turn": "1"}
            ):
                _call(client, model, f"{model} web request")

    try:
        # On a thread of their own, as a deployment's are: MLflow reads the active model from
        # the environment once per thread (this one may have read it before it was set).
        with ThreadPoolExecutor(1) as thread:
            thread.submit(calls).result()
        assert tracewire.flush(60)
    finally:
        tracewire.disable()
    store = MlflowClient(uri)
    experiment = store.get_experiment_by_name("server-record")
    return store.search_traces(locations=[experiment.experiment_id], include_spans=True)


@pytest.mark.timeout(180)
def test_a_server_and_a_database_store_read_back_the_same_records(
    server: MlflowServer, client: openai.OpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same model id both ways (a logged model of the server's store): MLflow links traces
    # to the active model with metadata no span carries.
    model_id = MlflowClient(server.url).create_logged_model(experiment_id="0").model_id
    via_server = _run_calls(server.url, client, monkeypatch, model_id)
    direct = _run_calls(f"sqlite:///{tmp_path / 'direct.db'}", client, monkeypatch, model_id)
    assert len(via_server) == len(direct) == 4

    def by_text(traces: list[Any]) -> dict[str, Any]:
        return {t.data.spans[0].inputs["messages"][-1]["content"]: t for t in traces}

    server_traces, direct_traces = by_text(via_server), by_text(direct)
    assert set(server_traces) == set(direct_traces)
    store = MlflowClient(server.url)
    experiment = store.get_experiment_by_name("server-record")
    for text, reference in direct_traces.items():
        shipped = server_traces[text]
        request_id = f"req-{text.split()[0]}" if text.endswith("web request") else None
        assert reference.info.client_request_id == request_id
        assert shipped.info.client_request_id == request_id  # stamped after the spans
        expected = _record(reference.info)
        assert expected["state"] == ("ERROR" if text.startswith("error") else "OK")
        assert expected["session"] == "s-1" and expected["user"] == "u-1"
        assert expected["tags"] == {
            keys.DEPLOYMENT_ENVIRONMENT: "staging",
            "team": "search",
            "turn": "1",
            **({keys.REQUEST_ID_TAG: request_id} if request_id else {}),
        }
        assert expected["metadata"][keys.MODEL_ID] == model_id
        assert expected["metadata"].get("app.commit") == (None if request_id else "abc123")
        assert _record(shipped.info) == expected
        assert shipped.info.execution_duration > 0
        assert [s.name for s in shipped.data.spans] == [s.name for s in reference.data.spans]
        # It went as spans only: its root span carries the record's session and tags.
        root = shipped.data.spans[0].attributes
        assert root.get(SpanAttributeKey.SESSION_ID) == "s-1"
        if request_id:
            assert root.get(SpanAttributeKey.TRACE_TAG_PREFIX + keys.REQUEST_ID_TAG) == request_id
        assert SpanAttributeKey.SESSION_ID not in reference.data.spans[0].attributes
        # Found by its session and its tags, like any other; a web request by its request id.
        found = store.search_traces(
            locations=[experiment.experiment_id],
            include_spans=False,
            filter_string=f"metadata.`{keys.TRACE_SESSION}` = 's-1' and tags.turn = '1'",
        )
        assert shipped.info.trace_id in {t.info.trace_id for t in found}
        if request_id:
            (by_id,) = store.search_traces(
                locations=[experiment.experiment_id],
                include_spans=False,
                filter_string=f"trace.client_request_id = '{request_id}'",
            )
            assert by_id.info.trace_id == shipped.info.trace_id
