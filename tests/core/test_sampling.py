"""core/sampling.py: which traces are kept, decided by a hash every process agrees on."""

from __future__ import annotations

import subprocess
import sys

from tracewire.core import sampling


def test_rates_at_the_ends_keep_everything_or_nothing() -> None:
    assert all(sampling.keep(f"s{i}", 1.0) for i in range(100))
    assert not any(sampling.keep(f"s{i}", 0.0) for i in range(100))


def test_the_kept_share_follows_the_rate() -> None:
    kept = sum(sampling.keep(f"session-{i}", 0.2) for i in range(20_000))
    assert 0.18 < kept / 20_000 < 0.22


def test_a_lower_rate_keeps_a_subset_of_a_higher_ones() -> None:
    keys = [f"k{i}" for i in range(5_000)]
    low = {k for k in keys if sampling.keep(k, 0.1)}
    high = {k for k in keys if sampling.keep(k, 0.5)}
    assert low and low <= high


def test_every_process_decides_alike_and_odd_text_is_fine() -> None:
    keys = ["a", "session-42", "ünïcode", "\ud800 lone surrogate", ""]
    here = [sampling.keep(k, 0.5) for k in keys]
    code = (
        "import sys; from tracewire.core import sampling; "
        f"print([sampling.keep(k, 0.5) for k in {keys!r}])"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    )
    assert other.stdout.strip() == str(here)
