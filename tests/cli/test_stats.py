"""`tracewire stats` on a store with known traces: every figure checked exactly, from the
store and from the Delta table (one aggregation path), as a table, JSON, CSV and an HTML page."""

from __future__ import annotations

import csv
import datetime as dt
import html
import io
import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import pytest
from mlflow.tracing.utils import calculate_cost_by_model_and_token_usage

from tests.support.processes import clean_env
from tracewire.cli import main
from tracewire.export import delta
from tracewire.testing.traces import Synthetic, write

NOW = int(time.time() * 1000)


def ago(minutes: int) -> str:
    """--since as a date/time relative to NOW, so the window does not move while the suite runs."""
    return dt.datetime.fromtimestamp(NOW / 1000 - minutes * 60, tz=dt.UTC).isoformat()


@pytest.fixture(scope="module")
def known(tracking_uri: str) -> str:
    """Six traces in the last hour: four on /a (prod, one failed), two on /b (staging, a model
    no price list knows); feedback on three of them. Plus one trace two days old."""
    experiment = mlflow.MlflowClient().create_experiment(f"stats-{uuid.uuid4().hex[:8]}")
    a = dict(
        route="/a",
        model="gpt-4o-mini",
        input_tokens=100,
        output_tokens=20,
        tags={"deployment.environment": "prod"},
    )
    b = dict(
        route="/b",
        model="unknown-model",
        input_tokens=10,
        output_tokens=5,
        tags={"deployment.environment": "staging"},
    )
    base = uuid.uuid4().int >> 64  # trace ids unique in the suite's shared store
    traces = [
        Synthetic(base + 1, NOW - 50 * 60_000, 100, ttfb_ms=10, session="s1", user="u1", **a),
        Synthetic(base + 2, NOW - 40 * 60_000, 200, ttfb_ms=20, session="s1", user="u1", **a),
        Synthetic(
            base + 3,
            NOW - 30 * 60_000,
            300,
            ttfb_ms=30,
            session="s2",
            user="u2",
            error="RuntimeError: boom",
            status=500,
            **a,
        ),
        Synthetic(base + 4, NOW - 20 * 60_000, 400, session="s2", user="u2", **a),
        Synthetic(base + 5, NOW - 10 * 60_000, 50, session="s3", **b),
        Synthetic(base + 6, NOW - 5 * 60_000, 1000, session="s3", **b),
        Synthetic(base + 7, NOW - 2 * 86_400_000, 5, session="old", **a),
    ]
    write(traces, tracking_uri, experiment)
    for trace, value in ((traces[0], True), (traces[1], False), (traces[4], 1)):
        mlflow.log_feedback(trace_id=trace.trace_id, name="thumbs", value=value)
    return experiment


def stats(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["stats", *args]) == 0
    return capsys.readouterr().out


def groups(output: str) -> dict[str, dict]:
    return {g["key"]: g for g in json.loads(output)["groups"]}


A_COST = calculate_cost_by_model_and_token_usage(
    "gpt-4o-mini", {"input_tokens": 100, "output_tokens": 20}, "openai"
)["total_cost"]


def test_by_route_exact(known: str, capsys: pytest.CaptureFixture[str]) -> None:
    found = groups(stats(capsys, "--experiment", known, "--since", ago(60), "--json"))
    assert list(found) == ["(all)", "/a", "/b"]
    everything, a, b = found["(all)"], found["/a"], found["/b"]
    # Durations 50, 100, 200, 300, 400, 1000: nearest rank ceil(p/100*6) -> 3rd, 6th, 6th.
    assert everything == {
        "key": "(all)",
        "traces": 6,
        "errors": 1,
        "error_rate": 1 / 6,
        "latency_p50_ms": 200.0,
        "latency_p95_ms": 1000.0,
        "latency_p99_ms": 1000.0,
        "ttfb_p50_ms": 20.0,
        "ttfb_p95_ms": 30.0,
        "input_tokens": 420,
        "output_tokens": 90,
        "total_tokens": 510,
        "cost_usd": math.fsum([A_COST] * 4),  # unknown-model traces have no cost
        "feedback": 3,
        "feedback_positive": 2,
        "positive_share": 2 / 3,
    }
    assert (a["traces"], a["errors"], a["error_rate"]) == (4, 1, 0.25)
    assert (a["latency_p50_ms"], a["latency_p95_ms"], a["latency_p99_ms"]) == (200, 400, 400)
    assert (a["ttfb_p50_ms"], a["ttfb_p95_ms"]) == (20, 30)
    assert (a["total_tokens"], a["cost_usd"]) == (480, math.fsum([A_COST] * 4))
    assert (a["feedback"], a["feedback_positive"], a["positive_share"]) == (2, 1, 0.5)
    assert (b["traces"], b["errors"], b["latency_p50_ms"], b["latency_p95_ms"]) == (2, 0, 50, 1000)
    assert (b["ttfb_p50_ms"], b["cost_usd"], b["total_tokens"]) == (None, 0.0, 30)
    assert (b["feedback"], b["positive_share"]) == (1, 1.0)


