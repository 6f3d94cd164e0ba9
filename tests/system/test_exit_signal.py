"""SIGTERM (a container stopping, uvicorn's shutdown re-raising it) ends Python without its
exit handlers: tracewire flushes first, bounded, and the process still dies of the signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from tests.conftest import API_KEY
from tests.support.mlflow_server import free_port
from tracewire.export import spool_directory as spools

CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import httpx2, openai, tracewire

    def handler(request):
        text = json.loads(request.content)["messages"][-1]["content"]
        return httpx2.Response(200, json={
            "id": "c", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}})

    tracewire.autolog()
    client = openai.OpenAI(api_key=os.environ["TEST_API_KEY"], max_retries=0,
                           http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    calls = int(os.environ["TEST_CALLS"])
    for i in range(calls):  # a tight loop: the export worker trails behind it
        client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": f"call {i}"}])
    os.kill(os.getpid(), signal.SIGTERM)
    print("not reached", flush=True)
""")


def test_sigterm_spools_every_finished_trace_then_dies_of_the_signal(tmp_path: Path) -> None:
    (tmp_path / "child.py").write_text(CHILD)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "TRACEWIRE_", "PYTEST_"))
    }
    spool_dir = tmp_path / "spool"
    env.update(
        {
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",  # nothing listens
            "TRACEWIRE_SPOOL_DIR": str(spool_dir),
            "TEST_CALLS": "2000",
            "TEST_API_KEY": API_KEY,
            "TRACEWIRE_TESTING": "1",
        }
    )
    done = subprocess.run(
        [sys.executable, str(tmp_path / "child.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert "not reached" not in done.stdout
    left = spools.status(spool_dir)
    assert sum(s.pending for s in left) == 2000, (left, done.stderr[-2000:])


EXITING = textwrap.dedent("""
    import os, sys, time
    import openai, tracewire

    tracewire.autolog()
    client = openai.OpenAI(base_url=os.environ["TEST_OPENAI_BASE_URL"],
                           api_key=os.environ["TEST_API_KEY"], max_retries=0)
    for i in range(20):
        client.chat.completions.create(model="gpt-4o-mini",
                                       messages=[{"role": "user", "content": f"call {i}"}])
    print("exiting", flush=True)
""")


def test_sigterm_while_the_exit_is_flushing_ends_it_promptly(
    tmp_path: Path, openai_server: Any
) -> None:
    """A SIGTERM that lands while the process is already exiting (a pool terminating workers
    that are finishing anyway, a container stopped as its job ends) must not make the exit wait
    on itself: it finishes the bounded flush it is in, then dies of the signal."""
    (tmp_path / "child.py").write_text(EXITING)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "TRACEWIRE_", "PYTEST_"))
    }
    env.update(
        {
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",  # nothing listens
            "TRACEWIRE_SPOOL_DIR": str(tmp_path / "spool"),
            "TEST_API_KEY": API_KEY,
            "TEST_OPENAI_BASE_URL": openai_server.base_url,
            "TRACEWIRE_TESTING": "1",
        }
    )
    child = subprocess.Popen(
        [sys.executable, str(tmp_path / "child.py")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "exiting"
    time.sleep(0.5)  # inside the exit's wait for the (dead) store
    child.send_signal(signal.SIGTERM)
    started = time.monotonic()
    _, err = child.communicate(timeout=60)
    ended_after = time.monotonic() - started
    print(f"\nSIGTERM during the exit: gone {ended_after:.1f} s later")
    assert ended_after < 10, err[-2000:]  # the flush bound (2 s), not the 31 s of waiting on itself
    assert child.returncode == -signal.SIGTERM, err[-2000:]
    assert sum(s.pending for s in spools.status(tmp_path / "spool")) == 20
