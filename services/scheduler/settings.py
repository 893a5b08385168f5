"""Settings of the scheduler service (environment variables; see README's table)."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.settings import CommonSettings, env


@dataclass(frozen=True, repr=False)
class SchedulerSettings(CommonSettings):
    service: str = "scheduler"
    http_port: int = env("HTTP_PORT", 8083)
    #: the contacts service's HTTP API: custom field definitions (F-21) and sample contacts.
    contacts_url: str = env("CONTACTS_URL", "http://127.0.0.1:8081")
    #: seconds between two ticks of the release loop (start due campaigns, release, pause).
    tick_seconds: float = env("SCHEDULER_TICK_SECONDS", 0.2)
    #: send.requests released per second and campaign (the paced rate of §9).
    release_rate: float = env("SCHEDULER_RELEASE_RATE", 5000.0)
    #: most send.requests released in one transaction (one chunk of acknowledged sends).
    release_chunk: int = env("SCHEDULER_RELEASE_CHUNK", 2000)
    #: a row released this long ago without a result goes out again (attempt + 1): a request
    #: dead-lettered or lost on the way is not waited for for ever. The sender's ledger makes
    #: a repeat harmless (a row it still holds, e.g. in a relay outage, is not sent twice).
    result_timeout_seconds: float = env("SCHEDULER_RESULT_TIMEOUT_SECONDS", 1800.0)
    #: releases of one row at most; rows still without a result after the last one's timeout
    #: are given up: the campaign becomes sent with them counted unsent (a late result still
    #: counts).
    max_releases: int = env("SCHEDULER_MAX_RELEASES", 3)
    #: how often (seconds) a sending campaign whose released requests await results
    #: publishes a checkpoint into every partition of send.requests; a sender answers it
    #: once it has decided everything before it, and rows a sender passed without a result
    #: (request or result lost, e.g. by a broker that lost data) go out again. Lost mail is
    #: noticed within about this long after the sender caught up with it; a backlog never
    #: triggers it (services/scheduler/checkpoints.py).
    checkpoint_seconds: float = env("SCHEDULER_CHECKPOINT_SECONDS", 60.0)
    #: seconds a campaign stays aggregating (集計中) after it was sent, before aggregated.
    aggregation_seconds: float = env("SCHEDULER_AGGREGATION_SECONDS", 3600.0)
    #: F-26: the error rate is judged only after this many attempts (sent + errors).
    halt_min_attempts: int = env("SCHEDULER_HALT_MIN_ATTEMPTS", 200)
    #: F-26: a campaign whose error rate exceeds this fraction is halted.
    halt_error_rate: float = env("SCHEDULER_HALT_ERROR_RATE", 0.10)
    #: F-22: scheduled_at must be at least this many seconds after now at creation.
    min_lead_seconds: float = env("SCHEDULER_MIN_LEAD_SECONDS", 180.0)
    #: F-28: a campaign may be named in a target's history conditions for this many calendar
    #: months after it started sending (過去3ヶ月以内).
    history_months: int = env("SCHEDULER_HISTORY_MONTHS", 3)
    #: seconds to wait for the contacts service's HTTP API.
    contacts_timeout_seconds: float = env("CONTACTS_TIMEOUT_SECONDS", 5.0)
