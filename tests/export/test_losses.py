"""Nothing is lost without being counted, and nothing bad in the spool directory stops shipping.

* A garbage ``spool-*.db`` (another program's file, a truncated copy) is set aside as
  ``.unreadable``, one of a newer format is left for the tracewire that wrote it; both are
  reported by ``tracewire spool status`` and every other trace still ships.
* A lone surrogate anywhere in a trace (prompt, model reply, tag, error trace) is replaced with
  U+FFFD and the trace stored; no log line carries the text.
* A full filesystem under the spool: every trace is either kept or counted as dropped for
  "disk", in one log line without content, and ``spool status`` shows the count after the
  process has exited. The filesystem is a 256 KiB tmpfs mounted in a private mount namespace
  (``unshare -m``): it needs root, as CI has, and vanishes with the process.
* A full in-memory queue and a spooled trace that cannot be decoded are counted too.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import mlflow
import openai
import pytest
from mlflow import MlflowClient

import tracewire
from tests.conftest import API_KEY, Traced
from tracewire import config
from tracewire.core import span_context
from tracewire.export import destination, encode, hooks, shipper, spool, spool_directory
from tracewire.testing import OpenAIServer

MODEL = "gpt-4o-mini"


def _encoded(text: str, settings: config.Settings) -> tuple[str, bytes]:
    span = span_context.start_span("chat", "CHAT_MODEL", inputs={"text": text})
    span.end()
    return encode.encode(hooks.Item(ours=span.trace), settings)


def _texts(uri: str, experiment_id: str) -> list[str]:
    found = MlflowClient(uri).search_traces(locations=[experiment_id], max_results=100)
    return sorted(t.data.spans[0].inputs["text"] for t in found)


def _new_experiment(uri: str, name: str) -> tuple[str, config.Settings]:
    experiment = MlflowClient(uri).create_experiment(f"{name}-{os.getpid()}-{time.time_ns()}")
    return experiment, dataclasses.replace(
        config.resolve(), tracking_uri=uri, experiment_id=experiment
    )


def _ship_until_empty(directory: Path, sources: list[spool.Spool], timeout: float = 60) -> None:
    worker = shipper.Shipper(directory, 10**8, shipper.store_for)
    worker.start()
    for source in sources:
        worker.take_on(source.path)
    deadline = time.monotonic() + timeout
    while any(s.pending() for s in sources) and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.stop(1)
    assert not any(s.pending() for s in sources), "shipping stopped"


def test_garbage_and_newer_spool_files_are_set_aside_and_shipping_goes_on(
    tmp_path: Path, tracking_uri: str
) -> None:
    experiment, settings = _new_experiment(tracking_uri, "bad-files")
    where = destination.destination(settings)
    # Another program's file, sorted before everything else, with a lock nobody holds.
    (tmp_path / "spool-0-garbage.db").write_bytes(b"this is not a database" * 100)
    (tmp_path / "spool-0-garbage.lock").touch()
    # Another program's sqlite database, with a lock: set aside untouched, never written to.
    foreign = sqlite3.connect(tmp_path / "spool-0-other.db")
    foreign.executescript("CREATE TABLE theirs (x); INSERT INTO theirs VALUES (1);")
    foreign.close()
    (tmp_path / "spool-0-other.lock").touch()
    foreign_bytes = (tmp_path / "spool-0-other.db").read_bytes()
    # A spool of a newer tracewire, left by a process that died.
    newer = sqlite3.connect(tmp_path / "spool-1-newer.db")
    newer.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('format_version', '99');"
    )
    newer.close()
    (tmp_path / "spool-1-newer.lock").touch()
    # A dead process's spool this tracewire can ship, and the live app's own.
    dead = spool.Spool.create(tmp_path, 10**8, where)
    dead.put(*_encoded("left by a dead process", settings))
    dead.close()
    own = spool.Spool.create(tmp_path, 10**8, where)
    own.put(*_encoded("the app's own", settings))

    _ship_until_empty(tmp_path, [own])
    deadline = time.monotonic() + 30
    while len(_texts(tracking_uri, experiment)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)

    assert _texts(tracking_uri, experiment) == ["left by a dead process", "the app's own"]
    assert (tmp_path / "spool-0-garbage.db.unreadable").exists()
    assert (tmp_path / "spool-0-other.db.unreadable").read_bytes() == foreign_bytes
    assert not (tmp_path / "spool-0-garbage.db").exists()
    assert (tmp_path / "spool-1-newer.db").exists()  # not ours to move: its tracewire ships it
    result = subprocess.run(
        [sys.executable, "-m", "tracewire.cli", "spool", "status", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (
        "spool-0-garbage.db.unreadable: cannot be shipped: unreadable, set aside" in result.stdout
    ), result.stdout
    assert (
        "spool-1-newer.db: cannot be shipped: " in result.stdout and "format 99" in result.stdout
    ), result.stdout
    own.close()


@pytest.mark.parametrize("traced", [{"tags": {"mood": "\ud83d"}}], indirect=True)
def test_a_lone_surrogate_anywhere_is_replaced_and_the_trace_stored(
    traced: Traced, client: openai.OpenAI, capfd: pytest.CaptureFixture[str]
) -> None:
    """A surrogate cannot even be sent to OpenAI (the client's JSON encoding refuses it), but it
    reaches traces from tags, the app's own functions and exceptions (JSON with a ``\\ud83d``
    escape decodes to one): in our spans, MLflow's spans, an OK and an ERROR trace."""
    half = "half an emoji \ud83d in a secret text"

    @mlflow.trace
    def tool(text: str) -> str:
        return f"{text} done"

    @mlflow.trace
    def failing(text: str) -> str:
        raise ValueError(f"cannot {text}")

    with tracewire.context(session_id="s-\ud83d", tags={"plan": "\ud83d"}):
        assert tool(half) == f"{half} done"  # the app's result unchanged
        with pytest.raises(ValueError):
            failing(half)
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "plain"}])

    fixed = half.replace("\ud83d", "\ufffd")
    traces = traced.traces(expected=3)
    by_name = {t.data.spans[0].name: t for t in traces}
    for trace in traces:
        assert trace.info.tags["mood"] == trace.info.tags["plan"] == "\ufffd"
    assert by_name["tool"].data.spans[0].inputs == {"text": fixed}
    assert by_name["tool"].data.spans[0].outputs == f"{fixed} done"
    assert by_name["tool"].info.state.value == "OK"
    assert by_name["failing"].info.state.value == "ERROR"
    assert fixed in by_name["failing"].data.spans[0].events[0].attributes["exception.message"]
    chat = next(t for name, t in by_name.items() if name not in ("tool", "failing"))
    assert chat.data.spans[0].outputs["choices"][0]["message"]["content"] == "Echo: plain"
    assert "secret text" not in capfd.readouterr().err


