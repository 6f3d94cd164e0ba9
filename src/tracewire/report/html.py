"""``tracewire stats --html FILE``: one self-contained page (inline CSS and SVG, no script, no
CDN) that opens offline and fits a laptop's window: the groups table, the latency distribution,
and traces, error rate, tokens and cost over time."""

from __future__ import annotations

import datetime as dt
import html
import math
from collections.abc import Callable, Sequence
from typing import Any

from tracewire.report.aggregate import PERCENTILE_METHOD, Bucket, Group

# A chart's drawing size (it shrinks with a narrower window) and its plot area inside it: room
# on the left for the y axis labels, below for the first and last x labels.
_W, _H = 620, 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 10, 10, 200


def _count(value: float) -> str:
    return f"{value:,.0f}"


def _share(value: float) -> str:
    return f"{value * 100:.1f} %"


def _usd(value: float) -> str:
    """Two significant digits below a dollar (a call costs fractions of a cent), cents above."""
    if value == 0 or value >= 1:
        return f"{value:,.2f}" if value else "0"
    return f"{value:.{max(2, 1 - math.floor(math.log10(value)))}f}"


def _bars(
    title: str,
    edges: Sequence[str],
    tips: Sequence[str],
    values: Sequence[float],
    fmt: Callable[[float], str],
) -> str:
    """A bar chart with a y axis from 0 to the largest value and the first and last x edges
    labelled; each bar's exact value is in its tooltip (<title>)."""
    top = max(values, default=0) or 1
    step = (_W - _LEFT - _RIGHT) / max(len(values), 1)
    height = _BOTTOM - _TOP
    parts = [
        f"<figure><figcaption>{html.escape(title)}</figcaption>"
        f'<svg viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img" '
        f'aria-label="{html.escape(title)}">',
        f'<line class="grid" x1="{_LEFT}" y1="{_TOP}" x2="{_W - _RIGHT}" y2="{_TOP}"/>',
        f'<line class="axis" x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{_BOTTOM}"/>',
        f'<line class="axis" x1="{_LEFT}" y1="{_BOTTOM}" x2="{_W - _RIGHT}" y2="{_BOTTOM}"/>',
        f'<text x="{_LEFT - 4}" y="{_TOP + 4}" text-anchor="end">{fmt(top)}</text>',
        f'<text x="{_LEFT - 4}" y="{_BOTTOM}" text-anchor="end">{fmt(0)}</text>',
    ]
    for i, (tip, value) in enumerate(zip(tips, values, strict=True)):
        bar = height * value / top
        parts.append(
            f'<rect x="{_LEFT + i * step + 1:.1f}" y="{_BOTTOM - bar:.1f}" '
            f'width="{max(step - 2, 1):.1f}" height="{bar:.1f}"><title>'
            f"{html.escape(tip)}: {fmt(value)}</title></rect>"
        )
    if edges:
        parts.append(
            f'<text x="{_LEFT}" y="{_BOTTOM + 16}">{html.escape(edges[0])}</text>'
            f'<text x="{_W - _RIGHT}" y="{_BOTTOM + 16}" text-anchor="end">'
            f"{html.escape(edges[-1])}</text>"
        )
    parts.append("</svg></figure>")
    return "".join(parts)


def _latency(durations: Sequence[float], bins: int = 24) -> str:
    edges, tips, counts = [], [], [0.0] * bins
    if durations:
        width = (max(durations) or 1) / bins
        for value in durations:
            counts[min(int(value / width), bins - 1)] += 1
        edges = [f"{i * width:,.0f} ms" for i in range(bins + 1)]
        tips = [f"{edges[i]} to {edges[i + 1]}" for i in range(bins)]
    return _bars(
        "Latency distribution: traces per duration bin",
        edges,
        tips,
        counts if durations else [],
        _count,
    )


def _over_time(buckets: Sequence[Bucket]) -> list[str]:
    if not buckets:
        return []
    width = buckets[0].end - buckets[0].start
    shape = "%Y-%m-%d" if width >= dt.timedelta(days=1) else "%Y-%m-%d %H:%M"
    edges = [buckets[0].start.strftime(shape) + " UTC", buckets[-1].end.strftime(shape) + " UTC"]
    tips = [f"{b.start.strftime(shape)} to {b.end.strftime(shape)} UTC" for b in buckets]
    minutes = width.total_seconds() / 60
    per = (
        f"per {minutes / 1440:g}-day bucket"
        if minutes >= 1440
        else f"per {minutes / 60:g}-hour bucket"
        if minutes >= 60
        else f"per {minutes:g}-minute bucket"
    )
    return [
        _bars(f"Traces {per}", edges, tips, [b.traces for b in buckets], _count),
        _bars(
            f"Error rate (share of traces in error) {per}",
            edges,
            [t if b.traces else f"{t} (no traces)" for t, b in zip(tips, buckets, strict=True)],
            [b.errors / b.traces if b.traces else 0 for b in buckets],
            _share,
        ),
        _bars(f"Tokens {per}", edges, tips, [b.total_tokens for b in buckets], _count),
        _bars(f"Cost (USD) {per}", edges, tips, [b.cost_usd for b in buckets], _usd),
    ]


