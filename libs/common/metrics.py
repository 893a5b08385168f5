"""Every Prometheus metric Tayori exports, declared once with its kind and meaning.

Labels are low-cardinality (service, topic, outcome); never an id or an address.

Each family has one owner: :data:`COMMON` (the runtime's: consumers, producers, outbox, HTTP,
retries, the database pool) or one service (:data:`OWNED`). Families are made unregistered;
a service's ``/metrics`` serves :func:`registry` of the common families and the ones its
``app.py`` declares as its own (``Runtime(metrics=...)``), so no process exports another
service's families, and importing this module registers nothing anywhere.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import prometheus_client
from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector, CollectorRegistry

# Made unregistered (not in prometheus_client's default registry): see registry().
Counter = functools.partial(prometheus_client.Counter, registry=None)
Gauge = functools.partial(prometheus_client.Gauge, registry=None)
Histogram = functools.partial(prometheus_client.Histogram, registry=None)

# Kafka consumers -------------------------------------------------------------------
#: messages a consumer finished (handled or dead-lettered), by topic and outcome.
MESSAGES_CONSUMED = Counter(
    "tayori_messages_consumed_total", "Messages consumed", ["service", "topic", "outcome"]
)
#: messages sent to a dead-letter topic, by source topic and failing stage.
MESSAGES_DEAD_LETTERED = Counter(
    "tayori_messages_dead_lettered_total", "Messages sent to a DLQ", ["service", "topic", "stage"]
)
#: seconds one consumed batch took from decode to commit.
BATCH_SECONDS = Histogram(
    "tayori_consumer_batch_seconds",
    "Time to process one consumed batch",
    ["service", "topic"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
#: unix time of the last batch a consumer committed (health = the loop is making progress).
CONSUMER_LAST_PROGRESS = Gauge(
    "tayori_consumer_last_progress_timestamp_seconds",
    "Last consumer progress",
    ["service", "group"],
)
#: records a consumer group is behind on a partition it holds: the partition's end offset
#: (high watermark of the last fetch) minus the group's committed offset (the start of the
#: partition while nothing is committed). Refreshed every poll; a partition that leaves this
#: member (rebalance, stop) loses its series.
CONSUMER_LAG = Gauge(
    "tayori_consumer_lag_records",
    "Records behind the end of the partition (end offset minus committed offset)",
    ["group", "topic", "partition"],
)
#: seconds since this consumer committed a record (since it started, while it has committed
#: none): with lag above zero, a stuck consumer. An idle consumer has no lag and a growing
#: value; a member holding no partition has no lag series at all.
CONSUMER_SECONDS_SINCE_COMMIT = Gauge(
    "tayori_consumer_seconds_since_commit",
    "Seconds since this consumer last committed a record (since its start before the first)",
    ["group"],
)
#: retries of transient failures, by operation.
TRANSIENT_RETRIES = Counter(
    "tayori_transient_retries_total", "Retries after a transient error", ["service", "operation"]
)

# The database pool -------------------------------------------------------------------
#: connections of the service's pool, by state: in_use (lent out), idle (open, free) and
#: max (the pool's size, DB_POOL_SIZE); in_use at max is a saturated pool. Read at scrape.
DB_POOL_CONNECTIONS = Gauge(
    "tayori_db_pool_connections", "Database pool connections by state", ["service", "state"]
)
#: callers waiting for a connection of the service's pool (above zero for long: saturated,
#: work queues for the database). Read at scrape.
DB_POOL_WAITING = Gauge(
    "tayori_db_pool_waiting", "Callers waiting for a database pool connection", ["service"]
)

# Producers and the outbox ---------------------------------------------------------
#: messages published to Kafka, by topic.
MESSAGES_PUBLISHED = Counter(
    "tayori_messages_published_total", "Messages published", ["service", "topic"]
)
#: records handed to the Kafka producer and not yet acknowledged by the broker (the
#: producer's queue: it grows when Kafka is slow or away, and a full queue blocks sends).
PRODUCER_PENDING = Gauge(
    "tayori_producer_pending_records",
    "Records queued in the producer, not yet acknowledged",
    ["service"],
)
#: rows waiting in a service's outbox (published after their transaction commits).
OUTBOX_BACKLOG = Gauge("tayori_outbox_backlog", "Outbox rows not yet published", ["service"])

# HTTP -------------------------------------------------------------------------------
#: HTTP requests served, by route template, method and status code.
HTTP_REQUESTS = Counter(
    "tayori_http_requests_total", "HTTP requests", ["service", "route", "method", "status"]
)
#: seconds to serve an HTTP request, by route template.
HTTP_SECONDS = Histogram(
    "tayori_http_request_seconds",
    "HTTP request latency",
    ["service", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

# Contacts ---------------------------------------------------------------------------
#: upstream contact events applied, by event type and effect (created, updated, deleted, duplicate).
CONTACT_EVENTS = Counter(
    "tayori_contact_events_total", "Upstream contact events applied", ["type", "effect"]
)
#: rows processed by CSV import jobs, by outcome (imported, updated, skipped, error).
IMPORT_ROWS = Counter("tayori_import_rows_total", "CSV import rows", ["outcome"])
#: seconds to answer a contact search (count + page).
SEARCH_SECONDS = Histogram(
    "tayori_contact_search_seconds",
    "Contact search latency",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2.5, 5),
)
#: recipients streamed on campaign.recipients by snapshot requests.
SNAPSHOT_RECIPIENTS = Counter(
    "tayori_snapshot_recipients_total", "Recipients streamed for campaign snapshots"
)

# Suppression ------------------------------------------------------------------------
#: delivery-state changes published, by kind (membership, contact_black, address,
#: blacklist_rule), new state and method.
SUPPRESSION_CHANGES = Counter(
    "tayori_suppression_changes_total", "Suppression changes", ["kind", "state", "method"]
)
#: seconds to answer a can-send question (GET /v1/can-send).
CAN_SEND_SECONDS = Histogram(
    "tayori_can_send_seconds",
    "Can-send decision latency",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
#: unsubscribe requests through the public endpoint, by outcome (unsubscribed,
#: already_stopped, bad_token) and kind (view = the GET confirmation page, form, one_click).
UNSUBSCRIBE_REQUESTS = Counter(
    "tayori_unsubscribe_requests_total", "Public unsubscribe requests", ["outcome", "kind"]
)

# Sender -----------------------------------------------------------------------------
#: deliveries finished, by kind (campaign, test, system), outcome (sent, suppressed,
#: temporary_error, permanent_error, policy_error) and relay (host:port; "" when none).
SENDER_SENDS = Counter(
    "tayori_sender_sends_total", "Deliveries finished", ["kind", "outcome", "relay"]
)
#: seconds of one SMTP transaction, MAIL FROM to the reply to the end of data, by relay.
SENDER_SMTP_SECONDS = Histogram(
    "tayori_sender_smtp_seconds",
    "SMTP transaction latency",
    ["relay"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
#: SMTP transactions whose MAIL, RCPT and DATA went out behind the previous message's end
#: of data on the same connection (PIPELINING: one round trip a message), by relay.
SENDER_AHEAD = Counter(
    "tayori_sender_transactions_ahead_total",
    "SMTP transactions pipelined behind the previous message",
    ["relay"],
)
#: SMTP connections open, by relay.
SENDER_CONNECTIONS = Gauge("tayori_sender_smtp_connections", "SMTP connections open", ["relay"])
#: relay problems (connect failed, 421, connection lost), by relay and kind.
SENDER_RELAY_ERRORS = Counter(
    "tayori_sender_relay_errors_total", "SMTP relay problems", ["relay", "kind"]
)
#: 4xx replies that put a message back for a later try, by relay.
SENDER_RETRIES = Counter("tayori_sender_retries_total", "Messages retried after 4xx", ["relay"])
#: ledger rows found unfinished or finished when a request came again, by what was done:
#: resent (not done: sent again, same Message-ID), republished (done: result again).
SENDER_LEDGER_RECOVERIES = Counter(
    "tayori_sender_ledger_recoveries_total", "Ledger recoveries", ["kind"]
)
#: send requests dropped without a result because their campaign is paused, halted or
#: cancelled, by that state.
SENDER_DROPPED = Counter(
    "tayori_sender_requests_dropped_total", "Send requests dropped by campaign control", ["state"]
)
#: outcomes recorded per ledger group commit.
SENDER_GROUP_COMMIT_SIZE = Histogram(
    "tayori_sender_group_commit_size",
    "Outcomes recorded per ledger commit",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
#: deliveries parked to wait for their recipient domain, by domain (the top
#: SENDER_DOMAIN_METRICS_TOP by volume, else "other") and reason (rate, connections,
#: paused, daily_cap).
SENDER_DOMAIN_WAITS = Counter(
    "tayori_sender_domain_waits_total", "Deliveries waiting for their domain", ["domain", "reason"]
)
#: a domain's rate lowered after a 4xx (decrease) or the domain paused after repeated
#: rate-limit answers (pause), by domain (top N, else "other").
SENDER_DOMAIN_THROTTLES = Counter(
    "tayori_sender_domain_throttles_total", "Domains slowed or paused", ["domain", "kind"]
)
#: deliveries recorded as temporary_error because their domain's wait would pass
#: SENDER_DOMAIN_MAX_WAIT_SECONDS, by domain (top N, else "other") and reason.
SENDER_DOMAIN_GAVE_UP = Counter(
    "tayori_sender_domain_gave_up_total",
    "Deliveries not sent: their domain's wait was too long",
    ["domain", "reason"],
)

#: 4xx answers the sender retries inside itself, as records on delivery.deferrals
#: (deferrals.py): published (acknowledged by the broker) or lost (the broker away, or
#: more waiting than DEFERRALS_WAITING_MAX; telemetry, not sent again).
SENDER_DEFERRALS = Counter(
    "tayori_sender_deferrals_total", "Retried 4xx answers on delivery.deferrals", ["outcome"]
)

#: deliveries held now: their batch committed while they wait for their domain in this
#: process (ledger.py "Held deliveries"); rows of a sender that is gone count once adopted.
SENDER_HELD = Gauge("tayori_sender_held_deliveries", "Deliveries held for their domain now")
#: deliveries held (held: written by this process; adopted: taken over from a sender that is
#: gone; republished: found done, result published again).
SENDER_HELD_TOTAL = Counter(
    "tayori_sender_held_total", "Deliveries held for their domain", ["kind"]
)

# Scheduler --------------------------------------------------------------------------
#: campaigns by status (draft, reserving, scheduled, sending, sent, aggregating, aggregated,
#: failed, halted, cancelled), refreshed by the release loop.
SCHEDULER_CAMPAIGNS = Gauge("tayori_scheduler_campaigns", "Campaigns by status", ["status"])
#: send.requests released for campaigns, by kind (first = attempt 1, again = re-released
#: after a pause).
SCHEDULER_RELEASED = Counter(
    "tayori_scheduler_released_total", "Send requests released by the scheduler", ["kind"]
)
#: delivery results that decided a recipient's ledger row, by outcome (success, error,
#: suppressed); duplicates and later results of the same recipient are not counted.
SCHEDULER_RESULTS = Counter(
    "tayori_scheduler_results_total", "Delivery results counted", ["outcome"]
)
#: campaigns halted by the error-rate rule (F-26).
SCHEDULER_HALTS = Counter("tayori_scheduler_halts_total", "Campaigns halted by error rate")
#: sending campaigns waiting outside their category's sending window.
SCHEDULER_WINDOW_PAUSED = Gauge(
    "tayori_scheduler_window_paused_campaigns", "Sending campaigns paused outside their window"
)
#: receiving domains of campaigns the complaint guard held (campaign.guard, issue 21) and
#: that an operator resumed or gave up (POST /v1/campaigns/{id}/guard/resume|drop); change:
#: held|resumed|dropped.
SCHEDULER_GUARD_DOMAINS = Counter(
    "tayori_scheduler_guard_domains_total",
    "Campaign receiving domains held by the complaint guard, resumed or dropped",
    ["change"],
)
#: step-mail enrolments (F-29) started (a deliverable join of a plan with a schedule) and
#: ended (unsubscribed, banned or left: the remaining steps stop).
PLAN_ENROLMENTS = Counter(
    "tayori_scheduler_plan_enrolments_total", "Step-mail enrolments", ["change"]
)
#: (step, enrolment) pairs that came due, by what happened: released on send.requests, or
#: skipped (the contact was deleted).
STEPS_RELEASED = Counter(
    "tayori_scheduler_steps_due_total", "Step-mail steps that came due", ["kind"]
)
#: delivery results that decided a step send, by outcome (success, error, suppressed).
STEP_RESULTS = Counter(
    "tayori_scheduler_step_results_total", "Step-mail delivery results counted", ["outcome"]
)
#: campaigns created by re-sending a past one (F-28, 配信実績の再送信).
RESENDS_CREATED = Counter("tayori_scheduler_resends_total", "Re-send campaigns created")

# Exporter ---------------------------------------------------------------------------
#: rows written into export files (rate() of it is the export's rows/s).
EXPORT_ROWS = Counter("tayori_export_rows_total", "Rows written to export files")
#: seconds from claiming an export job to its end, by how it ended (done, failed).
EXPORT_JOB_SECONDS = Histogram(
    "tayori_export_job_seconds",
    "Export job duration",
    ["status"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
#: export jobs that failed, by cause (source = contacts or scheduler stream, file = disk,
#: bug = an unexpected error, see libs/common/jobrunner.py).
EXPORT_FAILURES = Counter("tayori_export_failures_total", "Export jobs failed", ["cause"])
#: export files deleted by the sweeper because their download link expired.
EXPORT_FILES_DELETED = Counter("tayori_export_files_deleted_total", "Expired export files deleted")

# Bounce processor -------------------------------------------------------------------
#: classified failures (F-30), by source (dsn, arf, heuristic, smtp = a delivery result),
#: classification (invalid_address, temporary_error, policy, error, spam) and whether it was
#: new or a duplicate (the same campaign, contact and class again: counted once).
BOUNCES = Counter(
    "tayori_bounces_total", "Classified bounces", ["source", "classification", "seen"]
)
#: mail received on the VERP return path, by outcome: bounce (a failure was applied),
#: not_a_bounce (delayed, delivered, a failure of someone else), unattributed (no valid
#: signed return path), unreadable (no report we can read). The last two are kept with
#: their reason in bounce_processor.inbound_mail.
BOUNCE_INBOUND_MAIL = Counter(
    "tayori_bounce_inbound_mail_total", "Inbound bounce mail processed", ["outcome"]
)
#: inbound mail stored but not yet processed.
BOUNCE_INBOUND_BACKLOG = Gauge("tayori_bounce_inbound_backlog", "Inbound bounce mail waiting")
#: what the bounce rules did (F-31, F-32), by action: counted, bounced, complained, reset,
#: status (the delivery status alone changed).
BOUNCE_RULE_ACTIONS = Counter(
    "tayori_bounce_rule_actions_total", "Bounce rule actions published", ["action"]
)
#: tracking requests (F-34), by kind (open, click) and outcome (recorded, bad_token).
TRACKING_HITS = Counter("tayori_tracking_hits_total", "Tracking hits", ["kind", "outcome"])
#: ESP event webhooks (issue 21), by esp (ses, sendgrid, mailgun, postmark) and outcome:
#: accepted, confirmed (an SNS subscription), unconfigured, unsigned, forged, replayed,
#: bad_payload, unattributed (signed, but no valid X-Tayori-Ref in it).
ESP_WEBHOOKS = Counter("tayori_esp_webhooks_total", "ESP webhook requests", ["esp", "outcome"])

# Deliverability -----------------------------------------------------------------------------
#: per-domain tallies (one batch's counters of one receiving domain) added to the windowed
#: tables; each moves the domain's minute window and every hour window it falls in.
DELIVERABILITY_TALLIES = Counter(
    "tayori_deliverability_tallies_total", "Per-domain tallies added to the windowed tables"
)
#: receiving domains with figures in the hour table of this worker (its partitions: all of
#: them with the one replica). Refreshed every second.
DELIVERABILITY_DOMAINS = Gauge(
    "tayori_deliverability_domains", "Receiving domains with figures in the last hour"
)
#: each receiving domain's counters over the last hour (the hour window GET /v1/domains
#: shows), by domain and counter (attempts, delivered, deferred, rejected, hard_bounces,
#: soft_bounces, complaints, opens, clicks). ``domain``: the DELIVERABILITY_METRICS_TOP
#: domains with the most attempts in the hour (those under a published throttle or pause
#: first), the rest summed as "other"; a domain that leaves them loses its series.
#: Refreshed every policy round (services/deliverability/gauges.py).
DELIVERABILITY_DOMAIN_HOUR = Gauge(
    "tayori_deliverability_domain_hour",
    "Last hour's counters per receiving domain (top N by attempts, the rest as other)",
    ["domain", "counter"],
)
#: complaints / delivered over the last hour, by domain (as DELIVERABILITY_DOMAIN_HOUR; for
#: "other", of the summed counters); 0 while nothing was delivered.
DELIVERABILITY_DOMAIN_COMPLAINT_RATE = Gauge(
    "tayori_deliverability_domain_complaint_rate",
    "Complaints per delivered message over the last hour, per receiving domain",
    ["domain"],
)
#: deferred / attempts over the last hour, by domain (as DELIVERABILITY_DOMAIN_HOUR).
DELIVERABILITY_DOMAIN_DEFERRAL_RATE = Gauge(
    "tayori_deliverability_domain_deferral_rate",
    "Deferrals per attempt over the last hour, per receiving domain",
    ["domain"],
)
#: the policy in force on domain.policy as this service last published it, by domain (as
#: DELIVERABILITY_DOMAIN_HOUR) and state (normal, throttled, paused): 1 for the domain's
#: state, 0 for the others; for "other", how many of its domains are in each state.
DELIVERABILITY_DOMAIN_POLICY = Gauge(
    "tayori_deliverability_domain_policy",
    "Published sending policy per receiving domain (1: the state in force)",
    ["domain", "state"],
)
#: campaign.guard records published: ``tripped`` a campaign's first (its complaint rate
#: passed the threshold), ``grown`` one naming more receiving domains than the last.
DELIVERABILITY_CAMPAIGN_GUARDS = Counter(
    "tayori_deliverability_campaign_guards_total",
    "Campaigns whose complaint guard held receiving domains",
    ["kind"],
)


# Owners ----------------------------------------------------------------------------------
#: what every service exports: the runtime's families (libs/common).
COMMON: tuple[MetricWrapperBase, ...] = (
    MESSAGES_CONSUMED,
    MESSAGES_DEAD_LETTERED,
    BATCH_SECONDS,
    CONSUMER_LAST_PROGRESS,
    CONSUMER_LAG,
    CONSUMER_SECONDS_SINCE_COMMIT,
    TRANSIENT_RETRIES,
    DB_POOL_CONNECTIONS,
    DB_POOL_WAITING,
    MESSAGES_PUBLISHED,
    PRODUCER_PENDING,
    OUTBOX_BACKLOG,
    HTTP_REQUESTS,
    HTTP_SECONDS,
)
CONTACTS = (CONTACT_EVENTS, IMPORT_ROWS, SEARCH_SECONDS, SNAPSHOT_RECIPIENTS)
SUPPRESSION = (SUPPRESSION_CHANGES, CAN_SEND_SECONDS, UNSUBSCRIBE_REQUESTS)
SENDER = (
    SENDER_SENDS,
    SENDER_SMTP_SECONDS,
    SENDER_AHEAD,
    SENDER_CONNECTIONS,
    SENDER_RELAY_ERRORS,
    SENDER_RETRIES,
    SENDER_LEDGER_RECOVERIES,
    SENDER_DROPPED,
    SENDER_GROUP_COMMIT_SIZE,
    SENDER_DOMAIN_WAITS,
    SENDER_DOMAIN_THROTTLES,
    SENDER_DOMAIN_GAVE_UP,
    SENDER_HELD,
    SENDER_HELD_TOTAL,
    SENDER_DEFERRALS,
)
SCHEDULER = (
    SCHEDULER_CAMPAIGNS,
    SCHEDULER_RELEASED,
    SCHEDULER_RESULTS,
    SCHEDULER_HALTS,
    SCHEDULER_WINDOW_PAUSED,
    SCHEDULER_GUARD_DOMAINS,
    PLAN_ENROLMENTS,
    STEPS_RELEASED,
    STEP_RESULTS,
    RESENDS_CREATED,
)
EXPORTER = (EXPORT_ROWS, EXPORT_JOB_SECONDS, EXPORT_FAILURES, EXPORT_FILES_DELETED)
BOUNCE_PROCESSOR = (
    BOUNCES,
    BOUNCE_INBOUND_MAIL,
    BOUNCE_INBOUND_BACKLOG,
    BOUNCE_RULE_ACTIONS,
    TRACKING_HITS,
    ESP_WEBHOOKS,
)
DELIVERABILITY = (
    DELIVERABILITY_TALLIES,
    DELIVERABILITY_DOMAINS,
    DELIVERABILITY_DOMAIN_HOUR,
    DELIVERABILITY_DOMAIN_COMPLAINT_RATE,
    DELIVERABILITY_DOMAIN_DEFERRAL_RATE,
    DELIVERABILITY_DOMAIN_POLICY,
    DELIVERABILITY_CAMPAIGN_GUARDS,
)
#: each service's own families (its app.py passes them to its Runtime).
OWNED: dict[str, tuple[MetricWrapperBase, ...]] = {
    "contacts": CONTACTS,
    "suppression": SUPPRESSION,
    "sender": SENDER,
    "scheduler": SCHEDULER,
    "exporter": EXPORTER,
    "bounce_processor": BOUNCE_PROCESSOR,
    "deliverability": DELIVERABILITY,
}
#: the process's own (CPU, memory, file descriptors, GC, Python version).
PROCESS: tuple[Collector, ...] = (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR)


def every() -> tuple[MetricWrapperBase, ...]:
    """Every family declared here, common and owned."""
    return COMMON + tuple(family for own in OWNED.values() for family in own)


def registry(own: Iterable[Collector]) -> CollectorRegistry:
    """What one service's ``/metrics`` serves: the process's collectors, the common
    families and ``own``. A family may sit in several registries (the integration tests run
    services side by side in one process); its values are the process's."""
    served = CollectorRegistry(auto_describe=True)
    for collector in (*PROCESS, *COMMON, *own):
        served.register(collector)
    return served


def sample_value(name: str, labels: dict[str, str] | None = None) -> float | None:
    """The value of one sample of any family in this process (None: no such series), as
    ``CollectorRegistry.get_sample_value`` answers it."""
    return registry(family for own in OWNED.values() for family in own).get_sample_value(
        name, labels
    )
