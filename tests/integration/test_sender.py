"""The sender against the real broker, PostgreSQL and SMTP servers (aiosmtpd)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import Counter
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from email.message import Message
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiosmtpd.controller import Controller

from libs.common.mail.unsubscribe import UnsubscribeLinks
from libs.common.mail.verp import VerpAddresses
from libs.common.metrics import sample_value
from libs.common.topics import Topic
from services.sender import maintenance
from services.sender.context import CONTEXT
from services.suppression.store import change_record
from tayori.embedded import MaildirHandler, SmtpSink, free_port
from tests.conftest import Kafka, Service, Stack, eventually, running
from tests.integration.relays import TestRelay, kept, serving

pytestmark = pytest.mark.integration

SIGNING_KEYS = "dev:insecure-dev-signing-key"  # CommonSettings' default
CONTENT = {
    "from_address": "news@shop.example",
    "from_name": "Shop",
    "reply_to": None,
    "subject": "Hello <#name>",
    "format": "text",
    "body": "Dear <#name>,\n.a line starting with a dot\nLeave: <#unsubscribe_url>\n",
    "coupon_url": None,
}


def send_request(
    campaign_id: str, contact_id: int, email: str | None = None, **fields: Any
) -> dict[str, Any]:
    value: dict[str, Any] = {
        "request_id": str(uuid.uuid4()),
        "campaign_id": campaign_id,
        "step_id": None,
        "contact_id": contact_id,
        "email": email or f"c{contact_id}@example.com",
        "group_id": 7,
        "include_unsubscribed": False,
        "merge_values": {"name": f"Name{contact_id}"},
        "content": CONTENT,
        "attempt": 1,
        "released_at": datetime.now(UTC),
        "test": False,
    }
    value.update(fields)
    return value


def control(campaign_id: str, action: str) -> dict[str, Any]:
    return {
        "command_id": str(uuid.uuid4()),
        "campaign_id": campaign_id,
        "action": action,
        "reason": "test",
        "issued_at": datetime.now(UTC),
    }


_versions = iter(range(1, 1_000_000))


def change(kind: str, state: str, **fields: Any) -> dict[str, Any]:
    """A ``suppression.changes`` record, a newer version each time unless given."""
    fields.setdefault("version", next(_versions))
    fields.setdefault("method", "system")
    return change_record(kind, state=state, **fields)


def recipients(messages: list[Message]) -> Counter[str]:
    return Counter(str(m["X-Tayori-Envelope-To"]) for m in messages)


async def results(kafka: Kafka, n: int) -> list[dict[str, Any]]:
    return await kafka.read(Topic.DELIVERY_RESULTS, until=lambda rs: len(rs) >= n)


async def publish_all(kafka: Kafka, requests: list[dict[str, Any]]) -> None:
    for r in requests:
        await kafka.send(Topic.SEND_REQUESTS, r["contact_id"], r)


async def mail_to(sink: SmtpSink, n: int) -> list[Message]:
    async def arrived() -> list[Message]:
        got = sink.messages()
        return got if len(got) >= n else []

    return await eventually(arrived)


async def test_campaign_mail_arrives_personalised(
    sender: Service, kafka: Kafka, smtp_sink: SmtpSink
) -> None:
    campaign = str(uuid.uuid4())
    await publish_all(kafka, [send_request(campaign, 1), send_request(campaign, 2)])
    got = await results(kafka, 2)
    assert {r["outcome"] for r in got} == {"sent"}
    assert {r["contact_id"] for r in got} == {1, 2}
    mails = await mail_to(smtp_sink, 2)
    by_to = {str(m["To"]): m for m in mails}
    mail = by_to["c1@example.com"]
    assert mail["Subject"] == "Hello Name1"
    payload = mail.get_payload(decode=True)
    assert isinstance(payload, bytes)
    body = payload.decode()
    assert "Dear Name1," in body
    assert "\n.a line starting with a dot" in body.replace("\r\n", "\n")
    links = UnsubscribeLinks(SIGNING_KEYS, "http://127.0.0.1:8082")
    url = "".join(str(mail["List-Unsubscribe"]).split()).strip("<>")  # folded
    assert url in body
    target = links.read(url.rsplit("/", 1)[1])
    assert (target.contact_id, target.group_id, target.campaign_id) == (1, 7, campaign)
    assert mail["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    verp = VerpAddresses(SIGNING_KEYS, "bounces.localhost").read(
        str(mail["X-Tayori-Envelope-From"])
    )
    assert (verp.campaign_id, verp.contact_id) == (campaign, 1)
    sent = {r["contact_id"]: r for r in got}[1]
    assert sent["message_id"] == str(mail["Message-ID"]).strip()
    assert sent["smtp_code"] == 250
    assert sent["relay"] == f"127.0.0.1:{smtp_sink.port}"


async def test_duplicate_request_sends_once_and_republishes_the_same_result(
    sender: Service, kafka: Kafka, smtp_sink: SmtpSink
) -> None:
    campaign = str(uuid.uuid4())
    request = send_request(campaign, 11)
    await publish_all(kafka, [request])
    first = await results(kafka, 1)
    await publish_all(kafka, [request])  # redelivered
    await results(kafka, 2)
    await publish_all(kafka, [{**request, "request_id": str(uuid.uuid4()), "attempt": 2}])
    again = await results(kafka, 3)
    assert {r["result_id"] for r in again} == {first[0]["result_id"]}
    assert {r["outcome"] for r in again} == {"sent"}
    assert recipients(smtp_sink.messages()) == {"c11@example.com": 1}


async def copy_holds(sender: Service, table: str, n: int) -> None:
    async def applied() -> bool:
        return await sender.runtime.pool.fetchval(f"SELECT count(*) FROM {table}") >= n

    await eventually(applied)


async def test_last_moment_suppression(sender: Service, kafka: Kafka, smtp_sink: SmtpSink) -> None:
    changes = [
        change("membership", "unsubscribed", contact_id=21, group_id=7),
        change("membership", "banned", contact_id=22, group_id=7),
        change("membership", "unsubscribed", contact_id=23, group_id=7),
        change("blacklist_rule", "suffix", email="blocked.example"),
        change("address", "bounced", email="C25@Example.com", contact_id=25),
        change("contact_black", "black", contact_id=26),
        # An older change arriving later does not win: 27 stays unsubscribed.
        change("membership", "unsubscribed", contact_id=27, group_id=7, version=10_000_000),
        change("membership", "deliverable", contact_id=27, group_id=7, version=9_000_000),
    ]
    for c in changes:
        key = c["contact_id"] if c["kind"] in ("membership", "contact_black") else c["email"]
        await kafka.send(Topic.SUPPRESSION_CHANGES, key, c)
    await copy_holds(sender, "membership_copy", 4)
    await copy_holds(sender, "blacklist_copy", 1)
    await copy_holds(sender, "address_copy", 1)
    await copy_holds(sender, "contact_black_copy", 1)
    campaign = str(uuid.uuid4())
    await publish_all(
        kafka,
        [
            send_request(campaign, 21),
            send_request(campaign, 22, include_unsubscribed=True),
            send_request(campaign, 23, include_unsubscribed=True),
            send_request(campaign, 24, "x@mx.blocked.example", include_unsubscribed=True),
            send_request(campaign, 25),
            send_request(campaign, 26),
            send_request(campaign, 27),
        ],
    )
    got = {r["contact_id"]: r for r in await results(kafka, 7)}
    assert {k: (r["outcome"], r["suppressed_reason"]) for k, r in got.items()} == {
        21: ("suppressed", "unsubscribed"),
        22: ("suppressed", "banned"),
        23: ("sent", None),
        24: ("suppressed", "blacklisted"),
        25: ("suppressed", "address_bounced"),
        26: ("suppressed", "black_flag"),
        27: ("suppressed", "unsubscribed"),
    }
    assert recipients(smtp_sink.messages()) == {"c23@example.com": 1}


class RefusingHandler(TestRelay):
    """Refuses recipients by their local part: perm → 550 5.1.1, policy → 550 5.7.1,
    temp → 451 4.3.0, dataperm → accepted but 554 5.6.0 after the end of data, closing →
    accepted but 421 after its first end of data (the relay shuts the connection)."""

    def __init__(self, maildir: Path, pipelining: bool) -> None:
        super().__init__(maildir, pipelining)
        self.rcpt_attempts: Counter[str] = Counter()
        self.data_attempts: Counter[str] = Counter()

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        self.rcpt_attempts[address] += 1
        local = address.partition("@")[0]
        if local == "perm":
            return "550 5.1.1 <perm@example.com>: Recipient address rejected: User unknown"
        if local == "policy":
            return "550 5.7.1 Message rejected due to local policy"
        if local == "temp":
            return "451 4.3.0 Try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        to = envelope.rcpt_tos[0]
        self.data_attempts[to] += 1
        if to.startswith("dataperm@"):
            return "554 5.6.0 Message content rejected"
        if to.startswith("closing@") and self.data_attempts[to] == 1:
            return "421 4.3.2 Service shutting down"
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture(params=[False, True], ids=["one_by_one", "pipelining"])
def refusing_relay(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    with serving(RefusingHandler(tmp_path / "refusing", pipelining=request.param)) as controller:
        yield controller


async def queue_for_one_connection(kafka: Kafka, contact_id: int, addresses: list[str]) -> None:
    """A request to each address for one contact, a campaign each: one partition, published
    before the sender starts, so its first batch queues them all for its one connection."""
    await publish_all(kafka, [send_request(str(uuid.uuid4()), contact_id, a) for a in addresses])


def one_connection(
    stack: Stack, database: str, prefix: str, relay: str, **overrides: Any
) -> AbstractAsyncContextManager[Service]:
    """The sender with one SMTP connection to ``relay``."""
    return running(
        "sender", stack, database, prefix, smtp_relays=relay, smtp_connections=1, **overrides
    )


def ahead_count(relay: str) -> float:
    """Transactions the sender pipelined behind a previous message, on ``relay``, so far."""
    return sample_value("tayori_sender_transactions_ahead_total", {"relay": relay}) or 0


async def test_relay_replies_become_outcomes(
    stack: Stack, database: str, prefix: str, kafka: Kafka, refusing_relay: Controller
) -> None:
    """One connection, so with PIPELINING each transaction after the first goes out behind
    the previous message's end of data: refusals, whichever transaction they end, leave
    the next one intact."""
    relay = f"127.0.0.1:{refusing_relay.port}"
    addresses = ["ok0", "perm", "policy", "temp", "dataperm", "ok", "ok6"]
    await queue_for_one_connection(kafka, 30, [f"{a}@example.com" for a in addresses])
    before = ahead_count(relay)  # the session's: an earlier test's relay had this port maybe
    async with one_connection(
        stack, database, prefix, relay, smtp_retry_backoff=0.02, smtp_temp_retries=2
    ):
        got = {r["email"].partition("@")[0]: r for r in await results(kafka, len(addresses))}
    # Each 4xx retried went out on delivery.deferrals (a stopped sender has published what
    # it held); the last one, whose retries were spent, is the result only.
    deferrals = await kafka.read_to_end(Topic.DELIVERY_DEFERRALS)
    assert [
        (d["contact_id"], d["domain"], d["smtp_code"], d["enhanced_code"], d["relay"])
        for d in deferrals
    ] == [(30, "example.com", 451, "4.3.0", relay)] * 2
    assert {d["campaign_id"] for d in deferrals} == {got["temp"]["campaign_id"]}
    summary = {
        k: (r["outcome"], r["smtp_code"], r["enhanced_code"], r["relay"]) for k, r in got.items()
    }
    assert summary == {
        "ok0": ("sent", 250, None, relay),
        "perm": ("permanent_error", 550, "5.1.1", relay),
        "policy": ("policy_error", 550, "5.7.1", relay),
        "temp": ("temporary_error", 451, "4.3.0", relay),
        "dataperm": ("permanent_error", 554, "5.6.0", relay),
        "ok": ("sent", 250, None, relay),
        "ok6": ("sent", 250, None, relay),
    }
    assert "User unknown" in got["perm"]["diagnostic"]
    assert refusing_relay.handler.rcpt_attempts["temp@example.com"] == 3  # 1 + 2 retries
    assert refusing_relay.handler.rcpt_attempts["ok@example.com"] == 1
    assert recipients(kept(refusing_relay.handler)) == {
        "ok0@example.com": 1,
        "ok@example.com": 1,
        "ok6@example.com": 1,
    }
    if refusing_relay.handler.pipelining:
        assert ahead_count(relay) > before
    else:
        assert ahead_count(relay) == before


async def test_a_relay_closing_after_an_end_of_data_loses_nothing_pipelined_behind_it(
    stack: Stack, database: str, prefix: str, kafka: Kafka, tmp_path: Path
) -> None:
    """421 after an end of data while the next transaction's MAIL, RCPT and DATA are on
    the wire behind it: both messages go again on a new connection, each arrives once."""
    handler = RefusingHandler(tmp_path / "closing", pipelining=True)
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    relay = f"127.0.0.1:{controller.port}"
    addresses = ["a@example.com", "closing@example.com", "b@example.com", "c@example.com"]
    await queue_for_one_connection(kafka, 80, addresses)
    before = ahead_count(relay)
    try:
        async with one_connection(stack, database, prefix, relay, smtp_relay_backoff=0.05):
            got = await results(kafka, len(addresses))
        assert {r["email"]: r["outcome"] for r in got} == dict.fromkeys(addresses, "sent")
        assert recipients(kept(handler)) == dict.fromkeys(addresses, 1)
        assert handler.data_attempts["closing@example.com"] == 2
        assert ahead_count(relay) > before
    finally:
        controller.stop()


async def barrier(kafka: Kafka, contact_id: int, seen: int) -> list[dict[str, Any]]:
    """A request of another campaign to the same contact (same key, same partition, so
    handled after what was published before it); returns the results once it has one."""
    await publish_all(kafka, [send_request(str(uuid.uuid4()), contact_id)])
    return await results(kafka, seen + 1)


async def control_state(sender: Service, campaign: str, state: str) -> None:
    async def is_state() -> bool:
        return (
            await sender.runtime.pool.fetchval(
                "SELECT state FROM campaign_control WHERE campaign_id = $1", campaign
            )
            == state
        )

    await eventually(is_state)


class HoldingHandler(MaildirHandler):
    """Holds its answer to the first end of data until ``release`` is set (by another
    thread: aiosmtpd runs in its own); ``held`` is the recipient it holds."""

    def __init__(self, maildir: Path) -> None:
        super().__init__(maildir)
        self.release = threading.Event()
        self.held: list[str] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if not self.held:
            self.held.extend(envelope.rcpt_tos)
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 60)
        return await super().handle_DATA(server, session, envelope)


async def test_a_halt_stops_the_transaction_already_pipelined_behind_a_message(
    stack: Stack, database: str, prefix: str, kafka: Kafka, tmp_path: Path
) -> None:
    """The halt of a campaign comes while its mail's MAIL, RCPT and DATA are on the wire
    behind another message's end of data: its content never follows."""
    handler = HoldingHandler(tmp_path / "holding")
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    addresses = ["a@example.com", "b@example.com", "c@example.com"]
    campaigns = dict(zip(addresses, (str(uuid.uuid4()) for _ in addresses), strict=True))
    await publish_all(kafka, [send_request(campaigns[a], 90, a) for a in addresses])
    relay = f"127.0.0.1:{controller.port}"
    before = ahead_count(relay)
    try:
        async with one_connection(stack, database, prefix, relay) as sender:
            ctx = sender.runtime.app[CONTEXT]

            async def holding() -> list[str]:
                return handler.held

            (first,) = await eventually(holding)  # the next one's commands went behind it
            others = [a for a in addresses if a != first]
            for address in others:
                await kafka.send(
                    Topic.CAMPAIGN_CONTROL, campaigns[address], control(campaigns[address], "halt")
                )

            async def halted() -> bool:
                return all(ctx.stopped.get(campaigns[a]) == "halted" for a in others)

            await eventually(halted)
            handler.release.set()
            got = await barrier(kafka, 90, 1)  # handled after the three
        assert sorted(r["email"] for r in got) == sorted([first, "c90@example.com"])
        assert recipients(kept(handler)) == {first: 1, "c90@example.com": 1}
        assert ahead_count(relay) > before  # the halted one's commands did go ahead
    finally:
        handler.release.set()
        controller.stop()


