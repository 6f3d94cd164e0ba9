"""Delta table sync: traces from the real sqlite MLflow store into a real Delta table in a temp
dir, read back with deltalake and with DuckDB (through deltalake's Arrow dataset: DuckDB's own
delta extension downloads at run time). Crash-in-the-middle resume with a SIGKILLed sync
process, feedback merged into the existing row, a 10,000-trace backfill, the CLI and the
background sync of ``autolog(delta_path=...)``."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import duckdb
import mlflow
import openai
import pytest
from deltalake import DeltaTable

import tracewire
from tests.conftest import Traced
from tests.support.store import new_experiment, synthetic
from tracewire.cli import main
from tracewire.export import delta
from tracewire.testing import OpenAIServer
from tracewire.testing.traces import Synthetic, write

HOUR_MS = 3_600_000


def read(path: Path, columns: list[str] | None = None):  # type: ignore[no-untyped-def]
    # Without Arrow's thread pool: with it, the interpreter can abort at exit (trace_rows.read).
    return DeltaTable(str(path)).to_pyarrow_dataset().to_table(columns=columns, use_threads=False)


def rows(path: Path) -> list[dict]:
    return read(path).sort_by("trace_id").to_pylist()


def sync(path: Path, uri: str, experiment: str, **options: object) -> delta.SyncReport:
    lookback = options.pop("lookback_s", 86_400)
    return delta.sync(
        str(path), tracking_uri=uri, experiment_ids=[experiment], lookback_s=lookback, **options
    )  # type: ignore[arg-type]


def test_rows_read_back_with_deltalake_and_duckdb(tracking_uri: str, tmp_path: Path) -> None:
    experiment = new_experiment(tracking_uri)
    day = (int(time.time() * 1000) // 86_400_000 - 2) * 86_400_000  # midnight UTC, 2 days ago
    base = uuid.uuid4().int >> 64  # trace ids unique in the suite's shared store
    traces = [
        Synthetic(
            otel_trace_id=base + 1,
            request_time_ms=day + HOUR_MS,
            duration_ms=250,
            route="/chat/{room}",
            status=200,
            ttfb_ms=31.5,
            session="s-1",
            user="u-1",
            request_id="req-1",
            input_tokens=1000,
            output_tokens=100,
            tags={"deployment.environment": "prod", "team": "search"},
        ),
        Synthetic(
            otel_trace_id=base + 2,
            request_time_ms=day + 86_400_000 + HOUR_MS,
            duration_ms=90,
            route="/chat/{room}",
            status=500,
            error="RuntimeError: upstream down",
            model="my-private-model",
        ),
    ]
    write(traces, tracking_uri, experiment)

    report = sync(tmp_path / "t", tracking_uri, experiment)
    assert (report.read, report.written) == (2, 2)
    first, second = rows(tmp_path / "t")
    assert first["trace_id"] == traces[0].trace_id
    assert first["client_request_id"] == "req-1"
    assert first["request_time"].timestamp() * 1000 == day + HOUR_MS
    assert str(first["request_date"]) == time.strftime("%Y-%m-%d", time.gmtime(day / 1000))
    assert (first["state"], first["execution_duration_ms"]) == ("OK", 250)
    assert (first["session"], first["user"], first["environment"]) == ("s-1", "u-1", "prod")
    assert json.loads(first["tags"]) == {"deployment.environment": "prod", "team": "search"}
    assert (first["route"], first["http_status"], first["time_to_first_byte_ms"]) == (
        "/chat/{room}",
        200,
        31.5,
    )
    assert (first["input_tokens"], first["output_tokens"], first["total_tokens"]) == (
        1000,
        100,
        1100,
    )
    assert first["models"] == ["gpt-4o-mini"]
    # Priced by MLflow's store when it saved the spans (its built-in catalog).
    from mlflow.tracing.utils import calculate_cost_by_model_and_token_usage

    expected = calculate_cost_by_model_and_token_usage(
        "gpt-4o-mini", {"input_tokens": 1000, "output_tokens": 100}, "openai"
    )
    assert first["total_cost_usd"] == pytest.approx(expected["total_cost"], rel=1e-12)
    assert first["input_cost_usd"] == pytest.approx(expected["input_cost"], rel=1e-12)
    assert first["error_message"] is None
    assert [s["name"] for s in json.loads(first["spans"])] == ["POST /chat/{room}", "chat"]

    assert (second["state"], second["http_status"]) == ("ERROR", 500)
    assert second["error_message"] == "RuntimeError: upstream down"
    assert second["total_cost_usd"] is None  # unknown model: no cost
    assert second["request_date"] != first["request_date"]

    table = DeltaTable(str(tmp_path / "t"))
    assert table.metadata().partition_columns == ["request_date"]
    assert {p["request_date"] for p in table.partitions()} == {
        str(first["request_date"]),
        str(second["request_date"]),
    }

    con = duckdb.connect()
    found = (
        con.from_arrow(table.to_pyarrow_dataset())
        .filter("http_status = 500")
        .project("trace_id, error_message")
        .fetchall()
    )
    assert found == [(traces[1].trace_id, "RuntimeError: upstream down")]
    con.register("traces", table.to_pyarrow_dataset())
    assert con.sql("SELECT count(*), sum(total_tokens) FROM traces").fetchall() == [(2, 1220)]

    again = sync(tmp_path / "t", tracking_uri, experiment)
    assert (again.read, again.written) == (2, 0)
    assert DeltaTable(str(tmp_path / "t")).version() == table.version()  # nothing committed


def test_feedback_added_later_updates_the_row(tracking_uri: str, tmp_path: Path) -> None:
    experiment = new_experiment(tracking_uri)
    traces = synthetic(3, int(time.time() * 1000) - HOUR_MS)
    write(traces, tracking_uri, experiment)
    sync(tmp_path / "t", tracking_uri, experiment)
    before = {r["trace_id"]: r for r in rows(tmp_path / "t")}
    assert before[traces[1].trace_id]["feedback_count"] == 0

    mlflow.log_feedback(trace_id=traces[1].trace_id, name="thumbs", value=True)
    mlflow.log_feedback(trace_id=traces[1].trace_id, name="score", value=-1)
    report = sync(tmp_path / "t", tracking_uri, experiment)
    assert (report.read, report.written) == (3, 1)  # only the changed trace is rewritten
    after = {r["trace_id"]: r for r in rows(tmp_path / "t")}
    assert len(after) == 3
    row = after[traces[1].trace_id]
    assert (row["feedback_count"], row["feedback_positive"]) == (2, 1)
    assert sorted(a["name"] for a in json.loads(row["assessments"])) == ["score", "thumbs"]
    assert row["assessments_hash"] != before[traces[1].trace_id]["assessments_hash"]
    assert after[traces[0].trace_id] == before[traces[0].trace_id]

    # An edit (new value, new last-update time) changes the hash too.
    stored = mlflow.get_trace(traces[1].trace_id).info.assessments
    thumbs = next(a for a in stored if a.name == "thumbs")
    mlflow.update_assessment(
        trace_id=traces[1].trace_id,
        assessment_id=thumbs.assessment_id,
        assessment=mlflow.entities.Feedback(name="thumbs", value=False),
    )
    assert sync(tmp_path / "t", tracking_uri, experiment).written == 1
    row = {r["trace_id"]: r for r in rows(tmp_path / "t")}[traces[1].trace_id]
    assert (row["feedback_count"], row["feedback_positive"]) == (2, 0)


def test_late_trace_inside_the_lookback_window_arrives(tracking_uri: str, tmp_path: Path) -> None:
    experiment = new_experiment(tracking_uri)
    now = int(time.time() * 1000)
    write(synthetic(2, now - 60_000), tracking_uri, experiment)
    sync(tmp_path / "t", tracking_uri, experiment, lookback_s=3600)
    # Replayed from a spool after an outage: stored now, stamped 30 minutes ago.
    late = synthetic(1, now - 30 * 60_000)
    write(late, tracking_uri, experiment)
    report = sync(tmp_path / "t", tracking_uri, experiment, lookback_s=3600)
    assert report.written == 1
    assert late[0].trace_id in {r["trace_id"] for r in rows(tmp_path / "t")}


def test_burst_in_one_millisecond_larger_than_a_page(tracking_uri: str, tmp_path: Path) -> None:
    experiment = new_experiment(tracking_uri)
    now = int(time.time() * 1000) - 60_000
    burst = [dataclasses.replace(t, request_time_ms=now) for t in synthetic(25, now)]
    after = synthetic(3, now + 1)
    write(burst + after, tracking_uri, experiment)
    report = sync(tmp_path / "t", tracking_uri, experiment, page_size=10)
    assert (report.read, report.written) == (28, 28)
    assert sorted(r["trace_id"] for r in rows(tmp_path / "t")) == sorted(
        t.trace_id for t in burst + after
    )


# --------------------------------------------------------------------------- 10,000 traces


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, list[str]]]:
    """10,000 traces in a store of their own, written through tracewire's store writer in
    batches (about 50 s here: MLflow's SQL store takes ~5 ms a trace)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('big') / 'mlflow.db'}"
    experiment = new_experiment(uri)
    traces = synthetic(10_000, int(time.time() * 1000) - 20_000_000, session="s", user="u")
    write(traces, uri, experiment, batch=1000)
    yield uri, experiment, [t.trace_id for t in traces]


CHILD = textwrap.dedent("""
    import sys
    from tracewire.export import delta

    merge = delta.write

    def announced(table, rows, *args):  # the parent kills us while this merge runs
        print(len(rows), flush=True)
        return merge(table, rows, *args)

    delta.write = announced
    delta.sync(sys.argv[1], tracking_uri=sys.argv[2], experiment_ids=[sys.argv[3]],
               lookback_s=0, page_size=250)
""")


def test_sync_killed_mid_merge_resumes_without_duplicates_or_gaps(
    big_store: tuple[str, str, list[str]], tmp_path: Path
) -> None:
    uri, experiment, ids = big_store
    path = tmp_path / "t"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), uri, experiment], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        pages: list[int] = []  # rows per merge
        for line in child.stdout:
            pages.append(int(line))
            if len(pages) == 12:  # eleven pages committed, the twelfth being merged
                break
        time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        child.kill()
    killed_at = DeltaTable(str(path))
    committed = read(path, ["trace_id"]).num_rows
    assert committed in (sum(pages[:11]), sum(pages))  # whole pages only, either side of the commit
    mark = killed_at.transaction_version(delta.app_id(uri, [experiment]))
    assert mark is not None

    report = sync(path, uri, experiment, lookback_s=0, page_size=250)
    assert report.read <= 10_000 - committed + 1  # resumed at the recorded mark
    stored = read(path, ["trace_id"]).column("trace_id").to_pylist()
    assert len(stored) == 10_000 and sorted(stored) == sorted(ids)


