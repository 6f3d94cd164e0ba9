"""The shipper process dies while the app runs (killed, the OOM killer): the app never notices
beyond one log line, the next batch starts a new shipper (at most one every 5 s), and every
trace is stored. Even an app that has SIGPIPE back at its default action (some CLIs do) survives
a write to a shipper that died an instant before: the worker thread, which does every write to
the shipper, blocks SIGPIPE and gets an error instead."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from tests.support.app_process import child_env, stored_traces
from tests.support.processes import run_command
from tracewire.testing import OpenAIServer

APP = """
    import os, signal, sys, time

    import openai
    import tracewire
    from tracewire.export import pipeline

    if os.environ["TEST_SIGPIPE_DEFAULT"] == "1":
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    tracewire.autolog()
    client = openai.OpenAI(
        base_url=os.environ["TEST_OPENAI_BASE_URL"], api_key=os.environ["TEST_API_KEY"]
    )

    def ask(text):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
        )

    ask("before")
    assert tracewire.flush(60)
    process = pipeline._shipper._proc
    process.kill()
    os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)  # dead, not yet reaped
    if os.environ["TEST_LYING_POLL"] == "1":
        # The race: the shipper dies between the check that it lives and the write.
        poll = type(process).poll
        type(process).poll = lambda self: None if self is process else poll(self)
        ask("into a dead pipe")
        assert tracewire.flush(10) is False  # nobody ships it now
        type(process).poll = poll
    for i in range(3):
        ask(f"after {i}")
        time.sleep(0.3)
    assert tracewire.flush(60), "not stored after the shipper was restarted"
    print("survived", flush=True)
"""


def _run(tmp_path: Path, openai_server: OpenAIServer, lying_poll: bool) -> list[str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    done = run_command(
        [sys.executable, "app.py"],
        child_env(
            tracking_uri=uri,
            experiment="restart",
            spool_dir=tmp_path / "spool",
            openai_server=openai_server,
            TEST_SIGPIPE_DEFAULT="1",
            TEST_LYING_POLL="1" if lying_poll else "0",
        ),
        cwd=tmp_path,
        timeout=180,
    )
    assert done.returncode == 0 and "survived" in done.stdout, (done.returncode, done.stderr)
    assert "the shipper process exited (code -9); restarting it" in done.stderr, done.stderr
    return sorted(t.info.request_preview or "" for t in stored_traces(uri, "restart"))


def test_a_killed_shipper_is_restarted_and_every_trace_stored(
    tmp_path: Path, openai_server: OpenAIServer
) -> None:
    assert _run(tmp_path, openai_server, lying_poll=False) == [
        "after 0",
        "after 1",
        "after 2",
        "before",
    ]


def test_a_write_to_a_shipper_that_just_died_does_not_kill_the_app(
    tmp_path: Path, openai_server: OpenAIServer
) -> None:
    assert _run(tmp_path, openai_server, lying_poll=True) == [
        "after 0",
        "after 1",
        "after 2",
        "before",
        "into a dead pipe",
    ]
