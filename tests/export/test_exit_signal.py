"""SIGTERM (a container stopping, uvicorn's shutdown re-raising it) ends Python without its
exit handlers: tracewire flushes first, bounded, and the process still dies of the signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import API_KEY
from tests.support.mlflow_server import free_port
from tracewire.export import spool as spools

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
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "TRACEWIRE_", "PYTEST_"))}
    spool_dir = tmp_path / "spool"
    env.update({"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",  # nothing listens
                "TRACEWIRE_SPOOL_DIR": str(spool_dir), "TEST_CALLS": "2000",
                "TEST_API_KEY": API_KEY, "TRACEWIRE_TESTING": "1"})
    done = subprocess.run([sys.executable, str(tmp_path / "child.py")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert "not reached" not in done.stdout
    left = spools.status(spool_dir)
    assert sum(s.pending for s in left) == 2000, (left, done.stderr[-2000:])
