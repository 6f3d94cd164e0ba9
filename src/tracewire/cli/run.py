"""`tracewire run -- <command ...>`: run a command with tracing on, without changing its code.

    tracewire run -- uvicorn app:app --workers 2
    tracewire run -- python script.py

Every Python process of the command (the workers uvicorn or gunicorn spawn or fork included)
starts with ``tracewire.autolog()``, configured from ``TRACEWIRE_*`` and MLflow's environment
variables only: the command's environment gets ``PYTHONPATH`` with tracewire's
``sitecustomize`` first (see tracewire/bootstrap). The settings are checked and a local sqlite
store is created here, once, before any worker starts (a fresh store opened by several workers
at once can fail its schema migration). Then this process becomes the command (``exec``), so
signals and the exit code are the command's own.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from tracewire.cli import CLIError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "run", help="run a command with tracing on in every Python process it starts",
        description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the command and its arguments, after `--`")
    return parser


def run(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise CLIError("nothing to run: tracewire run -- <command ...>")
    executable = shutil.which(command[0])
    if executable is None:
        raise CLIError(f"command not found: {command[0]}")

    from tracewire import config
    from tracewire.export import destination, store

    settings = config.resolve()  # a bad setting fails here, once, not in every worker
    destination.check_destination(settings)
    store.initialize(settings)

    import tracewire.bootstrap

    env = dict(os.environ)
    bootstrap = str(Path(tracewire.bootstrap.__file__).parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [bootstrap, env.get("PYTHONPATH")]))
    env["TRACEWIRE_RUN"] = "1"
    os.execve(executable, command, env)
    return 0  # not reached
