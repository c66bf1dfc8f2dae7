"""The in-process SLO check on the real sink thread: once per interval at most, only after new
turns or while breaching, the breach logged once and re-armed when it ends."""

from __future__ import annotations

import logging
import time

import pytest
from prometheus_client import CollectorRegistry

import lk_observe
from lk_observe import sinks
from lk_observe.metrics import LatencyMetrics
from lk_observe.slo import DEFAULT_SLOS
from lk_observe.tracing import TurnTracer
from lk_observe.turns import Turn

INTERVAL_S = 0.05


def live_turn(index: int, e2e_ms: float) -> Turn:
    return Turn(
        index=index,
        speech_id=f"s{index}",
        started_at=1000.0 + index,
        ended_at=1000.0 + index + e2e_ms / 1000.0,
        latency_ms={"e2e": e2e_ms},
        interrupted=False,
        tier=None,
        agent="watch",
        complete=False,
    )


@pytest.fixture
def watched(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[sinks.TurnSinks, sinks.SLOWatch]:
    monkeypatch.setattr(sinks, "SLO_CHECK_INTERVAL_S", INTERVAL_S)
    monitor = lk_observe.LatencyMonitor(window_s=300.0)
    turn_sinks = sinks.TurnSinks(
        agent="watch",
        tracer=TurnTracer(None),
        metrics=LatencyMetrics.for_registry(CollectorRegistry()),
        monitor=monitor,
        slos=DEFAULT_SLOS,
        on_turn=None,
    )
    return turn_sinks, sinks.slo_check(monitor, "watch", DEFAULT_SLOS)


def play(turn_sinks: sinks.TurnSinks, turns: list[Turn]) -> None:
    turn_sinks.submit(turns, lambda _speech_id: None)
    assert lk_observe.flush(5.0)


def test_a_burst_of_turns_is_checked_once_and_a_quiet_agent_not_at_all(watched) -> None:  # type: ignore[no-untyped-def]
    turn_sinks, watch = watched
    play(turn_sinks, [live_turn(i, 300.0) for i in range(50)])
    time.sleep(INTERVAL_S * 6)
    # the first turn is checked at once, the other 49 (within one interval) once, an interval on
    assert watch.checks == 2
    time.sleep(INTERVAL_S * 4)
    assert watch.checks == 2  # nothing new and nothing breaching: no check, no wake-up
    play(turn_sinks, [live_turn(50, 300.0)])
    time.sleep(INTERVAL_S * 2)
    assert watch.checks == 3


def test_breach_is_logged_once_then_rearmed_after_it_ends(
    watched,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture,
) -> None:
    turn_sinks, watch = watched
    caplog.set_level(logging.WARNING, logger="lk_observe.slo")
    play(turn_sinks, [live_turn(i, 2500.0) for i in range(30)])  # every turn slow: breach
    time.sleep(INTERVAL_S * 6)
    breaches = [r for r in caplog.records if "breaching" in r.getMessage()]
    assert {r.getMessage().split()[1] for r in breaches} == {"e2e_good", "e2e_excellent"}
    checks_while_breaching = watch.checks
    assert checks_while_breaching >= 3  # re-checked every interval while it lasts, unprompted
    # the window fills with fast turns: the breach ends, and a new slow burst is news again
    play(turn_sinks, [live_turn(100 + i, 200.0) for i in range(600)])
    time.sleep(INTERVAL_S * 4)
    settled = watch.checks
    time.sleep(INTERVAL_S * 4)
    assert watch.checks == settled  # breach over: the timer stopped
    caplog.clear()
    monitor_turns = [live_turn(5000 + i, 2500.0) for i in range(3000)]
    play(turn_sinks, monitor_turns)
    time.sleep(INTERVAL_S * 4)
    assert [r.getMessage().split()[1] for r in caplog.records if "breaching" in r.getMessage()]
