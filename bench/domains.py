"""One receiving domain that defers (issue 21): a campaign across 20 domains, sent twice in
the same run through contacts → scheduler → sender → a relay, with the deliverability
service consuming ``delivery.results`` alongside.

* run 1 (baseline): no domain limited;
* run 2: the relay (bench/relay.py) answers ``421 4.7.0`` to RCPTs for one domain beyond
  ``LIMIT`` msgs/s (a token bucket of ``BURST``), as a provider limiting a sender does.

The figure is the other 19 domains' msgs/s in run 2 against run 1's (goal ≥ 90%): one
domain's deferrals must not slow the rest. Beside it the limited domain: most messages the
relay accepted in a calendar second and in any sliding second (the bucket lets through at
most ``LIMIT + BURST`` in one), how many RCPTs it deferred, and how its recipients ended
(``sent`` later, or ``temporary_error`` when the sender gave up waiting for the domain:
``SENDER_DOMAIN_MAX_WAIT_SECONDS``). Nothing may be lost: every recipient gets a result.
And the deliverability service's events/s and consumer lag on ``delivery.results``
(sampled from its ``/metrics`` every ``SAMPLE_SECONDS``) against the campaign's result rate.

Rates count from the run's first ``delivery.results`` record to the domain's last, as
bench/campaign.py counts. The relay's own ceiling is raw aiosmtplib to it, same run.
Each run gets a fresh PostgreSQL, broker and relay; the sender's settings are its defaults
(the environment's ``SENDER_*`` pass through, e.g. ``SENDER_DOMAIN_PAUSE_SECONDS``). A run
whose results do not all arrive within ``--domains-timeout`` is reported as it stands.

    flock /tmp/tayori-heavy.lock .venv/bin/python -m bench --only domains \
        [--domains-recipients N] [--domains-timeout SECONDS]
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
from aiokafka import AIOKafkaConsumer

from bench.campaign import (
    CONNECTIONS,
    FROM,
    Api,
    _seed,
    _send_campaign,
    _stack,
    sample_message,
)
from bench.cpu import CpuMeter
from bench.processes import ready, start
from bench.report import Result, n, progress, rate
from libs.common import avro
from libs.common.topics import Topic
from services.contacts.app import MIGRATIONS as CONTACTS_MIGRATIONS
from services.scheduler.app import MIGRATIONS as SCHEDULER_MIGRATIONS
from services.sender.app import MIGRATIONS as SENDER_MIGRATIONS
from tayori.embedded import free_port, wait_for_port

RECIPIENTS = 100_000
DOMAINS = tuple(f"d{k:02d}.example.jp" for k in range(20))
#: unlisted in the sender's built-in defaults: it learns the limit from the 421s (AIMD).
LIMITED = DOMAINS[7]
LIMIT = 50.0
BURST = 5.0
RAW_MESSAGES = 30_000
#: seconds a campaign may take to get every result: with the default 300 s pause of a
#: deferring domain it does not finish (docs/BENCHMARKS.md), and `make bench` must end.
TIMEOUT = 420.0
SAMPLE_SECONDS = 0.5
#: after the last result, how long the deliverability service may take to catch up.
CATCH_UP_SECONDS = 60.0
GOAL = 0.9
#: the deliverability service keeps up when it has consumed every result this soon after
#: the last one arrived (its rounds take 0.2 s; its lag gauge is refreshed every second).
CAUGHT_UP_SECONDS = 10.0
RESULTS_LABEL = Topic.DELIVERY_RESULTS.value


# Figures (pure) ----------------------------------------------------------------------------


def max_per_second(times: Iterable[float]) -> int:
    """Most timestamps in one calendar second (epoch seconds, floored)."""
    counts = Counter(int(t) for t in times)
    return max(counts.values(), default=0)


def max_per_sliding_second(times: Iterable[float]) -> int:
    """Most timestamps in any window [t, t + 1 s)."""
    ordered = sorted(times)
    best = 0
    for i, t in enumerate(ordered):
        best = max(best, bisect_left(ordered, t + 1.0, i) - i)
    return best


def others(by_domain: dict[str, list[float]], limited: str) -> list[float]:
    """The times of every domain's results but the limited one's."""
    return [t for domain, times in by_domain.items() if domain != limited for t in times]


@dataclass(frozen=True)
class Consumption:
    """The deliverability service on ``delivery.results`` during a campaign."""

    events_per_second: float  # over the campaign's result window
    peak_events_per_second: float  # best interval between two samples
    max_lag: int
    lag_at_last_result: int
    catch_up_seconds: float | None  # last result → all of them consumed (None: never)


def consumption(
    samples: Sequence[tuple[float, float, int]], first: float, last: float, total: int
) -> Consumption:
    """From ``(time, consumed so far, lag)`` samples and the campaign's first and last
    result times and result count: what the service kept up with."""
    within = [s for s in samples if first <= s[0] <= last] or list(samples[:1])
    before = [s for s in samples if s[0] < first]
    base = before[-1] if before else samples[0]
    end = within[-1]
    mean = rate(int(end[1] - base[1]), end[0] - base[0]) if end[0] > base[0] else 0.0
    peak = max(
        ((b[1] - a[1]) / (b[0] - a[0]) for a, b in itertools.pairwise(samples) if b[0] > a[0]),
        default=0.0,
    )
    at_last = [s for s in samples if s[0] <= last]
    caught = next((s[0] for s in samples if s[1] >= total), None)
    return Consumption(
        events_per_second=mean,
        peak_events_per_second=peak,
        max_lag=max((s[2] for s in samples), default=0),
        lag_at_last_result=at_last[-1][2] if at_last else 0,
        catch_up_seconds=None if caught is None else max(0.0, caught - last),
    )


def metric_sum(text: str, name: str, *label_parts: str) -> float:
    """Sum of the samples of metric ``name`` whose labels contain every one of
    ``label_parts`` (Prometheus text format)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(p in line for p in label_parts):
            total += float(line.rsplit(" ", 1)[1])
    return total


