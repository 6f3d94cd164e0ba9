"""Scale-out: an app's workers sharing a remote ``mlflow server`` whose store is PostgreSQL.

The configuration docs/scale-out.md describes, run for real: a FastAPI app with no tracewire
import under ``tracewire run -- uvicorn --workers 2``, an ``mlflow server`` on a
PostgreSQL database, concurrent traffic with a distinct request id per request, then feedback
through the middleware's route. Every trace must land exactly once, with its own request id,
session and user, and every feedback on the trace of the request it names, as the MLflow API
reads them and as the rows in PostgreSQL hold them; a Delta sync from the server has a row per
request.
"""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import mlflow
from mlflow.tracing.constant import SpansLocation, TraceTagKey

from tests.conftest import API_KEY
from tests.support.mlflow_server import free_port
from tests.support.postgres import PostgresCluster, PostgresMlflowServer
from tests.support.processes import (
    clean_env,
    start_under_tracewire_run,
    stop_group,
    uvicorn_workers,
    wait_answering,
)
from tracewire.export import delta, spool_directory
from tracewire.testing import OpenAIServer

EXPERIMENT = "scale-out"
REQUESTS = 30
CHAT_SPAN = "chat gpt-4o-mini"
SERVER_PAGE = 500  # the most traces an MLflow server returns for one search

# Read, not imported: its OpenAI client wants the key the test gives the workers.
APP = (Path(__file__).parents[2] / "support" / "worker_app.py").read_text()


def _request(i: int) -> dict[str, str]:
    """What request ``i`` sends, and so what its trace must hold."""
    return {
        "id": f"scale-{i:03d}",
        "session": f"session-{i % 5}",
        "user": f"user-{i % 3}",
        "question": f"question {i}",
    }


def _env(tmp_path: Path, openai_server: OpenAIServer, tracking_uri: str) -> dict[str, str]:
    return clean_env(
        **{
            "MLFLOW_TRACKING_URI": tracking_uri,
            "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
            "MLFLOW_MODEL_CATALOG_URI": "",
            "TRACEWIRE_TESTING": "1",  # an internal error in a worker raises instead of hiding
            "TRACEWIRE_SPOOL_DIR": str(tmp_path / "spool"),
            "TRACEWIRE_FEEDBACK_PATH": "/feedback",
            # As behind a gateway that sets them: the users' feedback is bound to these.
            "TRACEWIRE_TRUST_IDENTITY_HEADERS": "session=X-Session-ID,user=X-User-ID",
            # Everything is shipped before the app stops; the bound is for a loaded machine.
            "TRACEWIRE_FLUSH_TIMEOUT": "10",
            "OPENAI_BASE_URL": openai_server.base_url,
            "OPENAI_API_KEY": API_KEY,
        }
    )


def _ask(url: str, i: int) -> tuple[int, int]:
    """Request ``i`` on a new connection (so the kernel spreads them over the workers);
    (its index, the pid of the worker that answered)."""
    sent = _request(i)
    response = httpx.get(
        f"{url}/ask",
        params={"q": sent["question"]},
        timeout=30,
        headers={
            "X-Request-ID": sent["id"],
            "X-Session-ID": sent["session"],
            "X-User-ID": sent["user"],
            "Connection": "close",
        },
    )
    assert response.status_code == 200, response.text
    # The user's result is unchanged, and the request id is echoed.
    assert response.json()["reply"] == f"Echo: {sent['question']}"
    assert response.headers["X-Request-ID"] == sent["id"]
    return i, response.json()["pid"]


def _feedback(url: str, i: int) -> None:
    """Feedback on request ``i`` by its request id; whichever worker takes it, it must reach
    the trace the other worker (or this one) made."""
    sent = _request(i)
    response = httpx.post(
        f"{url}/feedback",
        timeout=30,
        headers={"X-User-ID": sent["user"], "Connection": "close"},
        json={
            "request_id": sent["id"],
            "name": "thumbs",
            "value": i % 2 == 0,
            "rationale": f"feedback on {sent['id']}",
        },
    )
    assert response.status_code == 202, response.text


def _complete(trace: mlflow.entities.Trace) -> bool:
    """Its spans and its feedback are stored. Through a server a trace is written in two
    calls (its record, then its spans), and a reader can see it between them."""
    return trace.info.tags.get(TraceTagKey.SPANS_LOCATION) == SpansLocation.TRACKING_STORE and bool(
        trace.info.assessments
    )


def _stored(
    client: mlflow.MlflowClient, expected: int, deadline: float
) -> list[mlflow.entities.Trace]:
    """The experiment's trace records (no spans) once ``expected`` are complete."""
    found: list[mlflow.entities.Trace] = []
    while time.monotonic() < deadline:
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            found = client.search_traces(
                locations=[experiment.experiment_id], max_results=SERVER_PAGE, include_spans=False
            )
            if len(found) >= expected and all(map(_complete, found)):
                return found
        time.sleep(0.5)
    return found


