"""`tracewire spool ...` run as a user runs it: a separate process, its output read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def spool_command(action: str, directory: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tracewire.cli", "spool", action, "--dir", str(directory), *options],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def spool_status(directory: Path) -> dict[str, Any]:
    """`tracewire spool status --json`, parsed; the command must succeed."""
    result = spool_command("status", directory, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]
