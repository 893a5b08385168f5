"""Services as their own processes (`python -m tayori <service>`), as `tayori dev` runs them."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from tayori.embedded import wait_for_port


def start(service: str, env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """Start ``tayori <service>`` on ``port`` with ``env``; its output goes to ``log``."""
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tayori", service],
            # dev profile: a bench run may use the development signing key.
            env={"TAYORI_PROFILE": "dev", **env, "HTTP_PORT": str(port), "HTTP_HOST": "127.0.0.1"},
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    wait_for_port("127.0.0.1", port, timeout=60, proc=process)
    return process


async def ready(session: aiohttp.ClientSession, port: int) -> None:
    """Wait until the service on ``port`` answers /readyz with 200."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(f"service on {port} not ready")


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every process, then SIGKILL what has not stopped after 20 s."""
    for process in processes:
        process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