@pytest.mark.parametrize(
    "by, expected",
    [
        ("session", {"s1": 2, "s2": 2, "s3": 2}),
        ("user", {"u1": 2, "u2": 2, "(none)": 2}),
        ("model", {"gpt-4o-mini": 4, "unknown-model": 2}),
        ("environment", {"prod": 4, "staging": 2}),
    ],
)
def test_other_groupings(
    known: str, capsys: pytest.CaptureFixture[str], by: str, expected: dict[str, int]
) -> None:
    found = groups(stats(capsys, "--experiment", known, "--since", ago(60), "--by", by, "--json"))
    assert {k: g["traces"] for k, g in found.items() if k != "(all)"} == expected


def test_window(known: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        groups(stats(capsys, "--experiment", known, "--since", ago(3 * 1440), "--json"))["(all)"][
            "traces"
        ]
        == 7
    )
    assert (
        groups(stats(capsys, "--experiment", known, "--since", ago(15), "--json"))["(all)"][
            "traces"
        ]
        == 2
    )


def test_delta_table_gives_the_same_figures(
    known: str, tracking_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    delta.sync(str(tmp_path / "t"), tracking_uri=tracking_uri, experiment_ids=[known], lookback_s=0)
    for by in ("route", "model", "session"):
        store = json.loads(stats(capsys, "--experiment", known, "--by", by, "--json"))
        table = json.loads(stats(capsys, "--delta", str(tmp_path / "t"), "--by", by, "--json"))
        assert table["groups"] == store["groups"]


def test_table_csv_and_html(known: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = stats(capsys, "--experiment", known, "--since", ago(60))
    lines = text.splitlines()
    assert lines[0].split() == [
        "route",
        "traces",
        "errors",
        "p50",
        "ms",
        "p95",
        "ms",
        "p99",
        "ms",
        "ttfb",
        "p50",
        "tokens",
        "cost",
        "$",
        "feedback",
        "+/n",
    ]
    assert lines[2].split()[:8] == ["(all)", "6", "16.7%", "200", "1,000", "1,000", "20", "510"]
    assert lines[3].split()[-1] == "1/2" and lines[4].split()[-1] == "1/1"

    rows = list(
        csv.DictReader(
            io.StringIO(stats(capsys, "--experiment", known, "--since", ago(60), "--csv"))
        )
    )
    assert [r["key"] for r in rows] == ["(all)", "/a", "/b"]
    assert rows[1]["latency_p95_ms"] == "400.0" and rows[2]["ttfb_p50_ms"] == ""


# Headless Debian chromium, as docs/screenshot.py runs it (offline: no calls to Google).
CHROMIUM = [
    "chromium",
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WINDOW = (1400, 900)
# Run by the browser on a copy of the page (the page itself has no script): what it laid out.
MEASURE = (
    "<script>document.body.dataset.layout = JSON.stringify({scroll: "
    "document.documentElement.scrollWidth, client: document.documentElement.clientWidth, "
    "inner: window.innerWidth});</script></body>"
)


def _laid_out(page: Path) -> dict[str, int]:
    """The page's widths in a 1400 x 900 headless chromium window."""
    assert shutil.which("chromium"), (
        "needs Debian's chromium (apt-get install chromium; .ci/run installs it)"
    )
    probe = page.with_suffix(".probe.html")
    probe.write_text(page.read_text().replace("</body>", MEASURE))
    done = subprocess.run(
        [
            *CHROMIUM,
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            f"--user-data-dir={page.parent / 'chromium-profile'}",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r'data-layout="([^"]*)"', done.stdout)
    assert found, done.stderr[-2000:]
    return json.loads(html.unescape(found[1]))


def test_html_report_reads_well_in_a_1400px_window(
    known: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "stats.html"
    # An hour back from now, not from NOW: the window ends now, and the suite may have run for
    # minutes since NOW (a longer window gets more buckets).
    since = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=60)).isoformat()
    assert main(["stats", "--experiment", known, "--since", since, "--html", str(page)]) == 0
    printed = capsys.readouterr()
    assert printed.err == f"tracewire: wrote the HTML report to {page}\n"
    assert printed.out.splitlines()[0].split()[0] == "route"  # the table, as without --html
    content = page.read_text()
    assert not re.search(r"(src|href)\s*=|https?://|<script", content)  # nothing to fetch

    # Headings a person reads, with units; rates as percentages.
    assert not re.search(r"<th[^>]*>[^<]*_", content), "a raw field name as a heading"
    for heading in (
        "error rate",
        "latency (ms)",
        "time to first byte (ms)",
        "cost (USD)",
        "p50",
        "p99",
        "positive share",
    ):
        assert f">{heading}</th>" in content, heading
    all_row = re.search(r"<tr><td>\(all\)</td>(.*?)</tr>", content)[1]
    assert re.findall(r"<td>([^<]*)</td>", all_row)[:7] == [
        "6",
        "1",
        "16.7 %",
        "200",
        "1,000",
        "1,000",
        "20",
    ]

    # Over time: the hour's window in 2-minute buckets (empty ones too), a y axis from 0 to the
    # largest bucket, and the window's first and last minute under it.
    charts = re.findall(r"<figure><figcaption>([^<]*)</figcaption>(.*?)</figure>", content)
    assert [title for title, _ in charts] == [
        "Latency distribution: traces per duration bin",
        "Traces per 2-minute bucket",
        "Error rate (share of traces in error) per 2-minute bucket",
        "Tokens per 2-minute bucket",
        "Cost (USD) per 2-minute bucket",
    ]
    for title, svg in charts[1:]:
        assert 30 <= svg.count("<rect") <= 31, title
        labels = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
        top, zero, first, last = labels
        assert zero in ("0", "0.0 %") and top not in ("0", "0.0 %"), (title, labels)
        assert first < last and last.endswith(" UTC"), (title, labels)
    assert re.findall(r"<text[^>]*>([^<]*)</text>", charts[1][1])[0] == "1"  # one a bucket
    assert re.findall(r"<text[^>]*>([^<]*)</text>", charts[0][1])[2:] == ["0 ms", "1,000 ms"]

    # Laid out by a browser: nothing wider than the window, even with a long unbroken key.
    layout = _laid_out(page)
    assert layout["inner"] == WINDOW[0] and layout["scroll"] <= layout["client"], layout
    long_key = tmp_path / "long.html"
    assert (
        main(
            [
                "stats",
                "--experiment",
                known,
                "--since",
                ago(60),
                "--by",
                "session",
                "--html",
                str(long_key),
            ]
        )
        == 0
    )
    long_key.write_text(long_key.read_text().replace(">s1<", ">" + "s" * 300 + "<"))
    layout = _laid_out(long_key)
    assert layout["scroll"] <= layout["client"], layout


def test_html_report_that_cannot_be_written_is_one_line(
    known: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where = tmp_path / "missing-folder" / "stats.html"
    assert main(["stats", "--experiment", known, "--html", str(where)]) == 1
    assert capsys.readouterr().err == (
        f"tracewire: error: cannot write the HTML report to {where}: No such file or directory\n"
    )


def test_bad_input_is_one_line(
    tracking_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["stats", "--since", "last week"]) == 1
    assert "--since must be a duration" in capsys.readouterr().err
    assert main(["stats", "--delta", str(tmp_path / "missing")]) == 1
    assert "no Delta table" in capsys.readouterr().err
    assert main(["stats", "--by", "colour"]) == 2


def _cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it: its own process, no MLflow settings but ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "tracewire.cli", *args],
        cwd=cwd,
        env=clean_env(MLFLOW_MODEL_CATALOG_URI="", **env),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_reading_where_there_is_no_store_creates_none(tmp_path: Path) -> None:
    for args in (["stats"], ["export", "delta", "table"]):
        done = _cli(tmp_path, *args)
        assert done.returncode == 1 and done.stdout == "", done.stderr
        assert done.stderr.splitlines() == [
            f"tracewire: error: MLflow's default tracking URI is 'sqlite:///{tmp_path}/mlflow.db' "
            "(MLFLOW_TRACKING_URI is not set), but there is no MLflow store at "
            f"{tmp_path}/mlflow.db: run this in the folder your app keeps its store in, or set "
            "MLFLOW_TRACKING_URI to it (sqlite:////path/to/mlflow.db or http://your-server:5000)"
        ]
        assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns, no table
    done = _cli(tmp_path, "stats", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/other.db")
    assert done.returncode == 1 and "there is no MLflow store at " in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_store_is_one_line(tmp_path: Path) -> None:
    store = tmp_path / "mlflow.db"
    store.write_bytes(b"this is not a database " * 100)
    done = _cli(tmp_path, "stats")
    assert done.returncode == 1 and done.stdout == "", done.stderr
    assert done.stderr.splitlines() == [
        f"tracewire: error: cannot read the tracking store sqlite:///{store}: "
        "(sqlite3.DatabaseError) file is not a database"
    ]
    assert store.read_bytes() == b"this is not a database " * 100


def test_an_unreachable_server_is_one_line_within_seconds(tmp_path: Path) -> None:
    """MLflow retries a server that refuses connections for about two minutes per request (4
    minutes for `tracewire stats` here); a person waiting on a report is told in seconds."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{probe.getsockname()[1]}"
    for args in (["stats"], ["export", "delta", str(tmp_path / "table")]):
        started = time.monotonic()
        done = _cli(tmp_path, *args, MLFLOW_TRACKING_URI=uri)
        assert done.returncode == 1 and done.stdout == "", done.stderr
        (line,) = done.stderr.splitlines()
        assert line.startswith(f"tracewire: error: cannot read the tracking store {uri}: ")
        assert time.monotonic() - started < 60  # a hang guard: about 5 s here