# The relay ---------------------------------------------------------------------------------


def relay_factory(limited: str | None) -> Callable[[int, Path], subprocess.Popen[bytes]]:
    """Starts bench/relay.py on a port, its record written to ``log`` when it is stopped."""

    def start_relay(port: int, log: Path) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "bench.relay", str(port), str(log)]
        if limited:
            args += ["--limited", limited, "--rate", str(LIMIT), "--burst", str(BURST)]
        with open(log.with_suffix(".out"), "wb") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        wait_for_port("127.0.0.1", port, timeout=10, proc=process)
        return process

    return start_relay


def relay_record(log: Path) -> dict[str, dict[str, list[float]]]:
    return json.loads(log.read_text()) if log.exists() else {"accepted": {}, "deferred": {}}


async def raw_ceiling(root: Path) -> tuple[float, int]:
    """msgs/s of aiosmtplib sending one pre-built message to the relay (no domain limited)
    over CONNECTIONS connections, recipients across the domains; what the relay counted."""
    port = free_port()
    log = root / "raw-relay.json"
    relay = relay_factory(None)(port, log)
    data = sample_message()
    per_worker = RAW_MESSAGES // CONNECTIONS
    try:

        async def worker(k: int) -> None:
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
            await client.connect()
            for i in range(per_worker):
                await client.sendmail(FROM, [f"u{i}@{DOMAINS[(k + i) % len(DOMAINS)]}"], data)
            await client.quit()

        started = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(CONNECTIONS)))
        elapsed = time.perf_counter() - started
    finally:
        relay.terminate()
        relay.wait(10)
    received = sum(len(t) for t in relay_record(log)["accepted"].values())
    return rate(per_worker * CONNECTIONS, elapsed), received


# A run ------------------------------------------------------------------------------------


def _address(i: int) -> str:
    """u<i>@ one of DOMAINS in turn."""
    return f"u{i}@{DOMAINS[i % len(DOMAINS)]}"


@dataclass
class Arrivals:
    """``delivery.results``: each recipient's first result by domain, with its time."""

    count: int
    seen: set[int] = field(default_factory=set)
    times: dict[str, list[float]] = field(default_factory=dict)
    outcomes: dict[str, Counter[str]] = field(default_factory=dict)
    records: int = 0

    async def watch(self, results: AIOKafkaConsumer) -> None:
        while len(self.seen) < self.count:
            for records in (await results.getmany(timeout_ms=500)).values():
                now = time.time()
                self.records += len(records)
                for record in records:
                    result = avro.decode(Topic.DELIVERY_RESULTS, record.value, record.headers)
                    if result["contact_id"] in self.seen:
                        continue
                    self.seen.add(result["contact_id"])
                    domain = result["email"].rpartition("@")[2].lower()
                    self.times.setdefault(domain, []).append(now)
                    self.outcomes.setdefault(domain, Counter())[result["outcome"]] += 1


async def _sample(
    session: aiohttp.ClientSession, port: int, samples: list[tuple[float, float, int]]
) -> None:
    """Every SAMPLE_SECONDS: the deliverability service's consumed ``delivery.results``
    records and its lag on them, from its /metrics."""
    while True:
        try:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
            consumed = metric_sum(
                text, "tayori_messages_consumed_total", 'service="deliverability"', RESULTS_LABEL
            )
            lag = metric_sum(text, "tayori_consumer_lag_records", RESULTS_LABEL)
            samples.append((time.time(), consumed, int(lag)))
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(SAMPLE_SECONDS)


