"""The e2e breakdown on scripted timelines where every part is known: its parts lie on the
critical path in order, each is exact, and together they add up to e2e."""

from __future__ import annotations

import math
from typing import Any

import pytest

from lk_observe.turns import BREAKDOWN_PARTS, Turn, TurnAssembler

S = 1000.0  # the user's speech end (LiveKit's stopped_speaking_at)
SETTINGS = {"vad_silence": "min_silence_duration=0.3s", "end_of_turn": "endpointing.min_delay=0.5s"}


def _user_turn(a: TurnAssembler, *, hook_s: float | None = 0.1, commit: float = 1000.62) -> None:
    a.user_state("listening", created_at=S, at=S + 0.3)  # the VAD decides 300 ms after
    metrics: dict[str, Any] = {
        "stopped_speaking_at": S,
        "transcription_delay": 0.35,
        "end_of_turn_delay": 0.5,
        "stt_metadata": {"model_provider": "deepgram", "model_name": "nova-3"},
    }
    if hook_s is not None:
        metrics["on_user_turn_completed_delay"] = hook_s
    a.user_turn("u1", metrics, "s1", at=commit, settings=SETTINGS)


def _speak(a: TurnAssembler, first_audio: float, *, node_ttft: float, ttfb: float) -> list[Turn]:
    early = {"llm_node_ttft": node_ttft, "tts_node_ttfb": ttfb, "playback_latency": 0.0}
    return a.agent_speaking(
        "s1", first_audio, early, first_audio, tts_model=("cartesia", "sonic-2")
    )


def _llm(a: TurnAssembler, start: float, ttft: float, end: float, at: float) -> list[Turn]:
    return a.llm_metrics(
        "s1", ended_at=end, duration_s=end - start, ttft_s=ttft, model="gpt-4.1-mini",
        provider="openai", at=at,
    )  # fmt: skip


def _live(turns: list[Turn]) -> Turn:
    (turn,) = [t for t in turns if not t.complete]
    return turn


def _assert_adds_up(turn: Turn, expected: dict[str, float]) -> None:
    assert list(turn.breakdown_ms) == [p for p in BREAKDOWN_PARTS if p in turn.breakdown_ms]
    for part, ms in expected.items():
        assert turn.breakdown_ms[part] == pytest.approx(ms, abs=1e-6), part
    assert set(turn.breakdown_ms) == set(expected)
    assert math.fsum(turn.breakdown_ms.values()) == pytest.approx(turn.latency_ms["e2e"], abs=1e-9)


def test_plain_turn_splits_e2e_into_its_parts_exactly() -> None:
    a = TurnAssembler()
    a.speech_created("s1", at=1000.61)
    _user_turn(a)
    # the LLM node starts at 1000.62, first token at 1000.82; TTS first byte 80 ms later
    turns = _llm(a, 1000.62, 0.2, 1001.2, at=1000.85)
    turns += _speak(a, 1000.90, node_ttft=0.2, ttfb=0.08)
    turn = _live(turns)
    assert turn.latency_ms["e2e"] == pytest.approx(900.0)
    _assert_adds_up(
        turn,
        {
            "vad_silence": 300.0,
            "transcription": 50.0,  # the final transcript came 50 ms after the VAD decided
            "end_of_turn": 150.0,
            "on_user_turn_completed": 100.0,
            "llm": 200.0,
            "tts": 80.0,
            "playback": 0.0,
            "scheduling": 20.0,  # hook end (1000.60) -> LLM node start (1000.62)
        },
    )
    assert turn.breakdown_settings == SETTINGS
    assert (turn.stt_provider, turn.stt_model) == ("deepgram", "nova-3")
    assert (turn.tts_provider, turn.tts_model) == ("cartesia", "sonic-2")
    assert (turn.llm_provider, turn.llm_model) == ("openai", "gpt-4.1-mini")


def test_preemptive_llm_hidden_behind_the_end_of_turn_counts_zero() -> None:
    a = TurnAssembler()
    a.speech_created("s1", at=1000.35)
    _user_turn(a)
    # generation began at the final transcript (1000.35): first token at 1000.55, before the
    # hook even ended; TTS from 1000.62 to 1000.70
    turns = _llm(a, 1000.35, 0.2, 1000.9, at=1000.9)
    turns += _speak(a, 1000.70, node_ttft=0.2, ttfb=0.08)
    _assert_adds_up(
        _live(turns),
        {
            "vad_silence": 300.0,
            "transcription": 50.0,
            "end_of_turn": 150.0,
            "on_user_turn_completed": 100.0,
            "llm": 0.0,
            "tts": 80.0,
            "playback": 0.0,
            "scheduling": 20.0,
        },
    )


