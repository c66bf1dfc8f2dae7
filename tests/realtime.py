"""A scripted realtime (speech-to-speech) model for real AgentSessions: no network, known delays.

Shaped after livekit/agents' own `tests/fake_realtime.py`, but it plays a timeline the way a
server-side-VAD provider (OpenAI Realtime) does: `input_speech_started` when the user starts,
`input_speech_stopped` once its VAD has heard `server_vad_s` of silence after the real speech end,
a response created at that moment (`generation_created`), its first audio `ttft_s` later (24 kHz
silence of a known length, with a text stream), the input transcription `transcript_s` after the
stop, and, when the response is done, `RealtimeModelMetrics` exactly as the OpenAI plugin builds
them (`timestamp` = response creation, `duration` = creation to done, `ttft` = creation to first
audio, or -1). A response can call a tool instead of speaking: LiveKit runs it, then asks for the
tool reply with `generate_reply()` (`auto_tool_reply_generation=False`).

Everything that happened is written down in `RealtimeTruth` (unix seconds); the audio output
(`lk_observe.demo.ScriptedAudioOutput`) notes when each reply's first frame played.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from livekit import rtc
from livekit.agents import NOT_GIVEN, Agent, AgentSession, NotGivenOr, function_tool, utils
from livekit.agents.llm import (
    ChatContext,
    FunctionCall,
    GenerationCreatedEvent,
    InputSpeechStartedEvent,
    InputSpeechStoppedEvent,
    InputTranscriptionCompleted,
    MessageGeneration,
    RealtimeCapabilities,
    RealtimeModel,
    RealtimeSession,
)
from livekit.agents.llm.tool_context import Tool, ToolChoice, ToolContext
from livekit.agents.metrics import RealtimeModelMetrics
from livekit.agents.metrics.base import Metadata

from lk_observe.demo import SAMPLE_RATE, ScriptedAudioOutput
from lk_observe.demo_audio import (
    INPUT_RATE,
    PacedAudioInput,
    last_voiced_sample,
    noise_floor,
    synthetic_voice,
)

FRAME_S = 0.02  # audio is sent in 20 ms frames, as providers stream it
MODEL, PROVIDER = "scripted-realtime", "lk_observe"
INPUT_TOKENS, OUTPUT_TOKENS = 40, 25


@dataclass(frozen=True)
class RealtimeTurn:
    """One user utterance and how the scripted server answers it (seconds)."""

    speech_s: float = 0.8
    server_vad_s: float = 0.2  # silence the server's VAD waits before input_speech_stopped
    transcript_s: float = 0.1  # input_speech_stopped -> input transcription completed
    ttft_s: float = 0.3  # response created (at input_speech_stopped) -> its first audio
    reply_audio_s: float = 0.6
    report_ttft: bool = True  # False: the metrics say ttft=-1, as plugins do when unknown
    tool_s: float | None = None  # the response calls `lookup` (no audio), which takes this long
    barge_in_after_s: float | None = None  # the next utterance starts this long after first audio
    gap_s: float = 0.5  # silence between the end of the reply and the next utterance


@dataclass
class Response:
    """One server response (a generation), as the server saw it."""

    response_id: str
    created: float
    first_audio: float | None = None  # first frame sent
    done: float | None = None
    cancelled: bool = False
    ttft_reported: float = -1.0


@dataclass
class RealtimeTruth:
    """When each part of one scripted turn really happened (unix seconds)."""

    speech_start: float | None = None
    speech_end: float | None = None  # the user's real speech end
    speech_stopped: float | None = None  # input_speech_stopped sent (server VAD decided)
    transcript: float | None = None
    responses: list[Response] = field(default_factory=list)
    tool: tuple[float, float] | None = None
    first_audio_played: float | None = None

    @property
    def perceived_e2e_ms(self) -> float:
        """Real speech end -> first audio played: what the caller waited."""
        assert self.speech_end is not None and self.first_audio_played is not None
        return (self.first_audio_played - self.speech_end) * 1000.0

    @property
    def observable_e2e_ms(self) -> float:
        """input_speech_stopped -> first audio played: the earliest speech end a client sees
        (LiveKit's InputSpeechStoppedEvent carries no time of its own)."""
        assert self.speech_stopped is not None and self.first_audio_played is not None
        return (self.first_audio_played - self.speech_stopped) * 1000.0


def user_text(i: int) -> str:
    return f"user utterance {i}"


def reply_text(i: int) -> str:
    return f"R{i}: here is the answer."


@dataclass(frozen=True)
class _Utterance:
    index: int
    start: float  # seconds on the timeline
    end: float
    turn: RealtimeTurn


def plan_timeline(turns: Sequence[RealtimeTurn], *, lead_s: float = 0.5) -> list[_Utterance]:
    out: list[_Utterance] = []
    t = lead_s
    for i, turn in enumerate(turns):
        start, end = t, t + turn.speech_s
        out.append(_Utterance(i, start, end, turn))
        first_audio = end + turn.server_vad_s + turn.ttft_s
        if turn.tool_s is not None:
            first_audio += turn.ttft_s + turn.tool_s  # the call, the tool, then the tool reply
        if turn.barge_in_after_s is not None:
            t = first_audio + turn.barge_in_after_s
        else:
            t = first_audio + turn.reply_audio_s + turn.gap_s + 0.3
    return out


def _capabilities() -> RealtimeCapabilities:
    return RealtimeCapabilities(
        message_truncation=True,
        turn_detection=True,  # server-side VAD: input_speech_started / input_speech_stopped
        user_transcription=True,
        auto_tool_reply_generation=False,  # LiveKit asks for the tool reply (generate_reply)
        audio_output=True,
        manual_function_calls=True,
        mutable_chat_context=True,
        mutable_instructions=True,
        mutable_tools=True,
    )


class ScriptedRealtimeModel(RealtimeModel):
    def __init__(self, turns: Sequence[RealtimeTurn]) -> None:
        super().__init__(capabilities=_capabilities())
        self.turns = list(turns)
        self.truth = [RealtimeTruth() for _ in turns]
        self.utterances = plan_timeline(turns)
        self.sessions: list[ScriptedRealtimeSession] = []

    @property
    def model(self) -> str:
        return MODEL

    @property
    def provider(self) -> str:
        return PROVIDER

    def session(self, *, turn_detection_disabled: bool = False) -> ScriptedRealtimeSession:
        session = ScriptedRealtimeSession(self)
        self.sessions.append(session)
        return session

    async def aclose(self) -> None:
        pass

    @property
    def duration_s(self) -> float:
        last = self.utterances[-1]
        t = last.turn
        return last.end + t.server_vad_s + 2 * t.ttft_s + (t.tool_s or 0.0) + t.reply_audio_s


class _Generation:
    """One response's streams, fed by the script."""

    def __init__(self, response: Response) -> None:
        self.response = response
        self.messages = utils.aio.Chan[MessageGeneration]()
        self.functions = utils.aio.Chan[FunctionCall]()
        self.text = utils.aio.Chan[str]()
        self.audio = utils.aio.Chan[rtc.AudioFrame]()
        self.task: asyncio.Task[None] | None = None

    def close(self) -> None:
        for ch in (self.text, self.audio, self.messages, self.functions):
            ch.close()


class ScriptedRealtimeSession(RealtimeSession):
    def __init__(self, model: ScriptedRealtimeModel) -> None:
        super().__init__(model)
        self._model = model
        self._chat_ctx = ChatContext.empty()
        self._tools = ToolContext.empty()
        self._current: _Generation | None = None
        self._responses = 0
        self._tool_reply_for: int | None = None  # the turn whose tool reply is asked for next
        self.interrupts = 0
        self.generate_reply_calls = 0

    # -- the script ---------------------------------------------------------------------------

    async def play(self, zero: float | None = None) -> None:
        """Play every utterance on the timeline (zero: a perf_counter() reading, default now);
        returns when the last was heard."""
        zero = time.perf_counter() if zero is None else zero
        origin = time.time() - (time.perf_counter() - zero)

        async def until(t: float) -> None:
            delay = t - (time.perf_counter() - zero)
            if delay > 0:
                await asyncio.sleep(delay)

        for u in self._model.utterances:
            truth = self._model.truth[u.index]
            await until(u.start)
            truth.speech_start = time.time()
            self.emit("input_speech_started", InputSpeechStartedEvent())
            await until(u.end + u.turn.server_vad_s)
            truth.speech_end = origin + u.end
            truth.speech_stopped = time.time()
            self.emit(
                "input_speech_stopped", InputSpeechStoppedEvent(user_transcription_enabled=True)
            )
            loop = asyncio.get_running_loop()
            loop.call_later(u.turn.transcript_s, self._transcribed, u.index)
            self._start_generation(u.index, user_initiated=False)

    def _transcribed(self, index: int) -> None:
        self._model.truth[index].transcript = time.time()
        self.emit(
            "input_audio_transcription_completed",
            InputTranscriptionCompleted(
                item_id=f"item_user_{index}", transcript=user_text(index), is_final=True
            ),
        )

    def _start_generation(self, index: int, *, user_initiated: bool) -> GenerationCreatedEvent:
        self._responses += 1
        response = Response(f"resp_{self._responses}", created=time.time())
        self._model.truth[index].responses.append(response)
        gen = self._current = _Generation(response)
        ev = GenerationCreatedEvent(
            message_stream=gen.messages,
            function_stream=gen.functions,
            user_initiated=user_initiated,
            response_id=response.response_id,
        )
        turn = self._model.turns[index]
        calls_tool = turn.tool_s is not None and not user_initiated
        gen.task = asyncio.create_task(self._generate(gen, index, turn, calls_tool))
        if not user_initiated:
            self.emit("generation_created", ev)
        return ev

    async def _generate(
        self, gen: _Generation, index: int, turn: RealtimeTurn, calls_tool: bool
    ) -> None:
        response = gen.response
        try:
            await asyncio.sleep(turn.ttft_s)
            if gen.response.cancelled:
                return
            if calls_tool:
                self._tool_reply_for = index
                gen.functions.send_nowait(
                    FunctionCall(
                        call_id=f"call_{index}", name="lookup", arguments=f'{{"turn": {index}}}'
                    )
                )
                return
            modalities: asyncio.Future[list[Literal["text", "audio"]]] = asyncio.Future()
            modalities.set_result(["audio", "text"])
            gen.messages.send_nowait(
                MessageGeneration(
                    message_id=f"item_{response.response_id}",
                    text_stream=gen.text,
                    audio_stream=gen.audio,
                    modalities=modalities,
                )
            )
            response.first_audio = time.time()
            if turn.report_ttft:
                response.ttft_reported = response.first_audio - response.created
            gen.text.send_nowait(reply_text(index))
            samples, chunk = int(SAMPLE_RATE * turn.reply_audio_s), int(SAMPLE_RATE * FRAME_S)
            for offset in range(0, samples, chunk):
                n = min(chunk, samples - offset)
                gen.audio.send_nowait(
                    rtc.AudioFrame(
                        data=b"\x00\x00" * n,
                        sample_rate=SAMPLE_RATE,
                        num_channels=1,
                        samples_per_channel=n,
                    )
                )
        finally:
            gen.close()
            response.done = time.time()
            if self._current is gen:
                self._current = None
            self._emit_metrics(response)

    def _emit_metrics(self, response: Response) -> None:
        duration = response.done - response.created if response.done else 0.0
        self.emit(
            "metrics_collected",
            RealtimeModelMetrics(
                timestamp=response.created,  # as the OpenAI plugin: the response's creation
                request_id=response.response_id,
                ttft=response.ttft_reported,
                duration=duration,
                cancelled=response.cancelled,
                label=self._model.label,
                input_tokens=INPUT_TOKENS,
                output_tokens=OUTPUT_TOKENS,
                total_tokens=INPUT_TOKENS + OUTPUT_TOKENS,
                tokens_per_second=OUTPUT_TOKENS / duration if duration > 0 else 0.0,
                input_token_details=RealtimeModelMetrics.InputTokenDetails(),
                output_token_details=RealtimeModelMetrics.OutputTokenDetails(),
                metadata=Metadata(model_name=MODEL, model_provider=PROVIDER),
            ),
        )

    # -- RealtimeSession ----------------------------------------------------------------------

    @property
    def chat_ctx(self) -> ChatContext:
        return self._chat_ctx

    @property
    def tools(self) -> ToolContext:
        return self._tools

    async def update_instructions(self, instructions: str) -> None:
        pass

    async def update_chat_ctx(self, chat_ctx: ChatContext) -> None:
        self._chat_ctx = chat_ctx

    async def update_tools(self, tools: list[Tool]) -> None:
        self._tools = ToolContext(tools)

    def update_options(self, *, tool_choice: NotGivenOr[ToolChoice | None] = NOT_GIVEN) -> None:
        pass

    def push_audio(self, frame: rtc.AudioFrame) -> None:
        pass

    def push_video(self, frame: rtc.VideoFrame) -> None:
        pass

    def generate_reply(
        self,
        *,
        instructions: NotGivenOr[str] = NOT_GIVEN,
        tool_choice: NotGivenOr[ToolChoice] = NOT_GIVEN,
        tools: NotGivenOr[list[Tool]] = NOT_GIVEN,
    ) -> asyncio.Future[GenerationCreatedEvent]:
        """Only the tool reply is asked for this way in these scripts."""
        self.generate_reply_calls += 1
        fut: asyncio.Future[GenerationCreatedEvent] = asyncio.get_running_loop().create_future()
        index, self._tool_reply_for = self._tool_reply_for, None
        if index is None:
            fut.set_exception(RuntimeError("the script has no reply to generate"))
        else:
            fut.set_result(self._start_generation(index, user_initiated=True))
        return fut

    def commit_audio(self) -> None:
        pass

    def clear_audio(self) -> None:
        pass

    def interrupt(self) -> None:
        self.interrupts += 1
        gen = self._current
        if gen is not None:
            gen.response.cancelled = True

    def truncate(
        self,
        *,
        message_id: str,
        modalities: list[Literal["text", "audio"]],
        audio_end_ms: int,
        audio_transcript: NotGivenOr[str] = NOT_GIVEN,
    ) -> None:
        pass

    def say(self, text: str | AsyncIterable[str]) -> asyncio.Future[GenerationCreatedEvent]:
        raise NotImplementedError

    async def aclose(self) -> None:
        gen = self._current
        if gen is not None and gen.task is not None:
            gen.task.cancel()


class RealtimeAgent(Agent):
    def __init__(self, model: ScriptedRealtimeModel) -> None:
        super().__init__(instructions="You are a scripted realtime test agent.")
        self._model = model

    @function_tool
    async def lookup(self, turn: int) -> str:
        """Look something up for the caller."""
        started = time.time()
        await asyncio.sleep(self._model.turns[turn].tool_s or 0.0)
        self._model.truth[turn].tool = (started, time.time())
        return f"lookup-result-{turn}"


@dataclass
class RealtimePipeline:
    session: AgentSession[None]
    agent: RealtimeAgent
    model: ScriptedRealtimeModel
    output: ScriptedAudioOutput
    caller: PacedAudioInput | None = None


CALLER_NOISE_DBFS = -60.0


def caller_audio(utterances: Sequence[_Utterance], duration_s: float) -> PacedAudioInput:
    """The caller's microphone: a voice during each utterance (its last voiced sample at the
    utterance's end, the script's real speech end), a -60 dBFS noise floor elsewhere."""
    signal = noise_floor(int(duration_s * INPUT_RATE), CALLER_NOISE_DBFS, seed=11)
    for u in utterances:
        voice = synthetic_voice(u.end - u.start, seed=u.index)
        start = round(u.end * INPUT_RATE) - (last_voiced_sample(voice) + 1)
        signal[start : start + len(voice)] += voice
    return PacedAudioInput(signal)


def build_realtime_pipeline(
    turns: Sequence[RealtimeTurn], *, with_caller_audio: bool = False
) -> RealtimePipeline:
    """A real AgentSession on the scripted realtime model; play it with `run_realtime`. With
    `with_caller_audio` the session also receives the caller's audio (as a room would send it);
    without, the model alone hears the caller (a client that sends no audio frames)."""
    model = ScriptedRealtimeModel(turns)

    def on_first_frame(at: float) -> None:
        # the frame belongs to the newest turn whose reply sent audio and has not played yet
        for truth in reversed(model.truth):
            if any(r.first_audio for r in truth.responses):
                if truth.first_audio_played is None:
                    truth.first_audio_played = at
                return

    session: AgentSession[None] = AgentSession(
        llm=model,
        vad=None,  # no local VAD: the server's input_speech_started/stopped drive turn-taking
        turn_handling={"turn_detection": "realtime_llm"},
        aec_warmup_duration=None,
        session_close_transcript_timeout=0.05,
    )
    output = ScriptedAudioOutput(on_first_frame)
    session.output.audio = output
    caller = caller_audio(model.utterances, model.duration_s + 1.0) if with_caller_audio else None
    session.input.audio = caller
    return RealtimePipeline(session, RealtimeAgent(model), model, output, caller)


async def run_realtime(pipeline: RealtimePipeline, *, settle_s: float = 0.6) -> None:
    """Start the session, play the script, let the last reply play out, close the session."""
    session, model = pipeline.session, pipeline.model
    await session.start(pipeline.agent)
    rt = model.sessions[-1]
    started = time.perf_counter()
    caller = pipeline.caller
    player = asyncio.create_task(caller.play(zero=started)) if caller is not None else None
    await rt.play(zero=started)
    rest = model.duration_s + settle_s - (time.perf_counter() - started)
    if rest > 0:
        await asyncio.sleep(rest)
    if player is not None:
        player.cancel()
    await session.aclose()
