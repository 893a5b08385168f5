"""Every line a service writes is JSON (libs/common/logging.configure), the standard
library's too, in a process of its own (configure changes the process's logging for good)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import logging, warnings
from libs.common import logging as tlog, trace
tlog.configure("demo", "info")
with trace.bound("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"):
    tlog.get_logger("demo").info("ours", contact_id=7)
    logging.getLogger("aiokafka.consumer.group_coordinator").warning("Heartbeat failed for %s", "g")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    warnings.warn("old API", DeprecationWarning, stacklevel=1)
    logging.getLogger("aiokafka").error('Unable connect to "%s": %s', "k:9092", "refused")
    logging.getLogger("aiokafka.conn").info("chatter below warning")
"""


def test_every_line_is_json_with_the_context_and_the_library_lines_too() -> None:
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout == ""
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    by_event = {line["event"]: line for line in lines}
    assert set(by_event) == {
        "ours",
        "Heartbeat failed for g",
        "Error handling request",
        # warnings come through the py.warnings logger, formatted by the warnings module
        *(e for e in by_event if "old API" in e),
    }
    for line in lines:
        assert line["service"] == "demo"
        assert line["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
        assert line["timestamp"].endswith("Z")
    assert by_event["ours"]["contact_id"] == 7 and by_event["ours"]["level"] == "info"
    heartbeat = by_event["Heartbeat failed for g"]
    assert (heartbeat["level"], heartbeat["logger"]) == (
        "warning",
        "aiokafka.consumer.group_coordinator",
    )
    failed = by_event["Error handling request"]
    assert failed["level"] == "error" and "ValueError: boom" in failed["exception"]
    assert any("old API" in e for e in by_event)
