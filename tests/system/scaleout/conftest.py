"""The PostgreSQL cluster of the scale-out tests: one per test process (so one per xdist worker
that runs a test here), started only when a test asks for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.postgres import PostgresCluster


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """Fails (never skips) with the install command when PostgreSQL is missing, so a machine
    without it cannot pass by skipping."""
    with PostgresCluster() as cluster:
        yield cluster
