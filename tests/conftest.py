"""Shared fixtures: a real sqlite MLflow store, the local OpenAI-compatible server, real clients.

Internal errors raise in tests (TRACEWIRE_TESTING=1) so the guard never hides a bug; it must be
set before tracewire is imported.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator

os.environ["TRACEWIRE_TESTING"] = "1"
# No network here: keep MLflow's pricing to its built-in model catalog.
os.environ["MLFLOW_MODEL_CATALOG_URI"] = ""
# Every process the suite starts spools here, never in the user's cache directory.
os.environ["TRACEWIRE_SPOOL_DIR"] = tempfile.mkdtemp(prefix="tracewire-test-spool-")

import mlflow
import pytest

import tracewire
from tracewire.testing import OpenAIServer

# Used by every client in the suite; the secrets test scans the store for it.
API_KEY = "sk-tracewire-test-9f8e7d6c5b4a3210-secret"


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    uri = f"sqlite:///{path}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.MlflowClient().search_experiments()  # create the schema once, up front
    yield uri
    # Secrets never leave: every byte the whole suite persisted, checked once at the end.
    tracewire.flush(30)
    stored = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    assert API_KEY.encode() not in stored, "the API key was persisted"


@pytest.fixture(scope="session")
def openai_server() -> Iterator[OpenAIServer]:
    with OpenAIServer() as server:
        yield server


@pytest.fixture
def client(openai_server: OpenAIServer):
    import openai

    return openai.OpenAI(base_url=openai_server.base_url, api_key=API_KEY, max_retries=0)


@pytest.fixture
def aclient(openai_server: OpenAIServer):
    """A factory: an async client's connections belong to the event loop it is first used in."""
    import openai

    return lambda: openai.AsyncOpenAI(
        base_url=openai_server.base_url, api_key=API_KEY, max_retries=0
    )


class Traced:
    """tracewire enabled into a fresh experiment of the test store; traces read back via MLflow."""

    def __init__(self, experiment_name: str, **settings: object) -> None:
        self.experiment_name = experiment_name
        self.settings = settings

    def enable(self) -> None:
        tracewire.autolog(**self.settings)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def untraced(self) -> Iterator[None]:
        """Run a block exactly as it runs without tracewire (originals restored)."""
        tracewire.disable()
        try:
            yield
        finally:
            self.enable()

    def traces(self, expected: int | None = None) -> list[mlflow.entities.Trace]:
        assert tracewire.flush(30), "export did not drain within 30 s"
        experiment = mlflow.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            found: list[mlflow.entities.Trace] = []
        else:
            found = mlflow.search_traces(
                locations=[experiment.experiment_id],
                return_type="list",
                order_by=["timestamp_ms ASC"],
            )
        if expected is not None:
            assert len(found) == expected, [t.info.trace_id for t in found]
        return found

    def trace(self) -> mlflow.entities.Trace:
        return self.traces(expected=1)[0]


@pytest.fixture
def traced(
    tracking_uri: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[Traced]:
    name = f"{request.node.name[:60]}-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    t = Traced(name, **getattr(request, "param", {}))
    t.enable()
    yield t
    tracewire.disable()