def _rows(database_uri: str, query: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(database_uri) as connection:
        return connection.execute(query).fetchall()


def test_workers_share_a_postgres_backed_server(
    tmp_path: Path, openai_server: OpenAIServer, postgres: PostgresCluster
) -> None:
    database = postgres.create_database(f"mlflow_{uuid.uuid4().hex[:12]}")
    server = PostgresMlflowServer(tmp_path / "mlflow-server", database)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The app starts first and boots while the server does (MLflow creates its schema in
    # PostgreSQL at start-up): with a tracking server, `tracewire run` does no I/O to it.
    (tmp_path / "scale_app.py").write_text(APP)
    app = start_under_tracewire_run(
        uvicorn_workers("scale_app:app", port), tmp_path, _env(tmp_path, openai_server, server.url)
    )
    answered: dict[int, int] = {}  # request index -> worker pid
    output = ""
    try:
        server.start()
        try:
            wait_answering(url)
            # Concurrent requests, a connection each: both workers busy at once. Should one
            # worker have taken every connection, more follow until the other answers too.
            with ThreadPoolExecutor(4) as pool:
                answered.update(pool.map(lambda i: _ask(url, i), range(REQUESTS)))
                while len(set(answered.values())) < 2 and len(answered) < 200:
                    answered.update([_ask(url, len(answered))])
                # Each process keeps its own spool file (spool-<pid>-<random>.db) while it runs.
                spool_pids = {
                    int(p.name.split("-")[1]) for p in (tmp_path / "spool").glob("spool-*.db")
                }
                # Feedback is taken by either worker, whichever served the request.
                list(pool.map(lambda i: _feedback(url, i), sorted(answered)))
            found = _stored(mlflow.MlflowClient(server.url), len(answered), time.monotonic() + 60)
        finally:
            output = stop_group(app)
            print(output)  # shown by pytest if the test fails, wherever it failed
        workers = set(answered.values())
        assert len(workers) == 2, f"one worker answered all {len(answered)} requests"
        assert workers <= spool_pids, (workers, spool_pids)
        assert len(found) == len(answered), f"{len(found)} of {len(answered)} complete"
        experiment_id = _assert_each_trace_once(server, answered)
        _assert_delta_sync(server, experiment_id, tmp_path / "traces_delta", answered)
    finally:
        stop_group(app)
        server.stop()

    # Nothing left behind: every process's spool shipped, nothing dropped or refused.
    left = [
        (s.path.name, s.pending, s.feedback_pending, s.dropped, s.rejected)
        for s in spool_directory.status(tmp_path / "spool")
    ]
    assert [entry for entry in left if entry[1:] != (0, 0, 0, 0)] == []


def _assert_each_trace_once(server: PostgresMlflowServer, answered: dict[int, int]) -> str:
    """Read after the app stopped, so its exit flush had its chance to write anything twice."""
    client = mlflow.MlflowClient(server.url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    traces = client.search_traces(locations=[experiment.experiment_id], max_results=SERVER_PAGE)
    expected = {_request(i)["id"]: _request(i) | {"index": i} for i in answered}
    by_request = {t.info.client_request_id: t for t in traces}
    assert len(traces) == len(expected) and set(by_request) == set(expected)
    assert len({t.info.trace_id for t in traces}) == len(traces)
    for request_id, trace in by_request.items():
        sent = expected[request_id]
        metadata = trace.info.trace_metadata
        assert (metadata["mlflow.trace.session"], metadata["mlflow.trace.user"]) == (
            sent["session"],
            sent["user"],
        ), request_id
        spans = {s.name: s for s in trace.data.spans}
        assert spans[CHAT_SPAN].parent_id == spans["GET /ask"].span_id
        # The model call in this trace is this request's: no context crossed between requests.
        assert spans[CHAT_SPAN].inputs["messages"][0]["content"] == sent["question"]
        (feedback,) = trace.info.assessments
        assert (feedback.name, feedback.value, feedback.rationale, feedback.source.source_id) == (
            "thumbs",
            sent["index"] % 2 == 0,
            f"feedback on {request_id}",
            sent["user"],
        )

    # The rows themselves, in PostgreSQL: one trace per request id, its two spans in the
    # database (not in an artifact store), one feedback.
    once = {request_id: 1 for request_id in expected}
    assert (
        dict(
            _rows(
                server.backend_store_uri,
                "SELECT client_request_id, COUNT(*) FROM trace_info GROUP BY 1",
            )
        )
        == once
    )
    assert dict(
        _rows(
            server.backend_store_uri,
            "SELECT t.client_request_id, COUNT(s.span_id) FROM trace_info t "
            "LEFT JOIN spans s ON s.trace_id = t.request_id GROUP BY 1",
        )
    ) == {request_id: 2 for request_id in expected}
    assert (
        dict(
            _rows(
                server.backend_store_uri,
                "SELECT t.client_request_id, COUNT(a.assessment_id) FROM trace_info t "
                "LEFT JOIN assessments a ON a.trace_id = t.request_id GROUP BY 1",
            )
        )
        == once
    )
    return experiment.experiment_id


def _assert_delta_sync(
    server: PostgresMlflowServer, experiment_id: str, path: Path, answered: dict[int, int]
) -> None:
    """The Delta sync reads the server through MLflow's REST API: a row per request."""
    from deltalake import DeltaTable

    report = delta.sync(
        str(path), tracking_uri=server.url, experiment_ids=[experiment_id], lookback_s=86400
    )
    assert (report.read, report.written) == (len(answered), len(answered))
    # use_threads=False: Arrow's thread pool can abort the interpreter at exit
    # (docs/delta-and-stats.md, "Reading it").
    table = DeltaTable(str(path)).to_pyarrow_dataset().to_table(use_threads=False).to_pylist()
    assert sorted(
        (r["client_request_id"], r["session"], r["user"], r["feedback_count"]) for r in table
    ) == sorted(
        (_request(i)["id"], _request(i)["session"], _request(i)["user"], 1) for i in answered
    )
