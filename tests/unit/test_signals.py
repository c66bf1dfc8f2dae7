"""Budget signals: what a signal holds, and its delivery through TurnSinks on the real sink thread
to the agent's loop (`on_budget` and the session's BUDGET_EVENT listeners)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from typing import Any

import pytest
from livekit.rtc import EventEmitter
from prometheus_client import CollectorRegistry

import lk_observe
from lk_observe import sinks
from lk_observe.metrics import LatencyMetrics
from lk_observe.presets import DEFAULT_BUDGET, LatencyBudget
from lk_observe.signals import SIGNAL_KINDS, BudgetSignal, slo_changed, turn_over_budget
from lk_observe.slo import SLO, BurnWindow, evaluate
from lk_observe.tracing import TurnTracer
from lk_observe.turns import Turn

AGENT = "signals"
INTERVAL_S = 0.02
# half the turns over 400 ms burns it (MIN_TURNS still asks for 20 turns in the window)
TTFT_SLO = SLO(
    "ttft",
    "llm_ttft",
    0.4,
    objective=0.5,
    windows=(BurnWindow("1h", "5m", 1.0, "page"),),
    min_turns_per_hour=0,
)


def live_turn(index: int, kind: str = "user", **latency_ms: float) -> Turn:
    return Turn(
        index=index,
        speech_id=f"s{index}",
        started_at=1000.0 + index,
        ended_at=1001.0 + index,
        latency_ms=latency_ms or {"llm_ttft": 100.0},
        interrupted=False,
        tier=None,
        kind=kind,  # type: ignore[arg-type]
        session_id="sess",
        agent=AGENT,
        complete=False,
    )


class FakeSession(EventEmitter[str]):
    """An emitter whose own `emit` records, as AgentSession.emit does: signals must bypass it."""

    def __init__(self) -> None:
        super().__init__()
        self.recorded: list[Any] = []

    def emit(self, event: str, *args: Any) -> None:
        self.recorded.append(event)
        super().emit(event, *args)


def failures(registry: CollectorRegistry, sink: str) -> float:
    value = registry.get_sample_value("voice_agent_sink_failures_total", {"sink": sink})
    return value or 0.0


class Delivered:
    """What reached the hook and the listeners, and on which thread."""

    def __init__(self) -> None:
        self.hook: list[BudgetSignal] = []
        self.event: list[BudgetSignal] = []
        self.threads: set[int] = set()

    def on_budget(self, signal: BudgetSignal) -> None:
        self.threads.add(threading.get_ident())
        self.hook.append(signal)

    def on_event(self, signal: BudgetSignal) -> None:
        self.threads.add(threading.get_ident())
        self.event.append(signal)


def make_sinks(
    registry: CollectorRegistry,
    *,
    on_budget: Any = None,
    session: Any = None,
    monitor: lk_observe.LatencyMonitor | None = None,
    slos: tuple[SLO, ...] = (),
    budget: LatencyBudget = DEFAULT_BUDGET,
    session_id: str = "sess",
) -> sinks.TurnSinks:
    turn_sinks = sinks.TurnSinks(
        agent=AGENT,
        tracer=TurnTracer(None),
        metrics=LatencyMetrics.for_registry(registry),
        monitor=monitor or lk_observe.LatencyMonitor(),
        slos=slos,
        on_turn=None,
        budget=budget,
        on_budget=on_budget,
        session=session,
        session_id=session_id,
    )
    if turn_sinks.signalling:  # as instrument() does when called on the agent's loop
        with contextlib.suppress(RuntimeError):
            turn_sinks.loop = asyncio.get_running_loop()
    return turn_sinks


async def play(turn_sinks: sinks.TurnSinks, turns: list[Turn], settle_s: float = 0.05) -> None:
    turn_sinks.submit(turns, lambda _speech_id: None)
    assert await asyncio.to_thread(lk_observe.flush, 5.0)
    await asyncio.sleep(settle_s)  # hand-backs run on this loop


# -- the signal ---------------------------------------------------------------------------------


def test_a_turn_signal_holds_its_turn_and_a_frozen_copy_of_the_overruns() -> None:
    turn = live_turn(3, llm_ttft=450.0)
    overruns = {"llm_ttft": 150.0}
    signal = turn_over_budget(turn, overruns, at=5.0)
    assert (signal.kind, signal.agent, signal.session_id, signal.at) == (
        "turn_over_budget",
        AGENT,
        "sess",
        5.0,
    )
    assert signal.turn is turn and signal.slo is None and signal.burn_rate is None
    overruns["llm_ttft"] = 0.0
    assert signal.over("llm_ttft") == 150.0 and signal.over("stt") == 0.0
    with pytest.raises(TypeError):
        signal.overruns_ms["llm_ttft"] = 1.0  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        signal.kind = "slo_burning"  # type: ignore[misc]


def test_an_slo_signal_carries_the_slo_status() -> None:
    monitor = lk_observe.LatencyMonitor()
    for i in range(20):
        monitor.record_turn(live_turn(i, llm_ttft=600.0))
    status = evaluate(TTFT_SLO, monitor, agent=AGENT)
    signal = slo_changed("slo_burning", status, agent=AGENT, session_id="x", at=1.0)
    assert signal.slo == "ttft" and signal.component == "llm_ttft"
    assert signal.burn_rate == pytest.approx(2.0) and signal.breach_burn_rate == 1.0
    assert signal.slo_status is status and signal.turn is None and not signal.overruns_ms


def test_invalid_signals_are_refused() -> None:
    assert SIGNAL_KINDS == ("turn_over_budget", "slo_burning", "slo_recovered")
    with pytest.raises(ValueError, match="kind"):
        BudgetSignal(kind="late", agent="a", session_id="s", at=0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="turn"):
        BudgetSignal(kind="turn_over_budget", agent="a", session_id="s", at=0.0)
    with pytest.raises(ValueError, match="SLO"):
        BudgetSignal(kind="slo_recovered", agent="a", session_id="s", at=0.0)


def test_the_public_names() -> None:
    assert lk_observe.BUDGET_EVENT == "lk_observe_budget"
    assert lk_observe.BudgetSignal is BudgetSignal


# -- delivery -----------------------------------------------------------------------------------


async def test_an_over_budget_user_turn_reaches_the_hook_and_the_listeners_on_the_loop() -> None:
    registry = CollectorRegistry()
    got = Delivered()
    session = FakeSession()
    session.on(lk_observe.BUDGET_EVENT, got.on_event)
    turn_sinks = make_sinks(registry, on_budget=got.on_budget, session=session)
    slow = live_turn(2, llm_ttft=450.0, e2e=950.0, stt=120.0)
    await play(turn_sinks, [live_turn(1, llm_ttft=120.0), slow])
    [signal] = got.hook
    assert got.event == [signal]
    assert got.threads == {threading.get_ident()}  # the loop's thread, not the sink thread
    assert signal.kind == "turn_over_budget" and signal.turn is not None
    assert signal.turn.index == 2 and not signal.turn.complete
    assert dict(signal.overruns_ms) == {"llm_ttft": 150.0, "e2e": 50.0}
    assert dict(signal.turn.budget_overruns_ms) == dict(signal.overruns_ms)
    assert session.recorded == []  # not through the session's own emit (its report)


async def test_no_signal_for_turns_within_budget_agent_turns_or_complete_records() -> None:
    got = Delivered()
    turn_sinks = make_sinks(CollectorRegistry(), on_budget=got.on_budget)
    greeting = live_turn(1, kind="agent", llm_ttft=900.0)
    complete = dataclasses.replace(live_turn(2, llm_ttft=900.0), complete=True)
    await play(turn_sinks, [greeting, complete, live_turn(3, llm_ttft=300.0)])
    assert got.hook == []


async def test_the_budget_given_is_the_one_signals_use() -> None:
    got = Delivered()
    strict = LatencyBudget(components={"llm_ttft": (0.0, 100.0)}, total=(0.0, 5000.0))
    turn_sinks = make_sinks(CollectorRegistry(), on_budget=got.on_budget, budget=strict)
    await play(turn_sinks, [live_turn(1, llm_ttft=250.0, stt=900.0)])
    [signal] = got.hook
    assert dict(signal.overruns_ms) == {"llm_ttft": 150.0}  # stt has no line in this budget


async def test_a_failing_hook_or_listener_is_counted_and_the_others_still_run() -> None:
    registry = CollectorRegistry()
    got = Delivered()

    def broken(signal: BudgetSignal) -> None:
        raise RuntimeError("boom")

    def wrong_arity(signal: BudgetSignal, extra: int) -> None:
        del signal, extra

    session = FakeSession()
    session.on(lk_observe.BUDGET_EVENT, got.on_event)
    session.on(lk_observe.BUDGET_EVENT, wrong_arity)  # LiveKit's emitter lets TypeError out
    turn_sinks = make_sinks(registry, on_budget=broken, session=session)
    await play(turn_sinks, [live_turn(1, llm_ttft=500.0)])
    assert [s.turn.index for s in got.event if s.turn] == [1]
    assert failures(registry, "on_budget") == 2.0
    await play(turn_sinks, [live_turn(2, llm_ttft=100.0)])  # the sinks go on
    assert failures(registry, "on_budget") == 2.0


def test_a_signal_handed_to_a_loop_that_closed_is_dropped() -> None:
    got = Delivered()
    loop = asyncio.new_event_loop()
    try:
        turn_sinks = make_sinks(CollectorRegistry(), on_budget=got.on_budget)
        turn_sinks.loop = loop  # not running: the hand-back waits
        turn_sinks.submit([live_turn(1, llm_ttft=900.0)], lambda _speech_id: None)
        assert lk_observe.flush(5.0)
        loop.close()
        assert turn_sinks.deliver_stranded() == 0
        assert got.hook == []  # a signal only means something to a running session
    finally:
        if not loop.is_closed():
            loop.close()


async def test_stopped_signals_are_not_delivered() -> None:
    got = Delivered()
    turn_sinks = make_sinks(CollectorRegistry(), on_budget=got.on_budget)
    turn_sinks.submit([live_turn(1, llm_ttft=900.0)], lambda _speech_id: None)
    assert lk_observe.flush(5.0)  # blocking the loop: the hand-back cannot run yet
    turn_sinks.stop_signals()  # handed to the loop, not run yet: dropped
    await play(turn_sinks, [live_turn(2, llm_ttft=900.0)])
    assert got.hook == []


async def test_without_hook_or_session_nothing_is_handed_back() -> None:
    turn_sinks = make_sinks(CollectorRegistry())
    assert not turn_sinks.signalling
    await play(turn_sinks, [live_turn(1, llm_ttft=900.0)])
    assert turn_sinks.loop is None  # never even looked for the loop: nothing to hand back


# -- SLO burning and recovered ------------------------------------------------------------------


async def test_every_subscribed_session_of_the_agent_hears_an_slo_burn_and_its_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sinks, "SLO_CHECK_INTERVAL_S", INTERVAL_S)
    monitor = lk_observe.LatencyMonitor(window_s=300.0)
    first, second = Delivered(), Delivered()
    registry = CollectorRegistry()
    a = make_sinks(registry, on_budget=first.on_budget, monitor=monitor, slos=(TTFT_SLO,))
    b = make_sinks(
        registry, on_budget=second.on_budget, monitor=monitor, slos=(TTFT_SLO,), session_id="b"
    )
    quiet = make_sinks(registry, monitor=monitor, slos=(TTFT_SLO,))  # no hook, no session
    assert not quiet.signalling
    # 20 turns at 350 ms (within the SLO, over the budget's 300): turn signals, no burn
    await play(a, [live_turn(i, llm_ttft=350.0) for i in range(20)], settle_s=INTERVAL_S * 4)
    assert [s.kind for s in first.hook] == ["turn_over_budget"] * 20 and second.hook == []
    # 25 at 500 ms (a's turns): 25/45 over the threshold, burn rate 1.11 >= 1
    await play(a, [live_turn(100 + i, llm_ttft=500.0) for i in range(25)], settle_s=INTERVAL_S * 4)
    burning = [s for s in first.hook if s.kind != "turn_over_budget"]
    assert [(s.kind, s.slo, s.session_id) for s in burning] == [("slo_burning", "ttft", "sess")]
    assert [(s.kind, s.slo, s.session_id) for s in second.hook] == [("slo_burning", "ttft", "b")]
    assert burning[0].burn_rate == pytest.approx(25 / 45 / 0.5)
    assert burning[0].at <= time.time()
    # fast turns from b: the burn ends, both hear it once
    await play(b, [live_turn(200 + i, llm_ttft=100.0) for i in range(10)], settle_s=INTERVAL_S * 6)
    assert [s.kind for s in second.hook] == ["slo_burning", "slo_recovered"]
    assert [s.kind for s in first.hook if s.kind != "turn_over_budget"] == [
        "slo_burning",
        "slo_recovered",
    ]
    recovered = second.hook[-1]
    assert recovered.burn_rate == pytest.approx(25 / 55 / 0.5)
    assert recovered.slo_status is not None and not recovered.slo_status.breaching


async def test_a_session_that_joins_while_an_slo_burns_hears_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sinks, "SLO_CHECK_INTERVAL_S", INTERVAL_S)
    monitor = lk_observe.LatencyMonitor(window_s=300.0)
    early = make_sinks(CollectorRegistry(), monitor=monitor, slos=(TTFT_SLO,))
    await play(early, [live_turn(i, llm_ttft=900.0) for i in range(25)], settle_s=INTERVAL_S * 3)
    late = Delivered()
    joined = make_sinks(
        CollectorRegistry(), on_budget=late.on_budget, monitor=monitor, slos=(TTFT_SLO,)
    )
    loop, joined.loop = joined.loop, None  # instrumented before its loop ran
    await asyncio.sleep(INTERVAL_S * 4)  # the check re-runs while the SLO burns
    assert late.hook == []  # no loop to hand it to: not told yet, so not forgotten
    joined.loop = loop  # its first turn (or instrument() on the loop) sets it
    await asyncio.sleep(INTERVAL_S * 4)
    assert [s.kind for s in late.hook] == ["slo_burning"]