def _ms(value: float | None) -> str:
    return "-" if value is None else _count(value)


# The table: (column group or None, heading, the cell of a group).
_COLUMNS: tuple[tuple[str | None, str, Callable[[Group], str]], ...] = (
    (None, "traces", lambda g: _count(g.traces)),
    (None, "errors", lambda g: _count(g.errors)),
    (None, "error rate", lambda g: _share(g.error_rate)),
    ("latency (ms)", "p50", lambda g: _ms(g.latency_p50_ms)),
    ("latency (ms)", "p95", lambda g: _ms(g.latency_p95_ms)),
    ("latency (ms)", "p99", lambda g: _ms(g.latency_p99_ms)),
    ("time to first byte (ms)", "p50", lambda g: _ms(g.ttfb_p50_ms)),
    ("time to first byte (ms)", "p95", lambda g: _ms(g.ttfb_p95_ms)),
    ("tokens", "input", lambda g: _count(g.input_tokens)),
    ("tokens", "output", lambda g: _count(g.output_tokens)),
    ("tokens", "total", lambda g: _count(g.total_tokens)),
    (None, "cost (USD)", lambda g: _usd(g.cost_usd)),
    ("feedback", "count", lambda g: _count(g.feedback)),
    ("feedback", "positive", lambda g: _count(g.feedback_positive)),
    (
        "feedback",
        "positive share",
        lambda g: "-" if g.positive_share is None else _share(g.positive_share),
    ),
)


def _table(groups: Sequence[Group], by: str) -> str:
    top = [f'<th rowspan="2">{html.escape(by)}</th>']
    sub = []
    for i, (group, heading, _) in enumerate(_COLUMNS):
        if group is None:
            top.append(f'<th rowspan="2">{html.escape(heading)}</th>')
            continue
        sub.append(f"<th>{html.escape(heading)}</th>")
        if i == 0 or _COLUMNS[i - 1][0] != group:
            span = sum(1 for g, _, _ in _COLUMNS if g == group)
            top.append(f'<th colspan="{span}">{html.escape(group)}</th>')
    body = "".join(
        f"<tr><td>{html.escape(g.key)}</td>"
        + "".join(f"<td>{cell(g)}</td>" for _, _, cell in _COLUMNS)
        + "</tr>"
        for g in groups
    )
    return (
        f"<table><thead><tr>{''.join(top)}</tr><tr>{''.join(sub)}</tr></thead>"
        f"<tbody>{body}</tbody></table>"
    )


def page(
    groups: Sequence[Group],
    by: str,
    durations: Sequence[float],
    buckets: Sequence[Bucket],
    window: dict[str, Any],
) -> str:
    charts = [_latency(durations), *_over_time(buckets)]
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tracewire stats</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-variant-numeric: tabular-nums; }}
th, td {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; }}
th {{ background: #f4f4f4; text-align: center; }}
td:first-child {{ text-align: left; max-width: 24em; overflow-wrap: anywhere; }}
.charts {{ display: flex; flex-wrap: wrap; column-gap: 2em; }}
figure {{ margin: 1.5em 0 0; max-width: 100%; }} svg {{ max-width: 100%; height: auto; }}
figcaption {{ font-weight: 600; margin-bottom: .3em; }}
svg text {{ font-size: 11px; fill: #555; }} .axis {{ stroke: #888; }}
.grid {{ stroke: #ddd; stroke-dasharray: 3 3; }}
rect {{ fill: #4a7bd0; }} rect:hover {{ fill: #d0764a; }}
</style></head><body>
<h1>tracewire stats by {html.escape(by)}</h1>
<p>Window: {html.escape(str(window.get("since")))} to {html.escape(str(window.get("until")))}
 &middot; source: {html.escape(str(window.get("source")))} &middot; generated {generated}.<br>
Percentiles: {html.escape(PERCENTILE_METHOD)}. The first row, (all), is the whole window.</p>
{_table(groups, by)}
<div class="charts">{"".join(charts)}</div>
</body></html>
"""
