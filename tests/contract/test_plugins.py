"""The contract every plugin in the registry keeps: patch before or after import, never twice,
unpatch exactly, nothing patched after disable(), and the caller's result unchanged whichever
internal step fails.

A plugin added to the registry must add an exerciser below (the test fails otherwise).
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import subprocess
import sys
import textwrap
from typing import Any, Callable

import pytest

import tracewire
from tests.conftest import API_KEY, Traced
from tracewire.core import guard
from tracewire.plugins.base import Plugin, TracewireWrapper
from tracewire.plugins.registry import PLUGINS
from tracewire.testing import OpenAIServer


def _plugin(name: str) -> Plugin:
    return importlib.import_module(PLUGINS[name]).plugin


def _outcome(fn: Callable[[], Any]) -> Any:
    """A call's result in comparable form, or its exception's type and message."""
    try:
        value = fn()
    except Exception as exc:  # the exception is part of what the caller sees
        return ("raised", type(exc).__name__, str(exc))
    if isinstance(value, list):
        return [_outcome(lambda v=v: v) for v in value]
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in ("id", "created", "created_at")}
    return value


def exercise_openai(server: OpenAIServer) -> list[Any]:
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
    messages = [{"role": "user", "content": "hello contract"}]

    async def async_calls() -> list[Any]:
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
        reply = await aclient.chat.completions.create(model="gpt-4o-mini", messages=messages)
        stream = await aclient.chat.completions.create(model="gpt-4o-mini", messages=messages,
                                                       stream=True)
        chunks = [c.choices[0].delta.content if c.choices else None async for c in stream]
        return [reply.choices[0].message.content, chunks]

    return [
        _outcome(lambda: client.chat.completions.create(model="gpt-4o-mini", messages=messages)),
        _outcome(lambda: [c.model_dump(exclude={"id", "created"}) for c in client.chat.completions.create(
            model="gpt-4o-mini", messages=messages, stream=True)]),
        _outcome(lambda: client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=messages).parse()),
        _outcome(lambda: [c.choices[0].delta.content for c in client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=messages, stream=True).parse() if c.choices]),
        _outcome(lambda: [e.type for e in client.responses.create(model="gpt-4o", input="hi",
                                                                  stream=True)]),
        _outcome(lambda: client.embeddings.create(model="text-embedding-3-small", input="hi")),
        _outcome(lambda: client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi")),
        _outcome(lambda: client.chat.completions.create(model="error-500", messages=messages)),
        _outcome(lambda: [c.choices[0].delta.content for c in client.chat.completions.create(
            model="stream-error", messages=messages, stream=True) if c.choices]),
        _outcome(lambda: asyncio.run(async_calls())),
    ]


EXERCISERS: dict[str, Callable[[OpenAIServer], list[Any]]] = {
    "openai": exercise_openai,
}

pytestmark = pytest.mark.parametrize("name", sorted(PLUGINS))


def test_every_plugin_has_an_exerciser(name: str) -> None:
    assert name in EXERCISERS


def _targets(name: str) -> list[tuple[Any, str]]:
    plugin = _plugin(name)
    importlib.import_module(plugin.module)
    found = [(owner, attr) for owner, attr, _ in plugin.targets()]
    assert found, f"plugin {name} wraps nothing"
    return found


def _run_python(code: tuple[str, ...], tmp_path: Any) -> None:
    env_code = textwrap.dedent(f"""
        import os, sys
        os.environ["MLFLOW_TRACKING_URI"] = "sqlite:///{tmp_path}/mlflow.db"
        os.environ["TRACEWIRE_TESTING"] = "1"
    """) + "\n".join(textwrap.dedent(part) for part in code)
    result = subprocess.run([sys.executable, "-c", env_code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


_CHECK = """
    import importlib
    from tracewire.plugins.base import TracewireWrapper
    from tracewire.plugins.registry import PLUGINS
    plugin = importlib.import_module(PLUGINS[{name!r}]).plugin
    targets = plugin.targets()
    assert targets
    wrapped = [isinstance(vars(owner)[attr], TracewireWrapper) for owner, attr, _ in targets]
"""


def test_patch_before_import(name: str, tmp_path: Any) -> None:
    _run_python((f"""
        import tracewire
        tracewire.autolog()
        import {_plugin(name).module}
        assert {_plugin(name).module!r} in sys.modules
    """, _CHECK.format(name=name), "assert all(wrapped), wrapped"), tmp_path)


def test_disable_then_first_import_patches_nothing(name: str, tmp_path: Any) -> None:
    _run_python((f"""
        import tracewire
        tracewire.autolog()
        tracewire.disable()
        import {_plugin(name).module}
    """, _CHECK.format(name=name), "assert not any(wrapped), wrapped"), tmp_path)


def test_patch_after_import_once_and_unpatch_exactly(name: str, traced: Traced) -> None:
    tracewire.disable()
    originals = {(o, a): vars(o)[a] for o, a in _targets(name)}
    assert not any(isinstance(f, TracewireWrapper) for f in originals.values())
    traced.enable()
    traced.enable()  # idempotent
    for (owner, attr), original in originals.items():
        current = vars(owner)[attr]
        assert isinstance(current, TracewireWrapper)
        assert current.__wrapped__ is original  # wrapped exactly once
    tracewire.disable()
    for (owner, attr), original in originals.items():
        assert vars(owner)[attr] is original
    traced.enable()


def test_every_step_can_fail_without_the_caller_noticing(
        name: str, traced: Traced, openai_server: OpenAIServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    def exercise(server: OpenAIServer) -> list[Any]:
        # A failed `deactivate` leaves its span current in the caller's context by design (it
        # failed); a fresh context per run keeps that from leaking into the next case.
        return contextvars.copy_context().run(EXERCISERS[name], server)

    with traced.untraced():
        expected = exercise(openai_server)

    seen: set[str] = set()
    monkeypatch.setattr(guard, "fault", lambda step: seen.add(step) or False)
    assert exercise(openai_server) == expected
    assert len(seen) >= 4, seen  # start, activate, deactivate, finish at least

    monkeypatch.setattr(guard, "TESTING", False)  # what production runs with
    for step in sorted(seen):
        monkeypatch.setattr(guard, "fault", lambda s, step=step: s == step)
        assert exercise(openai_server) == expected, f"step {step} leaked into the call"
    monkeypatch.setattr(guard, "fault", lambda s: True)
    assert exercise(openai_server) == expected
    monkeypatch.setattr(guard, "fault", None)
    tracewire.flush(30)