def test_tool_before_the_first_audio_is_its_own_part_and_both_rounds_count() -> None:
    a = TurnAssembler()
    a.speech_created("s1", at=1000.61)
    _user_turn(a)
    # round 1 asks for a tool (1000.62 -> 1000.90), the tool runs 1000.92 -> 1001.22, round 2
    # starts 1001.25 and its first token (1001.45) goes to the TTS; first audio at 1001.53
    turns = _llm(a, 1000.62, 0.18, 1000.90, at=1000.90)
    turns += a.tools_executed("s1", 1000.92, 1001.22, 1, at=1001.22)
    turns += _speak(a, 1001.53, node_ttft=0.2, ttfb=0.08)
    live = _live(turns)
    expected = {
        "vad_silence": 300.0,
        "transcription": 50.0,
        "end_of_turn": 150.0,
        "on_user_turn_completed": 100.0,
        "llm": 280.0 + 200.0,  # round 1 to its end, round 2 to its first token
        "tool": 300.0,
        "tts": 80.0,
        "playback": 0.0,
        "scheduling": 20.0 + 20.0 + 30.0,
    }
    _assert_adds_up(live, expected)
    # round 2's own timing arrives after the first audio: the complete record agrees
    done = _llm(a, 1001.25, 0.2, 1001.9, at=1001.9) + a.speech_done("s1", False, at=1002.5)
    (full,) = [t for t in done if t.complete]
    _assert_adds_up(full, expected)


def test_a_slow_hook_is_named_and_its_wait_is_exact() -> None:
    a = TurnAssembler()
    a.speech_created("s1", at=1001.11)
    _user_turn(a, hook_s=0.6, commit=1001.12)
    turns = _llm(a, 1001.12, 0.2, 1001.5, at=1001.5)
    turns += _speak(a, 1001.40, node_ttft=0.2, ttfb=0.08)
    turn = _live(turns)
    assert turn.breakdown_ms["on_user_turn_completed"] == pytest.approx(600.0)
    assert math.fsum(turn.breakdown_ms.values()) == pytest.approx(turn.latency_ms["e2e"])


def test_heard_leading_silence_is_its_own_part() -> None:
    a = TurnAssembler()
    a.speech_created("s1", at=1000.61)
    _user_turn(a)
    turns = _llm(a, 1000.62, 0.2, 1001.2, at=1000.85)
    early = {"llm_node_ttft": 0.2, "tts_node_ttfb": 0.08, "playback_latency": 0.0}
    turns += a.agent_speaking("s1", 1000.90, early, 1000.90, leading_silence_s=0.12)
    turn = _live(turns)
    assert turn.latency_ms["e2e"] == pytest.approx(1020.0)
    assert turn.breakdown_ms["leading_silence"] == pytest.approx(120.0)
    assert math.fsum(turn.breakdown_ms.values()) == pytest.approx(1020.0)


def test_turns_without_e2e_have_no_breakdown() -> None:
    a = TurnAssembler()
    a.speech_created("s1", at=1000.0)
    turns = a.agent_speaking("s1", 1000.5, {"tts_node_ttfb": 0.1}, 1000.5)  # a greeting
    assert _live(turns).breakdown_ms == {}
    b = TurnAssembler()
    b.speech_created("s1", at=1000.0)
    b.user_turn("typed", {}, "s1", at=1000.0, settings=SETTINGS)
    turn = _live(b.agent_speaking("s1", 1000.5, {"tts_node_ttfb": 0.1}, 1000.5))
    assert turn.breakdown_ms == {}
    assert turn.breakdown_settings == {}


def test_without_any_stage_everything_is_scheduling() -> None:
    a = TurnAssembler()
    a.speech_created("s1", at=1000.2)
    a.user_turn("u1", {"stopped_speaking_at": S}, "s1", at=1000.3)
    turn = _live(a.agent_speaking("s1", 1000.8, None, 1000.8))
    assert turn.breakdown_ms == {"scheduling": pytest.approx(800.0)}


def test_unknown_model_names_are_not_reported() -> None:
    a = TurnAssembler()
    a.speech_created("s1", at=1000.61)
    a.user_turn(
        "u1",
        {"stopped_speaking_at": S, "stt_metadata": {"model_provider": "unknown", "model_name": 3}},
        "s1",
        at=1000.62,
    )
    turn = _live(a.agent_speaking("s1", 1000.9, None, 1000.9, tts_model=(None, "unknown")))
    assert (turn.stt_provider, turn.stt_model, turn.tts_provider, turn.tts_model) == (None,) * 4


def test_measured_code_lands_on_its_reply_or_the_next_user_turn() -> None:
    a = TurnAssembler()
    a.measured("retrieval", 1000.52, 1000.58, None, at=1000.58)  # in the hook: no reply yet
    a.measured("stray", 990.0, 990.1, None, at=990.1)  # long before this turn: not its
    a.speech_created("s1", at=1000.61)
    _user_turn(a)
    a.measured("db", 1000.7, 1000.75, "s1", at=1000.75)
    turns = _llm(a, 1000.62, 0.2, 1001.2, at=1000.85)
    turns += _speak(a, 1000.90, node_ttft=0.2, ttfb=0.08)
    assert [name for name, _ in _live(turns).measured] == ["retrieval", "db"]
    a.measured("late", 1001.0, 1001.1, "missing", at=1001.1)
    assert a.skipped["measured_unknown_reply"] == 1
