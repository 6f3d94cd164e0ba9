"""Real uvicorn on 127.0.0.1, in a thread of the test process (so the app's traces go through
the same tracewire pipeline the test reads back), and httpx as the client."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import mlflow
import pytest
import uvicorn

from tests.conftest import Traced


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # A long keep-alive: on a busy machine a pooled connection idle past uvicorn's 5 s default
    # can be closed by the server just as the client reuses it (a ReadError of neither side's).
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="auto",
            timeout_keep_alive=120,
        )
    )
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


Serve = Callable[[Any], ContextManager[str]]


@pytest.fixture
def server() -> Serve:
    """``with server(app) as url:`` -- the app on real uvicorn for the block."""
    return serve


def settled(traced: Traced, expected: int) -> list[mlflow.entities.Trace]:
    """The traces once ``expected`` are stored: a request's trace ends when the app call
    returns, after the client has the whole response (and after any background task)."""
    deadline = time.monotonic() + 30
    while len(found := traced.traces()) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(found) == expected, [t.info.trace_id for t in found]
    return found
