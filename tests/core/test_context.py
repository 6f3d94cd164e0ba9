"""The request context (request id, session, user, tags) and deployment tags land on traces."""

from __future__ import annotations

import mlflow
import openai
import pytest

import tracewire
from tests.conftest import Traced

USER = [{"role": "user", "content": "who am I"}]


def _chat(client: openai.OpenAI) -> None:
    client.chat.completions.create(model="gpt-4o-mini", messages=USER)


def test_context_lands_on_the_trace(traced: Traced, client: openai.OpenAI) -> None:
    with tracewire.context(
        request_id="req-123", session_id="sess-1", user_id="alice", tags={"feature": "search"}
    ):
        _chat(client)
    _chat(client)  # outside: none of it
    inside, outside = traced.traces(expected=2)
    assert inside.info.client_request_id == "req-123"
    assert inside.info.trace_metadata["mlflow.trace.session"] == "sess-1"
    assert inside.info.trace_metadata["mlflow.trace.user"] == "alice"
    assert inside.info.tags["feature"] == "search"
    assert outside.info.client_request_id is None
    assert "mlflow.trace.session" not in outside.info.trace_metadata
    assert "feature" not in outside.info.tags


def test_set_user_late_in_the_work_still_lands(traced: Traced, client: openai.OpenAI) -> None:
    with tracewire.context(session_id="s-late"):
        with mlflow.start_span("handler"):
            _chat(client)
            tracewire.set_user("bob")  # e.g. auth resolved after the first model call
    trace = traced.trace()
    assert trace.info.trace_metadata["mlflow.trace.user"] == "bob"
    assert trace.info.trace_metadata["mlflow.trace.session"] == "s-late"


@pytest.mark.parametrize("bad", ["x" * 251, "a\nb", "nul\x00", "", 42])
def test_invalid_session_is_dropped_not_replaced(
    traced: Traced, client: openai.OpenAI, bad: object
) -> None:
    with tracewire.context(session_id="keep-me"):
        tracewire.set_session(bad)  # type: ignore[arg-type]
        _chat(client)
    assert "mlflow.trace.session" not in traced.trace().info.trace_metadata


@pytest.mark.parametrize("traced", [{"tags": {"team": "search"}}], indirect=True)
def test_deployment_tags_on_every_trace(
    monkeypatch: pytest.MonkeyPatch, traced: Traced, client: openai.OpenAI
) -> None:
    monkeypatch.setenv("TRACEWIRE_ENVIRONMENT", "staging")
    monkeypatch.setenv("TRACEWIRE_APP_VERSION", "1.4.2")
    monkeypatch.setenv("TRACEWIRE_REGION", "eu-west-1")
    traced.enable()

    @mlflow.trace
    def user_only() -> int:
        return 1

    _chat(client)
    user_only()
    for trace in traced.traces(expected=2):
        assert trace.info.tags["deployment.environment"] == "staging"
        assert trace.info.tags["service.version"] == "1.4.2"
        assert trace.info.tags["cloud.region"] == "eu-west-1"
        assert trace.info.tags["team"] == "search"
