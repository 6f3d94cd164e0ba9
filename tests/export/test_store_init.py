"""A fresh sqlite store opened by several shipper processes at once is initialized once,
under a lock (MLflow's schema migration races otherwise)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow

SCRIPT = """
import sys
from tracewire import config
from tracewire.export import store
import dataclasses
settings = dataclasses.replace(config.resolve(), tracking_uri=sys.argv[1], experiment_name="race")
client, experiment_id = store.Store(settings).experiment()
print(experiment_id)
"""


def test_parallel_first_opens_of_a_sqlite_store(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, uri],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1  # one experiment, found by all
    assert mlflow.MlflowClient(uri).get_experiment_by_name("race") is not None
