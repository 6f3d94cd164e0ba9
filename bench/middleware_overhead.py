"""Per-request overhead of TracingMiddleware, measured in-process (no sockets, no server).

What it measures, in one process, each request driven straight through the ASGI app with a
minimal ``receive``/``send`` pair:

  (a) a trivial endpoint (a health check: no traced work), a bare Starlette app vs the same
      app inside ``TracingMiddleware`` -- the middleware's own cost, which must stay under
      15 us per request (the target: such a request creates no trace);
  (a') the same with a bare ASGI callable instead of Starlette (no router, no Request object),
      which shows the middleware's cost apart from its interplay with Starlette's layers;
  (b) an endpoint that makes one traced OpenAI ``chat.completions.create`` call through an
      in-process mock transport (bench/openai_overhead.py's), with ``tracewire.autolog()`` on:
      without the middleware (the call is its own trace) vs with it (the call plus the request's
      root span, one trace).

Modes run interleaved in rounds (``--rounds``), the health checks in slices of 250 requests,
and the samples are pooled; medians and p99 are per request. Each round starts once the previous round's traces are flushed. Traces go to a fresh sqlite store in a temporary directory.

Run:  python bench/middleware_overhead.py [--requests 5000] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(_BENCH))

from openai_overhead import make_client, p99, quiet_logs
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

import tracewire
from tracewire.middleware import TracingMiddleware

TARGET_IDLE_US = 15.0
IDLE_MODES = ("idle bare", "idle traced", "asgi bare", "asgi traced")
CHUNK = 250


def build_app() -> Starlette:
    client = make_client()

    async def health(request: Any) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    def chat(request: Any) -> JSONResponse:  # sync: Starlette runs it in its thread pool
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
        )
        return JSONResponse({"reply": reply.choices[0].message.content})

    return Starlette(routes=[Route("/health", health), Route("/chat", chat, methods=["POST"])])


async def health_asgi(scope: Any, receive: Any, send: Any) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"15")],
        }
    )
    await send({"type": "http.response.body", "body": b'{"status":"ok"}'})


def scope(method: str, path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 5000),
        "headers": [(b"host", b"bench"), (b"x-session-id", b"bench-session")],
    }


async def timed(app: Any, method: str, path: str, n: int) -> list[float]:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    samples = []
    for _ in range(n):
        request = scope(method, path)
        start = time.perf_counter_ns()
        await app(request, receive, send)
        samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="tracewire-bench-mw-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["TRACEWIRE_SPOOL_DIR"] = str(root / "spool")
    quiet_logs()
    # The starlette plugin would put the middleware in the bare app too: it is what we time.
    tracewire.autolog(exclude=["starlette"])
    app = build_app()
    traced = TracingMiddleware(app)
    modes = {
        "idle bare": (app, "GET", "/health"),
        "idle traced": (traced, "GET", "/health"),
        "asgi bare": (health_asgi, "GET", "/health"),
        "asgi traced": (TracingMiddleware(health_asgi), "GET", "/health"),
        "chat bare": (app, "POST", "/chat"),
        "chat traced": (traced, "POST", "/chat"),
    }
    samples: dict[str, list[float]] = {name: [] for name in modes}
    chat_requests = max(200, args.requests // 10)  # the chat endpoint is ~100x slower

    async def run() -> None:
        for target, method, path in modes.values():  # warm up
            await timed(target, method, path, 200)
        for _ in range(args.rounds):
            # The chat modes' traces are exported by a worker thread of this process: let it
            # finish, or the requests timed next share the GIL with it (that inflated both the
            # bare and the traced health check by about 1.6x, and the difference with them).
            assert tracewire.flush(60), "traces did not drain"
            # The health checks alternate in slices of CHUNK requests, so that the machine's
            # drift (its load, its clock) falls on the bare and the traced requests alike.
            for _ in range(args.requests // CHUNK):
                for name in IDLE_MODES:
                    samples[name] += await timed(*modes[name], CHUNK)
            for name in ("chat bare", "chat traced"):
                samples[name] += await timed(*modes[name], chat_requests)

    asyncio.run(run())
    assert tracewire.flush(60), "traces did not drain"
    tracewire.disable()

    stats = {
        name: {"median_us": statistics.median(s), "p99_us": p99(s), "n": len(s)}
        for name, s in samples.items()
    }
    idle = stats["idle traced"]["median_us"] - stats["idle bare"]["median_us"]
    asgi = stats["asgi traced"]["median_us"] - stats["asgi bare"]["median_us"]
    chat = stats["chat traced"]["median_us"] - stats["chat bare"]["median_us"]
    print(
        f"Middleware overhead, in-process ASGI, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}; tracewire.autolog(exclude=['starlette']) on in every mode"
    )
    print(f"{'mode':<12} {'median us':>10} {'p99 us':>10} {'requests':>9}")
    for name, s in stats.items():
        print(f"{name:<12} {s['median_us']:>10.1f} {s['p99_us']:>10.1f} {s['n']:>9}")

    def ratio(mode: str) -> float:
        return stats[f"{mode} traced"]["median_us"] / stats[f"{mode} bare"]["median_us"]

    verdict = "MET" if idle < TARGET_IDLE_US else "NOT MET"
    print(
        f"added per request with no traced work: {idle:+.1f} us (target < "
        f"{TARGET_IDLE_US:.0f} us: {verdict}), ratio {ratio('idle'):.2f}"
    )
    print(f"the same on a bare ASGI endpoint (no Starlette): {asgi:+.1f} us")
    print(
        f"added per request with one traced OpenAI call (the request's root span): "
        f"{chat:+.1f} us, ratio {ratio('chat'):.2f}"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "stats": stats,
                    "idle_added_us": idle,
                    "asgi_added_us": asgi,
                    "chat_added_us": chat,
                }
            )
        )


if __name__ == "__main__":
    main()
