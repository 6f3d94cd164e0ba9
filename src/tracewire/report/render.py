"""Renderings of ``stats`` groups for a terminal (a plain table) and for scripts (JSON, CSV)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from tracewire.report.aggregate import PERCENTILE_METHOD, Group

_FIELDS = list(Group.__dataclass_fields__)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def table(groups: Sequence[Group], by: str) -> str:
    header = [
        by,
        "traces",
        "errors",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "ttfb p50",
        "tokens",
        "cost $",
        "feedback +/n",
    ]
    lines = [header]
    for g in groups:
        lines.append(
            [
                g.key,
                f"{g.traces:,}",
                f"{g.error_rate:.1%}",
                _ms(g.latency_p50_ms),
                _ms(g.latency_p95_ms),
                _ms(g.latency_p99_ms),
                _ms(g.ttfb_p50_ms),
                f"{g.total_tokens:,}",
                f"{g.cost_usd:.4f}",
                f"{g.feedback_positive}/{g.feedback}" if g.feedback else "-",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths))
        )
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def as_json(groups: Sequence[Group], by: str, window: dict[str, Any]) -> str:
    return json.dumps(
        {
            "window": window,
            "by": by,
            "percentile_method": PERCENTILE_METHOD,
            "groups": [g.as_dict() for g in groups],
        },
        indent=2,
    )


def as_csv(groups: Sequence[Group]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=_FIELDS, lineterminator="\n")
    writer.writeheader()
    for g in groups:
        writer.writerow(g.as_dict())
    return out.getvalue()
