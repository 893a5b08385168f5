"""The campaign status machine (F-25), in one place and without I/O.

::

    draft → reserving → scheduled (未配信) → sending (配信中) → sent (配信済)
          → aggregating (集計中) → aggregated (集計済)
    reserving → failed (配信失敗: no recipients, or the snapshot failed)
    sending → halted (配信停止: error rate over the threshold; final, never resumes)
    draft | reserving | scheduled → cancelled (キャンセル: only before sending starts)

The store changes a status with ``UPDATE ... WHERE status = ANY(sources(to))``, so a
transition this module does not allow never happens, whichever path asks for it.
"""

from __future__ import annotations

from libs.common.errors import Conflict

LABELS: dict[str, str] = {
    "draft": "下書き",
    "reserving": "予約処理中",
    "scheduled": "未配信",
    "sending": "配信中",
    "sent": "配信済",
    "aggregating": "集計中",
    "aggregated": "集計済",
    "failed": "配信失敗",
    "halted": "配信停止",
    "cancelled": "キャンセル",
}
STATUSES: tuple[str, ...] = tuple(LABELS)

TRANSITIONS: dict[str, frozenset[str]] = {
    "draft": frozenset({"reserving", "cancelled"}),
    "reserving": frozenset({"scheduled", "failed", "cancelled"}),
    "scheduled": frozenset({"sending", "cancelled"}),
    "sending": frozenset({"sent", "halted"}),
    "sent": frozenset({"aggregating"}),
    "aggregating": frozenset({"aggregated"}),
    "aggregated": frozenset(),
    "failed": frozenset(),
    "halted": frozenset(),
    "cancelled": frozenset(),
}

#: statuses from which nothing more will ever happen.
FINAL: frozenset[str] = frozenset(s for s, nexts in TRANSITIONS.items() if not nexts)
#: statuses in which nothing more is released: a recipient still without a result is given
#: up (未配信, F-25) — a late result still counts.
SENDING_OVER: frozenset[str] = frozenset(
    {"sent", "aggregating", "aggregated", "failed", "halted", "cancelled"}
)
#: statuses in which the frozen recipient list is complete.
LEDGER_COMPLETE: frozenset[str] = frozenset(
    {"scheduled", "sending", "sent", "aggregating", "aggregated", "halted"}
)


def allowed(current: str, target: str) -> bool:
    """Whether a campaign in ``current`` may move to ``target``."""
    return target in TRANSITIONS.get(current, frozenset())


def sources(target: str) -> list[str]:
    """Every status from which ``target`` may be reached (for the UPDATE's WHERE)."""
    if target not in TRANSITIONS:
        raise ValueError(f"unknown status {target!r}")
    return sorted(s for s, nexts in TRANSITIONS.items() if target in nexts)


def check(current: str, target: str) -> None:
    """Raise :class:`Conflict` (HTTP 409) unless ``current → target`` is allowed."""
    if not allowed(current, target):
        raise Conflict(
            f"a campaign that is {current} ({LABELS.get(current, current)}) cannot become"
            f" {target} ({LABELS.get(target, target)})"
        )
