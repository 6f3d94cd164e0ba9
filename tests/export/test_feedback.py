"""Feedback goes through the export pipeline: applied once its trace is stored, by request id
or trace id; waits in the spool meanwhile; dropped (and counted) past the retention."""

from __future__ import annotations

import json
import time

import openai
import pytest

import tracewire
from tests.conftest import Traced
from tracewire import config
from tracewire.core.feedback import Feedback
from tracewire.export import pipeline
from tracewire.export import spool_directory as spool

USER = [{"role": "user", "content": "rate me"}]


def test_feedback_by_request_id_and_trace_id(traced: Traced, client: openai.OpenAI) -> None:
    with tracewire.context(request_id="req-fb-1", user_id="u-1"):
        client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    # Sent right away: it waits in the spool until the trace is in the store.
    assert tracewire.log_feedback(
        request_id="req-fb-1", name="thumbs", value=False, rationale="wrong city", user="u-1"
    )
    trace = traced.trace()
    assert tracewire.log_feedback(trace_id=trace.info.trace_id, name="score", value=0.5)
    assert tracewire.flush(30)

    assessments = {a.name: a for a in traced.trace().info.assessments}
    assert assessments["thumbs"].value is False
    assert assessments["thumbs"].rationale == "wrong city"
    assert assessments["thumbs"].source.source_id == "u-1"
    assert assessments["score"].value == 0.5


@pytest.mark.parametrize(
    "bad",
    [
        {"value": True},  # no id
        {"value": True, "request_id": "a", "trace_id": "b"},
        {"value": [1, 2], "request_id": "a"},
        {"value": True, "request_id": "x" * 51},
        {"value": True, "request_id": "quote'd"},
        {"value": True, "request_id": "a", "name": ""},
        {"value": float("nan"), "request_id": "a"},
        # MLflow stores numbers as doubles: a tracking server then fails every read of the trace
        {"value": float("inf"), "request_id": "a"},
        {"value": float("-inf"), "request_id": "a"},
        {"value": 10**309, "request_id": "a"},
    ],
)
def test_malformed_feedback_is_a_clear_error(traced: Traced, bad: dict) -> None:
    with pytest.raises(ValueError, match="feedback"):
        tracewire.log_feedback(**bad)


def test_feedback_whose_trace_never_appears_is_dropped_and_counted(
    traced: Traced, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracewire.disable()
    monkeypatch.setenv("TRACEWIRE_FEEDBACK_RETENTION", "1")
    traced.enable()
    assert tracewire.log_feedback(request_id="req-never-traced", value=True)
    assert tracewire.flush(30)  # returns once the shipper has given up on it
    statuses = spool.status(config.active().spool_dir)
    assert sum(s.feedback_dropped for s in statuses) >= 1


def test_text_that_cannot_be_encoded_is_stored_replaced(
    traced: Traced, client: openai.OpenAI
) -> None:
    client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    trace_id = traced.trace().info.trace_id
    # A lone surrogate: half of an emoji, as a JSON body's "\\ud83d" is read.
    assert tracewire.log_feedback(
        trace_id=trace_id,
        name="thumbs\ud83d",
        value="ok\udc00",
        rationale="r\ud800",
        user="u\udfff",
    )
    assert tracewire.flush(30)
    (assessment,) = traced.trace().info.assessments
    assert (assessment.name, assessment.value, assessment.rationale) == (
        "thumbs\ufffd",
        "ok\ufffd",
        "r\ufffd",
    )
    assert assessment.source.source_id == "u\ufffd"


def test_feedback_the_store_cannot_take_does_not_hold_up_the_rest(
    traced: Traced, client: openai.OpenAI
) -> None:
    client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    trace_id = traced.trace().info.trace_id
    # Spooled as an older release (or a damaged file) could have left it: first in line, and
    # every attempt to apply it fails.
    bad = json.loads(Feedback(name="x", value=1, trace_id=trace_id).to_json())
    del bad["name"]
    bad["expires"] = time.time() + 3
    assert pipeline._spool is not None
    dropped_before = _feedback_dropped()
    pipeline._spool.put_feedback(json.dumps(bad).encode(), 100, 2**20)
    pipeline._spool.put_feedback(b"\xff not even JSON", 100, 2**20)  # a damaged row
    assert tracewire.log_feedback(trace_id=trace_id, name="thumbs", value=True)
    started = time.monotonic()
    assert tracewire.flush(30)
    assert time.monotonic() - started < 20  # the bad one expired after its back-off
    assert [a.name for a in traced.trace().info.assessments] == ["thumbs"]
    assert _feedback_dropped() == dropped_before + 2  # the bad ones, counted


def _feedback_dropped() -> int:
    """Feedback dropped so far in the spool directory (other tests' included)."""
    return sum(s.feedback_dropped for s in spool.status(config.active().spool_dir))
