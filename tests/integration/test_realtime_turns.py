"""Realtime (speech-to-speech) models through a real AgentSession.

A scripted `RealtimeModel` (tests/realtime.py) plays a server-side-VAD provider: speech started /
stopped events, a response created at the stop, its audio `ttft_s` later, the input transcript,
`RealtimeModelMetrics` as the OpenAI plugin builds them. Each scenario is checked against the
script's ground truth and against LiveKit's own `ChatMessage.metrics` on `session.history`.

What a realtime turn can report: `e2e` from the caller's real speech end when the session
receives the caller's audio (lk_observe hears it), else from the server's speech-stopped event
(LiveKit's `InputSpeechStoppedEvent` carries no time of its own, so that is the earliest speech
end a client can know); `vad`, the server VAD's wait, when the speech end was heard; the model's
own `llm_ttft` when its metrics measured one; no STT, no end-of-turn delay, no TTS (the model
speaks).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest
from livekit.agents import llm
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import lk_observe
from lk_observe.turns import tier_for
from tests.otel import memory_tracing, turn_root
from tests.realtime import (
    INPUT_TOKENS,
    MODEL,
    OUTPUT_TOKENS,
    RealtimeTruth,
    RealtimeTurn,
    build_realtime_pipeline,
    run_realtime,
)

E2E_TOLERANCE_MS = 5.0  # against the script's clocks
LIVEKIT_TOLERANCE_MS = 1.0  # against LiveKit's own figures for the same reply
NO_SUCH_COMPONENT = {"stt", "eou", "tts_ttfb"}  # a realtime model has no STT, EOU wait or TTS


@dataclass
class Played:
    turns: list[lk_observe.Turn]
    messages: list[llm.ChatMessage]
    truth: list[RealtimeTruth]
    registry: CollectorRegistry
    exporter: InMemorySpanExporter
    handle: lk_observe.InstrumentHandle

    def sample(self, name: str, **labels: str) -> float | None:
        if name.startswith("voice_agent_latency_seconds"):  # no provider/model unless given
            labels = {"provider": "", "model": "", **labels}
        return self.registry.get_sample_value(name, {"agent": "default", **labels})

    def replies(self) -> list[llm.ChatMessage]:
        return [m for m in self.messages if m.role == "assistant"]


def play(script: list[RealtimeTurn], *, with_caller_audio: bool = False) -> Played:
    async def go() -> Played:
        provider, exporter = memory_tracing()
        registry = CollectorRegistry()
        pipeline = build_realtime_pipeline(script, with_caller_audio=with_caller_audio)
        turns: list[lk_observe.Turn] = []
        handle = lk_observe.instrument(
            pipeline.session,
            tracer_provider=provider,
            registry=registry,
            monitor=lk_observe.LatencyMonitor(),
            on_turn=turns.append,
        )
        await run_realtime(pipeline)
        assert await asyncio.to_thread(lk_observe.flush, 10.0)
        await asyncio.sleep(0.05)  # on_turn hand-backs run on this loop
        messages = [item for item in pipeline.session.history.items if item.type == "message"]
        return Played(turns, messages, pipeline.model.truth, registry, exporter, handle)

    return asyncio.run(go())


def livekit_played_ms(message: llm.ChatMessage) -> float:
    metrics = message.metrics or {}
    return (metrics["stopped_speaking_at"] - metrics["started_speaking_at"]) * 1000.0


def assert_every_turn_once_in_order(played: Played, count: int) -> None:
    assert [t.index for t in played.turns] == list(range(1, count + 1))
    assert all(t.complete and t.kind == "user" for t in played.turns)
    assert played.handle.turns_emitted == count
    roots = [s for s in played.exporter.get_finished_spans() if s.name == "voice.turn"]
    assert len(roots) == count
    assert {t.trace_id for t in played.turns} == {r.context.trace_id for r in roots if r.context}


def assert_e2e_as_observable(played: Played) -> None:
    """e2e to the first audio played, per the script: from the caller's real speech end when
    the caller's audio was heard, else from the server's speech-stopped event."""
    for turn, truth in zip(played.turns, played.truth, strict=True):
        if turn.e2e_source == "input_audio":
            expected = truth.perceived_e2e_ms
        else:
            assert turn.e2e_source == "livekit"
            expected = truth.observable_e2e_ms
        assert turn.latency_ms["e2e"] == pytest.approx(expected, abs=E2E_TOLERANCE_MS)
        assert turn.tier == tier_for(turn.latency_ms["e2e"])


# -- two plain turns: the model measured its ttft for the first, reported -1 for the second ----


@pytest.fixture(scope="module")
def plain() -> Played:
    return play([RealtimeTurn(), RealtimeTurn(report_ttft=False)], with_caller_audio=True)


def test_a_realtime_turn_reports_e2e_and_no_pipeline_components(plain: Played) -> None:
    assert_every_turn_once_in_order(plain, 2)
    assert_e2e_as_observable(plain)
    for turn in plain.turns:
        assert not NO_SUCH_COMPONENT & set(turn.latency_ms)
        assert not turn.interrupted and turn.tool_calls == 0
    # both turns went live at their first audio; nothing was cut short
    assert plain.sample("voice_agent_latency_seconds_count", component="e2e") == 2.0
    assert plain.sample("voice_agent_interruptions_total") == 0.0
    assert not plain.handle.skipped.get("speaking_without_speech")


def test_played_ms_agrees_with_livekit(plain: Played) -> None:
    replies = plain.replies()
    assert len(replies) == 2 and not any(m.interrupted for m in replies)
    for turn, message in zip(plain.turns, replies, strict=True):
        assert turn.played_ms == pytest.approx(livekit_played_ms(message), abs=LIVEKIT_TOLERANCE_MS)
        assert turn.played_ms == pytest.approx(600.0, abs=60.0)  # the script's 0.6 s of audio
        # LiveKit itself stores no e2e_latency for a server-VAD realtime reply: its speech end
        # comes from a local VAD/STT, and there is none; lk_observe's e2e is its own
        assert "e2e_latency" not in (message.metrics or {})
        assert (message.metrics or {})["started_speaking_at"] == pytest.approx(
            turn.stages["e2e"].end, abs=0.002
        )


def test_a_ttft_the_model_did_not_measure_is_not_reported(plain: Played) -> None:
    assert "llm_ttft" not in plain.turns[1].latency_ms
    assert plain.handle.skipped["llm_ttft_not_reported"] == 1


def test_the_server_vads_wait_is_measured_from_the_heard_speech_end(plain: Played) -> None:
    for turn, truth in zip(plain.turns, plain.truth, strict=True):
        assert truth.speech_end is not None and truth.speech_stopped is not None
        waited_ms = (truth.speech_stopped - truth.speech_end) * 1000.0
        assert turn.latency_ms["vad"] == pytest.approx(waited_ms, abs=E2E_TOLERANCE_MS)
        assert turn.latency_ms["vad"] == pytest.approx(200.0, abs=20.0)  # server_vad_s


def test_without_the_callers_audio_no_vad_and_e2e_from_the_server_stop(
    barge_in: Played,
) -> None:
    for turn in barge_in.turns:
        assert "vad" not in turn.latency_ms  # a decision stamped on arrival measures nothing
        assert turn.e2e_source == "livekit"


def test_a_ttft_the_model_measured_is_reported_with_its_tokens(plain: Played) -> None:
    turn, truth = plain.turns[0], plain.truth[0]
    [response] = truth.responses
    assert turn.latency_ms["llm_ttft"] == pytest.approx(
        response.ttft_reported * 1000.0, abs=E2E_TOLERANCE_MS
    )
    # placed from the response's creation (RealtimeModelMetrics.timestamp), not its end
    assert turn.stages["llm_ttft"].start == pytest.approx(response.created, abs=0.005)
    assert turn.llm_rounds == 1 and turn.llm_model == MODEL
    assert (turn.input_tokens, turn.output_tokens) == (INPUT_TOKENS, OUTPUT_TOKENS)


def test_e2e_is_the_callers_perceived_wait(plain: Played) -> None:
    """A server VAD sends input_speech_stopped only after its silence window (server_vad_s=0.2
    here), and nothing LiveKit emits carries the real speech end: the caller's audio does."""
    for turn, truth in zip(plain.turns, plain.truth, strict=True):
        assert turn.e2e_source == "input_audio"  # the model's reply audio is silent here
        assert turn.latency_ms["e2e"] == pytest.approx(truth.perceived_e2e_ms, abs=E2E_TOLERANCE_MS)


