"""Real uvicorn on 127.0.0.1, in a thread of the test process (so the app's traces go through
the same tracewire pipeline the test reads back), and httpx as the client."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Callable, ContextManager, Iterator

import pytest
import uvicorn


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # A long keep-alive: on a busy machine a pooled connection idle past uvicorn's 5 s default
    # can be closed by the server just as the client reuses it (a ReadError of neither side's).
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="auto", timeout_keep_alive=120))
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
    return serve
