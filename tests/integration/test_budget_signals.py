"""Budget signals in a real AgentSession on the scripted pipeline, against its ground truth: a
slow LLM turn is signalled once, at its first audio, with the overrun the script made; fast turns
are not; a run of slow turns makes an SLO burn and fast ones end it. Through `on_budget` and
the session event alike, never into the session report or lk_observe's own event intake. Then
the example agent's reaction, switching to a faster LLM mid-call."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import lk_observe
from lk_observe import sinks, slo
from lk_observe.demo import GroundTruth, ScriptedLLM, ScriptedTurn, build_pipeline, run_pipeline
from lk_observe.presets import DEFAULT_BUDGET
from lk_observe.slo import SLO, BurnWindow

AGENT_PATH = Path(__file__).resolve().parents[2] / "examples" / "agent.py"
TRUTH_TOLERANCE_MS = 5.0  # against the pipeline's own clocks: the same moments we time
# against the script: asyncio sleeps never end early, but a loaded machine ends them late
SCRIPT_LATE_MS = 25.0
LLM_BUDGET_MS = DEFAULT_BUDGET.components["llm_ttft"][1]  # the guide's 300 ms

# every stage inside the guide's budget (vad 200, stt 200, tts 80, total 900 ms) but the LLM's
FAST = ScriptedTurn(
    speech_s=0.5,
    vad_s=0.15,
    stt_s=0.1,
    llm_ttft_s=0.1,
    llm_total_s=0.2,
    tts_ttfb_s=0.04,
    reply_audio_s=0.4,
    gap_s=0.3,
)
SLOW = dataclasses.replace(FAST, llm_ttft_s=0.45, llm_total_s=0.55)  # 150 ms over the budget
# the LLM is slow in half the turns: it burns (MIN_TURNS patched to 2 so four turns can tell)
TTFT_SLO = SLO(
    "llm_ttft_fast",
    "llm_ttft",
    0.4,
    objective=0.5,
    windows=(BurnWindow("1h", "5m", 1.0, "page"),),
    min_turns_per_hour=0,
)


@dataclass
class Received:
    signal: lk_observe.BudgetSignal
    at: float
    thread: int


@dataclass
class Run:
    hook: list[Received]
    event: list[lk_observe.BudgetSignal]
    turns: list[lk_observe.Turn]
    truth: GroundTruth
    registry: CollectorRegistry
    recorded: list[Any]  # the session report's events
    intake: list[str]  # every event lk_observe's intake read
    loop_thread: int


def run(
    script: list[ScriptedTurn],
    *,
    hook: Callable[[lk_observe.BudgetSignal], None] | None = None,
    reaction: Callable[[Any], Callable[[lk_observe.BudgetSignal], None]] | None = None,
) -> Run:
    async def go() -> Run:
        pipeline = build_pipeline(script)
        session = pipeline.session
        registry = CollectorRegistry()
        received: list[Received] = []
        event: list[lk_observe.BudgetSignal] = []
        turns: list[lk_observe.Turn] = []
        react = reaction(pipeline) if reaction is not None else None

        def on_budget(signal: lk_observe.BudgetSignal) -> None:
            received.append(Received(signal, time.time(), threading.get_ident()))
            for then in (hook, react):
                if then is not None:
                    then(signal)

        session.on(lk_observe.BUDGET_EVENT, event.append)  # type: ignore[arg-type]
        handle = lk_observe.instrument(
            session,
            registry=registry,
            monitor=lk_observe.LatencyMonitor(window_s=300.0),
            slos=(TTFT_SLO,),
            on_turn=turns.append,
            on_budget=on_budget,
        )
        intake: list[str] = []
        read = handle.events.read

        def spy(event: str, ev: Any, at: float) -> None:
            intake.append(event)
            read(event, ev, at)

        handle.events.read = spy  # type: ignore[method-assign]
        truth = await run_pipeline(pipeline)
        assert await asyncio.to_thread(lk_observe.flush, 10.0)
        await asyncio.sleep(0.1)  # hand-backs run on this loop
        return Run(
            received,
            event,
            turns,
            truth,
            registry,
            list(session._recorded_events),
            intake,
            threading.get_ident(),
        )

    return asyncio.run(go())


@pytest.fixture
def quick_slo_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sinks, "SLO_CHECK_INTERVAL_S", 0.05)
    monkeypatch.setattr(slo, "MIN_TURNS", 2)  # read when the SLO check is built


def signalled_turns(signals: list[lk_observe.BudgetSignal]) -> list[int]:
    return [s.turn.index for s in signals if s.kind == "turn_over_budget" and s.turn is not None]


def by_index(turns: list[lk_observe.Turn]) -> dict[int, lk_observe.Turn]:
    return {t.index: t for t in turns}


def test_slow_llm_turns_are_signalled_once_and_a_burning_slo_and_its_end_too(
    quick_slo_check: None,
) -> None:
    played = run([FAST, FAST, SLOW, SLOW, FAST])
    signals = [r.signal for r in played.hook]
    # the hook and the listeners get the very same signals, in the same order, on the loop
    assert played.event == signals
    assert {r.thread for r in played.hook} == {played.loop_thread}
    # turns 3 and 4 (the slow ones, indices from 1) once each; then the SLO burns after the
    # second slow turn (2 of 4 turns slow: burn rate 1.0), and the fast fifth ends it (0.8)
    assert [s.kind for s in signals] == [
        "turn_over_budget",
        "turn_over_budget",
        "slo_burning",
        "slo_recovered",
    ]
    assert signalled_turns(signals) == [3, 4]
    complete = by_index(played.turns)
    assert all(t.kind == "user" for t in complete.values()) and len(complete) == 5
    for received in played.hook[:2]:
        signal = received.signal
        assert signal.turn is not None
        truth = played.truth.turns[signal.turn.index - 1].latency_ms()
        assert list(signal.overruns_ms) == ["llm_ttft"]  # nothing else overran
        assert signal.over("llm_ttft") == pytest.approx(
            truth["llm_ttft"] - LLM_BUDGET_MS, abs=TRUTH_TOLERANCE_MS
        )
        scripted = SLOW.llm_ttft_s * 1000.0 - LLM_BUDGET_MS  # 150 ms
        assert scripted - 1.0 <= signal.over("llm_ttft") <= scripted + SCRIPT_LATE_MS
        # the live report, in time to act: before the reply it is about had finished playing
        assert not signal.turn.complete
        assert signal.agent == "default" and signal.session_id == signal.turn.session_id
        assert received.at < complete[signal.turn.index].ended_at
        assert dict(complete[signal.turn.index].budget_overruns_ms) == dict(signal.overruns_ms)
    burning, recovered = signals[2], signals[3]
    assert (burning.slo, burning.component) == ("llm_ttft_fast", "llm_ttft")
    assert burning.burn_rate == pytest.approx(1.0) and burning.breach_burn_rate == 1.0
    assert recovered.slo == "llm_ttft_fast" and recovered.burn_rate == pytest.approx(0.8)
    assert played.hook[2].at >= played.hook[1].at  # after the turn that made it burn
    fifth_spoken = played.truth.turns[4].speech_end
    assert fifth_spoken is not None and played.hook[3].at > fifth_spoken  # the fast turn ended it
    # only listeners heard them: not the session report, not lk_observe's own intake
    assert not any(isinstance(e, lk_observe.BudgetSignal) for e in played.recorded)
    assert lk_observe.BUDGET_EVENT not in played.intake and "metrics_collected" in played.intake
    failures = played.registry.get_sample_value(
        "voice_agent_sink_failures_total", {"sink": "on_budget"}
    )
    assert not failures


def test_a_failing_hook_is_counted_and_the_session_goes_on() -> None:
    def broken(signal: lk_observe.BudgetSignal) -> None:
        raise RuntimeError("the user's hook broke")

    played = run([SLOW, FAST], hook=broken)
    assert signalled_turns(played.event) == [1]  # the listeners still heard it
    assert sorted(by_index(played.turns)) == [1, 2]  # and the session went on
    failures = played.registry.get_sample_value(
        "voice_agent_sink_failures_total", {"sink": "on_budget"}
    )
    assert failures == 1.0


@pytest.fixture(scope="module")
def example() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("lk_example_agent_budget", AGENT_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_the_example_switches_to_a_faster_llm_after_two_slow_llm_turns(
    example: ModuleType,
) -> None:
    """examples/agent.py's reaction in a real session: every turn is scripted slow, so the turns
    after the switch are fast only because the running agent now uses the faster LLM."""
    switches: list[Any] = []

    def reaction(pipeline: Any) -> Callable[[lk_observe.BudgetSignal], None]:
        scripted = pipeline.session.llm
        assert isinstance(scripted, ScriptedLLM)
        faster = ScriptedLLM(
            {
                key: dataclasses.replace(reply, ttft_s=FAST.llm_ttft_s, total_s=FAST.llm_total_s)
                for key, reply in scripted._replies.items()
            }
        )

        def faster_llm() -> ScriptedLLM:
            switches.append(faster)
            return faster

        hook: Callable[[lk_observe.BudgetSignal], None] = example.SwitchToFasterLLM(
            pipeline.session, faster_llm, after=2
        )
        return hook

    played = run([SLOW, SLOW, SLOW, SLOW], reaction=reaction)
    assert len(switches) == 1
    assert signalled_turns([r.signal for r in played.hook]) == [1, 2]
    measured = [played.truth.turns[i].latency_ms()["llm_ttft"] for i in range(4)]
    for before in measured[:2]:
        assert SLOW.llm_ttft_s * 1000.0 - 1.0 <= before <= SLOW.llm_ttft_s * 1000 + SCRIPT_LATE_MS
    for after in measured[2:]:
        assert FAST.llm_ttft_s * 1000.0 - 1.0 <= after <= FAST.llm_ttft_s * 1000 + SCRIPT_LATE_MS
    assert [by_index(played.turns)[i].latency_ms["llm_ttft"] < LLM_BUDGET_MS for i in (3, 4)] == [
        True,
        True,
    ]


async def test_the_example_reacts_only_where_a_faster_profile_exists(example: ModuleType) -> None:
    session = build_pipeline([FAST]).session
    try:
        for name, faster in (("balanced", "fast"), ("fast", "ultra")):
            reaction = example.budget_reaction(session, lk_observe.speed_profile(name))
            assert isinstance(reaction, example.SwitchToFasterLLM)
            assert example.FASTER_PROFILE[name] == faster
        assert example.budget_reaction(session, lk_observe.speed_profile("ultra")) is None
    finally:
        await session.aclose()
