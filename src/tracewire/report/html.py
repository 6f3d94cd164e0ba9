"""``tracewire stats --html FILE``: one self-contained page (inline CSS and SVG, no script, no
CDN) that opens offline: the groups table, the latency distribution, and traces, error rate,
tokens and cost over time."""

from __future__ import annotations

import datetime as dt
import html
from typing import Any, Sequence

from tracewire.report.aggregate import PERCENTILE_METHOD, Bucket, Group

_W, _H, _PAD = 640, 180, 28


def _bars(title: str, labels: Sequence[str], values: Sequence[float], fmt: str) -> str:
    """A bar chart; each bar's exact value is in its tooltip (<title>)."""
    top = max(values, default=0) or 1
    step = (_W - 2 * _PAD) / max(len(values), 1)
    parts = [f'<figure><figcaption>{html.escape(title)}</figcaption>'
             f'<svg viewBox="0 0 {_W} {_H + 20}" width="{_W}" height="{_H + 20}" role="img" '
             f'aria-label="{html.escape(title)}">',
             f'<line x1="{_PAD}" y1="{_H}" x2="{_W - _PAD}" y2="{_H}" stroke="#888"/>',
             f'<text x="{_PAD}" y="12" class="axis">max {fmt.format(top)}</text>']
    for i, (label, value) in enumerate(zip(labels, values)):
        height = (_H - 20) * value / top
        x = _PAD + i * step
        parts.append(f'<rect x="{x + 1:.1f}" y="{_H - height:.1f}" width="{max(step - 2, 1):.1f}" '
                     f'height="{height:.1f}"><title>{html.escape(label)}: '
                     f'{fmt.format(value)}</title></rect>')
    if labels:
        parts.append(f'<text x="{_PAD}" y="{_H + 16}" class="axis">{html.escape(labels[0])}</text>'
                     f'<text x="{_W - _PAD}" y="{_H + 16}" class="axis" text-anchor="end">'
                     f'{html.escape(labels[-1])}</text>')
    parts.append("</svg></figure>")
    return "".join(parts)


def _histogram(durations: Sequence[float], bins: int = 24) -> tuple[list[str], list[float]]:
    if not durations:
        return [], []
    high = max(durations) or 1
    width = high / bins
    counts = [0.0] * bins
    for value in durations:
        counts[min(int(value / width), bins - 1)] += 1
    return [f"{i * width:,.0f}-{(i + 1) * width:,.0f} ms" for i in range(bins)], counts


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.6f}".rstrip("0").rstrip(".") if value < 1 else f"{value:,.1f}"
    return html.escape(f"{value:,}" if isinstance(value, int) else str(value))


def page(groups: Sequence[Group], by: str, durations: Sequence[float],
         buckets: Sequence[Bucket], window: dict[str, Any]) -> str:
    fields = list(Group.__dataclass_fields__)
    head = "".join(f"<th>{html.escape(f)}</th>" for f in fields)
    body = "".join("<tr>" + "".join(f"<td>{_cell(getattr(g, f))}</td>" for f in fields) + "</tr>"
                   for g in groups)
    when = [b.start.strftime("%Y-%m-%d %H:%M") for b in buckets]
    labels, counts = _histogram(durations)
    charts = [
        _bars("Latency distribution (trace duration, traces per bin)", labels, counts, "{:,.0f}"),
        _bars("Traces over time", when, [b.traces for b in buckets], "{:,.0f}"),
        _bars("Error rate over time", when,
              [b.errors / b.traces if b.traces else 0 for b in buckets], "{:.1%}"),
        _bars("Tokens over time", when, [b.total_tokens for b in buckets], "{:,.0f}"),
        _bars("Cost over time (USD)", when, [b.cost_usd for b in buckets], "${:,.4f}"),
    ]
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tracewire stats</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-variant-numeric: tabular-nums; }}
th, td {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
rect {{ fill: #4a7bd0; }} rect:hover {{ fill: #d0764a; }}
.axis {{ font-size: 11px; fill: #555; }} figure {{ margin: 1.5em 0; }}
figcaption {{ font-weight: 600; margin-bottom: .3em; }}
</style></head><body>
<h1>tracewire stats by {html.escape(by)}</h1>
<p>Window: {html.escape(str(window.get("since")))} to {html.escape(str(window.get("until")))}
 &middot; source: {html.escape(str(window.get("source")))} &middot; generated {generated}.<br>
Percentiles: {html.escape(PERCENTILE_METHOD)}.</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{"".join(charts)}
</body></html>
"""