def test_two_syncs_into_one_table_at_once(
    big_store: tuple[str, str, list[str]], tmp_path: Path
) -> None:
    uri, experiment, ids = big_store
    path = tmp_path / "t"
    delta.sync(
        str(path),
        tracking_uri=uri,
        experiment_ids=[experiment],
        lookback_s=0,
        since_ms=int(time.time() * 1000) + 86_400_000,
    )  # creates the table, reads nothing
    script = textwrap.dedent("""
        import sys
        from tracewire.export import delta
        report = delta.sync(sys.argv[1], tracking_uri=sys.argv[2], experiment_ids=[sys.argv[3]],
                            lookback_s=0, since_ms=int(sys.argv[4]), page_size=250)
        print(report.read)
    """)
    # The newest 3,000 traces: enough pages for the two to collide, in a few seconds.
    since = mlflow.MlflowClient(uri).get_trace(ids[7000]).info.request_time
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(path), uri, experiment, str(since)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [child.communicate(timeout=120)[0] for child in children]
    assert [child.returncode for child in children] == [0, 0]
    assert [int(out) for out in outputs] == [3000, 3000]
    stored = read(path, ["trace_id"]).column("trace_id").to_pylist()
    assert len(stored) == 3000 and sorted(stored) == sorted(ids[7000:])