def test_an_undecodable_spooled_trace_is_set_aside_and_counted_not_dropped(
    tmp_path: Path, tracking_uri: str
) -> None:
    experiment, settings = _new_experiment(tracking_uri, "undecodable")
    own = spool.Spool.create(tmp_path, 10**8, destination.destination(settings))
    own.put(*_encoded("before", settings))
    own.put("tr-broken", b'{"head": "not what the shipper reads"}')
    own.put(*_encoded("after", settings))
    _ship_until_empty(tmp_path, [own])
    assert _texts(tracking_uri, experiment) == ["after", "before"]
    (status,) = spool_directory.status(tmp_path)
    assert (status.pending, status.rejected) == (0, 1)
    own.close()


def test_a_full_queue_counts_what_it_refuses(
    tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.support.app_process import mock_client

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"queue-{os.getpid()}-{time.time_ns()}")
    monkeypatch.setenv("TRACEWIRE_SPOOL_DIR", str(tmp_path))
    monkeypatch.setenv("TRACEWIRE_QUEUE_SIZE", "1")
    tracewire.autolog()
    try:
        client = mock_client()
        calls = 300
        for i in range(calls):
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"q {i}"}]
            )
        assert tracewire.flush(60)
        experiment = MlflowClient(tracking_uri).get_experiment_by_name(
            os.environ["MLFLOW_EXPERIMENT_NAME"]
        )
        stored = len(
            MlflowClient(tracking_uri).search_traces(
                locations=[experiment.experiment_id], max_results=500
            )
        )
        from tracewire.export import pipeline

        assert pipeline._spool is not None
        refused = pipeline._spool.drops.get("queue", 0)
    finally:
        tracewire.disable()
    print(f"\nqueue of 1: {stored} stored, {refused} refused of {calls}")
    assert refused > 0, "the queue never filled: the test proves nothing"
    assert stored + refused == calls


FULL_DISK_APP = """
    import os, sys
    import openai, tracewire

    tracewire.autolog()
    client = openai.OpenAI(base_url=os.environ["TEST_OPENAI_BASE_URL"], api_key=os.environ[
        "TEST_API_KEY"], max_retries=0)
    for i in range(int(os.environ["TEST_CALLS"])):
        text = f"full disk {i} " + "secret words " * 150
        reply = client.chat.completions.create(model="gpt-4o-mini",
                                               messages=[{"role": "user", "content": text}])
        assert reply.choices[0].message.content == f"Echo: {text}"
    print("calls returned", flush=True)
"""

