"""What a benchmark reports: its figure next to the ceiling measured in the same run, a goal."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Result:
    name: str
    figure: str
    ceiling: str
    goal: str
    passed: bool
    ratio: float | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "MISS"


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def n(value: float) -> str:
    """1234567.8 → '1,234,568'."""
    return f"{value:,.0f}"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


_STARTED = time.monotonic()


def progress(message: str) -> None:
    print(f"  [{time.monotonic() - _STARTED:5.0f}s] {message}", file=sys.stderr, flush=True)


def table(results: list[Result]) -> str:
    headers = ("benchmark", "figure", "ceiling (same run)", "ratio", "goal", "result")
    rows = [
        (
            r.name,
            r.figure,
            r.ceiling,
            "" if r.ratio is None else f"{r.ratio:.1%}",
            r.goal,
            r.verdict,
        )
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def json_line(result: Result) -> str:
    body = asdict(result)
    body["result"] = result.verdict
    return json.dumps(body, ensure_ascii=False, default=str)
