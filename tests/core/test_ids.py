"""core/ids.py: fresh ids from the OS's random source, pooled, never shared between threads
or between a forked worker and its parent."""

from __future__ import annotations

import os
import re
import threading

from tracewire.core import ids

HEX32 = re.compile(r"[0-9a-f]{32}")


def test_ids_never_repeat_across_threads_and_keep_their_format() -> None:
    seen: list[tuple[str, int, int]] = []

    def take() -> None:
        seen.extend((ids.request_id(), ids.trace_id(), ids.span_id()) for _ in range(2_000))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for column in zip(*seen):
        assert len(set(column)) == 8_000
    assert all(HEX32.fullmatch(r) and 0 < t < 2**128 and 0 < s < 2**64 for r, t, s in seen)


def test_a_forked_child_never_reuses_its_parents_read_ahead_ids() -> None:
    parent = (ids.request_id(), ids.trace_id(), ids.span_id())  # the parent now reads ahead
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, repr((ids.request_id(), ids.trace_id(), ids.span_id())).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = eval(os.read(read, 512).decode())
    after = (ids.request_id(), ids.trace_id(), ids.span_id())
    assert all(c != a and c != p for c, a, p in zip(child, after, parent))
