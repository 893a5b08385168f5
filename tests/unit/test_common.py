"""libs/common: settings, tokens, masking, SQL blocks, the DLQ limit, backoff."""

from __future__ import annotations

import base64
import dataclasses
import time
from pathlib import Path

import pytest

from libs.common.db import Queries, columns, migration_files
from libs.common.errors import DlqLimitExceeded, InvalidMessage
from libs.common.kafka import QUIET_FETCH_MAX_WAIT_MS, DlqLimit, Latency, Message, Pacing, checked
from libs.common.logging import mask_email
from libs.common.mail.tokens import BadToken, Sealer, Signer
from libs.common.retry import Backoff
from libs.common.settings import CommonSettings, load
from libs.common.topics import Topic, all_topic_names, topic_name


def test_settings_from_environment_with_types_and_secret_files(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("s3cret\n")
    settings = load(
        CommonSettings,
        {
            "KAFKA_BOOTSTRAP": "kafka:9092",
            "HTTP_PORT": "9000",
            "DLQ_LIMIT_RATIO": "0.25",
            "TAYORI_ADMIN_TOKEN_FILE": str(secret),
            "TAYORI_API_TOKENS": "viewer:v1, operator:o1",
        },
    )
    assert settings.kafka_bootstrap == "kafka:9092"
    assert settings.http_port == 9000
    assert settings.dlq_limit_ratio == 0.25
    assert settings.admin_token == "s3cret"
    assert settings.bearer_tokens() == {"s3cret": "admin", "v1": "viewer", "o1": "operator"}
    shown = repr(settings)
    assert "s3cret" not in shown and "v1" not in shown and "kafka:9092" in shown


def test_settings_refuse_a_bad_number() -> None:
    with pytest.raises(ValueError):
        load(CommonSettings, {"HTTP_PORT": "eighty"})


def test_tokens_verify_rotate_and_refuse_forgeries_alike() -> None:
    old = Signer("k1:first-secret", "unsubscribe")
    token = old.sign({"c": 42, "g": 7})
    rotated = Signer("k2:second-secret,k1:first-secret", "unsubscribe")
    assert rotated.verify(token) == {"c": 42, "g": 7}
    assert rotated.sign({"c": 1}).startswith("k2.")
    kid, payload, mac = token.split(".")
    forgeries = [
        f"{kid}.{payload}.{'A' * len(mac)}",  # wrong MAC
        f"{kid}.{payload[:-2]}xx.{mac}",  # tampered payload
        f"k9.{payload}.{mac}",  # unknown key
        "not-a-token",
        Signer("k1:other-secret", "unsubscribe").sign({"c": 42, "g": 7}),  # other key, same kid
        Signer("k1:first-secret", "click").sign({"c": 42, "g": 7}),  # other purpose
    ]
    for forged in forgeries:
        with pytest.raises(BadToken) as caught:
            rotated.verify(forged)
        assert str(caught.value) == ""  # the same, uninformative answer for every failure


def test_sealed_tokens_open_rotate_and_refuse_forgeries_alike() -> None:
    old = Sealer("k1:first-secret", "unsubscribe")
    token = old.seal(b"\x00claims 42")
    assert b"claims" not in base64.urlsafe_b64decode(token[3:] + "==")
    rotated = Sealer("k2:second-secret,k1:first-secret", "unsubscribe")
    assert rotated.open(token) == b"\x00claims 42"
    assert rotated.seal(b"x").startswith("k2.") and rotated.seal(b"x") != rotated.seal(b"x")
    kid, box = token.split(".")
    forgeries = [
        f"{kid}.{box[:8]}{'A' if box[8] != 'A' else 'B'}{box[9:]}",  # tampered
        f"k2.{box}",  # another key id
        f"k9.{box}",  # unknown key
        "not-a-token",
        f"{kid}.{box}.{box}",
        Sealer("k1:other-secret", "unsubscribe").seal(b"x"),  # other key, same kid
        Sealer("k1:first-secret", "click").seal(b"x"),  # other purpose
    ]
    for forged in forgeries:
        with pytest.raises(BadToken) as caught:
            rotated.open(forged)
        assert str(caught.value) == ""


def test_tokens_expire() -> None:
    signer = Signer("k1:secret", "download")
    token = signer.sign({"job": "j"}, ttl_seconds=60)
    assert signer.verify(token)["job"] == "j"
    with pytest.raises(BadToken):
        signer.verify(token, now=time.time() + 61)


def test_mask_email_keeps_domain_only() -> None:
    assert mask_email("taro.yamada@example.co.jp") == "t***@example.co.jp"
    assert mask_email("nonsense") == "***"
    assert mask_email(None) == ""


def test_named_queries(tmp_path: Path) -> None:
    sql = tmp_path / "q.sql"
    sql.write_text("-- name: one\nSELECT 1;\n\n-- name: two-rows\nSELECT 1\nUNION SELECT 2;\n")
    queries = Queries(sql)
    assert queries["one"] == "SELECT 1"
    assert queries["two-rows"] == "SELECT 1\nUNION SELECT 2"
    sql.write_text("-- name: one\nSELECT 1;\n-- name: one\nSELECT 2;\n")
    with pytest.raises(ValueError, match="defined twice"):
        Queries(sql)


def test_migrations_must_be_numbered_without_gaps(tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("")
    (tmp_path / "0003_c.sql").write_text("")
    with pytest.raises(ValueError, match="without gaps"):
        migration_files(tmp_path)


def test_dlq_limit_lets_a_poison_pill_through_but_stops_a_bad_deploy() -> None:
    limit = DlqLimit(ratio=0.5, minimum=10, window=100)
    for i in range(200):  # one bad message in twenty
        limit.record(dead_lettered=(i % 20 == 0))
    with pytest.raises(DlqLimitExceeded):
        for _ in range(100):
            limit.record(dead_lettered=True)


def test_checked_gives_each_value_as_checked_and_names_the_first_refused() -> None:
    def message(offset: int, n: int) -> Message:
        return Message(Topic.EXPORT_REQUESTS, None, {"n": n}, 0, offset, 0)

    def check(value: dict[str, int]) -> int:
        if value["n"] < 0:
            raise InvalidMessage("negative", field="n")
        return value["n"] * 2

    assert checked([message(0, 1), message(1, 2)], check) == [2, 4]
    with pytest.raises(InvalidMessage) as refused:
        checked([message(0, 1), message(1, -1), message(2, -2)], check)
    assert refused.value.message.offset == 1  # type: ignore[attr-defined]
    assert (refused.value.reason, refused.value.field) == ("negative", "n")


def test_backoff_is_bounded_and_jittered() -> None:
    delays = list(Backoff(initial=0.1, maximum=1.0, attempts=6).delays())
    assert len(delays) == 6
    assert all(0 <= d <= 1.0 for d in delays)


def test_topic_names_and_dlqs() -> None:
    assert topic_name(Topic.CONTACTS_EVENTS, "t1.") == "t1.contacts.events"
    names = all_topic_names("p.")
    assert "p.contacts.events.dlq" in names
    assert len(names) == 2 * len(Topic)


def test_fetch_pacing_follows_who_waits_on_the_topic_on_the_embedded_broker() -> None:
    settings = CommonSettings(
        kafka_profile="embedded", kafka_fetch_max_wait_ms=50, kafka_fast_fetch_max_wait_ms=10
    )
    assert Pacing.of(Latency.CRITICAL, settings) == Pacing(10, 50)  # a lone change: ≤ 50 ms
    assert Pacing.of(Latency.NORMAL, settings) == Pacing(50, QUIET_FETCH_MAX_WAIT_MS)
    assert Pacing.of(Latency.QUIET, settings) == Pacing(QUIET_FETCH_MAX_WAIT_MS)


def test_on_apache_kafka_every_consumer_fetches_with_the_one_wait() -> None:
    """A Kafka broker answers a fetch when records arrive: the wait is only a ceiling, so no
    class needs a short one and an idle consumer is not re-paced."""
    settings = CommonSettings()
    assert settings.kafka_profile == "kafka"
    for latency in Latency:
        assert Pacing.of(latency, settings) == Pacing(500)


def test_an_unknown_kafka_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="KAFKA_PROFILE"):
        CommonSettings(kafka_profile="tansu")


def test_services_collect_less_often_and_skip_what_start_up_made() -> None:
    import gc

    from libs.common.runner import GC_YOUNG_THRESHOLD, quiet_collector

    before = gc.get_threshold()
    try:
        quiet_collector()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:])
        assert gc.get_freeze_count() > 0  # modules, codecs… are no collection's work
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1  # cycles made afterwards are still collected
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