def test_backfill_of_10000_traces(
    big_store: tuple[str, str, list[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    uri, experiment, _ids = big_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    assert (
        main(["export", "delta", str(tmp_path / "t"), "--experiment", experiment, "--since", "30d"])
        == 0
    )
    elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    assert out.strip() == f"10000 trace(s) read, 10000 row(s) written to {tmp_path / 't'}"
    assert err == ""  # not a terminal: no progress display
    table = DeltaTable(str(tmp_path / "t"))
    con = duckdb.connect()
    con.register("traces", table.to_pyarrow_dataset())
    assert con.sql(
        "SELECT count(*), count(DISTINCT trace_id), sum(total_tokens) FROM traces"
    ).fetchall() == [(10_000, 10_000, 10_000 * 120)]
    print(f"backfill: {10_000 / elapsed:,.0f} traces/s")


# --------------------------------------------------------------------------- in the app


def test_autolog_syncs_in_the_background_and_stops_on_disable(
    traced: Traced, client: openai.OpenAI, tmp_path: Path
) -> None:
    path = tmp_path / "bg"
    tracewire.autolog(delta_path=str(path), delta_interval=1)
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "sync me"}]
    )
    assert reply.choices[0].message.content
    trace = traced.trace()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if DeltaTable.is_deltatable(str(path)) and rows(path):
            break
        time.sleep(0.2)
    (row,) = rows(path)
    assert row["trace_id"] == trace.info.trace_id
    assert row["models"] == ["gpt-4o-mini"] and row["total_cost_usd"] > 0

    thread = delta._background._thread  # type: ignore[union-attr]
    tracewire.disable()
    assert not thread.is_alive() and delta._background is None
    traced.enable()  # no delta_path now: no background sync
    assert delta._background is None