FULL_DISK_SCRIPT = """
    set -e
    mount -t tmpfs -o size=256k tmpfs "$SPOOL"
    "$PYTHON" "$APP"
    "$PYTHON" -m tracewire.cli spool status --json --dir "$SPOOL" > "$STATUS"
"""


def test_a_full_filesystem_loses_nothing_without_counting_it(
    tmp_path: Path, openai_server: OpenAIServer
) -> None:
    unshare = shutil.which("unshare")
    assert unshare is not None and os.geteuid() == 0, (
        "this test mounts a small tmpfs in a private mount namespace: it needs unshare and root"
    )
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    (tmp_path / "app.py").write_text(textwrap.dedent(FULL_DISK_APP))
    (tmp_path / "run.sh").write_text(textwrap.dedent(FULL_DISK_SCRIPT))
    calls = 60
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TRACEWIRE_"))}
    env.update(
        {
            "PYTHON": sys.executable,
            "APP": str(tmp_path / "app.py"),
            "SPOOL": str(spool_dir),
            "STATUS": str(tmp_path / "status.json"),
            "TRACEWIRE_SPOOL_DIR": str(spool_dir),
            "TEST_CALLS": str(calls),
            "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",  # nothing listens: all stay spooled
            "TEST_OPENAI_BASE_URL": openai_server.base_url,
            "TEST_API_KEY": API_KEY,
        }
    )
    run = subprocess.run(
        [unshare, "-m", "--propagation", "private", "sh", str(tmp_path / "run.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and "calls returned" in run.stdout, run.stderr[-4000:]
    (status,) = json.loads((tmp_path / "status.json").read_text())["spools"]
    print(f"\nfull disk: {status['pending']} kept, drops {status['drops']} of {calls}")
    assert status["drops"].get("disk", 0) > 0, "the disk never filled: the test proves nothing"
    assert status["pending"] + status["dropped"] == calls, status
    # One line while it runs (at most one a minute), one when it exits, with the counts.
    lines = [line for line in run.stderr.splitlines() if "dropped so far" in line]
    assert len(lines) == 1 and "disk" in lines[0], run.stderr[-4000:]
    assert f"{status['dropped']} trace(s) were dropped ({status['dropped']} disk)" in run.stderr, (
        run.stderr[-4000:]
    )
    assert "Traceback" not in run.stderr and "secret words" not in run.stderr, run.stderr[-4000:]


def test_a_new_kind_of_failure_is_said_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A store outage is said now and then (1st, 5th, every 20th failure); a full disk under the
    # spool after it (the batch stored, but not marked shipped) must not wait for the 20th.
    worker = shipper.Shipper(tmp_path, 10**8, shipper.store_for)
    for _ in range(7):
        worker._failed(ConnectionError("store down"), None)
    assert caplog.text.count("store down") == 2
    worker._failed(sqlite3.OperationalError("database or disk is full"), None)
    assert "database or disk is full" in caplog.text


class _NotMlflow(http.server.BaseHTTPRequestHandler):
    """A web server that is no MLflow tracking server: 404 to everything."""

    def do_GET(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("server", ["down", "not mlflow"])
def test_a_tracking_server_whose_version_cannot_be_read_is_said_with_why(
    tmp_path: Path, server: str
) -> None:
    # MLflow's own words for both: "log_spans is not supported: could not identify MLflow
    # server version", which named neither the server nor the cause.
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotMlflow)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    uri = "http://127.0.0.1:9" if server == "down" else f"http://127.0.0.1:{web.server_port}"
    settings = dataclasses.replace(config.resolve(), tracking_uri=uri, experiment_id="0")
    source = spool.Spool.create(tmp_path, 10**8, destination.destination(settings))
    source.put(*_encoded("to a server that cannot take it", settings))
    worker = shipper.Shipper(tmp_path, 10**8, shipper.store_for)
    worker.take_on(source.path)
    worker.start()
    deadline = time.monotonic() + 30
    while worker.last_error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.stop(0)
    web.shutdown()
    said = str(worker.last_error)
    if server == "down":
        assert said == f"the tracking server {uri} did not answer ([Errno 111] Connection refused)"
    else:
        assert said == (
            f"the tracking server {uri} answered 404 for its version: an MLflow older than "
            "3.4, or not an MLflow server"
        )
    assert source.pending() == 1
    source.close(remove_if_empty=False)
