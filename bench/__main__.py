"""``make bench``: ingest, search (the API and the console's search page) and snapshot
benchmarks of contacts, the unsubscribe latency of suppression, a campaign's send rate
through scheduler and sender, one deferring domain among 20 (the others' rate, the
deliverability service's), and the bounce processor's DSN and open-pixel rates; a CSV
export through the exporter.

    python -m bench [--only ingest|search|snapshot|export|unsubscribe|campaign|domains|bounce]
                    [--contacts N]
                    [--ingest-events N] [--recipients N] [--domains-recipients N]

Each benchmark runs on a fresh embedded stack (new temp directory, new PostgreSQL data
directory with default durability, new broker) and prints its figure next to the ceiling
measured in the same run, and a goal: as an aligned table and as one JSON line each.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import datetime as dt
import gc
import os
import platform
import shutil
import signal
import sys
import time
from pathlib import Path

import uvloop

from bench import bounce, campaign, domains, export, ingest, search, snapshot, unsubscribe
from bench.cpu import loadavg
from bench.load import load
from bench.report import Result, json_line, progress, table
from bench.stack import database
from libs.common import logging as tlog
from tayori.embedded import temp_home

DEFAULT_CONTACTS = 1_000_000
DEFAULT_INGEST = 200_000


def machine() -> dict[str, str]:
    model = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with open("/proc/meminfo", encoding="utf-8") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    return {
        "date": dt.datetime.now(dt.UTC).astimezone().isoformat(timespec="seconds"),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": memory,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--only",
        choices=(
            "ingest",
            "search",
            "snapshot",
            "unsubscribe",
            "campaign",
            "domains",
            "bounce",
            "export",
        ),
        action="append",
        help="run only this benchmark (repeatable)",
    )
    parser.add_argument(
        "--contacts",
        type=int,
        default=DEFAULT_CONTACTS,
        help=f"contacts loaded for search, snapshot and export (default {DEFAULT_CONTACTS:,})",
    )
    parser.add_argument(
        "--ingest-events",
        type=int,
        default=None,
        help=f"events for ingest (default {DEFAULT_INGEST:,}, or --contacts when that is smaller)",
    )
    parser.add_argument(
        "--recipients",
        type=int,
        default=campaign.RECIPIENTS,
        help=f"recipients of the campaign benchmark (default {campaign.RECIPIENTS:,})",
    )
    parser.add_argument(
        "--domains-recipients",
        type=int,
        default=domains.RECIPIENTS,
        help=f"recipients of each domains benchmark campaign (default {domains.RECIPIENTS:,})",
    )
    parser.add_argument(
        "--domains-timeout",
        type=float,
        default=domains.TIMEOUT,
        help="seconds each campaign of the domains benchmark may take to get every result"
        f" (default {domains.TIMEOUT:g}; one not done by then is reported as it stands)",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=search.REQUESTS,
        help=f"search requests of each kind (default {search.REQUESTS})",
    )
    parser.add_argument(
        "--ingest-replicas",
        type=int,
        default=0,
        help="ingest with this many `tayori contacts` processes instead of one in this process",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="cProfile the service during ingest and write the stats here",
    )
    return parser.parse_args(argv)


async def main(args: argparse.Namespace, root: Path) -> list[Result]:
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    chosen = args.only or [
        "ingest",
        "search",
        "snapshot",
        "export",
        "unsubscribe",
        "campaign",
        "domains",
        "bounce",
    ]
    ingest_events = args.ingest_events or min(DEFAULT_INGEST, args.contacts)
    results: list[Result] = []

    def report(found: list[Result], started: float) -> None:
        for result in found:
            result.data["benchmark_seconds"] = round(time.monotonic() - started, 1)
            result.data["loadavg_after"] = loadavg()
            print(json_line(result), flush=True)
        results.extend(found)
        gc.collect()

    try:
        if "ingest" in chosen:
            started = time.monotonic()
            report(
                await ingest.run(
                    root, ingest_events, profile=args.profile, replicas=args.ingest_replicas
                ),
                started,
            )
        if {"search", "snapshot", "export"} & set(chosen):
            async with database(root, "contacts") as db:
                started = time.monotonic()
                progress(f"loading {args.contacts:,} contacts for search and snapshot")
                loaded = await load(db.dsn, args.contacts)
                gc.collect()
                gc.freeze()  # nothing loaded stays in memory, but keep GC pauses out of latencies
                if "search" in chosen:
                    report(await search.run(root, db, loaded, args.requests), started)
                    started = time.monotonic()
                if "snapshot" in chosen:
                    report(await snapshot.run(root, db, loaded), started)
                    started = time.monotonic()
                if "export" in chosen:
                    report(await export.run(root, db, loaded), started)
        if "unsubscribe" in chosen:
            started = time.monotonic()
            report(await unsubscribe.run(root), started)
        if "campaign" in chosen:
            started = time.monotonic()
            report(await campaign.run(root, args.recipients), started)
        if "domains" in chosen:
            started = time.monotonic()
            report(await domains.run(root, args.domains_recipients, args.domains_timeout), started)
        if "bounce" in chosen:
            started = time.monotonic()
            report(await bounce.run(root), started)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def run(argv: list[str]) -> int:
    args = parse(argv)
    tlog.configure("bench", "warning")
    info = machine()
    print(f"Tayori benchmarks — {info['date']}")
    print(
        f"machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory']} RAM, "
        f"Python {info['python']}, Linux {info['kernel']}"
    )
    print(f"command: python -m bench {' '.join(argv)}".rstrip())
    overrides = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("SENDER_DOMAIN_"))
    if overrides:  # the services take the environment: a run's figures depend on these
        print(f"environment: {' '.join(overrides)}")
    print(f"load average at start: {loadavg()} (other work on the machine skews every figure)")
    print(flush=True)
    started = time.monotonic()
    root = temp_home("tayori-bench-")
    # Registered before pgserver is imported, so it runs after pgserver's own exit hook,
    # which recreates its lock directory under root.
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    results = uvloop.run(main(args, root))
    print()
    print(table(results))
    print(f"\ntotal {time.monotonic() - started:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
