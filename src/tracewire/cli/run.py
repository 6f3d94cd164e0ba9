"""`tracewire run -- <command ...>`: run a command with tracing on, without changing its code.

    tracewire run -- uvicorn app:app --workers 2
    tracewire run -- mlflow models serve -m models:/<id> --env-manager local
    tracewire run -- python script.py

Every Python process of the command (the workers uvicorn or gunicorn spawn or fork included)
starts with ``tracewire.autolog()``, configured from ``TRACEWIRE_*`` and MLflow's environment
variables only: the command's environment gets ``PYTHONPATH`` with tracewire's
``sitecustomize`` first (see tracewire/bootstrap). The settings are checked once, before the
command starts, in the process that then becomes the command; a fresh local sqlite store is
created by the first worker's shipper, atomically (export/sqlite_store.py).

This process stays as the command's parent, small (it never imports MLflow), and stops last:
it passes SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 on to the command (but not a
SIGINT or SIGQUIT a terminal sent: that one reaches the command directly), and when the command
has exited it waits, bounded by the exit and flush timeouts, for the processes the command left
behind to finish, saying so if they take a while: their traces are stored before this process,
often a container's first, exits. A server that runs its workers
in a process of their own (``mlflow models serve`` runs uvicorn under its CLI) is covered: on
Linux this process is the subreaper of everything the command starts. The exit status is the
command's own (the same signal if a signal ended it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from tracewire.cli import CLIError


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "run",
        help="run a command with tracing on in every Python process it starts",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "command", nargs=argparse.REMAINDER, help="the command and its arguments, after `--`"
    )
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

    import tracewire.bootstrap
    from tracewire import config

    env = dict(os.environ)
    bootstrap = str(Path(tracewire.bootstrap.__file__).parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [bootstrap, env.get("PYTHONPATH")]))
    env["TRACEWIRE_RUN"] = "1"
    settings = config.resolve()  # a bad setting fails here, once, not in every worker
    pid = os.fork()
    if pid == 0:
        os._exit(_become_the_command(executable, command, env))
    return _supervise(pid, settings.exit_timeout + settings.flush_timeout + _SHIPPER_GRACE)


# After the command, its processes' exits (each waits up to the exit timeout for its traces to
# be stored) and their shippers' last efforts (the flush timeout), and a margin for starting.
_SHIPPER_GRACE = 5.0
_FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
# A terminal sends these to its whole foreground group, the command included: passing them on
# then would deliver them twice (a second Ctrl-C makes uvicorn quit without its graceful
# shutdown). Sent to this process alone (`docker stop` with STOPSIGNAL SIGINT, `timeout -s
# INT`), they are passed on.
_TERMINAL = (signal.SIGINT, signal.SIGQUIT)


def _become_the_command(executable: str, command: list[str], env: dict[str, str]) -> int:
    """In the forked child: check the destination (a local store is created by the first
    shipper that needs it, atomically), then exec."""
    try:
        from tracewire import config
        from tracewire.export import destination

        destination.check_destination(config.resolve())
        os.execve(executable, command, env)
    except config.ConfigError as error:
        print(f"tracewire: error: {' '.join(str(error).split())}", file=sys.stderr)
    except OSError as error:
        print(f"tracewire: error: cannot run {command[0]}: {error.strerror}", file=sys.stderr)
    return 1


def _supervise(pid: int, grace: float) -> int:
    _become_subreaper()
    for sig in _FORWARDED:
        signal.signal(sig, lambda signum, frame: _pass_on(pid, signum))
    for sig in _TERMINAL:
        signal.signal(
            sig, lambda signum, frame: None if _from_terminal() else _pass_on(pid, signum)
        )
    _, status = os.waitpid(pid, 0)
    started = time.monotonic()
    said = False
    while True:  # what the command left: reparented to us, reaped here
        try:
            reaped, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        waited = time.monotonic() - started
        if waited >= grace:
            print(
                f"tracewire: processes the command started are still running after "
                f"{grace:.0f} s; leaving them",
                file=sys.stderr,
            )
            break
        if reaped == 0:
            if waited > 2 and not said:
                said = True
                print(
                    f"tracewire: the command has exited; waiting up to {grace:.0f} s for the "
                    "processes it started (and their traces)",
                    file=sys.stderr,
                )
            time.sleep(0.05)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # ended by a signal: end the same way (PID 1 ignores it: then 128 + signal)
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


def _from_terminal() -> bool:
    """Whether we are in a terminal's foreground group, where its Ctrl-C reaches everyone."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError):  # no terminal (a container, a service, a pipe)
        return False


def _pass_on(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # it has exited: what it left behind is being waited for


def _become_subreaper() -> None:
    """Linux: orphaned descendants become our children, so their exits can be waited for."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass
