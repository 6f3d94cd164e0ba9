"""`tracewire spool ...` run as a user runs it: a separate process, its output read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.support.processes import run_command


def spool_command(
    action: str, directory: Path, *options: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``tracewire spool <action> --dir <directory> <options>``, in ``env`` (default: this
    process's environment)."""
    return run_command(
        [sys.executable, "-m", "tracewire.cli", "spool", action, "--dir", str(directory), *options],
        os.environ if env is None else env,
        timeout=60,
    )


def spool_status(directory: Path) -> dict[str, Any]:
    """`tracewire spool status --json`, parsed; the command must succeed."""
    result = spool_command("status", directory, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]
