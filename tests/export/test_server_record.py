"""A trace shipped to a tracking server has the same record whichever way it was written.

Into a tracking server, a trace with no client request id goes as spans only (the server makes
its record from the root span's attributes, many traces per request); one with a request id
goes with its own ``start_trace`` request (export/store.py::_record_in_root_span). Here
the same calls go both ways into a real ``mlflow server`` on loopback, and every field a user
reads back is compared: name, tags, session, user, token usage, previews, state, times, spans.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
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
        "request_preview": info.request_preview,
        "response_preview": info.response_preview,
        "state": info.state.value,
    }


@pytest.mark.timeout(180)
def test_spans_only_and_start_trace_records_read_back_the_same(
        server: MlflowServer, client: openai.OpenAI) -> None:
    tracewire.autolog(tags={"team": "search"})
    try:
        for model in (MODEL, "error-500"):
            with tracewire.context(session_id="s-1", user_id="u-1", tags={"turn": "1"}):
                _call(client, model, f"{model} spans-only")
            with tracewire.context(request_id=f"req-{model}", session_id="s-1", user_id="u-1",
                                   tags={"turn": "1"}):
                _call(client, model, f"{model} start-trace")
        assert tracewire.flush(60)
    finally:
        tracewire.disable()

    store = MlflowClient(server.url)
    experiment = store.get_experiment_by_name("server-record")
    traces = store.search_traces(locations=[experiment.experiment_id], include_spans=True)
    assert len(traces) == 4
    by_text = {t.data.spans[0].inputs["messages"][-1]["content"]: t for t in traces}
    for model, state in ((MODEL, "OK"), ("error-500", "ERROR")):
        spans_only = by_text[f"{model} spans-only"]
        with_start = by_text[f"{model} start-trace"]
        assert spans_only.info.client_request_id is None
        # It went as spans only: its root span carries the record's session.
        assert spans_only.data.spans[0].attributes.get(SpanAttributeKey.SESSION_ID) == "s-1"
        assert SpanAttributeKey.SESSION_ID not in with_start.data.spans[0].attributes
        assert with_start.info.client_request_id == f"req-{model}"

        expected = _record(with_start.info)
        assert expected["state"] == state
        assert expected["session"] == "s-1" and expected["user"] == "u-1"
        assert expected["tags"] == {keys.DEPLOYMENT_ENVIRONMENT: "staging", "team": "search",
                                    "turn": "1"}
        got = _record(spans_only.info)
        # The two calls' texts differ in one word (same token counts): previews apart from it.
        for record in (expected, got):
            for preview in ("request_preview", "response_preview"):
                record[preview] = (record[preview] or "").replace(
                    "start-trace", "*").replace("spans-only", "*")
        assert got == expected

        assert spans_only.info.execution_duration > 0
        assert [s.name for s in spans_only.data.spans] == [s.name for s in with_start.data.spans]
        # The trace is found by its session and its tags, like any other.
        found = store.search_traces(
            locations=[experiment.experiment_id], include_spans=False,
            filter_string=f"metadata.`{keys.TRACE_SESSION}` = 's-1' and tags.turn = '1'")
        assert spans_only.info.trace_id in {t.info.trace_id for t in found}