async def send(root: Path, name: str, count: int, limited: str | None, timeout: float) -> dict:
    """One campaign of ``count`` recipients through a fresh stack whose relay limits
    ``limited`` (None: none); what was measured."""
    schemas = {
        "contacts": CONTACTS_MIGRATIONS,
        "scheduler": SCHEDULER_MIGRATIONS,
        "sender": SENDER_MIGRATIONS,
    }
    async with _stack(root, name, schemas, relay_factory(limited)) as stack:
        relay_log = stack.sink_log
        progress(f"domains {name}: loading {count:,} contacts over {len(DOMAINS)} domains")
        group = await _seed(stack.dsn, count, _address)
        ports = {s: free_port() for s in ("contacts", "scheduler", "sender", "deliverability")}
        stack.env["CONTACTS_URL"] = f"http://127.0.0.1:{ports['contacts']}"
        stack.env["SCHEDULER_MIN_LEAD_SECONDS"] = "2"
        for service, port in ports.items():
            process = start(service, stack.env, port, root / f"{name}-{service}.log")
            stack.processes.append(process)
            stack.pids[service] = process.pid
        arrivals = Arrivals(count)
        ended: float | None = None  # when the wait for results gave up (None: all arrived)
        samples: list[tuple[float, float, int]] = []
        async with aiohttp.ClientSession() as session:
            for port in ports.values():
                await ready(session, port)
            watcher = asyncio.ensure_future(arrivals.watch(stack.results))
            sampler = asyncio.ensure_future(_sample(session, ports["deliverability"], samples))
            try:
                try:
                    state, reserve_seconds, _ = await _send_campaign(
                        Api(session, ports["scheduler"]),
                        group,
                        watcher,
                        CpuMeter(stack.pids),
                        timeout=timeout,
                    )
                except TimeoutError:  # reported: what had arrived by then, incomplete
                    progress(f"domains {name}: {len(arrivals.seen):,} results after {timeout} s")
                    state, reserve_seconds = {"status": f"timed out after {timeout:g} s"}, 0.0
                    ended = time.time()
                # The service catches up with the last results (or the wait ends): another
                # process, seen only through the samples.
                deadline = time.time() + CATCH_UP_SECONDS
                while time.time() < deadline and not (  # noqa: ASYNC110
                    samples and samples[-1][1] >= arrivals.records
                ):
                    await asyncio.sleep(SAMPLE_SECONDS)
            finally:
                watcher.cancel()
                sampler.cancel()
                await asyncio.gather(watcher, sampler, return_exceptions=True)
    return {
        "arrivals": arrivals,
        "samples": samples,
        "relay": relay_record(relay_log),
        "final_status": state["status"],
        "counters": {k: state.get(k) for k in ("planned", "success", "error", "unsent")},
        "reserve_seconds": round(reserve_seconds, 1),
        "gave_up_at": ended,
    }


def summary(measured: dict, limited: str, others_expected: int | None = None) -> dict[str, Any]:
    """The figures of one run (JSON-ready). ``others_expected``: how many recipients the
    other domains have; once all of theirs are in, their rate runs to their last result
    even when the wait for the limited domain's mail gave up later."""
    arrivals: Arrivals = measured["arrivals"]
    every = [t for times in arrivals.times.values() for t in times] or [0.0]
    first, last = min(every), max(every)
    rest = others(arrivals.times, limited) or [first]
    # An incomplete run's rates count up to when the wait gave up, not its last result —
    # unless every other domain's result is in (only the limited domain's mail is waiting).
    others_done = others_expected is not None and len(rest) >= others_expected
    end = max(rest) if others_done or not measured["gave_up_at"] else measured["gave_up_at"]
    accepted = measured["relay"]["accepted"]
    deferred = measured["relay"]["deferred"]
    used = consumption(measured["samples"], first, last, arrivals.records)
    return {
        "results": len(arrivals.seen),
        "result_records": arrivals.records,
        "result_rate": round(rate(len(every), last - first), 1),
        "peak_results_per_second": max_per_second(every),
        "seconds": round(last - first, 1),
        "others_results": len(rest),
        "others_rate": round(rate(len(rest), end - first), 1),
        "others_seconds": round(end - first, 1),
        "limited": {
            "domain": limited,
            "results": dict(arrivals.outcomes.get(limited, {})),
            "last_result_seconds": round(max(arrivals.times.get(limited, [first])) - first, 1),
            "relay_accepted": len(accepted.get(limited, [])),
            "relay_deferred": len(deferred.get(limited, [])),
            "max_per_second": max_per_second(accepted.get(limited, [])),
            "max_per_sliding_second": max_per_sliding_second(accepted.get(limited, [])),
        },
        "relay_accepted": sum(len(t) for t in accepted.values()),
        "outcomes": dict(sum(arrivals.outcomes.values(), Counter())),
        "deliverability": {
            "events_per_second": round(used.events_per_second, 1),
            "peak_events_per_second": round(used.peak_events_per_second, 1),
            "max_lag": used.max_lag,
            "lag_at_last_result": used.lag_at_last_result,
            "catch_up_seconds": None
            if used.catch_up_seconds is None
            else round(used.catch_up_seconds, 1),
        },
        "final_status": measured["final_status"],
        "counters": measured["counters"],
        "reserve_seconds": measured["reserve_seconds"],
    }


