"""`tayori dev`'s supervision without processes: the backoff series, how an exit is named,
and what one round of the loop does to something that died, on a clock of our own."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tayori.dev import HEALTHY_RUN, MAX_DELAY, Backoff, Dev, exit_status


def test_backoff_doubles_up_to_the_cap() -> None:
    backoff = Backoff()
    backoff.started(0.0)
    delays = [backoff.died(1.0 + i) for i in range(7)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert max(delays) == MAX_DELAY


def test_backoff_starts_over_after_a_healthy_run() -> None:
    backoff = Backoff()
    backoff.started(0.0)
    assert [backoff.died(1.0), backoff.died(2.0), backoff.died(3.0)] == [1.0, 2.0, 4.0]
    backoff.started(10.0)
    assert backoff.died(10.0 + HEALTHY_RUN - 1) == 8.0  # a short run: still in the row
    backoff.started(100.0)
    assert backoff.died(100.0 + HEALTHY_RUN) == 1.0


def test_backoff_is_due_once_its_delay_has_passed() -> None:
    backoff = Backoff()
    assert not backoff.due(1000.0)  # running: nothing to start
    backoff.started(0.0)
    backoff.died(5.0)
    assert backoff.next_start == 6.0
    assert not backoff.due(5.9)
    assert backoff.due(6.0)
    backoff.started(6.0)
    assert backoff.next_start is None


def test_exit_status_names_the_signal() -> None:
    assert exit_status(-9) == "-9 (SIGKILL)"
    assert exit_status(-15) == "-15 (SIGTERM)"
    assert exit_status(1) == "1"
    assert exit_status(0) == "0"


@dataclass
class FakeUnit:
    """A Supervised that dies and restarts when told to."""

    name: str = "sender"
    log_path: Path = Path("logs/sender.log")
    backoff: Backoff = field(default_factory=Backoff)
    dead: str | None = None
    fail_restart: bool = False
    restarts: list[float] = field(default_factory=list)

    def death(self) -> str | None:
        return self.dead

    def restart(self, now: float) -> str | None:
        if self.fail_restart:
            raise RuntimeError("port in use")
        self.restarts.append(now)
        self.dead = None
        return f"{self.name} is back"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def dev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: Clock) -> Dev:
    monkeypatch.setenv("TAYORI_HOME", str(tmp_path / "home"))
    dev = Dev()
    dev.clock = clock
    return dev


def test_a_death_is_told_once_and_the_unit_restarted_after_its_delay(
    dev: Dev, clock: Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    unit = FakeUnit()
    dev._tend(unit)
    assert capsys.readouterr().err == ""

    unit.dead = "exited with -9 (SIGKILL)"
    clock.now = 10.0
    dev._tend(unit)
    clock.now = 10.5
    dev._tend(unit)  # waiting: told only once, not started yet
    assert capsys.readouterr().err == (
        "tayori dev: sender exited with -9 (SIGKILL); restarting in 1.0 s (log: logs/sender.log)\n"
    )
    assert unit.restarts == []

    clock.now = 11.0
    dev._tend(unit)
    assert unit.restarts == [11.0]
    assert capsys.readouterr().err == "tayori dev: sender is back\n"
    assert unit.backoff.next_start is None


def test_a_failed_restart_is_tried_again_later_and_later(
    dev: Dev, clock: Clock, capsys: pytest.CaptureFixture[str]
) -> None:
    unit = FakeUnit(dead="exited with 1", fail_restart=True)
    unit.backoff.started(0.0)
    clock.now = 500.0  # a long healthy run, then a death: 1 s
    dev._tend(unit)
    clock.now = 501.0
    dev._tend(unit)  # the restart fails: not a healthy run, the delay grows
    clock.now = 503.0
    dev._tend(unit)
    err = capsys.readouterr().err
    assert "sender exited with 1; restarting in 1.0 s" in err
    assert "could not restart sender (port in use); trying again in 2.0 s" in err
    assert "could not restart sender (port in use); trying again in 4.0 s" in err
    unit.fail_restart = False
    clock.now = 507.0
    dev._tend(unit)
    assert unit.restarts == [507.0]


def test_nothing_is_restarted_once_dev_is_stopping(dev: Dev, clock: Clock) -> None:
    unit = FakeUnit(dead="exited with 1")
    dev._tend(unit)
    dev.stopping = True
    clock.now = 100.0
    dev._tend(unit)
    assert unit.restarts == []