class SlowHandler(MaildirHandler):
    """Keeps each message, then takes ``delay`` seconds to say so (a filtering relay)."""

    def __init__(self, maildir: Path, delay: float) -> None:
        super().__init__(maildir)
        self.delay = delay

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        await asyncio.sleep(self.delay)
        return reply


async def test_a_relay_slow_to_answer_an_end_of_data_gets_the_message_once(
    stack: Stack, database: str, prefix: str, kafka: Kafka, tmp_path: Path
) -> None:
    """SMTP_TIMEOUT bounds every reply but the one to an end of data, which may take
    minutes (SMTP_DATA_TIMEOUT): giving up there would send the message again."""
    handler = SlowHandler(tmp_path / "slow", delay=1.5)
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    addresses = ["a@example.com", "b@example.com"]
    await queue_for_one_connection(kafka, 91, addresses)
    try:
        relay = f"127.0.0.1:{controller.port}"
        async with one_connection(stack, database, prefix, relay, smtp_timeout=0.5):
            got = await results(kafka, len(addresses))
        assert {r["email"]: r["outcome"] for r in got} == dict.fromkeys(addresses, "sent")
        assert recipients(kept(handler)) == dict.fromkeys(addresses, 1)
    finally:
        controller.stop()


async def test_halt_stops_a_campaign_for_good(
    sender: Service, kafka: Kafka, smtp_sink: SmtpSink
) -> None:
    campaign = str(uuid.uuid4())
    await kafka.send(Topic.CAMPAIGN_CONTROL, campaign, control(campaign, "halt"))
    await control_state(sender, campaign, "halted")
    await kafka.send(Topic.CAMPAIGN_CONTROL, campaign, control(campaign, "resume"))
    await publish_all(kafka, [send_request(campaign, 41)])
    got = await barrier(kafka, 41, 0)
    assert len(got) == 1
    assert got[0]["campaign_id"] != campaign
    assert len(smtp_sink.messages()) == 1
    await control_state(sender, campaign, "halted")  # resume did not lift it


