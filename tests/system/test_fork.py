"""Forked workers (gunicorn, uvicorn --workers) each run their own worker thread, spool and
shipper process."""

from __future__ import annotations

import os
import threading

import openai

import tracewire
from tests.conftest import Traced
from tracewire.export import pipeline


def test_forked_child_exports_through_its_own_threads_and_spool(
    traced: Traced, client: openai.OpenAI
) -> None:
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "parent"}]
    )
    assert tracewire.flush(30)
    parent_spool, parent_shipper = pipeline._spool.path, pipeline._shipper
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: exit code says what it saw
        code = 1
        try:
            names = {t.name for t in threading.enumerate()}
            child = openai.OpenAI(base_url=client.base_url, api_key="sk-x", max_retries=0)
            for _ in range(3):
                child.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "child"}]
                )
            ok = (
                tracewire.flush(30)
                and "tracewire-export" in names
                and pipeline._spool.path != parent_spool
                and pipeline._shipper is not parent_shipper
            )
            os.write(write, str(pipeline._spool.path).encode())
            code = 0 if ok else 3
        finally:
            os._exit(code)
    os.close(write)
    child_spool = os.read(read, 4096).decode()
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child_spool and child_spool != str(parent_spool)
    contents = sorted(
        t.data.spans[0].inputs["messages"][0]["content"] for t in traced.traces(expected=4)
    )
    assert contents == ["child", "child", "child", "parent"]


def test_multiprocessing_children_store_their_traces_without_a_flush(
    traced: Traced, client: openai.OpenAI
) -> None:
    """A multiprocessing child (fork: the default on Linux) leaves with os._exit, past atexit:
    its traces must still be stored, by the same bounded exit wait."""
    import multiprocessing

    def work(text: str) -> None:
        child = openai.OpenAI(base_url=client.base_url, api_key="sk-x", max_retries=0)
        child.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": text}]
        )

    context = multiprocessing.get_context("fork")
    children = [context.Process(target=work, args=(f"process {i}",)) for i in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    contents = sorted(
        t.data.spans[0].inputs["messages"][0]["content"] for t in traced.traces(expected=2)
    )
    assert contents == ["process 0", "process 1"]
