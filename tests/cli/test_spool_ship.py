"""``tracewire spool ship`` writes the store as the shipper process does: priced from MLflow's
bundled model catalog, without fetching the remote one first (without network, that fetch held
the command up for 7-27 s before the first trace was stored)."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
import uuid
from pathlib import Path

import mlflow

from tests.support.processes import clean_env
from tests.support.spool_cli import spool_command
from tracewire import config
from tracewire.core import attributes as keys
from tracewire.core import span_context
from tracewire.core.feedback import Feedback
from tracewire.export import destination, encode, hooks
from tracewire.export.spool import Spool


class _Proxy:
    """An HTTP(S) proxy that records who connects to it and answers nothing."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._server.close()


def test_spool_ship_prices_from_mlflow_s_bundled_catalog_without_fetching(
    tmp_path: Path, tracking_uri: str
) -> None:
    experiment_id = mlflow.MlflowClient(tracking_uri).create_experiment(
        f"ship-{uuid.uuid4().hex[:8]}"
    )
    settings = dataclasses.replace(
        config.resolve(), tracking_uri=tracking_uri, experiment_id=experiment_id
    )
    spool = Spool.create(tmp_path, 10**8, destination.destination(settings))
    span = span_context.start_span(
        "chat gpt-4o-mini",
        "CHAT_MODEL",
        inputs={"messages": [{"role": "user", "content": "hi"}]},
        attributes={
            keys.LLM_MODEL: "gpt-4o-mini",
            keys.LLM_PROVIDER: "openai",
            keys.CHAT_USAGE: {"input_tokens": 1000, "output_tokens": 500, "total_tokens": 1500},
        },
    )
    span.end()
    trace_id, payload = encode.encode(hooks.Item(ours=span.trace), settings)
    spool.put(trace_id, payload)
    spool.close()  # as an exited process leaves it

    proxy = _Proxy()
    try:
        # No MLFLOW_MODEL_CATALOG_URI: a user's environment; every fetch goes to the proxy.
        env = clean_env(
            MLFLOW_TRACKING_URI=tracking_uri, HTTPS_PROXY=proxy.url, HTTP_PROXY=proxy.url
        )
        ship = spool_command("ship", tmp_path, env=env)
    finally:
        proxy.close()

    assert ship.returncode == 0, ship.stderr[-3000:]
    assert "done: 1 trace(s) stored" in ship.stdout, ship.stdout
    assert proxy.connections == 0, "spool ship fetched MLflow's remote model catalog"
    stored = mlflow.MlflowClient(tracking_uri).get_trace(trace_id)
    assert stored.info.trace_metadata.get("mlflow.trace.cost"), stored.info.trace_metadata


def test_a_store_that_stays_down_does_not_keep_the_others_spools_from_shipping(
    tmp_path: Path, tracking_uri: str
) -> None:
    def left_behind(uri: str, name: str) -> str:
        settings = dataclasses.replace(config.resolve(), tracking_uri=uri)
        spool = Spool.create(tmp_path, 10**8, destination.destination(settings))
        span = span_context.start_span("work", "CHAIN", inputs={"for": uri})
        span.end()
        trace_id, payload = encode.encode(hooks.Item(ours=span.trace), settings)
        spool.put(trace_id, payload)
        spool.close()  # as an exited process leaves it
        for suffix in (".db", ".lock"):  # named so that the unreachable store's comes first
            spool.path.with_suffix(suffix).rename(tmp_path / f"{name}{suffix}")
        return trace_id

    left_behind("http://127.0.0.1:9", "spool-0-down")  # nothing listens on port 9
    reachable = left_behind(tracking_uri, "spool-1-up")

    ship = spool_command("ship", tmp_path, env=clean_env(MLFLOW_TRACKING_URI=tracking_uri))

    assert ship.returncode == 1, ship.stdout
    (line,) = ship.stderr.splitlines()
    assert line.startswith("tracewire: error: the tracking store http://127.0.0.1:9 is unavailable")
    assert line.endswith(f"1 trace(s) stay spooled in {tmp_path}")
    assert mlflow.MlflowClient(tracking_uri).get_trace(reachable) is not None
    assert (tmp_path / "spool-0-down.db").exists() and not (tmp_path / "spool-1-up.db").exists()


def test_feedback_left_waiting_for_its_trace_is_applied_once_the_trace_is_shipped(
    tmp_path: Path, tracking_uri: str
) -> None:
    settings = dataclasses.replace(config.resolve(), tracking_uri=tracking_uri)
    spool = Spool.create(tmp_path, 10**8, destination.destination(settings))
    span = span_context.start_span("work", "CHAIN", inputs={"text": "rate me"})
    span.end()
    trace_id, payload = encode.encode(hooks.Item(ours=span.trace), settings)
    spool.put(trace_id, payload)
    thumbs = Feedback(name="thumbs", value=True, trace_id=trace_id, expires=time.time() + 600)
    spool.put_feedback(thumbs.to_json(), 100, 2**20)
    spool.close()  # as an exited process leaves it: its feedback still waiting

    ship = spool_command("ship", tmp_path, env=clean_env(MLFLOW_TRACKING_URI=tracking_uri))

    assert ship.returncode == 0, ship.stderr[-3000:]
    assert "1/1 feedback applied" in ship.stdout, ship.stdout
    (assessment,) = mlflow.MlflowClient(tracking_uri).get_trace(trace_id).info.assessments
    assert (assessment.name, assessment.value) == ("thumbs", True)