def test_web_request_trace_row_has_route_status_and_first_byte(
    traced: Traced, openai_server: OpenAIServer, tmp_path: Path
) -> None:
    """A real FastAPI app under TracingMiddleware (called in process over ASGI), its trace
    synced: the row carries what the middleware recorded on the request's root span."""
    import asyncio

    import httpx
    from fastapi import FastAPI

    from tests.conftest import API_KEY
    from tracewire.middleware import TracingMiddleware

    app = FastAPI()
    llm = openai.AsyncOpenAI(base_url=openai_server.base_url, api_key=API_KEY, max_retries=0)

    @app.post("/chat/{room}")
    async def chat(room: str) -> dict[str, str]:
        reply = await llm.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": room}]
        )
        return {"reply": reply.choices[0].message.content or ""}

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(
            app=TracingMiddleware(
                app, trust_identity_headers={"session": "X-Session-ID", "user": "X-User-ID"}
            )
        )
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            return await http.post(
                "/chat/lobby",
                headers={
                    "X-Request-ID": "req-delta-1",
                    "X-Session-ID": "sess-9",
                    "X-User-ID": "ann",
                },
            )

    response = asyncio.run(call())
    assert response.status_code == 200 and response.json()["reply"]
    trace = traced.trace()
    experiment = mlflow.get_experiment_by_name(traced.experiment_name).experiment_id
    sync(tmp_path / "t", os.environ["MLFLOW_TRACKING_URI"], experiment)
    (row,) = rows(tmp_path / "t")
    assert row["trace_id"] == trace.info.trace_id
    assert (row["route"], row["http_status"], row["client_request_id"]) == (
        "/chat/{room}",
        200,
        "req-delta-1",
    )
    assert (row["session"], row["user"]) == ("sess-9", "ann")
    assert row["time_to_first_byte_ms"] > 0 and row["models"] == ["gpt-4o-mini"]
    assert row["total_tokens"] > 0 and row["total_cost_usd"] > 0


def test_background_sync_that_fails_never_reaches_the_app(
    traced: Traced, client: openai.OpenAI, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    tracewire.autolog(delta_path=str(blocker / "table"), delta_interval=1)
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "still fine"}]
    )
    traced.trace()
    background = delta._background
    assert background is not None
    deadline = time.monotonic() + 30
    while background.last_error is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert background.last_error is not None and background._thread.is_alive()
    tracewire.disable()
    assert not background._thread.is_alive()


def test_progress_only_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert delta.terminal_progress(io.StringIO()) is None
    screen = Terminal()
    show = delta.terminal_progress(screen)
    assert show is not None
    show(delta.SyncReport(read=2500, written=2000))
    assert screen.getvalue().startswith("\rtracewire: 2,500 traces read, 2,000 rows written (")


@pytest.mark.parametrize(
    "env, value, message",
    [
        ("TRACEWIRE_DELTA_INTERVAL", "0", "TRACEWIRE_DELTA_INTERVAL must be at least 1"),
        ("TRACEWIRE_DELTA_INTERVAL", "soon", "TRACEWIRE_DELTA_INTERVAL must be a number"),
    ],
)
def test_bad_delta_settings_name_the_setting(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, message: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(tracewire.ConfigError, match=message):
        tracewire.config.resolve()


def test_delta_path_without_deltalake_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "deltalake" else find_spec(name, *a),
    )
    with pytest.raises(
        tracewire.ConfigError, match=r'argument delta_path is set.*pip install "tracewire\[delta\]"'
    ):
        tracewire.config.resolve(delta_path="/tmp/x")
    monkeypatch.setenv("TRACEWIRE_DELTA_PATH", "/tmp/x")
    with pytest.raises(tracewire.ConfigError, match="TRACEWIRE_DELTA_PATH is set"):
        tracewire.config.resolve()


def test_export_cli_errors_are_one_line(
    tracking_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", "delta", str(tmp_path), "--since", "yesterday"]) == 1
    assert "--since must be a duration" in capsys.readouterr().err
    assert main(["export", "delta", str(tmp_path), "--experiment", "no-such-exp"]) == 1
    assert "no experiment named 'no-such-exp'" in capsys.readouterr().err
