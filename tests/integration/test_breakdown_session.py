"""The e2e breakdown in a real AgentSession, against the scripted pipeline's own clocks: a plain
turn, one whose LLM ran preemptively, one with a tool call before the first audio, and one
with a slow `on_user_turn_completed`. Each part is within 5 ms of when it really happened, the
parts add up to e2e exactly, and the settings that own the waits are the session's own."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import lk_observe
from lk_observe.demo import GroundTruth, ScriptedTurn, TurnTruth, build_pipeline, run_pipeline
from tests.otel import memory_tracing, turn_root

PART_TOLERANCE_MS = 5.0  # the bar, against the scripted pipeline's clocks
MIN_ENDPOINTING_S = 0.1


@dataclass
class Played:
    turns: list[lk_observe.Turn]
    truth: GroundTruth
    registry: CollectorRegistry
    exporter: InMemorySpanExporter


def play(script: list[ScriptedTurn], *, preemptive: bool) -> Played:
    async def go() -> Played:
        provider, exporter = memory_tracing()
        registry = CollectorRegistry()
        pipeline = build_pipeline(script, preemptive=preemptive)
        turns: list[lk_observe.Turn] = []
        lk_observe.instrument(
            pipeline.session,
            tracer_provider=provider,
            registry=registry,
            monitor=lk_observe.LatencyMonitor(),
            on_turn=turns.append,
        )
        truth = await run_pipeline(pipeline)
        assert await asyncio.to_thread(lk_observe.flush, 10.0)
        await asyncio.sleep(0.05)  # on_turn hand-backs run on this loop
        return Played(turns, truth, registry, exporter)

    return asyncio.run(go())


def expected_parts(t: TurnTruth, *, tool: bool) -> dict[str, float]:
    """The critical path from the pipeline's clocks: each wait after the one before it."""
    assert t.speech_end is not None and t.vad_end is not None and t.stt_final is not None
    assert t.eou is not None and t.tts_first_text is not None and t.tts_first_audio is not None
    decided = max(t.vad_end, t.stt_final)
    hook_end = t.hook_end or t.eou
    parts = {
        "vad_silence": t.vad_end - t.speech_end,
        "transcription": max(0.0, t.stt_final - t.vad_end),
        "end_of_turn": t.eou - decided,
        "on_user_turn_completed": hook_end - t.eou,
        "tts": t.tts_first_audio - t.tts_first_text,
    }
    if tool:
        assert t.tool is not None and len(t.llm_requests) == 2
        (start1, first1), (start2, first2) = t.llm_requests
        parts["llm"] = (first1 - start1) + (first2 - start2)  # round 1 ends at its tool call
        parts["tool"] = t.tool[1] - t.tool[0]
    else:
        start, first = t.llm_requests[-1]
        parts["llm"] = max(0.0, first - max(start, hook_end))
    return {part: ms * 1000.0 for part, ms in parts.items()}


def assert_breakdown(turn: lk_observe.Turn, truth: TurnTruth, *, tool: bool = False) -> None:
    breakdown = turn.breakdown_ms
    assert math.fsum(breakdown.values()) == pytest.approx(turn.latency_ms["e2e"], abs=1e-6)
    for part, ms in expected_parts(truth, tool=tool).items():
        assert breakdown[part] == pytest.approx(ms, abs=PART_TOLERANCE_MS), (part, breakdown)
    assert breakdown["scheduling"] < 25.0, breakdown  # LiveKit's own steps: small here
    assert turn.breakdown_settings["end_of_turn"] == f"endpointing.min_delay={MIN_ENDPOINTING_S}s"


@pytest.fixture(scope="module")
def without_preemption() -> Played:
    return play(
        [ScriptedTurn(), ScriptedTurn(tool_s=0.3), ScriptedTurn(hook_s=0.3)], preemptive=False
    )


