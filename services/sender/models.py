"""The sender's records: a ledger key, what was claimed, what happened to a delivery.

Plain values with no I/O, shared by the pure decisions (processor.py) and the ledger's
SQL (ledger.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LedgerKey:
    """One mail to one recipient: ``(campaign_id, step_id or '', contact_id)``;
    ``mail.system`` uses ``('mail:<mail_id>', '', <recipient index>)``."""

    campaign_id: str
    step_id: str
    contact_id: int


@dataclass
class Outcome:
    """What happened to one delivery (a DeliveryResult's fields without ids and time)."""

    outcome: str
    smtp_code: int | None = None
    enhanced_code: str | None = None
    diagnostic: str | None = None
    relay: str | None = None
    message_id: str | None = None
    suppressed_reason: str | None = None


@dataclass
class Claimed:
    """One claimed key and what the ledger held for it before."""

    key: LedgerKey
    fresh: bool
    status: str | None
    result: dict[str, Any] | None
    owner: int | None = None


#: an outcome to record: (key, kind, outcome, its DeliveryResult for a campaign row).
Done = tuple[LedgerKey, str, Outcome, dict[str, Any] | None]
