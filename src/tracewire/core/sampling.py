"""Which traces to keep: a deterministic hash of the session (or request), so every worker
process agrees without shared state and a session is kept or dropped whole."""

from __future__ import annotations

import hashlib


def keep(key: str, rate: float) -> bool:
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < rate * 2**64
