"""The user's redaction hook runs before anything touches disk; if it fails, content is withheld."""

from __future__ import annotations

import re
from typing import Any

import openai
import pytest

from tests.conftest import Traced
from tests.support.store import store_bytes

EMAIL = "jane.doe@example.org"


def scrub(key: str, value: Any) -> Any:
    if isinstance(value, str):
        return re.sub(r"[\w.]+@[\w.]+", "<email>", value)
    if isinstance(value, dict):
        return {k: scrub(key, v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(key, v) for v in value]
    return value


def explode(key: str, value: Any) -> Any:
    raise RuntimeError("hook bug")


@pytest.mark.parametrize("traced", [{"redact": scrub}], indirect=True)
def test_redact_hook_scrubs_inputs_and_outputs(
    traced: Traced, tracking_uri: str, client: openai.OpenAI
) -> None:
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": f"mail {EMAIL} now"}]
    )
    assert EMAIL in reply.choices[0].message.content  # the caller's data is untouched
    span = traced.trace().data.spans[0]
    assert span.inputs["messages"][0]["content"] == "mail <email> now"
    assert span.outputs["choices"][0]["message"]["content"] == "Echo: mail <email> now"
    assert store_bytes(tracking_uri).count(EMAIL.encode()) == 0


@pytest.mark.parametrize("traced", [{"redact": explode}], indirect=True)
def test_failing_redact_hook_withholds_content(traced: Traced, client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "secret plan"}]
    )
    assert reply.choices[0].message.content == "Echo: secret plan"
    span = traced.trace().data.spans[0]
    assert span.inputs == span.outputs == "[tracewire: withheld, redaction failed]"
    assert span.attributes["mlflow.chat.tokenUsage"]["input_tokens"] > 0


def test_redact_from_environment_must_import(
    tracking_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tracewire

    monkeypatch.setenv("TRACEWIRE_REDACT", "no_such_module_x:scrub")
    with pytest.raises(tracewire.ConfigError, match="TRACEWIRE_REDACT"):
        tracewire.autolog()
    monkeypatch.setenv("TRACEWIRE_REDACT", "tests.plugins.test_redaction:scrub")
    tracewire.autolog()
    tracewire.disable()