async def test_a_wait_cancelled_as_its_event_is_set_is_cancelled() -> None:
    """The stop of a service cancels its idle loops; one whose event is set in the same loop
    step must still stop (``asyncio.wait_for`` returned True there on 3.11: the loop went on
    and the stop waited for it forever)."""
    import asyncio

    from libs.common.aio import woken

    event = asyncio.Event()
    waiting = asyncio.ensure_future(woken(event, 60))
    await asyncio.sleep(0)
    event.set()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    event.clear()
    assert await woken(event, 0.01) is False
    event.set()
    assert await woken(event, 60) is True


def test_no_asyncio_wait_for_in_the_code() -> None:
    """``asyncio.wait_for`` can swallow a cancel on 3.11 (libs/common/aio.py); the code uses
    ``asyncio.timeout`` or ``aio.woken``."""
    root = Path(__file__).resolve().parents[2]
    users = [
        str(path.relative_to(root))
        for folder in ("libs", "services", "tayori")
        for path in (root / folder).rglob("*.py")
        if "asyncio.wait_for(" in path.read_text(encoding="utf-8")
    ]
    assert users == []


def test_columns_turn_rows_into_unnest_arrays() -> None:
    @dataclasses.dataclass
    class Row:
        a: int
        b: str

    assert columns([{"a": 1, "b": "x"}, {"a": 2, "b": "y"}], "b", "a") == [["x", "y"], [1, 2]]
    assert columns([Row(1, "x"), Row(2, "y")], "a", "b") == [[1, 2], ["x", "y"]]
    assert columns([], "a", "b") == [[], []]


def test_the_runtime_floor_never_imports_the_mail_floor() -> None:
    """libs/common has two floors: runtime plumbing below, the mail package above it."""
    runtime = Path(__file__).resolve().parents[2] / "libs" / "common"
    for module in runtime.glob("*.py"):
        text = module.read_text(encoding="utf-8")
        assert "libs.common.mail" not in text, f"{module.name} imports the mail floor"
        assert "from libs.common import mail" not in text, module.name


def test_malformed_requests_are_not_logged_as_server_errors() -> None:
    """aiohttp answers a request it cannot parse 400 itself; its traceback is not an
    operator's problem. Other errors of its server are still logged."""
    import logging

    from aiohttp.http_exceptions import BadHttpMessage

    from libs.common.logging import configure

    configure("test")
    server = logging.getLogger("aiohttp.server")

    def record(error: BaseException) -> logging.LogRecord:
        return server.makeRecord(
            "aiohttp.server",
            logging.ERROR,
            __file__,
            1,
            "Error handling request",
            (),
            (type(error), error, None),
        )

    assert not server.filter(record(BadHttpMessage("Invalid header value char")))
    assert server.filter(record(RuntimeError("a bug")))