async def run(root: Path, recipients: int = RECIPIENTS, timeout: float = TIMEOUT) -> list[Result]:
    progress(f"domains: raw aiosmtplib to the relay, {RAW_MESSAGES:,} messages")
    ceiling, raw_received = await raw_ceiling(root)
    others_expected = recipients - recipients // len(DOMAINS)
    baseline = summary(
        await send(root, "domains-base", recipients, None, timeout), LIMITED, others_expected
    )
    progress(f"domains: baseline {baseline['others_rate']:,.0f} msgs/s for the other domains")
    limited = summary(
        await send(root, "domains-limited", recipients, LIMITED, timeout), LIMITED, others_expected
    )
    ratio = limited["others_rate"] / baseline["others_rate"] if baseline["others_rate"] else 0.0
    lim = limited["limited"]
    allowed = LIMIT + BURST
    complete = all(r["results"] == recipients for r in (baseline, limited))
    settings = {k: v for k, v in os.environ.items() if k.startswith("SENDER_DOMAIN_")}
    data = {
        "recipients": recipients,
        "domains": len(DOMAINS),
        "limit": {"domain": LIMITED, "rate": LIMIT, "burst": BURST},
        "ceiling_rate": round(ceiling, 1),
        "ceiling_received": raw_received,
        "baseline": baseline,
        "limited_run": limited,
        "sender_settings_from_env": settings,
    }
    use, base_use = limited["deliverability"], baseline["deliverability"]
    return [
        Result(
            f"domains {recipients:,}: other {len(DOMAINS) - 1} domains, one deferring",
            f"{n(limited['others_rate'])} msgs/s ({limited['others_results']:,} in"
            f" {limited['others_seconds']} s; all results: {limited['results']:,})",
            f"same campaign, none deferring: {n(baseline['others_rate'])} msgs/s;"
            f" relay raw {n(ceiling)} msgs/s",
            f"≥ {GOAL:.0%} of the baseline, every recipient a result",
            complete and ratio >= GOAL,
            ratio=ratio,
            data=data,
        ),
        Result(
            f"domains: {LIMITED} limited to {LIMIT:g}/s",
            f"max {lim['max_per_second']}/s, sliding {lim['max_per_sliding_second']};"
            f" {lim['relay_deferred']:,} RCPTs deferred; results {lim['results']}",
            f"bucket {LIMIT:g}/s + burst {BURST:g} = ≤ {allowed:g} in any second",
            f"≤ {allowed:g} in any second",
            0 < lim["max_per_sliding_second"] <= allowed,
            data=lim,
        ),
        *(
            Result(
                f"domains: deliverability on delivery.results, {label}",
                f"{n(used['events_per_second'])} events/s (peak"
                f" {n(used['peak_events_per_second'])}), max lag {used['max_lag']:,},"
                f" caught up {used['catch_up_seconds']} s after",
                f"campaign results {n(measured['result_rate'])}/s"
                f" (peak {measured['peak_results_per_second']:,} in a second)",
                f"caught up ≤ {CAUGHT_UP_SECONDS:g} s after the last result",
                used["catch_up_seconds"] is not None
                and used["catch_up_seconds"] <= CAUGHT_UP_SECONDS,
                ratio=(used["events_per_second"] / measured["result_rate"])
                if measured["result_rate"]
                else None,
                data=used,
            )
            for label, used, measured in (
                ("run 1 (none deferring)", base_use, baseline),
                ("run 2 (one deferring)", use, limited),
            )
        ),
    ]


if __name__ == "__main__":
    import tempfile

    from bench.report import table

    count = int(sys.argv[1]) if len(sys.argv) > 1 else RECIPIENTS
    found = asyncio.run(run(Path(tempfile.mkdtemp(prefix="tayori-bench-")), count))
    print(table(found))
    for result in found:
        print(json.dumps(result.data, default=str))
