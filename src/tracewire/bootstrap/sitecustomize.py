"""Started by ``tracewire run``: enables ``tracewire.autolog()`` (configured from environment
variables only) in every Python process of the command, before the app's own imports, spawned
workers included: they inherit ``PYTHONPATH``, which puts this directory first.

Another ``sitecustomize`` further down the path (a distribution's, a virtualenv's) still runs.
A failure here never stops the program: it runs untraced, with one line on stderr.
"""

import os
import sys


def _run_next_sitecustomize() -> None:
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


# multiprocessing's resource tracker, a Python process of its own started with ``-c``: it runs
# no app code, and tracing it cost a shipper process (about 200 MB) and 170 MB of its own.
_HELPERS = ("from multiprocessing.resource_tracker import main",)


def _autolog() -> None:
    if os.environ.get("TRACEWIRE_RUN") != "1":
        return  # a process tracewire itself starts (its shipper), or the variable was cleared
    if any(arg.startswith(_HELPERS) for arg in sys.orig_argv[1:]):
        return
    try:
        import tracewire

        tracewire.autolog()
    except Exception as exc:  # the program must start whatever happens here
        print(f"tracewire: autolog() failed, this process runs untraced: {exc}", file=sys.stderr)


_run_next_sitecustomize()
_autolog()