@pytest.fixture(scope="module")
def preemptive() -> Played:
    # the final transcript comes 150 ms after the speech end, the end of turn about 250 ms:
    # an LLM started on the transcript, 50 ms to its first token, is done before the turn is
    # decided (LiveKit may also start it at the VAD's end of speech: then most of it shows)
    return play([ScriptedTurn(llm_ttft_s=0.05, llm_total_s=0.2)], preemptive=True)


def test_plain_turn_parts_match_the_pipeline(without_preemption: Played) -> None:
    turn = without_preemption.turns[0]
    assert_breakdown(turn, without_preemption.truth.turns[0])
    assert "tool" not in turn.breakdown_ms


def test_tool_call_before_the_first_audio_is_its_own_part(without_preemption: Played) -> None:
    assert_breakdown(without_preemption.turns[1], without_preemption.truth.turns[1], tool=True)


def test_slow_hook_is_named_with_its_time(without_preemption: Played) -> None:
    turn = without_preemption.turns[2]
    assert_breakdown(turn, without_preemption.truth.turns[2])
    assert turn.breakdown_ms["on_user_turn_completed"] == pytest.approx(300.0, abs=5.0)
    assert max(turn.breakdown_ms, key=turn.breakdown_ms.__getitem__) in (
        "on_user_turn_completed",
        "vad_silence",
    )


def test_preemptive_llm_counts_only_its_time_past_the_end_of_turn(preemptive: Played) -> None:
    turn = preemptive.turns[0]
    truth = preemptive.truth.turns[0]
    start, first_token = truth.llm_requests[-1]
    assert truth.eou is not None and start < truth.eou  # it really ran before the end of turn
    assert_breakdown(turn, truth)  # the part: its first token minus the end of turn, or 0
    hidden_ms = (truth.eou - start) * 1000.0
    visible_ms = max(0.0, turn.latency_ms["llm_ttft"] - hidden_ms)
    assert turn.breakdown_ms["llm"] <= visible_ms + PART_TOLERANCE_MS
    if first_token < truth.eou:  # the usual case: done before the turn was decided
        assert turn.breakdown_ms["llm"] == pytest.approx(0.0, abs=PART_TOLERANCE_MS)


def test_breakdown_reaches_the_span_the_metrics_and_names_the_models(
    without_preemption: Played,
) -> None:
    turn = without_preemption.turns[0]
    root = turn_root(without_preemption.exporter, turn.trace_id)
    attributes = dict(root.attributes or {})
    for part, ms in turn.breakdown_ms.items():
        assert attributes[f"voice.breakdown.{part}_ms"] == pytest.approx(ms, abs=0.001)
    assert attributes["voice.breakdown.end_of_turn.setting"] == "endpointing.min_delay=0.1s"
    # the breakdown counter: every part of every turn, in seconds, adding up to the e2e sum
    registry = without_preemption.registry
    parts = sum(
        registry.get_sample_value(
            "voice_agent_e2e_breakdown_seconds_total", {"agent": "default", "part": part}
        )
        or 0.0
        for part in lk_observe.BREAKDOWN_PARTS
    )
    e2e_sum = registry.get_sample_value(
        "voice_agent_latency_seconds_sum",
        {"agent": "default", "component": "e2e", "provider": "", "model": ""},
    )
    assert e2e_sum is not None and parts == pytest.approx(e2e_sum, rel=1e-9)
    # the scripted plugins name themselves; the model labels the per-stage latency
    assert turn.stt_provider and turn.tts_provider and turn.llm_provider
    stt = registry.get_sample_value(
        "voice_agent_latency_seconds_count",
        {
            "agent": "default",
            "component": "stt",
            "provider": turn.stt_provider,
            "model": turn.stt_model or "unknown",
        },
    )
    assert stt == len(without_preemption.turns)
    spans = {s.name: s for s in without_preemption.exporter.get_finished_spans()}
    assert dict(spans["voice.stt"].attributes or {})["voice.stt.provider"] == turn.stt_provider
