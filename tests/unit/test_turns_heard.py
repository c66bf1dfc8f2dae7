"""TurnAssembler with the audio's figures: the user's heard speech end, the reply's leading
silence (known at first audio or later), and the fallback to LiveKit's timestamps."""

from __future__ import annotations

import pytest

from lk_observe.turns import Turn, TurnAssembler

SPEECH_END = 1002.3063  # LiveKit's stopped_speaking_at: the VAD's estimate
HEARD_END = 1002.2101  # where the voice really stopped, ~96 ms earlier
VAD_DECIDED = 1002.857
FIRST_AUDIO = 1003.373
METRICS = {
    "stopped_speaking_at": SPEECH_END,
    "transcription_delay": 0.151,
    "end_of_turn_delay": 0.56,
}


def _user(a: TurnAssembler, heard: float | None = HEARD_END) -> list[Turn]:
    out = a.speech_created("s1", at=1002.458)
    out += a.user_state("listening", created_at=SPEECH_END, at=VAD_DECIDED)
    out += a.user_turn("item1", METRICS, "s1", at=1002.9, heard_end=heard)
    return out


def _speaking(a: TurnAssembler, **audio: object) -> list[Turn]:
    return a.agent_speaking("s1", FIRST_AUDIO, None, FIRST_AUDIO, **audio)  # type: ignore[arg-type]


def test_heard_end_and_leading_silence_make_the_callers_e2e() -> None:
    a = TurnAssembler()
    assert a.vad_decision() is None
    a.speech_created("s1", at=1002.458)
    a.user_state("listening", created_at=SPEECH_END, at=VAD_DECIDED)
    assert a.vad_decision() == (SPEECH_END, VAD_DECIDED)
    a.user_turn("item1", METRICS, "s1", at=1002.9, heard_end=HEARD_END)
    [turn] = _speaking(a, leading_silence_s=0.08)
    assert turn.e2e_source == "audio"
    assert turn.latency_ms["e2e"] == pytest.approx((FIRST_AUDIO + 0.08 - HEARD_END) * 1000)
    assert turn.latency_ms["leading_silence"] == pytest.approx(80.0)
    assert turn.stages["leading_silence"].start == FIRST_AUDIO
    assert turn.latency_ms["vad"] == pytest.approx((VAD_DECIDED - HEARD_END) * 1000)
    # stt and eou end where LiveKit says, and start at the heard end
    assert turn.stages["stt"].start == HEARD_END
    assert turn.stages["stt"].end == pytest.approx(SPEECH_END + 0.151)
    assert turn.livekit_e2e_ms == pytest.approx((FIRST_AUDIO - SPEECH_END) * 1000)
    assert turn.started_at == HEARD_END and turn.ended_at == pytest.approx(FIRST_AUDIO + 0.08)
    assert not a.skipped


def test_a_pending_leading_silence_holds_the_live_report_until_it_is_known() -> None:
    a = TurnAssembler()
    _user(a)
    assert _speaking(a, audible_pending=True) == []
    assert a.agent_audible("other", 0.05, at=FIRST_AUDIO + 0.1) == []  # not this reply's
    [turn] = a.agent_audible("s1", 0.12, at=FIRST_AUDIO + 0.2)
    assert turn.latency_ms["leading_silence"] == pytest.approx(120.0)
    assert a.agent_audible("s1", 0.5, at=FIRST_AUDIO + 0.3) == []  # settled once


@pytest.mark.parametrize(
    ("heard", "leading", "source"),
    [(None, None, "livekit"), (HEARD_END, None, "input_audio"), (None, 0.0, "output_audio")],
)
def test_each_end_falls_back_to_livekit_on_its_own(
    heard: float | None, leading: float | None, source: str
) -> None:
    a = TurnAssembler()
    _user(a, heard=heard)
    [turn] = _speaking(a, leading_silence_s=leading)
    assert turn.e2e_source == source
    start = HEARD_END if heard is not None else SPEECH_END
    assert turn.latency_ms["e2e"] == pytest.approx((FIRST_AUDIO - start) * 1000)
    assert ("leading_silence" in turn.latency_ms) == (leading is not None)


def test_a_reply_that_never_became_audible_reports_livekits_first_frame() -> None:
    a = TurnAssembler()
    _user(a)
    assert _speaking(a, audible_pending=True) == []
    [turn] = a.agent_audible("s1", None, at=FIRST_AUDIO + 2.0)
    assert turn.e2e_source == "input_audio" and "leading_silence" not in turn.latency_ms


def test_a_pending_verdict_that_never_comes_expires_with_livekits_frame() -> None:
    a = TurnAssembler(max_wait_s=1.0)
    _user(a)
    _speaking(a, audible_pending=True)
    [turn] = a.expire(FIRST_AUDIO + 1.0)
    assert turn.e2e_source == "input_audio"


@pytest.mark.parametrize("heard", [float("nan"), SPEECH_END - 5.0, 1002.95])
def test_an_unusable_heard_end_is_counted_and_livekits_is_used(heard: float) -> None:
    a = TurnAssembler()
    _user(a, heard=heard)  # NaN, far from LiveKit's, after the commit
    [turn] = _speaking(a)
    assert turn.e2e_source == "livekit"
    assert turn.latency_ms["e2e"] == pytest.approx((FIRST_AUDIO - SPEECH_END) * 1000)
    assert a.skipped == {"heard_speech_end_unusable": 1}


def test_an_unusable_leading_silence_is_counted() -> None:
    a = TurnAssembler()
    _user(a)
    [turn] = _speaking(a, leading_silence_s=-0.1)
    assert "leading_silence" not in turn.latency_ms
    assert a.skipped == {"leading_silence_unusable": 1}


def test_a_server_vad_decision_is_a_vad_stage_only_from_a_heard_end() -> None:
    """A realtime model's decision arrives stamped at its arrival (no back-dating)."""
    for heard, has_vad in ((None, False), (SPEECH_END - 0.2, True)):
        a = TurnAssembler()
        a.speech_created("s1", at=SPEECH_END)
        a.user_state("listening", created_at=SPEECH_END, at=SPEECH_END)
        a.user_turn(
            "i", {"stopped_speaking_at": SPEECH_END}, "s1", at=SPEECH_END + 0.01, heard_end=heard
        )
        [turn] = _speaking(a)
        assert ("vad" in turn.latency_ms) == has_vad
        if has_vad:
            assert turn.latency_ms["vad"] == pytest.approx(200.0)


def test_typed_input_ignores_a_heard_end() -> None:
    a = TurnAssembler()
    a.speech_created("s1", at=1002.0)
    a.user_turn("i", {}, "s1", at=1002.1, heard_end=1002.0)
    [turn] = _speaking(a, leading_silence_s=0.02)
    assert "e2e" not in turn.latency_ms and turn.e2e_source is None
    assert turn.livekit_e2e_ms is None and turn.latency_ms["leading_silence"] == pytest.approx(20.0)
