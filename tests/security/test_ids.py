"""Trace ids reach every client (``X-Trace-ID``) and grant feedback: one client must not be able
to predict another's. With a Mersenne Twister behind them, 104 requests' trace and root span ids
(624 consecutive 32-bit outputs) give away the generator's state and so the next trace id."""

from __future__ import annotations

import random
from typing import Any

import httpx
import mlflow
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from tests.conftest import Traced
from tests.support.web_server import Serve, settled
from tracewire.middleware import TracingMiddleware

_N = 32
_MASK = 0xFFFFFFFF


def _untemper(y: int) -> int:
    y ^= y >> 18
    y ^= (y << 15) & 0xEFC60000
    z = y
    for _ in range(4):
        z = y ^ ((z << 7) & 0x9D2C5680)
    y = z & _MASK
    z = y
    for _ in range(2):
        z = y ^ (z >> 11)
    return z


def _words(value: int, count: int) -> list[int]:
    """The 32-bit outputs ``getrandbits(32 * count)`` consumed, in the order it drew them."""
    return [(value >> (_N * i)) & _MASK for i in range(count)]


def _predict_trace_id(observed: list[tuple[int, int]], ahead: int = 1) -> int:
    """The ``ahead``-th next 128-bit trace id of a Mersenne Twister that drew, per request, a
    128-bit trace id then a 64-bit span id (``observed``: 104 such pairs, its whole state)."""
    outputs = [
        w for trace_id, span_id in observed for w in _words(trace_id, 4) + _words(span_id, 2)
    ]
    state = [_untemper(w) for w in outputs[-624:]]
    clone = random.Random()
    clone.setstate((3, (*state, 624), None))
    for _ in range(ahead - 1):
        clone.getrandbits(128), clone.getrandbits(64)
    return clone.getrandbits(128)


def test_the_predictor_predicts_a_mersenne_twister() -> None:
    """The attack below is real: against the generator tracewire used, it predicts."""
    victim = random.Random()
    observed = [(victim.getrandbits(128), victim.getrandbits(64)) for _ in range(104)]
    assert _predict_trace_id(observed) == victim.getrandbits(128)


def _app() -> Starlette:
    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hi")

    return Starlette(routes=[Route("/hello", hello)])


def test_trace_ids_cannot_be_predicted_from_earlier_ones(server: Serve, traced: Traced) -> None:
    app = TracingMiddleware(_app(), trace_all_requests=True, feedback_path="/feedback")
    with server(app) as url, httpx.Client(base_url=url) as http:
        seen = [http.get("/hello").headers["x-trace-id"] for _ in range(104)]
        stored = {t.info.trace_id: t for t in settled(traced, 104)}
        # The attacker's view: the trace ids echoed to it, and (worst case) the root span ids.
        observed = [
            (
                int(trace_id[3:], 16),
                int(
                    next(s for s in stored[trace_id].data.spans if s.parent_id is None).span_id, 16
                ),
            )
            for trace_id in seen
        ]
        # The feedback request itself is traced too: the victim's is the one after it.
        predicted = f"tr-{_predict_trace_id(observed, ahead=2):032x}"
        # Planted before the victim's request exists.
        planted = http.post(
            "/feedback", json={"trace_id": predicted, "value": False, "name": "planted"}
        )
        assert planted.status_code == 202
        victim = http.get("/hello").headers["x-trace-id"]
    assert victim != predicted
    settled(traced, 106)
    assert not [a for a in mlflow.get_trace(victim).info.assessments if a.name == "planted"]
