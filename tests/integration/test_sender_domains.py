"""Per-recipient-domain pacing through the real broker, PostgreSQL and an SMTP relay
(aiosmtpd) that rate-limits one domain; the operator override API; and the policies the
deliverability service publishes on domain.policy."""

from __future__ import annotations

import itertools
import time
import uuid
from collections import Counter, deque
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from libs.common.metrics import sample_value
from libs.common.topics import Topic
from tayori.embedded import SmtpSink
from tests.conftest import (
    OPERATOR_TOKEN,
    VIEWER_TOKEN,
    Kafka,
    Service,
    Stack,
    eventually,
    running,
)
from tests.integration.relays import TestRelay, kept, serving
from tests.integration.test_sender import (
    one_connection,
    publish_all,
    queue_for_one_connection,
    recipients,
    results,
    send_request,
)

pytestmark = pytest.mark.integration

LIMITED, FAST = "limited.example", "fast.example"


REFUSAL = "421 4.7.0 Try again later, closing connection (too many messages)"


class RecordingRelay(TestRelay):
    """Accepts every RCPT unless :meth:`refuses` says so (then ``421 4.7.0``: the relay
    closing on a sender that goes too fast). Records (monotonic time, event, address) of
    each RCPT answer ("rcpt" or "421") and each accepted message ("kept")."""

    def __init__(self, maildir: Path, pipelining: bool) -> None:
        super().__init__(maildir, pipelining)
        self.events: list[tuple[float, str, str]] = []

    def refuses(self, address: str, now: float) -> bool:
        return False

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        now = time.monotonic()
        if self.refuses(address, now):
            self.events.append((now, "421", address))
            return REFUSAL
        self.events.append((now, "rcpt", address))
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        self.events.append((time.monotonic(), "kept", envelope.rcpt_tos[0]))
        return reply


class RateLimitingHandler(RecordingRelay):
    """Answers ``421 4.7.0`` to the first ``refusals`` RCPTs for LIMITED, then accepts;
    every other domain at once."""

    def __init__(self, maildir: Path, refusals: int, pipelining: bool) -> None:
        super().__init__(maildir, pipelining)
        self.refusals = refusals

    def refuses(self, address: str, now: float) -> bool:
        if address.endswith("@" + LIMITED) and self.refusals > 0:
            self.refusals -= 1
            return True
        return False


class RateCappingRelay(RecordingRelay):
    """Accepts at most ``per_second`` RCPTs for LIMITED in any one second (a sliding
    window over the RCPTs it accepted); beyond that, ``421 4.7.0`` — the way a receiving
    MX answers a sender above its rate. Every other domain at once."""

    def __init__(self, maildir: Path, per_second: int, pipelining: bool) -> None:
        super().__init__(maildir, pipelining)
        self.per_second = per_second
        self.accepted: deque[float] = deque()

    def refuses(self, address: str, now: float) -> bool:
        if not address.endswith("@" + LIMITED):
            return False
        while self.accepted and self.accepted[0] <= now - 1.0:
            self.accepted.popleft()
        if len(self.accepted) >= self.per_second:
            return True
        self.accepted.append(now)
        return False


def metric(name: str, domain: str, **labels: str) -> float:
    return sample_value(name, {"domain": domain, **labels}) or 0.0