async def test_pause_holds_until_resume(sender: Service, kafka: Kafka, smtp_sink: SmtpSink) -> None:
    campaign = str(uuid.uuid4())
    await kafka.send(Topic.CAMPAIGN_CONTROL, campaign, control(campaign, "pause"))
    await control_state(sender, campaign, "paused")
    await publish_all(kafka, [send_request(campaign, 51)])
    got = await barrier(kafka, 51, 0)
    assert campaign not in {r["campaign_id"] for r in got}
    await kafka.send(Topic.CAMPAIGN_CONTROL, campaign, control(campaign, "resume"))
    await control_state(sender, campaign, "active")
    await publish_all(kafka, [send_request(campaign, 51, attempt=2)])
    got = await results(kafka, 2)
    assert [r["outcome"] for r in got if r["campaign_id"] == campaign] == ["sent"]
    assert recipients(smtp_sink.messages()) == {"c51@example.com": 2}  # barrier + resumed


async def test_relay_down_then_up_delivers_once(
    stack: Stack, database: str, prefix: str, kafka: Kafka, tmp_path: Path
) -> None:
    port = free_port()
    async with running(
        "sender",
        stack,
        database,
        prefix,
        smtp_relays=f"127.0.0.1:{port}",
        smtp_relay_backoff=0.05,
    ):
        campaign = str(uuid.uuid4())
        await publish_all(kafka, [send_request(campaign, 61), send_request(campaign, 62)])
        await asyncio.sleep(0.5)  # the relay is refusing connections meanwhile
        assert await kafka.read_to_end(Topic.DELIVERY_RESULTS) == []
        sink = SmtpSink(tmp_path / "late", port)
        try:
            got = await results(kafka, 2)
            assert {r["outcome"] for r in got} == {"sent"}
            assert recipients(await mail_to(sink, 2)) == {
                "c61@example.com": 1,
                "c62@example.com": 1,
            }
        finally:
            sink.stop()


