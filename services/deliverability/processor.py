"""The deliverability decisions, pure: which receiving domain a record is about and which
counters it moves. No broker, no faust: ``tests/unit/test_deliverability.py`` runs them.

Counters per domain (and per window):

- ``attempts``: a send reached the relay and was answered (sent, 4xx or 5xx; a
  suppressed send is none): each answer counts, so a message deferred twice and then
  delivered is three attempts;
- ``delivered``: the relay accepted it (250);
- ``deferred``: a 4xx answer, also counted under ``deferred:<enhanced code>`` (``4.7.0``)
  or ``deferred:<smtp code>`` when the relay gave no enhanced code: the final result of a
  4xx whose retries are spent (``delivery.results``, temporary_error) and each 4xx the
  sender retried inside itself (``delivery.deferrals``, published when it happened);
- ``rejected``: a 5xx answer at send time (permanent and policy errors);
- ``hard_bounces`` / ``soft_bounces`` / ``complaints``: the bounce processor's classified
  bounces (F-30): a hard one, a soft or policy one, an ARF complaint;
- ``opens`` / ``clicks``: tracking feedback (F-34), attributed to the contact's domain
  learnt from an earlier delivery result or bounce.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from libs.common.topics import Topic

COUNTERS = (
    "attempts",
    "delivered",
    "deferred",
    "rejected",
    "hard_bounces",
    "soft_bounces",
    "complaints",
    "opens",
    "clicks",
)
DEFERRED_CODE = "deferred:"
#: an enhanced status code (RFC 3463) as we keep it: bounded, so a relay's odd text cannot
#: grow the tables.
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
#: the inputs that teach ``contact-domains`` a contact's domain: a deferral's contact id
#: is a system mail's recipient index when it is no campaign's, so it teaches nothing.
TEACHES_DOMAIN = (Topic.DELIVERY_RESULTS, Topic.BOUNCE_EVENTS)
#: a receiving domain as we count it: letters, digits, hyphens, dots (IDNs in their
#: A-label form), at most 253 characters.
_DOMAIN = re.compile(
    r"(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?)*"
)


def domain_of(address: str | None) -> str | None:
    """The receiving domain of ``address``, lower-case (IDNs as A-labels), or None when the
    address has no usable domain."""
    if not address:
        return None
    _, at, domain = address.strip().rpartition("@")
    if not at:
        return None
    return normal_domain(domain)


def normal_domain(domain: str | None) -> str | None:
    """``domain`` as we count it (lower-case, IDNs as A-labels), or None when unusable."""
    if not domain:
        return None
    domain = domain.strip().rstrip(">").rstrip(".").lower()
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return domain if _DOMAIN.fullmatch(domain) else None


def deferral_code(smtp_code: int | None, enhanced_code: str | None) -> str:
    """The key a deferral is counted under: its enhanced code, else its SMTP code."""
    if enhanced_code and _ENHANCED.fullmatch(enhanced_code.strip()):
        return enhanced_code.strip()
    if smtp_code is not None and 400 <= smtp_code <= 499:
        return str(smtp_code)
    return "4xx"


def result_counts(record: Mapping[str, Any]) -> dict[str, int]:
    """The counters a delivery result moves (``delivery.results``)."""
    outcome = record.get("outcome")
    if outcome == "sent":
        return {"attempts": 1, "delivered": 1}
    if outcome == "temporary_error":
        # Without an SMTP code it is mail the sender gave up waiting for its domain ("not
        # sent: … would wait more than …"): it never reached a relay. Counted, the sender's
        # own pause of a domain would feed that domain's deferral ratio.
        return deferral_counts(record) if record.get("smtp_code") is not None else {}
    if outcome in ("permanent_error", "policy_error"):
        return {"attempts": 1, "rejected": 1}
    return {}  # suppressed: nothing reached the relay


def deferral_counts(record: Mapping[str, Any]) -> dict[str, int]:
    """The counters a deferral the sender retried moves (``delivery.deferrals``): an
    attempt answered 4xx, under its code. Its message's final result counts on its own
    (the sender publishes no deferral for the 4xx that became the result)."""
    code = deferral_code(record.get("smtp_code"), record.get("enhanced_code"))
    return {"attempts": 1, "deferred": 1, DEFERRED_CODE + code: 1}


def bounce_counts(record: Mapping[str, Any]) -> dict[str, int]:
    """The counters a classified bounce moves (``bounce.events``); resets and status-only
    records (classification none) move none."""
    classification = record.get("classification")
    if classification == "spam":
        return {"complaints": 1}
    if classification in (None, "none") or record.get("action") in ("reset", "status"):
        return {}
    return {"hard_bounces": 1} if record.get("hard") else {"soft_bounces": 1}


def feedback_counts(record: Mapping[str, Any]) -> dict[str, int]:
    """The counters an open or click moves (``feedback.events``)."""
    kind = record.get("type")
    return {"opens": 1} if kind == "open" else {"clicks": 1} if kind == "click" else {}


def classify(
    topic: Topic, record: Mapping[str, Any], known_domain: str | None = None
) -> tuple[str | None, dict[str, int]]:
    """(receiving domain, counters) of one decoded record of ``topic``. Feedback carries no
    address: its domain is ``known_domain``, the one learnt for its contact."""
    if topic is Topic.DELIVERY_RESULTS:
        return domain_of(record.get("email")), result_counts(record)
    if topic is Topic.DELIVERY_DEFERRALS:
        return normal_domain(record.get("domain")), deferral_counts(record)
    if topic is Topic.BOUNCE_EVENTS:
        return domain_of(record.get("email")), bounce_counts(record)
    if topic is Topic.FEEDBACK_EVENTS:
        return known_domain, feedback_counts(record)
    raise ValueError(f"not a deliverability input: {topic}")


def add(total: Mapping[str, int], more: Mapping[str, int]) -> dict[str, int]:
    """``total`` + ``more``, counter by counter."""
    merged = dict(total)
    for key, value in more.items():
        merged[key] = merged.get(key, 0) + value
    return merged


def tally(items: Iterable[tuple[str | None, Mapping[str, int]]]) -> dict[str, dict[str, int]]:
    """One batch's counters summed per domain (what is sent on, keyed by domain, to the
    partition that owns it): records without a domain or counters are left out."""
    per_domain: dict[str, Counter[str]] = {}
    for domain, counts in items:
        if domain and counts:
            per_domain.setdefault(domain, Counter()).update(counts)
    return {domain: dict(counts) for domain, counts in per_domain.items()}


#: the counters the complaint guard keeps per campaign and receiving domain.
CAMPAIGN_COUNTERS = ("delivered", "complaints")


def tally_campaigns(
    items: Iterable[tuple[str, str, Mapping[str, int]]],
) -> dict[str, dict[str, dict[str, int]]]:
    """One batch's ``delivered`` and ``complaints`` summed per campaign and receiving
    domain (what is sent on, keyed by campaign, to the partition that owns it), from
    (campaign_id, domain, counters) items. Counters of other kinds are left out, and so is
    a campaign id that is not a UUID (the guard's records and route name campaigns by
    their UUID; it is put in its canonical lower-case form, checked once per campaign and
    batch)."""
    per_campaign: dict[str, dict[str, dict[str, int]]] = {}
    for campaign, domain, counts in items:
        for name in CAMPAIGN_COUNTERS:
            n = counts.get(name)
            if n:
                domains = per_campaign.setdefault(campaign, {})
                counters = domains.setdefault(domain, {})
                counters[name] = counters.get(name, 0) + n
    out: dict[str, dict[str, dict[str, int]]] = {}
    for campaign, domains in per_campaign.items():
        try:
            canonical = str(uuid.UUID(campaign))
        except ValueError:
            continue
        merged = out.setdefault(canonical, {})
        for domain, counts in domains.items():
            merged[domain] = add(merged.get(domain, {}), counts)
    return out


def add_domains(
    total: Mapping[str, Mapping[str, int]], more: Mapping[str, Mapping[str, int]]
) -> dict[str, dict[str, int]]:
    """A campaign's counters per domain ``total`` + ``more``, domain by domain."""
    merged = {domain: dict(counts) for domain, counts in total.items()}
    for domain, counts in more.items():
        merged[domain] = add(merged.get(domain, {}), counts)
    return merged


def figures(counts: Mapping[str, int] | None) -> dict[str, Any]:
    """The public shape of one window's counters: every counter (0 when absent), the
    deferrals by code, and the deferral and complaint rates."""
    counts = counts or {}
    out: dict[str, Any] = {name: int(counts.get(name, 0)) for name in COUNTERS}
    out["deferred_by_code"] = {
        key[len(DEFERRED_CODE) :]: value
        for key, value in sorted(counts.items())
        if key.startswith(DEFERRED_CODE)
    }
    attempts, delivered = out["attempts"], out["delivered"]
    out["deferral_rate"] = round(out["deferred"] / attempts, 6) if attempts else 0.0
    out["complaint_rate"] = round(out["complaints"] / delivered, 6) if delivered else 0.0
    return out
