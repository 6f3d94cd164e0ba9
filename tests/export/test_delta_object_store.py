"""Delta sync to object storage: deltalake's own S3 client (Rust ``object_store``) talking real
HTTP to moto's S3 server on 127.0.0.1, the traces coming from the real sqlite MLflow store.
Rows read back from S3, a second sync that reads its progress back from the table on S3 and
writes nothing, feedback rewriting a row, a commit that loses a race to another sync, the CLI.

Storage options: endpoint, ``AWS_ALLOW_HTTP`` (moto speaks plain HTTP), fake keys (moto checks
none), a region (the signer needs one). Nothing for concurrent writers: deltalake 1.6 (the
version here) commits a version on S3 with a conditional put (``If-None-Match: *``, which AWS S3
has honoured since 2024) and has dropped the DynamoDB locking provider, so there is no lock to
configure; ``AWS_S3_ALLOW_UNSAFE_RENAME`` no longer changes how it commits (with it set, a trial
run here still sent ``If-None-Match``), and ``conditional_put=disabled`` makes every commit fail.
The tests check the header on every commit, and that a commit losing a race gets moto's 412.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import mlflow
import pytest
from deltalake import DeltaTable
from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

from tests.support.store import new_experiment, synthetic
from tracewire.cli import main
from tracewire.export import delta, trace_rows
from tracewire.testing.traces import write

BUCKET = "tracewire-test"
COMMIT = re.compile(r"/_delta_log/(\d{20})\.json$")


class S3Server:
    """moto's S3 server, the same WSGI app and handler ``ThreadedMotoServer`` runs, with one layer
    in front: ThreadedMotoServer has no hook to see request headers, and the tests need to see
    what a commit PUT asked for and to run another writer just before one lands."""

    def __init__(self) -> None:
        self._moto = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(
            "127.0.0.1", 0, self._app, threaded=True, request_handler=MotoRequestHandler
        )
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.commits: list[tuple[str, str | None, int]] = []  # path, If-None-Match, status
        self.before_commit: dict[str, Callable[[], None]] = {}  # path -> run once, first
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ["PATH_INFO"]
        if environ["REQUEST_METHOD"] != "PUT" or not COMMIT.search(path):
            return self._moto(environ, start_response)
        if (hook := self.before_commit.pop(path, None)) is not None:
            hook()

        def recorded(status: str, *args: Any) -> Any:
            self.commits.append((path, environ.get("HTTP_IF_NONE_MATCH"), int(status[:3])))
            return start_response(status, *args)

        return self._moto(environ, recorded)

    def options(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
        }

    def __enter__(self) -> S3Server:
        self._thread.start()
        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        ).create_bucket(Bucket=BUCKET)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


def table_uri() -> str:
    return f"s3://{BUCKET}/traces-{uuid.uuid4().hex[:8]}"


def rows(uri: str, s3: S3Server) -> list[dict]:
    table = DeltaTable(uri, storage_options=s3.options())
    return trace_rows.read(table).sort_by("trace_id").to_pylist()


def sync(uri: str, tracking_uri: str, experiment: str, s3: S3Server) -> delta.SyncReport:
    return delta.sync(
        uri,
        tracking_uri=tracking_uri,
        experiment_ids=[experiment],
        lookback_s=3600,
        storage_options=s3.options(),
    )


def test_sync_to_s3_reads_back_resumes_from_the_table_and_merges_feedback(
    tracking_uri: str, s3: S3Server
) -> None:
    experiment = new_experiment(tracking_uri)
    now = int(time.time() * 1000) - 600_000
    traces = [
        t
        for i, session in enumerate(["s-a", "s-b", "s-c"])
        for t in synthetic(
            1,
            now + i * 1000,
            session=session,
            user=f"u-{i}",
            input_tokens=100 * (i + 1),
            output_tokens=10 * (i + 1),
        )
    ]
    write(traces, tracking_uri, experiment)
    uri = table_uri()

    report = sync(uri, tracking_uri, experiment, s3)
    assert (report.read, report.written) == (3, 3)
    stored = rows(uri, s3)
    expected = sorted(traces, key=lambda t: t.trace_id)
    assert [r["trace_id"] for r in stored] == [t.trace_id for t in expected]
    assert [(r["session"], r["user"]) for r in stored] == [(t.session, t.user) for t in expected]
    assert [(r["input_tokens"], r["output_tokens"], r["total_tokens"]) for r in stored] == [
        (t.input_tokens, t.output_tokens, t.input_tokens + t.output_tokens) for t in expected
    ]
    assert all(r["feedback_count"] == 0 for r in stored)
    # Every version of the table went to S3 as a create-only put, and landed.
    mine = [c for c in s3.commits if c[0].startswith(uri[4:])]
    assert [(m, s) for _, m, s in mine] == [("*", 200), ("*", 200)]  # create, first page

    # A fresh process would know nothing: the progress comes back from the table on S3.
    mark = DeltaTable(uri, storage_options=s3.options()).transaction_version(
        delta.app_id(tracking_uri, [experiment])
    )
    assert mark == traces[-1].request_time_ms
    again = sync(uri, tracking_uri, experiment, s3)
    assert (again.read, again.written, again.high_water_ms) == (3, 0, mark)
    assert len(rows(uri, s3)) == 3

    mlflow.log_feedback(trace_id=traces[1].trace_id, name="thumbs", value=True)
    after = sync(uri, tracking_uri, experiment, s3)
    assert (after.read, after.written) == (3, 1)
    updated = {r["trace_id"]: r for r in rows(uri, s3)}
    assert len(updated) == 3 and len(rows(uri, s3)) == 3
    assert (
        updated[traces[1].trace_id]["feedback_count"],
        updated[traces[1].trace_id]["feedback_positive"],
    ) == (1, 1)
    assert updated[traces[0].trace_id]["feedback_count"] == 0


def test_a_commit_that_loses_a_race_on_s3_is_merged_again_not_overwritten(
    tracking_uri: str, s3: S3Server
) -> None:
    """Another sync (another experiment, into the same table) commits version 1 while this
    sync's version-1 put is on its way: moto refuses that put (412), and the sync merges its
    page again on top of the other's rows."""
    ours, theirs = new_experiment(tracking_uri), new_experiment(tracking_uri)
    now = int(time.time() * 1000) - 600_000
    mine, other = synthetic(3, now, session="ours"), synthetic(2, now + 5000, session="theirs")
    write(mine, tracking_uri, ours)
    write(other, tracking_uri, theirs)
    uri = table_uri()
    version_1 = f"/{BUCKET}/{uri.rsplit('/', 1)[1]}/_delta_log/{1:020}.json"
    s3.before_commit[version_1] = lambda: sync(uri, tracking_uri, theirs, s3)

    report = sync(uri, tracking_uri, ours, s3)
    assert (report.read, report.written) == (3, 3)
    assert version_1 not in s3.before_commit  # the other sync did run first
    statuses = [s for path, _, s in s3.commits if path == version_1]
    assert statuses == [200, 412]  # theirs landed, ours was refused
    stored = rows(uri, s3)
    assert sorted(r["trace_id"] for r in stored) == sorted(t.trace_id for t in mine + other)
    table = DeltaTable(uri, storage_options=s3.options())
    assert table.transaction_version(delta.app_id(tracking_uri, [ours])) == mine[-1].request_time_ms
    assert table.transaction_version(delta.app_id(tracking_uri, [theirs])) == (
        other[-1].request_time_ms
    )


def test_cli_export_to_s3_with_options_from_the_environment(
    tracking_uri: str,
    s3: S3Server,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The CLI passes no storage options: deltalake reads AWS_* variables itself."""
    experiment = new_experiment(tracking_uri)
    traces = synthetic(2, int(time.time() * 1000) - 600_000, session="cli")
    write(traces, tracking_uri, experiment)
    for name, value in s3.options().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    uri = table_uri()

    assert main(["export", "delta", uri, "--experiment", experiment]) == 0
    out, _err = capsys.readouterr()
    assert out.strip() == f"2 trace(s) read, 2 row(s) written to {uri}"
    assert [(r["trace_id"], r["session"]) for r in rows(uri, s3)] == sorted(
        (t.trace_id, "cli") for t in traces
    )
    assert main(["export", "delta", uri, "--experiment", experiment]) == 0
    assert capsys.readouterr().out.strip() == f"2 trace(s) read, 0 row(s) written to {uri}"
