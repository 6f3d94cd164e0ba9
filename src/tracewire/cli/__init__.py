"""The ``tracewire`` command.

Each subcommand is its own module in this package with two functions::

    add_parser(subparsers) -> argparse.ArgumentParser   # declare the subcommand and its options
    run(args: argparse.Namespace) -> int                 # do it; the exit code

and is listed in ``SUBCOMMANDS``. Subcommand modules import their heavy dependencies (MLflow,
openai) inside ``run`` so that ``tracewire --help`` stays fast.

Exit codes: 0 success, 1 failure (one line on stderr, no traceback, for expected errors: a
:class:`CLIError`, ``tracewire.ConfigError``, ``tracewire.PluginUnavailable``), 2 usage error.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["SUBCOMMANDS", "CLIError", "build_parser", "main"]

PROG = "tracewire"

# Subcommand modules under tracewire.cli, in the order `tracewire --help` lists them.
SUBCOMMANDS: tuple[str, ...] = ("demo", "run", "spool", "stats", "export")


class CLIError(Exception):
    """An expected failure: printed as one line on stderr, exit code 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Production tracing for GenAI apps on MLflow.",
        epilog="Run `tracewire <command> --help` for the options of a command.",
    )
    try:
        from importlib.metadata import version

        parser.add_argument(
            "--version", action="version", version=f"%(prog)s {version('tracewire')}"
        )
    except Exception:  # not installed as a distribution (running from a source tree)
        pass
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        sub = module.add_parser(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def _fail(message: str) -> int:
    from tracewire.core import scrub

    # One line: the first line of the message is what the user needs; no credential (errors
    # repeat MLflow's, which repeat the tracking URI).
    text = " ".join(scrub.text(str(message)).split()) or "failed"
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tracewire`` command with ``argv`` (default: ``sys.argv[1:]``); the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help / --version (0) or a usage error (2)
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_usage(sys.stderr)
        print(
            f"{PROG}: error: a command is required (one of: {', '.join(SUBCOMMANDS)})",
            file=sys.stderr,
        )
        return 2

    from tracewire.config import ConfigError
    from tracewire.plugins.base import PluginUnavailable

    try:
        return int(run(args))
    except (CLIError, ConfigError, PluginUnavailable) as error:
        return _fail(str(error))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
