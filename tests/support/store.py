"""Reading and seeding the real MLflow store the tests write to."""

from __future__ import annotations

import uuid
from pathlib import Path

import mlflow

from tracewire.testing.traces import Synthetic


def store_bytes(tracking_uri: str) -> bytes:
    """Every byte a sqlite store holds (its -wal too): what a secret must never be found in."""
    path = Path(tracking_uri.removeprefix("sqlite:///"))
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


def new_experiment(tracking_uri: str) -> str:
    return mlflow.MlflowClient(tracking_uri).create_experiment(f"delta-{uuid.uuid4().hex[:10]}")


def synthetic(count: int, start_ms: int, **fields: object) -> list[Synthetic]:
    """Traces written straight into the store (tracewire.testing.traces), with unique ids."""
    base = uuid.uuid4().int >> 64  # trace ids unique in the suite's shared store
    return [
        Synthetic(
            otel_trace_id=base + i + 1,  # type: ignore[arg-type]
            request_time_ms=start_ms + i * 1000,
            duration_ms=100 + i,
            **fields,
        )
        for i in range(count)
    ]