@pytest.mark.parametrize("pipelining", [False, True], ids=["one_by_one", "pipelining"])
async def test_a_rate_limiting_domain_is_paused_while_another_goes_at_full_speed(
    stack: Stack, database: str, prefix: str, kafka: Kafka, tmp_path: Path, pipelining: bool
) -> None:
    """Three 421 4.7.0 answers, nothing accepted between them (each one a signal: no
    decrease interval), pause LIMITED for PAUSE seconds: no RCPT to it meanwhile,
    while FAST's mail goes on without ever waiting; afterwards every recipient has exactly
    one mail and every result is ``sent``."""
    pause = 3.0
    handler = RateLimitingHandler(tmp_path / "relay", refusals=3, pipelining=pipelining)
    limited = [f"l{i}@{LIMITED}" for i in range(8)]
    fast = [f"f{i}@{FAST}" for i in range(120)]
    # LIMITED first, so its first 421 comes before FAST's mail; one connection, so the
    # relay's events are in the sender's order.
    addresses = [limited[0], *fast[:60], *limited[1:], *fast[60:]]
    await queue_for_one_connection(kafka, 44, addresses)
    waits_fast = metric("tayori_sender_domain_waits_total", FAST, reason="rate")
    pauses = metric("tayori_sender_domain_throttles_total", LIMITED, kind="pause")
    with serving(handler) as controller:
        relay = f"127.0.0.1:{controller.port}"
        async with one_connection(
            stack,
            database,
            prefix,
            relay,
            domain_pause_after=3,
            domain_pause_seconds=pause,
            domain_aimd_floor=1.0,
            domain_aimd_increase=1.0,
            domain_aimd_decrease_interval_seconds=0.0,
        ) as sender:
            got = await results(kafka, len(addresses))
            relays = await sender.api.ok("GET", "/v1/relays")
        assert {r["email"]: r["outcome"] for r in got} == dict.fromkeys(addresses, "sent")
        assert recipients(kept(handler)) == dict.fromkeys(addresses, 1)  # once each
        # The relay was never blamed: a domain's 421 to RCPT is not a relay problem.
        assert relays["relays"][0]["state"] == "up"
        assert relays["waiting_for_domains"] == 0  # every delivery has its outcome
        assert metric("tayori_sender_domain_throttles_total", LIMITED, kind="pause") == pauses + 1
        assert metric("tayori_sender_domain_waits_total", FAST, reason="rate") == waits_fast
        events = handler.events
        refused = [i for i, (_, kind, _) in enumerate(events) if kind == "421"]
        assert len(refused) == 3
        third = refused[-1]
        paused_at = events[third][0]
        after = events[third + 1 :]
        next_limited = next(i for i, (_, kind, a) in enumerate(after) if a.endswith(LIMITED))
        # The pause held: LIMITED's next RCPT came no sooner than the pause's end.
        assert after[next_limited][0] - paused_at >= pause - 0.05
        # FAST went on while LIMITED waited: FAST's mail arrived between LIMITED's first
        # 421 and its first accepted message.
        first_kept = next(
            i for i, (_, kind, a) in enumerate(events) if kind == "kept" and a.endswith(LIMITED)
        )
        between = events[refused[0] : first_kept]
        assert sum(kind == "kept" and a.endswith(FAST) for _, kind, a in between) > 0
        by_domain = Counter(a.partition("@")[2] for _, kind, a in events if kind == "kept")
        assert by_domain == {LIMITED: len(limited), FAST: len(fast)}


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


