"""The per-domain benchmark's relay and figures (bench/relay.py, bench/domains.py): the
relay must refuse exactly what its bucket does not allow and read pipelined SMTP right,
and the figures must count what they say, or the benchmark's verdict means nothing."""

from __future__ import annotations

from bench import domains
from bench.relay import Bucket, Recorder, Session, domain_of


def test_the_bucket_lets_its_burst_through_then_its_rate() -> None:
    bucket = Bucket(rate=50.0, burst=5.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert not bucket.take(0.01)  # half a token
    assert bucket.take(0.02)  # 1.0 token after 20 ms at 50/s


def test_the_bucket_allows_at_most_rate_plus_burst_in_a_second() -> None:
    bucket = Bucket(rate=50.0, burst=5.0, now=0.0)
    times = [i / 1000 for i in range(3000)]  # a RCPT every millisecond for 3 s
    taken = [t for t in times if bucket.take(t)]
    assert domains.max_per_sliding_second(taken) <= 55
    assert 50 * 3 <= len(taken) <= 50 * 3 + 5


def test_domain_of_a_rcpt_command() -> None:
    assert domain_of(b"RCPT TO:<u1@D07.Example.jp>") == "d07.example.jp"
    assert domain_of(b"RCPT TO:<u1@d07.example.jp> NOTIFY=NEVER") == "d07.example.jp"


class _Transport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True


def _session(limited: str | None = None, burst: float = 5.0) -> tuple[Session, _Transport]:
    session = Session(Recorder(limited, 50.0, burst))
    transport = _Transport()
    session.connection_made(transport)  # type: ignore[arg-type]
    return session, transport


def test_pipelined_messages_split_anywhere_are_each_accepted_once() -> None:
    session, transport = _session()
    one = b"MAIL FROM:<a@x.jp>\r\nRCPT TO:<u@d01.example.jp>\r\nDATA\r\n"
    stream = (
        b"EHLO me\r\n"
        + one
        + b"Subject: x\r\n\r\n..dot\r\nbody\r\n.\r\n"
        + one.replace(b"d01", b"d02")
        + b"short\r\n.\r\nQUIT\r\n"
    )
    for i in range(0, len(stream), 3):  # three bytes at a time: every cut is crossed
        session.data_received(stream[i : i + 3])
    accepted = session.recorder.accepted
    assert {d: len(t) for d, t in accepted.items()} == {"d01.example.jp": 1, "d02.example.jp": 1}
    assert transport.written.count(b"250 2.0.0 Ok: queued") == 2
    assert transport.written.endswith(b"221 2.0.0 Bye\r\n") and transport.closed


def test_an_empty_message_after_a_refused_rcpt_is_not_delivered() -> None:
    session, transport = _session()
    session.data_received(b"EHLO me\r\nMAIL FROM:<a@x.jp>\r\nDATA\r\n.\r\nNOOP\r\n")
    assert b"503 5.5.1" in transport.written
    assert session.recorder.accepted == {}
    assert transport.written.endswith(b"250 2.0.0 Ok\r\n")  # NOOP read as a command


def test_a_rcpt_beyond_the_limit_is_answered_421_and_the_connection_closed() -> None:
    session, transport = _session("d07.example.jp", burst=1.0)
    message = b"MAIL FROM:<a@x.jp>\r\nRCPT TO:<u@d07.example.jp>\r\nDATA\r\nx\r\n.\r\n"
    session.data_received(b"EHLO me\r\n" + message + message)
    assert transport.written.endswith(b"421 4.7.0 d07.example.jp rate limited, try again later\r\n")
    assert transport.closed
    assert len(session.recorder.accepted["d07.example.jp"]) == 1
    assert len(session.recorder.deferred["d07.example.jp"]) == 1


def test_other_domains_are_never_limited() -> None:
    session, transport = _session("d07.example.jp", burst=1.0)
    message = b"MAIL FROM:<a@x.jp>\r\nRCPT TO:<u@d01.example.jp>\r\nDATA\r\nx\r\n.\r\n"
    session.data_received(message * 100)
    assert len(session.recorder.accepted["d01.example.jp"]) == 100
    assert not transport.closed


def test_most_per_second_calendar_and_sliding() -> None:
    times = [10.6, 10.7, 10.8, 11.1, 11.2, 12.5]
    assert domains.max_per_second(times) == 3  # 10.x
    assert domains.max_per_sliding_second(times) == 5  # [10.6, 11.6)
    assert domains.max_per_second([]) == 0 == domains.max_per_sliding_second([])


def test_the_other_domains_are_every_domain_but_the_limited_one() -> None:
    by_domain = {"a": [0.0, 1.0], "b": [2.0, 4.0], "limited": [0.5, 100.0]}
    assert sorted(domains.others(by_domain, "limited")) == [0.0, 1.0, 2.0, 4.0]


def test_consumption_from_samples() -> None:
    # (time, consumed, lag): results from t=10 to t=20, 1,000 of them.
    samples = [(9.0, 0, 0), (12.0, 300, 50), (15.0, 600, 200), (20.0, 950, 40), (21.0, 1000, 0)]
    used = domains.consumption(samples, 10.0, 20.0, 1000)
    assert used.events_per_second == 950 / 11  # from the last sample before the first result
    assert used.peak_events_per_second == 100.0  # 300 in 3 s, 350 in 5 s, 50 in 1 s
    assert used.max_lag == 200
    assert used.lag_at_last_result == 40
    assert used.catch_up_seconds == 1.0


def test_consumption_that_never_caught_up() -> None:
    used = domains.consumption([(1.0, 0, 5), (2.0, 10, 90)], 0.0, 2.0, 100)
    assert used.catch_up_seconds is None


def test_metric_sum_adds_the_matching_series() -> None:
    text = (
        "# HELP tayori_consumer_lag_records Records behind\n"
        'tayori_consumer_lag_records{group="g",topic="p.delivery.results",partition="0"} 3.0\n'
        'tayori_consumer_lag_records{group="g",topic="p.delivery.results",partition="1"} 4.0\n'
        'tayori_consumer_lag_records{group="g",topic="p.bounce.events",partition="0"} 9.0\n'
        'tayori_consumer_lag_records_other{topic="delivery.results"} 100.0\n'
    )
    assert domains.metric_sum(text, "tayori_consumer_lag_records", "delivery.results") == 7.0


def _measured(gave_up_at: float | None) -> dict:
    arrivals = domains.Arrivals(count=5, seen={1, 2, 3, 4}, records=5)
    arrivals.times = {"a.jp": [100.0, 101.0], "b.jp": [102.0], "lim.jp": [100.5]}
    return {
        "arrivals": arrivals,
        "samples": [(99.0, 0, 0), (103.0, 5, 0)],
        "relay": {"accepted": {"lim.jp": [100.5]}, "deferred": {"lim.jp": [100.6, 100.7]}},
        "final_status": "sent",
        "counters": {},
        "reserve_seconds": 1.0,
        "gave_up_at": gave_up_at,
    }


def test_the_other_domains_rate_runs_from_the_first_result_to_their_last() -> None:
    figures = domains.summary(_measured(None), "lim.jp")
    assert figures["others_results"] == 3
    assert figures["others_rate"] == 1.5  # 3 in 2 s
    assert figures["limited"]["relay_deferred"] == 2
    assert figures["deliverability"]["catch_up_seconds"] == 1.0


def test_an_incomplete_runs_rate_counts_to_when_the_wait_gave_up() -> None:
    figures = domains.summary(_measured(110.0), "lim.jp")
    assert figures["others_rate"] == 0.3  # 3 in the 10 s until the wait gave up
    assert figures["others_seconds"] == 10.0


def test_once_every_other_domains_result_is_in_their_rate_ends_at_their_last() -> None:
    figures = domains.summary(_measured(110.0), "lim.jp", others_expected=3)
    assert figures["others_rate"] == 1.5 and figures["others_seconds"] == 2.0