# -- the user barges in one second into a 2.5 s reply -------------------------------------------


@pytest.fixture(scope="module")
def barge_in() -> Played:
    return play([RealtimeTurn(reply_audio_s=2.5, barge_in_after_s=1.0), RealtimeTurn()])


def test_a_reply_the_user_cuts_off_after_its_first_audio_is_interrupted(barge_in: Played) -> None:
    assert_every_turn_once_in_order(barge_in, 2)
    assert_e2e_as_observable(barge_in)
    cut, after = barge_in.turns
    first, second = barge_in.replies()
    assert cut.interrupted and first.interrupted  # LiveKit's own word for it
    assert not after.interrupted and not second.interrupted
    assert cut.played_ms == pytest.approx(livekit_played_ms(first), abs=LIVEKIT_TOLERANCE_MS)
    assert cut.played_ms == pytest.approx(1000.0, abs=100.0)  # barge-in 1 s into 2.5 s of audio
    assert barge_in.sample("voice_agent_interruptions_total") == 1.0
    assert barge_in.sample("voice_agent_latency_seconds_count", component="e2e") == 2.0
    root = turn_root(barge_in.exporter, cut.trace_id)
    attrs = dict(root.attributes or {})
    assert attrs["voice.turn.interrupted"] is True
    assert attrs["voice.reply.played_ms"] == pytest.approx(cut.played_ms, abs=0.001)


# -- a response that calls a tool, then the tool reply speaks -----------------------------------


@pytest.fixture(scope="module")
def tool_call() -> Played:
    return play([RealtimeTurn(tool_s=0.4), RealtimeTurn()])


def test_a_tool_call_belongs_to_its_turn(tool_call: Played) -> None:
    assert_every_turn_once_in_order(tool_call, 2)
    assert_e2e_as_observable(tool_call)  # to the tool reply's first audio
    with_tool, plain_turn = tool_call.turns
    truth = tool_call.truth[0]
    assert truth.tool is not None and len(truth.responses) == 2  # the call, then the tool reply
    assert with_tool.tool_calls == 1 and plain_turn.tool_calls == 0
    started, ended = truth.tool
    assert with_tool.stages["tool"].start == pytest.approx(started, abs=0.005)
    assert with_tool.stages["tool"].end == pytest.approx(ended, abs=0.005)
    assert with_tool.tool_ms == pytest.approx(400.0, abs=50.0)
    assert not with_tool.interrupted
    [reply, _] = tool_call.replies()
    assert with_tool.played_ms == pytest.approx(livekit_played_ms(reply), abs=LIVEKIT_TOLERANCE_MS)
    assert not tool_call.handle.skipped.get("tools_without_reply")
    assert tool_call.sample("voice_agent_latency_seconds_count", component="e2e") == 2.0