async def test_a_domain_over_its_rate_slows_while_the_others_flow_and_nothing_is_lost(
    stack: Stack, database: str, prefix: str, kafka: Kafka, tmp_path: Path
) -> None:
    """Issue 21's proof. The relay answers 421 4.7.0 to LIMITED's RCPTs beyond
    ``per_second`` a second; the sender offers both domains its ceiling for an unlisted
    domain (``ceiling`` msgs/s, SENDER_DOMAIN_RATE), well above that. LIMITED accepts part
    of what it is offered — it meters, it does not block — so it is slowed, never paused
    (a pause would stop its mail and start the search for its rate over). The requests
    come in batches of ``batch``: FAST's later mail is in batches fetched while LIMITED
    waits, which commit because LIMITED's waiting mail is held (holding.py, past ``hold``
    seconds) — a batch kept until LIMITED's last mail of it went stalled FAST for as long
    (a run whose broker served the one partition in two fetches). From the relay's own
    record:

    * LIMITED slows: after its first refusals the sender offers it less than before, near
      what it accepts — refusals become the exception — and its mail keeps going;
    * FAST is not held behind LIMITED: its mail keeps arriving while LIMITED waits, its
      longest gap well under LIMITED's;
    * nothing is lost or doubled: every recipient of both domains has exactly one message
      and one ``sent`` result, the deferred ones once LIMITED took them.

    Only quantities of one run compared with each other: no wall-clock bound."""
    per_second, ceiling = 4, 20.0
    hold, batch = 0.5, 20
    handler = RateCappingRelay(tmp_path / "relay", per_second=per_second, pipelining=True)
    limited = [f"l{i}@{LIMITED}" for i in range(30)]
    fast = [f"f{i}@{FAST}" for i in range(200)]
    # Both domains from the start, mixed; one contact, so one partition: its batches are
    # handled one after the other, each committed once its mail is sent or held.
    mixed = iter(limited)
    addresses: list[str] = []
    for i, address in enumerate(fast):
        if i % 7 == 0:
            addresses.extend(itertools.islice(mixed, 1))
        addresses.append(address)
    addresses.extend(mixed)
    assert sorted(addresses) == sorted(limited + fast)
    await queue_for_one_connection(kafka, 45, addresses)
    pauses = metric("tayori_sender_domain_throttles_total", LIMITED, kind="pause")
    with serving(handler) as controller:
        async with running(
            "sender",
            stack,
            database,
            prefix,
            smtp_relays=f"127.0.0.1:{controller.port}",
            smtp_connections=4,
            send_batch=batch,
            domain_hold_seconds=hold,
            domain_rate=ceiling,
            domain_aimd_floor=1.0,
            domain_aimd_increase=0.5,
        ):
            got = await results(kafka, len(addresses))
    # Nothing lost, nothing twice.
    assert {r["email"]: r["outcome"] for r in got} == dict.fromkeys(addresses, "sent")
    assert len(got) == len(addresses)
    assert recipients(kept(handler)) == dict.fromkeys(addresses, 1)

    events = handler.events
    ours = [(t, kind) for t, kind, a in events if a.endswith("@" + LIMITED) and kind != "kept"]
    first_refusal = next(t for t, kind in ours if kind == "421")
    # Before LIMITED said no, it was offered more RCPTs in a second than it takes.
    start = ours[0][0]
    offered_first_second = sum(start <= t < start + 1.0 for t, _ in ours)
    assert offered_first_second > per_second
    # After: it slowed to about what it accepts. From its first acceptance after the
    # first refusals on (the sender had slowed it), its RCPTs are mostly accepted — the
    # sender found its rate instead of hammering it — offered at a lower rate than in the
    # first second, and accepted at a good part of the limit: slowed, not stalled.
    settled = next(t for t, kind in ours if t > first_refusal and kind == "rcpt")
    later = [(t, kind) for t, kind in ours if t >= settled]
    refused_later = sum(kind == "421" for _, kind in later)
    assert refused_later < len(later) / 3, (refused_later, len(later))
    span = later[-1][0] - later[0][0]
    assert len(later) / span < offered_first_second
    assert (len(later) - refused_later) / span >= per_second / 4
    # FAST flowed while LIMITED waited: its messages kept arriving through LIMITED's slow
    # period, with gaps far shorter than LIMITED's.
    fast_kept = [t for t, kind, a in events if kind == "kept" and a.endswith("@" + FAST)]
    limited_kept = [t for t, kind, a in events if kind == "kept" and a.endswith("@" + LIMITED)]
    during = [t for t in fast_kept if t >= first_refusal]
    assert len(during) > len(fast) / 2
    assert max(gaps(during)) < max(gaps(limited_kept)) / 2
    # Metering, not blocking: LIMITED was slowed, never paused.
    assert metric("tayori_sender_domain_throttles_total", LIMITED, kind="pause") == pauses


