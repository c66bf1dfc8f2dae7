"""TurnAssembler on recorded AgentSession event sequences: exact values, stage placement, and
every way the event stream goes wrong (interruptions, reordering, duplicates, bad values)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from lk_observe.turns import (
    MAX_CLOCK_SKEW_S,
    MAX_LATENCY_S,
    MAX_TRACKED_SPEECHES,
    Stage,
    Turn,
    TurnAssembler,
    tier_for,
)

# The recorded turn (times relative to t0 = 1000.0, unix seconds).
SPEECH_END = 1002.3063
VAD_DECIDED = 1002.557
USER_METRICS: dict[str, Any] = {
    "stopped_speaking_at": SPEECH_END,
    "transcription_delay": 0.151,
    "end_of_turn_delay": 0.2513,
}
FIRST_AUDIO = 1002.773
EARLY: dict[str, Any] = {
    "llm_node_ttft": 0.2512,
    "tts_node_ttfb": 0.061,
    "playback_latency": 0.00001,
}
LLM_ENDED, LLM_DURATION, LLM_TTFT = 1002.9935, 0.4513, 0.2511


def _speech_and_user(a: TurnAssembler, metrics: dict[str, Any] | None = None) -> list[Turn]:
    out = a.speech_created("s1", at=1002.458)
    out += a.user_state("listening", created_at=1002.306, at=1002.557)
    out += a.user_turn("item1", USER_METRICS if metrics is None else metrics, "s1", at=1002.558)
    return out


def _first_audio(a: TurnAssembler, speech_id: str = "s1") -> list[Turn]:
    return a.agent_speaking(speech_id, started_at=FIRST_AUDIO, early=EARLY, at=FIRST_AUDIO)


def _llm(a: TurnAssembler, speech_id: str = "s1", at: float = 1002.911) -> list[Turn]:
    return a.llm_metrics(
        speech_id,
        ended_at=LLM_ENDED,
        duration_s=LLM_DURATION,
        ttft_s=LLM_TTFT,
        model="m",
        provider="p",
        input_tokens=48,
        output_tokens=12,
        at=at,
    )


def live(turns: list[Turn]) -> list[Turn]:
    return [t for t in turns if not t.complete]


def complete(turns: list[Turn]) -> list[Turn]:
    return [t for t in turns if t.complete]


def _recorded_turn(a: TurnAssembler) -> list[Turn]:
    return _speech_and_user(a) + _first_audio(a) + _llm(a)


def _assert_normal_values(turn: Turn) -> None:
    expected = {
        "e2e": 466.7,
        "vad": 250.7,
        "stt": 151.0,
        "eou": 251.3,
        "llm_ttft": 251.2,
        "tts_ttfb": 61.0,
    }
    assert set(turn.latency_ms) == set(expected)
    for component, value in expected.items():
        assert turn.latency_ms[component] == pytest.approx(value, abs=1e-6), component
    assert turn.tier == "excellent"
    assert not turn.interrupted


def _assert_sane(turns: list[Turn]) -> None:
    for turn in turns:
        for component, value in turn.latency_ms.items():
            assert math.isfinite(value), (component, value)
            assert 0.0 <= value <= MAX_LATENCY_S * 1000.0, (component, value)
        for name, stage in turn.stages.items():
            assert math.isfinite(stage.start) and math.isfinite(stage.end), (name, stage)
            assert 0.0 <= stage.duration_ms <= MAX_LATENCY_S * 1000.0, (name, stage)
        assert isinstance(turn.tool_calls, int) and turn.tool_calls >= 0
        for tokens in (turn.input_tokens, turn.output_tokens):
            assert tokens is None or (isinstance(tokens, int) and tokens >= 0)
        if turn.tool_ms is not None:
            assert math.isfinite(turn.tool_ms) and 0.0 <= turn.tool_ms <= MAX_LATENCY_S * 1000
        if turn.played_ms is not None:
            assert math.isfinite(turn.played_ms) and 0.0 <= turn.played_ms <= 3600_000.0


# -- the normal turn ------------------------------------------------------------------------


def test_recorded_turn_is_finished_by_the_llm_metrics_with_exact_values() -> None:
    a = TurnAssembler(session_id="sess", agent="bot")
    assert _speech_and_user(a) == []
    assert _first_audio(a) == []  # first audio played, but the LLM's own timing is still due
    assert a.pending == 1
    turns = _llm(a)
    assert len(turns) == 1
    turn = turns[0]
    _assert_normal_values(turn)
    assert (turn.index, turn.speech_id, turn.kind) == (1, "s1", "user")
    assert (turn.session_id, turn.agent) == ("sess", "bot")
    assert turn.started_at == SPEECH_END
    assert turn.ended_at == FIRST_AUDIO
    assert (turn.llm_model, turn.llm_provider) == ("m", "p")
    assert (turn.input_tokens, turn.output_tokens, turn.llm_rounds) == (48, 12, 1)
    assert (turn.tool_calls, turn.tool_ms) == (0, None)
    assert a.pending == 0
    assert not a.skipped


def test_recorded_turn_places_each_stage_at_its_real_time() -> None:
    [turn] = _recorded_turn(TurnAssembler())
    s = turn.stages
    assert s["e2e"] == Stage(SPEECH_END, FIRST_AUDIO)
    assert s["vad"] == Stage(SPEECH_END, VAD_DECIDED)
    assert s["stt"].start == SPEECH_END
    assert s["stt"].end == pytest.approx(SPEECH_END + 0.151)
    assert s["eou"].end == pytest.approx(SPEECH_END + 0.2513)
    llm_start = LLM_ENDED - LLM_DURATION
    assert s["llm_ttft"].start == pytest.approx(llm_start)
    assert s["llm_ttft"].end == pytest.approx(llm_start + LLM_TTFT)
    # TTS first byte ends where playback began (first audio minus the playback latency)
    assert s["tts_ttfb"].end == pytest.approx(FIRST_AUDIO - 0.00001)
    assert s["tts_ttfb"].start == pytest.approx(FIRST_AUDIO - 0.00001 - 0.061)
    for stage in s.values():  # recorded clocks: LLM timing may overlap playback by a few ms
        assert turn.started_at <= stage.start <= stage.end <= turn.ended_at + 0.05


def test_turn_finishes_at_first_audio_when_llm_metrics_came_first() -> None:
    a = TurnAssembler()
    assert _speech_and_user(a) + _llm(a, at=1002.7) == []
    [turn] = _first_audio(a)
    _assert_normal_values(turn)


def test_llm_metrics_before_the_user_turn_still_belong_to_the_reply() -> None:
    a = TurnAssembler()
    assert a.speech_created("s1", at=1002.458) == []
    assert _llm(a, at=1002.5) == []  # no user turn yet: nothing to finish
    assert a.user_state("listening", created_at=1002.306, at=1002.557) == []
    assert a.user_turn("item1", USER_METRICS, "s1", at=1002.558) == []
    [turn] = _first_audio(a)
    _assert_normal_values(turn)


def test_latency_tiers_follow_the_guide() -> None:
    assert [tier_for(v) for v in (0.0, 499.999, 500.0, 799.999, 800.0, 5000.0)] == [
        "excellent",
        "excellent",
        "good",
        "good",
        "slow",
        "slow",
    ]
    assert tier_for(None) is None
    for delay, tier in ((0.25, "excellent"), (0.5, "good"), (0.875, "slow")):
        a = TurnAssembler()
        a.speech_created("s1", at=1000.0)
        a.user_turn("item1", {"stopped_speaking_at": 1000.0}, "s1", at=1000.0)
        [turn] = a.agent_speaking("s1", 1000.0 + delay, {}, at=1000.0 + delay)
        assert turn.latency_ms["e2e"] == delay * 1000.0
        assert turn.tier == tier


def test_indices_increase_across_turns() -> None:
    a = TurnAssembler()
    turns = _recorded_turn(a)
    turns += a.speech_created("s2", at=1010.0)
    turns += a.user_turn("item2", {"stopped_speaking_at": 1009.8}, "s2", at=1010.0)
    turns += a.agent_speaking("s2", 1010.4, {}, at=1010.4)
    assert [t.index for t in turns] == [1, 2]
    assert turns[1].latency_ms["e2e"] == pytest.approx(600.0)


# -- greeting, tools ------------------------------------------------------------------------


def test_greeting_without_user_turn_is_an_agent_turn_without_e2e() -> None:
    a = TurnAssembler()
    assert a.speech_created("g", at=1000.0) == []
    [turn] = a.agent_speaking("g", 1000.4, {"tts_node_ttfb": 0.05}, at=1000.4)
    assert turn.kind == "agent"
    assert "e2e" not in turn.latency_ms and turn.tier is None
    assert turn.latency_ms["tts_ttfb"] == pytest.approx(50.0)
    assert (turn.started_at, turn.ended_at) == (1000.0, 1000.4)
    assert not turn.interrupted


def test_greeting_with_llm_waits_for_llm_metrics() -> None:
    a = TurnAssembler()
    a.speech_created("g", at=1000.0)
    assert a.agent_speaking("g", 1000.4, {"llm_node_ttft": 0.2}, at=1000.4) == []
    [turn] = a.llm_metrics("g", ended_at=1000.5, duration_s=0.45, ttft_s=0.2, at=1000.5)
    assert turn.kind == "agent"
    assert turn.latency_ms == pytest.approx({"llm_ttft": 200.0})


def test_tool_call_reports_first_round_ttft_and_tool_time() -> None:
    a = TurnAssembler()
    _speech_and_user(a)
    a.llm_metrics("s1", ended_at=1002.8, duration_s=0.3, ttft_s=0.25, at=1002.8)
    assert a.tools_executed(None, 1002.8, 1003.1, 1, at=1003.1) == []  # no speech id: in flight
    a.llm_metrics("s1", ended_at=1003.5, duration_s=0.35, ttft_s=0.2, at=1003.5)
    [turn] = a.agent_speaking("s1", 1003.45, {"llm_node_ttft": 0.2, "tts_node_ttfb": 0.05}, 1003.45)
    assert turn.latency_ms["llm_ttft"] == pytest.approx(250.0)
    assert turn.tool_ms == pytest.approx(300.0)
    assert (turn.tool_calls, turn.llm_rounds) == (1, 2)
    assert turn.stages["tool"] == Stage(1002.8, 1003.1)
    assert turn.stages["llm_round_2"].start == pytest.approx(1003.15)
    assert turn.stages["llm_round_2"].duration_ms == pytest.approx(200.0)
    assert turn.latency_ms["e2e"] == pytest.approx((1003.45 - SPEECH_END) * 1000)
    assert turn.tier == "slow"


def test_llm_ttft_is_livekits_node_figure_ending_at_the_rounds_first_token() -> None:
    a = TurnAssembler()
    turns = _recorded_turn(a)
    first_token = LLM_ENDED - LLM_DURATION + LLM_TTFT
    [live_turn] = live(turns)
    assert live_turn.stages["llm_ttft"].end == pytest.approx(first_token)
    assert live_turn.stages["llm_ttft"].duration_ms == pytest.approx(EARLY["llm_node_ttft"] * 1e3)
    [done] = a.speech_done("s1", interrupted=False, at=FIRST_AUDIO + 1.0)
    assert done.stages["llm_ttft"] == live_turn.stages["llm_ttft"]
    assert done.latency_ms["llm_ttft"] == pytest.approx(251.2)


def test_tool_calls_with_speech_id_accumulate_into_one_tool_stage() -> None:
    a = TurnAssembler()
    _speech_and_user(a)
    a.tools_executed("s1", 1002.8, 1002.9, 1, at=1002.9)
    a.tools_executed("s1", 1002.95, 1003.2, 2, at=1003.2)
    [turn] = a.agent_speaking("s1", 1003.5, {}, at=1003.5)
    assert turn.tool_calls == 3
    assert turn.stages["tool"] == Stage(1002.8, 1003.2)


def test_tools_with_no_reply_in_flight_are_skipped() -> None:
    a = TurnAssembler()
    assert a.tools_executed(None, 1.0, 1.2, 1, at=1.2) == []
    assert a.skipped["tools_without_reply"] == 1


# -- interruptions --------------------------------------------------------------------------


def test_barge_in_before_first_audio_gives_interrupted_turn_without_e2e_or_tier() -> None:
    a = TurnAssembler()
    _speech_and_user(a)
    _llm(a, at=1002.9)
    a.user_barge_in(at=1003.0)
    first, turn = a.speech_done("s1", interrupted=True, at=1003.1)
    assert not first.complete and turn.complete  # live and complete at once: it never played
    assert first.interrupted and turn.interrupted
    assert "e2e" not in turn.latency_ms and "e2e" not in turn.stages
    assert turn.tier is None and turn.played_ms is None
    assert {"vad", "stt", "eou", "llm_ttft"} <= set(turn.latency_ms)
    assert turn.ended_at == 1002.558  # never played: ends at the commit


def test_barge_in_marks_the_reply_even_when_speech_done_says_otherwise() -> None:
    a = TurnAssembler()
    _speech_and_user(a)
    a.user_barge_in(at=1003.0)
    [turn] = complete(a.speech_done("s1", interrupted=False, at=1003.1))
    assert turn.interrupted and turn.tier is None


def test_barge_in_that_does_not_stop_the_reply_leaves_it_uninterrupted() -> None:
    a = TurnAssembler()
    _speech_and_user(a)
    a.user_barge_in(at=1002.6)  # a short noise; LiveKit does not interrupt the reply
    _first_audio(a)
    [turn] = _llm(a)
    assert "e2e" in turn.latency_ms
    assert not turn.interrupted


def test_new_user_turn_while_previous_reply_never_played_emits_it_interrupted() -> None:
    a = TurnAssembler()
    _speech_and_user(a)
    a.speech_created("s2", at=1004.0)
    turns = a.user_turn("item2", {"stopped_speaking_at": 1003.8}, "s2", at=1004.0)
    assert [(t.speech_id, t.complete) for t in turns] == [("s1", False), ("s1", True)]
    assert turns[1].interrupted and "e2e" not in turns[1].latency_ms and turns[1].tier is None
    [second] = a.agent_speaking("s2", 1004.3, {}, at=1004.3)
    assert second.index == 2 and not second.interrupted
    assert second.latency_ms["e2e"] == pytest.approx(500.0)


@pytest.mark.parametrize(
    ("stopped_after_done_s", "expected_ms"),
    [
        (-0.2, 227.0 - 200.0),  # stopped before the done callback: LiveKit's figure
        (0.001, 227.0 + 1.0),  # LiveKit stamps the stop a moment after the handle is done
        (0.5, 227.0),  # far beyond the reply's end: not this reply's message, the done time
    ],
)
def test_played_ms_is_livekits_playout_within_its_slack(
    stopped_after_done_s: float, expected_ms: float
) -> None:
    a = TurnAssembler()
    _speech_and_user(a)
    _first_audio(a)
    _llm(a)
    done = FIRST_AUDIO + 0.227
    stopped = {
        "started_speaking_at": FIRST_AUDIO,
        "stopped_speaking_at": done + stopped_after_done_s,
    }
    a.assistant_message("s1", stopped, at=done)
    [turn] = a.speech_done("s1", interrupted=True, at=done)
    assert turn.played_ms == pytest.approx(expected_ms)


def test_interrupted_after_first_audio_keeps_e2e() -> None:
    a = TurnAssembler()
    _speech_and_user(a)
    assert _first_audio(a) == []
    first, turn = a.speech_done("s1", interrupted=True, at=1003.0)
    assert not first.interrupted  # live at first audio: it had started playing
    assert turn.complete and turn.interrupted  # LiveKit's meaning: cut short, at any point
    assert turn.latency_ms["e2e"] == pytest.approx(466.7)
    assert turn.played_ms == pytest.approx((1003.0 - FIRST_AUDIO) * 1000.0)
    assert turn.ended_at == 1003.0


def test_false_interruption_resume_counts_first_audio_once() -> None:
    a = TurnAssembler()
    _speech_and_user(a)
    assert _first_audio(a) == []
    # paused by a false interruption, then resumed: "speaking" again for the same speech
    assert a.agent_speaking("s1", started_at=1003.6, early={"tts_node_ttfb": 0.5}, at=1003.6) == []
    [turn] = _llm(a, at=1003.7)
    _assert_normal_values(turn)
    assert a.agent_speaking("s1", started_at=1004.0, early=EARLY, at=1004.0) == []
    [done] = a.speech_done("s1", interrupted=False, at=1004.5)
    assert done.complete and not done.interrupted  # it resumed and played out
    _assert_normal_values(done)
    assert a.close(at=1005.0) == []


def test_speech_done_for_an_unknown_speech_is_ignored() -> None:
    a = TurnAssembler()
    assert a.speech_done("nope", interrupted=True, at=1.0) == []
    assert a.pending == 0


# -- preemptive generation, duplicates, missing data ----------------------------------------


def test_preemptive_speech_that_was_discarded_emits_nothing_and_spares_the_real_turn() -> None:
    a = TurnAssembler()
    out = a.speech_created("pre", at=1002.35)
    out += a.llm_metrics("pre", ended_at=1002.55, duration_s=0.2, ttft_s=0.1, at=1002.55)
    out += a.speech_done("pre", interrupted=True, at=1002.56)  # cancelled, never played
    out += _recorded_turn(a)
    out += a.close(at=1010.0)
    assert [(t.speech_id, t.complete) for t in out] == [("s1", False), ("s1", True)]
    _assert_normal_values(out[0])
    assert out[0].index == out[1].index == 1


def test_duplicate_user_item_makes_one_turn_and_is_counted() -> None:
    a = TurnAssembler()
    _speech_and_user(a)
    assert a.user_turn("item1", USER_METRICS, "s1", at=1002.6) == []
    turns = _first_audio(a) + _llm(a) + a.close(at=1010.0)
    assert len(live(turns)) == len(complete(turns)) == 1
    _assert_normal_values(turns[0])
    assert a.skipped["duplicate_item"] == 1


def test_user_item_without_metrics_is_an_unspoken_turn_with_no_speech_stages() -> None:
    a = TurnAssembler()
    a.speech_created("s1", at=1002.458)
    a.user_turn("typed", {}, "s1", at=1002.558)
    turns = _first_audio(a) + _llm(a)
    [turn] = turns
    assert turn.kind == "user"
    for component in ("vad", "stt", "eou", "e2e"):
        assert component not in turn.latency_ms and component not in turn.stages
    assert turn.tier is None
    assert turn.latency_ms["llm_ttft"] == pytest.approx(251.2)  # LiveKit's llm_node figure
    assert turn.latency_ms["tts_ttfb"] == pytest.approx(61.0)


def test_user_item_without_metrics_falls_back_to_the_vad_speech_end() -> None:
    a = TurnAssembler()
    _speech_and_user(a, metrics={})
    [turn] = _first_audio(a) + _llm(a)
    assert turn.latency_ms["e2e"] == pytest.approx((FIRST_AUDIO - 1002.306) * 1000)
    assert turn.latency_ms["vad"] == pytest.approx((VAD_DECIDED - 1002.306) * 1000)
    assert "stt" not in turn.latency_ms and "eou" not in turn.latency_ms


def test_realtime_like_pipeline_reports_only_measured_components() -> None:
    a = TurnAssembler()
    a.speech_created("s1", at=1002.458)
    a.user_state("listening", created_at=1002.306, at=1002.557)
    metrics = {"stopped_speaking_at": SPEECH_END, "end_of_turn_delay": 0.2513}
    a.user_turn("item1", metrics, "s1", at=1002.558)
    assert a.llm_metrics("s1", ended_at=1002.9, duration_s=0.5, ttft_s=-1.0, at=1002.9) == []
    [turn] = a.agent_speaking("s1", FIRST_AUDIO, {"playback_latency": 0.0}, at=FIRST_AUDIO)
    assert set(turn.latency_ms) == {"vad", "eou", "e2e"}
    assert set(turn.stages) == {"vad", "eou", "e2e"}
    assert all(v > 0 for v in turn.latency_ms.values())
    assert turn.llm_rounds == 0 and turn.tier == "excellent"


def test_user_turn_that_never_got_a_reply_is_reported_at_close_not_lost() -> None:
    a = TurnAssembler()
    assert a.user_turn("item1", USER_METRICS, None, at=1002.558) == []
    first, turn = a.close(at=1003.0)
    assert (first.complete, turn.complete) == (False, True)
    assert turn.index == 1 and turn.kind == "user" and turn.speech_id is None
    assert "e2e" not in turn.latency_ms and {"stt", "eou"} <= set(turn.latency_ms)
    assert a.skipped["user_turn_without_reply"] == 1


def test_a_user_turn_committed_before_its_reply_is_created_gets_that_reply() -> None:
    a = TurnAssembler()
    assert a.user_turn("item1", USER_METRICS, None, at=1002.558) == []
    a.speech_created("s1", at=1002.6)
    [turn] = _first_audio(a) + _llm(a)
    assert turn.index == 1 and turn.speech_id == "s1" and "e2e" in turn.latency_ms


def test_a_say_is_never_the_reply_to_a_user_turn() -> None:
    a = TurnAssembler()
    a.speech_created("reply", at=1002.45)
    a.speech_created("filler", at=1002.5, said=True)  # said from on_user_turn_completed
    # LiveKit commits the user message while the filler is the current speech
    a.user_turn("item1", USER_METRICS, "filler", at=1002.558)
    filler = a.agent_speaking("filler", FIRST_AUDIO, {}, at=FIRST_AUDIO)
    assert [(t.kind, "e2e" in t.latency_ms) for t in filler] == [("agent", False)]
    [reply] = a.agent_speaking("reply", 1003.5, {}, at=1003.5)
    assert reply.kind == "user" and reply.index == 1
    assert reply.latency_ms["e2e"] == pytest.approx((1003.5 - SPEECH_END) * 1000.0)


def test_typed_input_while_the_agent_speaks_is_a_user_turn_with_its_reply() -> None:
    a = TurnAssembler()
    _recorded_turn(a)  # s1 answers turn 1 and is still playing
    a.speech_created("s2", at=1003.2)  # generate_reply(user_input=...)
    # committed while s1 is still the current speech; a typed message has no metrics
    assert a.user_turn("typed", {}, "s1", at=1003.3) == []
    [typed] = a.agent_speaking("s2", 1003.9, {}, at=1003.9)
    assert typed.index == 2 and typed.kind == "user" and typed.speech_id == "s2"
    assert "e2e" not in typed.latency_ms  # nothing is measured from a keystroke
    assert not a.skipped


def test_second_user_item_for_an_answered_speech_waits_for_its_own_reply() -> None:
    a = TurnAssembler()
    _speech_and_user(a)
    abandoned = a.user_turn("item2", {"stopped_speaking_at": 1002.5}, "s1", at=1002.6)
    assert [t.speech_id for t in abandoned] == ["s1", "s1"]  # never played: the user moved on
    assert abandoned[1].interrupted
    a.speech_created("s2", at=1002.7)
    [second] = a.agent_speaking("s2", 1003.0, {}, at=1003.0)
    assert second.index == 2 and second.speech_id == "s2"


def test_implausible_speech_end_makes_an_unspoken_turn() -> None:
    a = TurnAssembler()
    a.speech_created("s1", at=1002.458)
    a.user_turn("item1", {**USER_METRICS, "stopped_speaking_at": 1.0}, "s1", at=1002.558)
    [turn] = a.agent_speaking("s1", FIRST_AUDIO, {}, at=FIRST_AUDIO)
    assert set(turn.latency_ms) == set()
    assert a.skipped["stopped_speaking_at_unusable"] == 1


# -- expiry, close, memory ------------------------------------------------------------------


def test_expire_finishes_a_reply_whose_llm_metrics_never_arrive_after_max_wait() -> None:
    a = TurnAssembler(max_wait_s=5.0)
    _speech_and_user(a)
    assert _first_audio(a) == []
    assert a.expire(FIRST_AUDIO + 4.99) == []
    [turn] = a.expire(FIRST_AUDIO + 5.0)
    assert turn.latency_ms["llm_ttft"] == pytest.approx(251.2)  # LiveKit's early figure
    assert "llm_ttft" not in turn.stages  # no start time: no span placed
    assert turn.latency_ms["e2e"] == pytest.approx(466.7)
    assert a.expire(FIRST_AUDIO + 100.0) == []
    assert a.pending == 0


def test_any_later_event_expires_a_stale_reply() -> None:
    a = TurnAssembler(max_wait_s=1.0)
    _speech_and_user(a)
    _first_audio(a)
    [turn] = a.speech_created("s9", at=FIRST_AUDIO + 2.0)
    assert turn.speech_id == "s1"


def test_reply_that_never_starts_is_finished_after_max_latency() -> None:
    a = TurnAssembler()
    _speech_and_user(a)
    assert a.expire(1002.558 + MAX_LATENCY_S - 1.0) == []
    [turn] = complete(a.expire(1002.558 + MAX_LATENCY_S))
    assert "e2e" not in turn.latency_ms
    assert a.skipped["reply_never_started"] == 1


def test_close_flushes_pending_turns_and_ignores_later_user_turns() -> None:
    a = TurnAssembler()
    _speech_and_user(a)
    _first_audio(a)  # waiting for LLM metrics
    first, turn = a.close(at=1003.0)
    assert (first.complete, turn.complete) == (False, True)
    assert turn.speech_id == "s1"
    assert turn.latency_ms["e2e"] == pytest.approx(466.7)
    assert a.pending == 0
    assert a.user_turn("item2", {"stopped_speaking_at": 1003.5}, "s1", at=1004.0) == []
    assert a.close(at=1005.0) == []


def test_memory_stays_bounded_over_ten_thousand_speeches() -> None:
    a = TurnAssembler()
    emitted = 0
    for i in range(10_000):
        t = 2000.0 + i
        emitted += len(a.speech_created(f"s{i}", at=t))
        if i % 3 == 0:  # greeting-like
            emitted += len(a.agent_speaking(f"s{i}", t + 0.2, {"llm_node_ttft": 0.1}, at=t + 0.2))
        elif i % 3 == 1:  # answered
            metrics = {"stopped_speaking_at": t - 0.3, "transcription_delay": 0.1}
            emitted += len(a.user_turn(f"i{i}", metrics, f"s{i}", at=t + 0.01))
            emitted += len(a.agent_speaking(f"s{i}", t + 0.3, {}, at=t + 0.3))
        else:  # preemptive, discarded
            emitted += len(a.llm_metrics(f"s{i}", ended_at=t, duration_s=0.1, ttft_s=0.05, at=t))
        assert len(a._speeches) <= MAX_TRACKED_SPEECHES
        assert len(a._seen_items) <= MAX_TRACKED_SPEECHES
        assert len(a._agent_turns) <= MAX_TRACKED_SPEECHES
        assert len(a._open) <= MAX_TRACKED_SPEECHES
    emitted += len(a.close(at=20_000.0))
    assert emitted == 2 * (3334 + 3333)  # each reported live, then complete
    assert a.pending == 0


# -- bad values -----------------------------------------------------------------------------

BAD_VALUES: dict[str, object] = {
    "nan": math.nan,
    "inf": math.inf,
    "-inf": -math.inf,
    "negative": -1.0,
    "string": "0.2",
    "none": None,
    "huge": 1e9,
}
# fields where None means "not reported" (a pipeline without that stage), not a bad value
OPTIONAL_FIELDS = {
    "stopped_speaking_at",
    "transcription_delay",
    "end_of_turn_delay",
    "llm_node_ttft",
    "tts_node_ttfb",
    "playback_latency",
    "input_tokens",
    "output_tokens",
}
FIELDS = [
    ("user_state", "created_at"),
    ("user_turn", "stopped_speaking_at"),
    ("user_turn", "transcription_delay"),
    ("user_turn", "end_of_turn_delay"),
    ("agent_speaking", "started_at"),
    ("agent_speaking", "llm_node_ttft"),
    ("agent_speaking", "tts_node_ttfb"),
    ("agent_speaking", "playback_latency"),
    ("llm_metrics", "ended_at"),
    ("llm_metrics", "duration_s"),
    ("llm_metrics", "ttft_s"),
    ("llm_metrics", "input_tokens"),
    ("llm_metrics", "output_tokens"),
    ("tools_executed", "started_at"),
    ("tools_executed", "ended_at"),
    ("tools_executed", "calls"),
]
FIRST_ARRIVAL, LAST_ARRIVAL = 1002.458, 1004.0


def _turn_with(method: str, key: str, value: object) -> tuple[TurnAssembler, list[Turn]]:
    """The recorded turn (plus a tool call) with one field replaced by `value`."""
    a = TurnAssembler()

    def bad(m: str, k: str, default: Any) -> Any:
        return value if (m, k) == (method, key) else default

    out = a.speech_created("s1", at=1002.458)
    out += a.user_state("listening", created_at=bad("user_state", key, 1002.306), at=1002.557)
    metrics = {k: bad("user_turn", k, v) for k, v in USER_METRICS.items()}
    out += a.user_turn("item1", metrics, "s1", at=1002.558)
    out += a.tools_executed(
        "s1",
        bad("tools_executed", "started_at", 1002.6),
        bad("tools_executed", "ended_at", 1002.65),
        bad("tools_executed", "calls", 1),
        at=1002.65,
    )
    early = {k: bad("agent_speaking", k, v) for k, v in EARLY.items()}
    out += a.agent_speaking("s1", bad("agent_speaking", "started_at", FIRST_AUDIO), early, 1002.773)
    out += a.llm_metrics(
        "s1",
        ended_at=bad("llm_metrics", "ended_at", LLM_ENDED),
        duration_s=bad("llm_metrics", "duration_s", LLM_DURATION),
        ttft_s=bad("llm_metrics", "ttft_s", LLM_TTFT),
        model="m",
        provider="p",
        input_tokens=bad("llm_metrics", "input_tokens", 48),
        output_tokens=bad("llm_metrics", "output_tokens", 12),
        at=1002.911,
    )
    out += a.speech_done("s1", interrupted=False, at=1003.5)
    out += a.close(at=LAST_ARRIVAL)
    return a, out


def _cases() -> list[Any]:
    return [
        pytest.param(method, key, value, id=f"{method}.{key}-{label}")
        for method, key in FIELDS
        for label, value in BAD_VALUES.items()
    ]


@pytest.mark.parametrize(("method", "key", "value"), _cases())
def test_bad_value_never_raises_nor_yields_a_negative_nan_or_absurd_number(
    method: str, key: str, value: object
) -> None:
    _, turns = _turn_with(method, key, value)
    assert len(live(turns)) == len(complete(turns)) == 1
    _assert_sane(turns)


def test_negative_token_counts_are_not_reported() -> None:
    a = TurnAssembler()
    _speech_and_user(a)
    a.llm_metrics(
        "s1",
        ended_at=1002.9,
        duration_s=0.4,
        ttft_s=0.2,
        input_tokens=-5,
        output_tokens=-7,
        at=1002.9,
    )
    [turn] = _first_audio(a)
    _assert_sane([turn])


UNCOUNTED = "the bad value is dropped silently, nothing added to `skipped`"
NON_FINITE = ("nan", "inf", "-inf", "string")


@pytest.mark.parametrize(("method", "key", "value"), _cases())
def test_bad_value_is_counted_in_skipped(method: str, key: str, value: object) -> None:
    if value is None and key in OPTIONAL_FIELDS:
        pytest.skip("None is 'not reported' for this field, not a bad value")
    a, _ = _turn_with(method, key, value)
    assert sum(a.skipped.values()) >= 1


MISPLACED = "turns.py:{}: {} is not checked against the arrival time; stage placed decades away"


@pytest.mark.parametrize(("method", "key", "value"), _cases())
def test_bad_value_never_moves_the_turn_or_its_stages_away_from_when_it_happened(
    method: str, key: str, value: object
) -> None:
    _, turns = _turn_with(method, key, value)
    low, high = FIRST_ARRIVAL - MAX_CLOCK_SKEW_S, LAST_ARRIVAL + MAX_CLOCK_SKEW_S
    for turn in turns:
        for at in (turn.started_at, turn.ended_at):
            assert low <= at <= high, (turn.started_at, turn.ended_at)
        for name, stage in turn.stages.items():
            assert low <= stage.start <= stage.end <= high, (name, stage)


@pytest.mark.parametrize("at", [math.nan, math.inf, -math.inf, -1.0, 1e12])
def test_bad_arrival_time_never_raises_nor_yields_a_bad_latency(at: float) -> None:
    a = TurnAssembler()
    calls: list[Callable[[], list[Turn]]] = [
        lambda: a.speech_created("s1", at=at),
        lambda: a.user_state("listening", created_at=1002.306, at=at),
        lambda: a.user_turn("item1", USER_METRICS, "s1", at=at),
        lambda: a.agent_speaking("s1", FIRST_AUDIO, EARLY, at=at),
        lambda: a.tools_executed("s1", 1002.6, 1002.65, 1, at=at),
        lambda: a.llm_metrics("s1", ended_at=LLM_ENDED, duration_s=0.45, ttft_s=0.25, at=at),
        lambda: a.speech_done("s1", interrupted=False, at=at),
        lambda: a.expire(at),
        lambda: a.close(at=at),
    ]
    turns: list[Turn] = []
    for call in calls:
        turns += call()
    a.user_barge_in(at=at)
    assert len(complete(turns)) <= 1 and len(live(turns)) <= 1
    _assert_sane(turns)


# -- the complete record: what happened after the first audio -----------------------------


def test_tools_and_llm_rounds_after_the_first_audio_belong_to_the_turn() -> None:
    a = TurnAssembler()
    _speech_and_user(a)
    _first_audio(a)
    [first] = _llm(a)  # "let me check" played; the LLM then called a tool
    assert first.tool_calls == 0 and first.llm_rounds == 1
    # LiveKit runs tools outside the current-speech slot: no speech id on the event
    assert a.tools_executed(None, 1003.0, 1003.4, 2, at=1003.4) == []
    assert a.llm_metrics("s1", ended_at=1003.9, duration_s=0.4, ttft_s=0.2, at=1003.9) == []
    [turn] = a.speech_done("s1", interrupted=False, at=1005.0)
    assert turn.complete and not turn.interrupted
    assert turn.tool_calls == 2 and turn.tool_ms == pytest.approx(400.0)
    assert turn.llm_rounds == 2 and "llm_round_2" in turn.stages
    assert turn.stages["tool"] == Stage(1003.0, 1003.4)
    assert turn.latency_ms == first.latency_ms  # latency is what went live at first audio
    assert not a.skipped


def test_a_reply_played_out_reports_how_long_it_played() -> None:
    a = TurnAssembler()
    _recorded_turn(a)
    [turn] = a.speech_done("s1", interrupted=False, at=FIRST_AUDIO + 2.5)
    assert turn.played_ms == pytest.approx(2500.0)
    assert turn.ended_at == FIRST_AUDIO + 2.5 and not turn.interrupted


def test_events_after_the_complete_record_change_nothing() -> None:
    a = TurnAssembler()
    _recorded_turn(a)
    a.speech_done("s1", interrupted=False, at=1004.0)
    assert a.tools_executed("s1", 1004.1, 1004.2, 1, at=1004.2) == []
    assert a.llm_metrics("s1", ended_at=1004.5, duration_s=0.2, ttft_s=0.1, at=1004.5) == []
    assert a.speech_done("s1", interrupted=True, at=1004.6) == []
    assert a.skipped["tools_without_reply"] == 1
    assert a.skipped["llm_metrics_after_reply"] == 1


def test_a_reply_evicted_before_its_end_is_completed_not_lost() -> None:
    a = TurnAssembler()
    _recorded_turn(a)  # s1 reported live, still playing
    out: list[Turn] = []
    for i in range(MAX_TRACKED_SPEECHES + 1):
        out += a.speech_created(f"x{i}", at=1004.0 + i)
    [turn] = complete(out)
    assert turn.speech_id == "s1" and turn.complete
    assert a.skipped["evicted_unfinished_reply"] == 1


def test_what_a_new_agent_says_first_answers_the_waiting_user_turn() -> None:
    """An AgentTask started from a tool: its question is what the caller hears next (LiveKit
    gives that speech the user turn's e2e too); the parent's reply after the task is its own."""
    a = TurnAssembler()
    _speech_and_user(a)  # s1 answers the user turn, then calls a tool that runs a task
    a.agent_entered(at=1002.7)  # the task takes over
    a.speech_created("ask", at=1002.71, said=True)  # its on_enter says its question
    [question] = a.agent_speaking("ask", FIRST_AUDIO, {}, at=FIRST_AUDIO)
    assert question.kind == "user" and question.index == 1
    assert question.latency_ms["e2e"] == pytest.approx(466.7)
    [asked] = a.speech_done("ask", interrupted=False, at=1003.4)  # the question played out
    assert asked.complete and asked.index == 1
    assert a.tools_executed(None, 1003.0, 1004.0, 1, at=1004.0) == []  # the parent's tool
    [parent] = a.agent_speaking("s1", 1004.5, {}, at=1004.5)
    assert parent.kind == "agent" and parent.index == 2 and "e2e" not in parent.latency_ms
    [done] = a.speech_done("s1", interrupted=False, at=1005.0)
    assert done.tool_calls == 1 and not a.skipped


def test_a_handoff_with_no_user_turn_waiting_changes_nothing() -> None:
    a = TurnAssembler()
    a.agent_entered(at=1000.0)  # the session's first agent starts
    a.speech_created("hello", at=1000.1)
    [greeting] = a.agent_speaking("hello", 1000.5, {}, at=1000.5)
    assert greeting.kind == "agent" and greeting.index == 1
