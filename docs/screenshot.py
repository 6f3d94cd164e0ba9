"""Regenerate docs/demo-trace.png: a demo trace's span tree in the MLflow UI.

A docs tool, not a test. Run it from the repository, with the project's virtualenv:

    apt-get install chromium   # Debian's browser: browser downloads do not work offline
    python docs/screenshot.py  # a fresh `tracewire demo` in a temp dir, then the picture
    python docs/screenshot.py --store path/to/mlflow.db   # or traces already stored

(`python` being the project's virtualenv, e.g. .venv/bin/python: it needs tracewire with the
demo's extras, mlflow and websockets.)

It runs `tracewire demo` against a sqlite store in a temporary directory (the user's ./mlflow.db
is not touched), starts `mlflow server` on a free loopback port against that store, picks the
newest successful agent request trace (the one with a retriever, a chat model and a tool span),
opens its page in headless chromium and writes the PNG. Every process it starts is stopped
before it exits.

Chromium is driven through its DevTools protocol rather than `--screenshot`: the MLflow UI is a
React app that fetches the trace after the page loads, so the script waits until the span tree
is on the page instead of guessing a time budget, and it can mark MLflow's assistant panel as
already shown (it opens itself on a first visit from loopback and would cover half the picture).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from base64 import b64decode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from websockets.sync.client import connect

DOCS = Path(__file__).resolve().parent
EXPERIMENT = "tracewire-demo"  # what `tracewire demo` logs to by default
WINDOW = (1440, 820)
# The UI's first visit from loopback opens the assistant panel unless this flag is set
# (mlflow/server/js: useLocalStorage key "mlflow.assistant.fab.autoOpenedOnFirstLoad", version 1).
HIDE_ASSISTANT = "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true')"
# The span types an agent request trace of the demo has besides its root and graph nodes.
WANTED_TYPES = {"RETRIEVER", "CHAT_MODEL", "TOOL"}
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Without these chromium keeps trying to reach Google's services, which fails offline.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# No proxy for loopback, whatever the environment says.
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def say(message: str) -> None:
    print(f"screenshot: {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def started(args: list[str], name: str, **kwargs: Any) -> Iterator[subprocess.Popen]:
    """A process in a session of its own, so stopping it also stops what it spawned
    (mlflow server's uvicorn workers and job runner, chromium's helpers)."""
    proc = subprocess.Popen(args, start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Children that outlive the leader keep the group; make sure none is left.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        say(f"stopped {name}")


def run_demo(workdir: Path) -> str:
    """`tracewire demo` with its store and Delta table in ``workdir``; the store's URI."""
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    say(f"running tracewire demo into {uri} ...")
    began = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tracewire.cli",
            "demo",
            "--tracking-uri",
            uri,
            "--delta",
            str(workdir / "delta"),
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        sys.exit(f"tracewire demo failed:\n{result.stdout}{result.stderr}")
    say(f"demo done in {time.monotonic() - began:.0f} s")
    return uri


def pick_trace(uri: str) -> tuple[str, str, list[str]]:
    """The newest successful trace with retriever, chat model and tool spans:
    (experiment id, trace id, span names)."""
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        sys.exit(f"no experiment {EXPERIMENT!r} in {uri}: run `tracewire demo` first")
    traces = client.search_traces(
        locations=[experiment.experiment_id], max_results=50, order_by=["timestamp_ms DESC"]
    )
    for trace in traces:
        spans = trace.data.spans
        if trace.info.state == "OK" and WANTED_TYPES <= {s.span_type for s in spans}:
            return experiment.experiment_id, trace.info.trace_id, [s.name for s in spans]
    sys.exit(f"no successful agent trace in experiment {EXPERIMENT!r} of {uri}")


def wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            with LOCAL.open(url, timeout=5) as response:
                if response.status == 200:
                    return
        if proc.poll() is not None:
            sys.exit(f"{what} exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            sys.exit(f"{what} did not answer {url} within {timeout:.0f} s")
        time.sleep(0.5)


class DevTools:
    """The few DevTools protocol calls the screenshot needs, over one page's websocket."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self._id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv(timeout=60))
            if message.get("id") == self._id:  # events in between are not needed
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)[
            "result"
        ].get("value")


def devtools_page(profile: Path, proc: subprocess.Popen) -> str:
    """The websocket URL of chromium's first tab, once its DevTools port is up."""
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit("chromium did not open its DevTools port")
        time.sleep(0.2)
    port = port_file.read_text().split()[0]
    with LOCAL.open(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
        targets = json.load(response)
    return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")


def capture(url: str, span_names: list[str], out: Path, workdir: Path) -> None:
    """Open ``url`` in headless chromium, wait until every span name is on the page, save a PNG."""
    profile = workdir / "chromium-profile"  # fresh and empty: no state from earlier runs
    profile.mkdir()
    args = [
        "chromium",
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--remote-debugging-port=0",
        "about:blank",
    ]
    with started(args, "chromium", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        with connect(devtools_page(profile, proc), max_size=None) as ws:
            page = DevTools(ws)
            page.call("Page.enable")
            # --window-size includes the headless window's frame: the page itself gets less.
            page.call(
                "Emulation.setDeviceMetricsOverride",
                width=WINDOW[0],
                height=WINDOW[1],
                deviceScaleFactor=1,
                mobile=False,
            )
            page.call("Page.addScriptToEvaluateOnNewDocument", source=HIDE_ASSISTANT)
            page.call("Page.navigate", url=url)
            check = (
                "(() => { const text = document.body ? document.body.innerText : '';"
                f" return {json.dumps(sorted(set(span_names)))}"
                ".every(name => text.includes(name)); })()"
            )
            deadline = time.monotonic() + 90
            while not page.evaluate(check):
                if time.monotonic() > deadline:
                    sys.exit(f"the span tree did not appear at {url} within 90 s")
                time.sleep(0.5)
            time.sleep(1.5)  # the drawer's slide-in animation and icon fonts
            shot = page.call("Page.captureScreenshot", format="png")
    out.write_bytes(b64decode(shot["data"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--store",
        metavar="DB",
        help="an existing sqlite store with demo traces (default: run the demo)",
    )
    parser.add_argument("--out", default=str(DOCS / "demo-trace.png"), help="the PNG to write")
    args = parser.parse_args()

    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tracewire-screenshot-") as tmp:
        workdir = Path(tmp)
        uri = f"sqlite:///{Path(args.store).resolve()}" if args.store else run_demo(workdir)
        experiment_id, trace_id, span_names = pick_trace(uri)
        say(f"trace {trace_id}: {len(span_names)} spans")

        port = free_port()
        server = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--default-artifact-root",
            str(workdir / "artifacts"),
        ]
        say(f"starting mlflow server on 127.0.0.1:{port} ...")
        with started(
            server,
            "mlflow server",
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        ) as proc:
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/health", proc, "mlflow server")
            url = f"{base}/#/experiments/{experiment_id}/traces/{trace_id}"
            say(f"opening {url} in headless chromium ...")
            capture(url, span_names, Path(args.out), workdir)
    out = Path(args.out)
    say(f"wrote {out} ({out.stat().st_size // 1024} KB) in {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