async def test_domain_override_api(sender: Service) -> None:
    api = sender.api
    path = "/v1/domains/Docomo.NE.jp/override"
    empty = await api.ok("GET", path, token=VIEWER_TOKEN)
    assert empty["domain"] == "docomo.ne.jp"
    assert empty["override"] is None
    assert empty["policy"]["state"] == "normal"
    assert empty["policy"]["rate"] > 0  # the built-in carrier default
    assert (empty["in_flight"], empty["waiting"]) == (0, 0)

    body: dict[str, Any] = {
        "rate": 2.5,
        "connections": 2,
        "state": "throttled",
        "until": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
        "reason": "キャリアからの遅延 (carrier deferrals)",
        "warmup": {"start": datetime.now(UTC).date().isoformat(), "daily_caps": [100, 200]},
    }
    # Writes: operator or admin; a viewer may only read; nobody without a token.
    status, _ = await api.call("PUT", path, body, token=None)
    assert status == 401
    status, _ = await api.call("PUT", path, body, token=VIEWER_TOKEN)
    assert status == 403
    put = await api.ok("PUT", path, body, token=OPERATOR_TOKEN)
    assert put["override"]["state"] == "throttled"
    assert put["override"]["updated_by"] == "operator"
    assert put["policy"] == {
        "rate": 2.5,
        "connections": 2,
        "state": "throttled",
        "reason": body["reason"],
        "paused_for_seconds": None,
        "daily_cap": 100,
    }
    again = await api.ok("GET", "/v1/domains/docomo.ne.jp/override")
    warmup = again["override"]["warmup"]
    assert warmup == {"start": body["warmup"]["start"], "daily_caps": [100, 200]}
    listed = await api.ok("GET", "/v1/domain-overrides", token=VIEWER_TOKEN)
    assert [o["domain"] for o in listed["overrides"]] == ["docomo.ne.jp"]

    paused = await api.ok("PUT", path, {"state": "paused"})
    assert paused["policy"]["state"] == "paused"
    assert paused["policy"]["rate"] > 0  # back to the default's ceiling

    # Validation: 400 with a message, never a 500.
    bad = [
        ("/v1/domains/not_a_domain/override", {}),
        ("/v1/domains/example/override", {}),
        (path, {"rate": -1}),
        (path, {"rate": "fast"}),
        (path, {"connections": 1.5}),
        (path, {"state": "stopped"}),
        (path, {"until": "2020-01-01T00:00:00+00:00"}),
        (path, {"until": "2099-01-01T00:00:00"}),  # no offset
        (path, {"reason": "two\nlines"}),
        (path, {"warmup": {"start": "2026-12-01", "daily_caps": []}}),
        (path, {"warmup": {"start": "2026-12-01", "daily_caps": [0]}}),
        (path, {"speed": 3}),
    ]
    for where, payload in bad:
        status, problem = await api.call("PUT", where, payload)
        assert status == 400, (where, payload, status, problem)
        assert problem["detail"], problem
    status, _ = await api.call(
        "PUT", path, None, data=b"{", headers={"Content-Type": "application/json"}
    )
    assert status == 400

    status, _ = await api.call("DELETE", path, token=VIEWER_TOKEN)
    assert status == 403
    status, _ = await api.call("DELETE", path, token=OPERATOR_TOKEN)
    assert status == 204
    status, _ = await api.call("DELETE", path)
    assert status == 404
    gone = await api.ok("GET", path)
    assert gone["override"] is None
    assert gone["policy"]["state"] == "normal"


