"""Sampling by session (errors always kept) and the cap on oversized payloads."""

from __future__ import annotations

import openai
import pytest

import tracewire
from tests.conftest import Traced
from tracewire.core import sampling
from tracewire.export.encode import MAX_ATTRIBUTE_CHARS


@pytest.mark.parametrize("traced", [{"sample_rate": 0.5}], indirect=True)
def test_sessions_are_kept_or_dropped_whole_and_errors_always_kept(
    traced: Traced, client: openai.OpenAI
) -> None:
    sessions = [f"session-{i}" for i in range(30)]
    for session in sessions:
        with tracewire.context(session_id=session):
            for _ in range(2):
                client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
                )
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(
                    model="error-500", messages=[{"role": "user", "content": "hi"}]
                )
    kept = {s for s in sessions if sampling.keep(s, 0.5)}
    assert 5 < len(kept) < 25  # the hash splits them, deterministically

    by_session: dict[str, list[str]] = {}
    for trace in traced.traces():
        session = trace.info.trace_metadata["mlflow.trace.session"]
        by_session.setdefault(session, []).append(trace.info.state.value)
    for session in sessions:
        states = sorted(by_session.get(session, []))
        assert states == (["ERROR", "OK", "OK"] if session in kept else ["ERROR"]), session


def test_sample_rate_is_validated(tracking_uri: str) -> None:
    with pytest.raises(tracewire.ConfigError, match="sample_rate"):
        tracewire.autolog(sample_rate=1.5)


def test_oversized_payload_is_cut_with_a_marker(traced: Traced, client: openai.OpenAI) -> None:
    huge = "data:image/png;base64," + "A" * (2 * MAX_ATTRIBUTE_CHARS)
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": huge}]
    )
    assert reply.choices[0].message.content.startswith("Echo: data:image/png")  # untouched
    span = traced.trace().data.spans[0]
    assert isinstance(span.inputs, str)
    assert len(span.inputs) < MAX_ATTRIBUTE_CHARS
    assert "[tracewire: cut" in span.inputs and "characters]" in span.inputs
    assert span.attributes["mlflow.chat.tokenUsage"]["input_tokens"] > 0  # the rest is intact