@pytest.mark.parametrize("where", ["building the mail", "after the relay's reply"])
async def test_a_bug_while_sending_fails_the_sender_loudly(
    stack: Stack,
    database: str,
    prefix: str,
    kafka: Kafka,
    smtp_sink: SmtpSink,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    """A bug while sending one mail (not a refusable request: those are permanent_error)
    fails its batch's handler, so /healthz goes red and a restart sends the batch again; the
    relay worker goes on. (Its worker used to die silently, the batch waiting for ever with
    /healthz green.)"""
    from services.sender import agents, smtp
    from services.sender.compose import Composer

    monkeypatch.setattr(agents, "KEEPALIVE_SECONDS", 0.2)
    if where == "building the mail":
        built = Composer.campaign_mail

        def campaign_mail(self: Composer, mail: Any, request: dict[str, Any]) -> Any:
            if request["email"].startswith("boom"):
                raise RuntimeError("a bug in building this mail")
            return built(self, mail, request)

        monkeypatch.setattr(Composer, "campaign_mail", campaign_mail)
    else:

        def outcome(*_: Any) -> Any:
            raise RuntimeError("a bug in reading the reply")

        monkeypatch.setattr(smtp._Worker, "_outcome", outcome)
    relays = f"127.0.0.1:{smtp_sink.port}"
    async with running("sender", stack, database, prefix, smtp_relays=relays) as sender:
        await publish_all(kafka, [send_request(str(uuid.uuid4()), 64, "boom@example.com")])

        async def failing() -> dict[str, Any] | None:
            status, body = await sender.api.call("GET", "/healthz", token=None)
            return body if status == 503 else None

        body = await eventually(failing)
        assert "consumer:sender.requests" in body["stopped_tasks"]
        workers = sender.runtime.app[CONTEXT].relays._workers
        assert workers and not [t for t in workers if t.done()]  # the workers go on
        assert await kafka.read_to_end(Topic.DELIVERY_RESULTS) == []  # nothing recorded
    assert len(smtp_sink.messages()) == (0 if where == "building the mail" else 1)


async def test_a_sender_waiting_for_its_relays_stays_healthy(
    stack: Stack, database: str, prefix: str, kafka: Kafka, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every relay down: the batch waits, uncommitted, by design; a restart would not help,
    so /healthz stays green while the handler waits (it tells its consumer so)."""
    from libs.common import service
    from services.sender import agents

    monkeypatch.setattr(service, "STALL_SECONDS", 2.5)
    monkeypatch.setattr(agents, "KEEPALIVE_SECONDS", 0.2)
    port = free_port()
    async with running(
        "sender", stack, database, prefix, smtp_relays=f"127.0.0.1:{port}"
    ) as sender:
        await publish_all(kafka, [send_request(str(uuid.uuid4()), 63)])
        for _ in range(10):  # 5 s: well past STALL_SECONDS
            await asyncio.sleep(0.5)
            _, body = await sender.api.call("GET", "/healthz", token=None)
            assert "sender.requests" not in body["stalled"], body
        assert await kafka.read_to_end(Topic.DELIVERY_RESULTS) == []  # still waiting


async def test_failover_to_the_next_relay(
    stack: Stack, database: str, prefix: str, kafka: Kafka, smtp_sink: SmtpSink
) -> None:
    dead = free_port()
    live = f"127.0.0.1:{smtp_sink.port}"
    async with running("sender", stack, database, prefix, smtp_relays=f"127.0.0.1:{dead},{live}"):
        campaign = str(uuid.uuid4())
        await publish_all(kafka, [send_request(campaign, 70 + n) for n in range(5)])
        got = await results(kafka, 5)
    assert {(r["outcome"], r["relay"]) for r in got} == {("sent", live)}
    assert len(recipients(smtp_sink.messages())) == 5


async def test_a_stop_mid_campaign_sends_nothing_twice(
    stack: Stack, database: str, prefix: str, kafka: Kafka, smtp_sink: SmtpSink
) -> None:
    """A sender stopped (SIGTERM, a rolling update, a scale-down) while it sends: the
    connections whose end of data is out read their replies before closing, the others
    stop before theirs, so after the restart every recipient has exactly one mail."""
    count = 400
    campaign = str(uuid.uuid4())
    await publish_all(kafka, [send_request(campaign, n) for n in range(1, count + 1)])
    relay = f"127.0.0.1:{smtp_sink.port}"
    async with running("sender", stack, database, prefix, smtp_relays=relay):
        await mail_to(smtp_sink, count // 4)
    stopped_at = len(smtp_sink.messages())
    async with running("sender", stack, database, prefix, smtp_relays=relay):

        async def answered() -> bool:
            results = await kafka.read_to_end(Topic.DELIVERY_RESULTS)
            return len({r["contact_id"] for r in results}) == count

        await eventually(answered)
    assert stopped_at < count, "the stop came too late to test anything"
    assert recipients(smtp_sink.messages()) == {f"c{n}@example.com": 1 for n in range(1, count + 1)}


def system_mail(mail_id: str, to: list[str]) -> dict[str, Any]:
    return {
        "mail_id": mail_id,
        "job_id": "job-1",
        "kind": "export_ready",
        "to": to,
        "subject": "Your export is ready",
        "text_body": "Download it here.\n.dot line\n",
        "html_body": "<p>Download it <a href='https://x.example/d'>here</a>.</p>",
        "created_at": datetime.now(UTC),
    }


async def test_system_mail_is_delivered_once(
    sender: Service, kafka: Kafka, smtp_sink: SmtpSink
) -> None:
    mail = system_mail(str(uuid.uuid4()), ["ops@example.com", "boss@example.com"])
    await kafka.send(Topic.MAIL_SYSTEM, "job-1", mail)
    await kafka.send(Topic.MAIL_SYSTEM, "job-1", mail)
    await kafka.send(Topic.MAIL_SYSTEM, "job-1", system_mail(str(uuid.uuid4()), ["x@example.com"]))
    mails = await mail_to(smtp_sink, 3)
    assert recipients(mails) == {"ops@example.com": 1, "boss@example.com": 1, "x@example.com": 1}
    first = next(m for m in mails if m["To"] == "ops@example.com")
    assert first["From"] == "tayori@localhost"
    assert first["X-Tayori-Envelope-From"] == "tayori@localhost"
    assert first.get_content_type() == "multipart/alternative"
    assert await kafka.read_to_end(Topic.DELIVERY_RESULTS) == []


async def test_a_system_mail_smuggling_a_header_is_refused_and_the_next_goes(
    sender: Service, kafka: Kafka, smtp_sink: SmtpSink
) -> None:
    bad = system_mail(str(uuid.uuid4()), ["ops@example.com"])
    bad["subject"] = "Ready\r\nBcc: victim@example.com"
    await kafka.send(Topic.MAIL_SYSTEM, "job-1", bad)
    await kafka.send(Topic.MAIL_SYSTEM, "job-1", system_mail(str(uuid.uuid4()), ["x@example.com"]))
    assert recipients(await mail_to(smtp_sink, 1)) == {"x@example.com": 1}

    async def refused() -> bool:
        row = await sender.runtime.pool.fetchrow(
            "SELECT status, outcome FROM send_ledger WHERE campaign_id = $1",
            f"mail:{bad['mail_id']}",
        )
        return row is not None and (row["status"], row["outcome"]) == ("done", "permanent_error")

    await eventually(refused)
    assert (await sender.api.call("GET", "/healthz", token=None))[0] == 200
    assert recipients(smtp_sink.messages()) == {"x@example.com": 1}


async def test_test_send_is_delivered_without_result(
    sender: Service, kafka: Kafka, smtp_sink: SmtpSink
) -> None:
    # The sample contact is unsubscribed: a test send goes to the operator regardless.
    await kafka.send(
        Topic.SUPPRESSION_CHANGES,
        81,
        change("membership", "unsubscribed", contact_id=81, group_id=7),
    )
    await copy_holds(sender, "membership_copy", 1)
    campaign = str(uuid.uuid4())
    test = send_request(campaign, 81, "operator@example.com", step_id="test:t1:1", test=True)
    await publish_all(kafka, [test, test])
    got = await barrier(kafka, 81, 0)  # same key: handled after the test sends
    assert [(r["campaign_id"], r["outcome"]) for r in got] != [(campaign, "sent")]
    assert [r["suppressed_reason"] for r in got] == ["unsubscribed"]  # the barrier itself
    assert recipients(await mail_to(smtp_sink, 1)) == {"operator@example.com": 1}

    async def recorded() -> bool:  # the barrier may have shared the test sends' batch
        status = await sender.runtime.pool.fetchval(
            "SELECT status FROM send_ledger WHERE step_id = 'test:t1:1'"
        )
        return status == "done"

    await eventually(recorded)


async def test_content_no_mail_can_be_made_of_goes_to_the_dlq(
    sender: Service, kafka: Kafka, smtp_sink: SmtpSink
) -> None:
    campaign = str(uuid.uuid4())
    bad = send_request(campaign, 91, content={**CONTENT, "format": "pdf"})
    await publish_all(kafka, [bad, send_request(campaign, 91, step_id="s2")])
    dead = await kafka.read(Topic.SEND_REQUESTS.dlq, until=lambda rs: len(rs) >= 1)
    assert dict(dead[0].headers)["dlq-reason"].startswith(b"format must be")
    got = await results(kafka, 1)
    assert [(r["contact_id"], r["step_id"], r["outcome"]) for r in got] == [(91, "s2", "sent")]


async def test_rows_claimed_by_another_live_sender_are_left_to_it(
    sender: Service, kafka: Kafka, smtp_sink: SmtpSink, stack: Stack, database: str
) -> None:
    """A rebalance can hand a partition over while its old owner still sends: rows it claimed
    are not sent again while it lives; when it dies they are taken over and sent once."""
    campaign = str(uuid.uuid4())
    finishing, dying = 901, 902  # advisory-lock keys of two "other senders"
    others = [await asyncpg.connect(database) for _ in range(2)]
    try:
        for conn, key in zip(others, (finishing, dying), strict=True):
            await conn.execute("SELECT pg_advisory_lock($1)", key)
        await sender.runtime.pool.execute(
            "INSERT INTO send_ledger (campaign_id, contact_id, kind, status, email, owner)"
            " VALUES ($1, 96, 'campaign', 'claimed', 'c96@example.com', $2),"
            "        ($1, 97, 'campaign', 'claimed', 'c97@example.com', $3)",
            campaign,
            finishing,
            dying,
        )
        await publish_all(kafka, [send_request(campaign, 96), send_request(campaign, 97)])
        await asyncio.sleep(1.0)
        assert smtp_sink.messages() == []
        # The first finishes its row (and publishes its own result); the second dies.
        await sender.runtime.pool.execute(
            "UPDATE send_ledger SET status = 'done', outcome = 'sent' WHERE contact_id = 96"
        )
        await others[1].close()
        got = await results(kafka, 1)
        assert [(r["contact_id"], r["outcome"]) for r in got] == [(97, "sent")]
        assert recipients(await mail_to(smtp_sink, 1)) == {"c97@example.com": 1}
    finally:
        for conn in others:
            await conn.close()


async def test_operator_api_shows_relays_and_a_campaign_ledger(
    sender: Service, kafka: Kafka, smtp_sink: SmtpSink
) -> None:
    campaign = str(uuid.uuid4())
    await publish_all(kafka, [send_request(campaign, 99)])
    await results(kafka, 1)
    relays = await sender.api.ok("GET", "/v1/relays")
    assert relays["relays"] == [
        {
            "relay": f"127.0.0.1:{smtp_sink.port}",
            "state": "up",
            "retry_in_seconds": 0,
            "connections_open": 1,
        }
    ]
    ledger = await sender.api.ok("GET", f"/v1/ledger/{campaign}")
    assert ledger == {
        "campaign_id": campaign,
        "control": "active",
        "held_domains": [],
        "by_status": {"done": 1},
        "by_outcome": {"sent": 1},
    }
    status, _ = await sender.api.call("GET", "/v1/relays", token=None)
    assert status == 401


async def test_upkeep_forgets_old_finished_rows_only(sender: Service) -> None:
    pool = sender.runtime.pool
    rows = [
        # (campaign, contact, status, claimed days ago)
        ("old-done", 1, "done", 40),
        ("old-claimed", 2, "claimed", 40),  # unfinished: never forgotten
        ("recent-done", 3, "done", 5),
    ]
    for campaign, contact, status, days in rows:
        await pool.execute(
            "INSERT INTO send_ledger (campaign_id, contact_id, kind, status, email, claimed_at)"
            " VALUES ($1, $2, 'campaign', $3, 'x@example.com', now() - make_interval(days => $4))",
            campaign,
            contact,
            status,
            days,
        )
    await pool.execute(
        "INSERT INTO processed_event (event_id, processed_at) VALUES"
        " ('old', now() - interval '40 days'), ('new', now())"
    )
    ctx = sender.runtime.app[CONTEXT]
    assert await maintenance.run_once(ctx) == (1, 1)
    left = await pool.fetch("SELECT campaign_id FROM send_ledger ORDER BY campaign_id")
    assert [r["campaign_id"] for r in left] == ["old-claimed", "recent-done"]
    assert await pool.fetchval("SELECT array_agg(event_id) FROM processed_event") == ["new"]