async def test_a_warm_up_cap_leaves_the_rest_for_later_and_sends_nothing_twice(
    sender: Service, kafka: Kafka, smtp_sink: SmtpSink
) -> None:
    """Today's warm-up cap of a domain: that many go, the rest are recorded as not sent
    (temporary_error, the wait would pass the bound) and other domains are untouched; a
    redelivered batch republishes the same results and sends nothing again."""
    domain = "warming.example"
    today = datetime.now(UTC).date().isoformat()
    await sender.api.ok(
        "PUT",
        f"/v1/domains/{domain}/override",
        {"warmup": {"start": today, "daily_caps": [3, 100]}, "reason": "new IP"},
        token=OPERATOR_TOKEN,
    )
    campaign = str(uuid.uuid4())
    requests = [send_request(campaign, 500 + i, f"w{i}@{domain}") for i in range(5)]
    requests += [send_request(campaign, 600 + i, f"o{i}@other.example") for i in range(5)]
    await publish_all(kafka, requests)
    got = await results(kafka, len(requests))
    outcomes = Counter((r["email"].partition("@")[2], r["outcome"]) for r in got)
    assert outcomes == {
        (domain, "sent"): 3,
        (domain, "temporary_error"): 2,
        ("other.example", "sent"): 5,
    }
    refused = [r for r in got if r["outcome"] == "temporary_error"]
    assert all("daily_cap" in r["diagnostic"] for r in refused)
    sent = recipients(smtp_sink.messages())
    assert sum(sent.values()) == 8 and set(sent.values()) == {1}
    await publish_all(kafka, requests)  # redelivered: the ledger decided them already
    again = await results(kafka, 2 * len(requests))
    assert {r["result_id"] for r in again} == {r["result_id"] for r in got}
    assert recipients(smtp_sink.messages()) == sent


def _domain_policy(domain: str, state: str, rate: float | None, reason: str) -> dict[str, Any]:
    now = int(time.time() * 1000)  # epoch milliseconds, as deliverability writes them
    return {
        "domain": domain,
        "state": state,
        "messages_per_second": rate,
        "connections": None,
        "reason": reason,
        "until": now + 3_600_000,
        "decided_at": now,
    }


async def test_the_sender_follows_the_published_domain_policies(
    stack: Stack, database: str, prefix: str, kafka: Kafka, smtp_sink: SmtpSink
) -> None:
    """domain.policy, read whole by the replica in no group: a record there before it
    started and one published while it runs set the domain's policy (the override API's
    ``policy`` shows it), a tombstone clears it, and a record it cannot read is skipped
    without stopping the reader."""
    early = "early.example"
    await kafka.send(
        Topic.DOMAIN_POLICY, early, _domain_policy(early, "throttled", 3.0, "deferral_ratio 0.5")
    )
    await kafka.send_raw(Topic.DOMAIN_POLICY, "broken.example", b"\x00not avro")
    relays = f"127.0.0.1:{smtp_sink.port}"
    async with running("sender", stack, database, prefix, smtp_relays=relays) as sender:
        api = sender.api

        async def policy_of(domain: str, state: str) -> dict[str, Any]:
            body = await api.ok("GET", f"/v1/domains/{domain}/override", token=VIEWER_TOKEN)
            assert body["policy"]["state"] == state, body
            return dict(body["policy"])

        policy = await eventually(lambda: policy_of(early, "throttled"))
        assert (policy["rate"], policy["reason"]) == (3.0, "deferral_ratio 0.5")
        assert (await policy_of("broken.example", "normal"))["reason"] is None

        later = "later.example"
        reason = "complaint_rate 0.0050 > 0.0030 (5/1000 delivered in 1h)"
        await kafka.send(Topic.DOMAIN_POLICY, later, _domain_policy(later, "paused", None, reason))
        policy = await eventually(lambda: policy_of(later, "paused"))
        assert policy["reason"] == reason
        assert 0 < policy["paused_for_seconds"] <= 3600

        await kafka.send_raw(Topic.DOMAIN_POLICY, early, None)  # the tombstone
        policy = await eventually(lambda: policy_of(early, "normal"))
        assert policy["reason"] is None
        assert (await policy_of(later, "paused"))["reason"] == reason
