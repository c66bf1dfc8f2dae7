"""A scripted, headless voice pipeline: real AgentSession, scripted VAD/STT/LLM/TTS and audio I/O.

Every stage waits a known delay and writes down when it really happened (`GroundTruth`), so the
demo has realistic traffic with no LiveKit server or API key, and tests can check each latency
lk_observe reports against what the pipeline actually did.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from livekit import rtc
from livekit.agents import (
    NOT_GIVEN,
    Agent,
    AgentSession,
    AgentTask,
    APIConnectOptions,
    LanguageCode,
    NotGivenOr,
    UserInputTranscribedEvent,
    function_tool,
    llm,
    stt,
    tts,
    utils,
    vad,
)
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS
from livekit.agents.voice.io import AudioInput, AudioOutput, AudioOutputCapabilities, TextOutput

SAMPLE_RATE = 24000
_MIN_SPEECH_S = 0.05  # VAD needs this much speech before declaring its start
_VAD_UPDATE_S = 0.05
_NOISE_S = 0.3  # long enough for LiveKit to pause the reply (interruption min_duration 0.2)


@dataclass(frozen=True)
class SimulatedModel:
    """A simulated provider's model, named as a plugin names itself to LiveKit (its `provider`
    and `model`, which LiveKit copies into its metrics metadata). The provider's name starts
    with "sim-": the scripted pipeline calls nothing; only its latency is the model's."""

    provider: str
    model: str

    def __post_init__(self) -> None:
        if not self.provider.startswith("sim-"):
            raise ValueError(f"a simulated provider's name starts with 'sim-': {self.provider!r}")

    def __str__(self) -> str:
        return f"{self.provider}/{self.model}"


@dataclass(frozen=True)
class ScriptedTurn:
    """One user utterance and how fast each stage of the agent's reply is (seconds)."""

    speech_s: float = 0.8
    vad_s: float = 0.25
    stt_s: float = 0.15
    llm_ttft_s: float = 0.25
    llm_total_s: float = 0.45
    tts_ttfb_s: float = 0.06
    reply_audio_s: float = 0.6
    tool_s: float | None = None  # the LLM first calls a tool that takes this long
    barge_in_after_s: float | None = None  # the next utterance starts this long after speech end
    filler: bool = False  # the agent says "one moment" (session.say) before the LLM's reply
    speak_before_tool: bool = False  # with tool_s: the LLM says "let me check", then calls it
    typed: bool = False  # typed (generate_reply(user_input=...)) at its place on the timeline
    handoff: bool = False  # the LLM calls `transfer`: a tool that hands off to a new Agent
    task: bool = False  # the LLM calls `ask_consent`, which runs an AgentTask that asks; the
    # next utterance answers it (the task's LLM calls `confirm`), then the tool's result is answered
    noise_after_s: float | None = None  # a noise (VAD hears speech, STT nothing) this long
    # after the user's speech end: a false interruption the reply resumes after
    gap_s: float = 0.4  # silence between the end of the reply and the next utterance
    hook_s: float = 0.0  # on_user_turn_completed takes this long (a lookup before the reply)
    # the simulated provider each stage's request for this turn is routed to, as an A/B router
    # does (see `route_providers`); None: the scripted plugin's own name ("lk_observe")
    stt_model: SimulatedModel | None = None
    llm_model: SimulatedModel | None = None
    tts_model: SimulatedModel | None = None


@dataclass
class TurnTruth:
    """When each stage of one scripted turn really happened (unix seconds)."""

    speech_end: float | None = None
    vad_end: float | None = None
    stt_final: float | None = None
    eou: float | None = None
    llm_requests: list[tuple[float, float]] = field(default_factory=list)  # (start, first token)
    tts_first_text: float | None = None
    tts_first_audio: float | None = None
    first_audio_played: float | None = None
    tool: tuple[float, float] | None = None
    hook_end: float | None = None  # on_user_turn_completed returned (it started at `eou`)

    def latency_ms(self) -> dict[str, float]:
        """The components lk_observe measures (README, "What is measured"), from the pipeline's
        own clocks."""
        out: dict[str, float] = {}
        if self.speech_end is not None:
            for name, at in (
                ("vad", self.vad_end),
                ("stt", self.stt_final),
                ("eou", self.eou),
                ("e2e", self.first_audio_played),
            ):
                if at is not None:
                    out[name] = (at - self.speech_end) * 1000.0
        if self.llm_requests:
            start, first = self.llm_requests[0]
            out["llm_ttft"] = (first - start) * 1000.0
        if self.tts_first_text is not None and self.tts_first_audio is not None:
            out["tts_ttfb"] = (self.tts_first_audio - self.tts_first_text) * 1000.0
        return out


@dataclass
class GroundTruth:
    turns: list[TurnTruth]
    greeting: TurnTruth = field(default_factory=TurnTruth)
    fillers: dict[int, TurnTruth] = field(default_factory=dict)  # by user turn
    origin: float = 0.0  # unix time of the timeline's zero


def _user_text(i: int) -> str:
    return f"user utterance {i}"


def _reply_text(i: int) -> str:
    return f"R{i}: here is the answer."


def _tool_result(i: int) -> str:
    return f"lookup-result-{i}"


def _filler_text(i: int) -> str:
    return f"F{i}: one moment."


def _check_text(i: int) -> str:
    return f"C{i}: let me check."


def _task_text(i: int) -> str:
    return f"T{i}: please confirm."


GREETING_PROMPT = "greet the caller"
GREETING_TEXT = "Hello! How can I help?"


@dataclass(frozen=True)
class _Utterance:
    index: int
    start: float  # seconds on the timeline
    end: float
    turn: ScriptedTurn
    noise: bool = False  # heard by the VAD only: no words, no ground truth


def plan_timeline(turns: Sequence[ScriptedTurn], *, lead_s: float = 0.6) -> list[_Utterance]:
    """Place each utterance on the timeline so that replies and speech don't overlap unless a
    turn asks the next one to barge in."""
    out: list[_Utterance] = []
    t = lead_s
    for i, turn in enumerate(turns):
        start, end = t, t + turn.speech_s
        out.append(_Utterance(i, start, end, turn))
        if turn.noise_after_s is not None:
            noise_at = end + turn.noise_after_s
            out.append(_Utterance(i, noise_at, noise_at + _NOISE_S, turn, noise=True))
        if turn.barge_in_after_s is not None:
            t = end + turn.barge_in_after_s
        else:
            reply_at = max(turn.vad_s, turn.stt_s) + 0.15 + (turn.tool_s or 0.0)
            reply_at += turn.llm_ttft_s * (2 if turn.tool_s is not None else 1) + turn.tts_ttfb_s
            t = end + reply_at + turn.reply_audio_s + turn.gap_s + 0.3
    return out


class _Clock:
    """The timeline's zero, set when the first audio frame reaches VAD/STT."""

    def __init__(self, truth: GroundTruth) -> None:
        self._truth = truth
        self._zero: float | None = None

    def start(self) -> None:
        if self._zero is None:
            self._zero = time.perf_counter()
            self._truth.origin = time.time()

    def now(self) -> float:
        assert self._zero is not None
        return time.perf_counter() - self._zero

    async def sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            await asyncio.sleep(delay)

    def wall(self, t: float) -> float:
        return self._truth.origin + t


class ScriptedVAD(vad.VAD):
    def __init__(
        self,
        utterances: list[_Utterance],
        clock: _Clock,
        truth: GroundTruth,
        *,
        min_silence_duration: float | None = None,
    ) -> None:
        super().__init__(capabilities=vad.VADCapabilities(update_interval=_VAD_UPDATE_S))
        self._utterances = utterances
        self._clock = clock
        self._truth = truth
        self._min_silence_duration = min_silence_duration

    @property
    def min_silence_duration(self) -> float | None:
        """The silence window the script's VAD delays stand for (a Silero VAD's setting of that
        name), when the script says; each turn's `vad_s` is that window plus detection jitter."""
        return self._min_silence_duration

    @property
    def model(self) -> str:
        return "scripted-vad"

    @property
    def provider(self) -> str:
        return "lk_observe"

    def stream(self) -> vad.VADStream:
        return _ScriptedVADStream(self)


class _ScriptedVADStream(vad.VADStream):
    def __init__(self, owner: ScriptedVAD) -> None:
        super().__init__(owner)
        self._owner = owner

    async def _main_task(self) -> None:
        owner = self._owner
        async for frame in self._input_ch:
            if isinstance(frame, rtc.AudioFrame):
                break
        else:
            return
        owner._clock.start()
        clock = owner._clock
        opened = clock.now()  # a stream opened later (a handoff's new agent) hears what follows
        for u in owner._utterances:
            if u.turn.typed or u.start < opened:
                continue  # typed (run_pipeline sends it), or spoken before this stream
            await clock.sleep_until(u.start + _MIN_SPEECH_S)
            self._send(vad.VADEventType.START_OF_SPEECH, u)
            decide_at = u.end + u.turn.vad_s
            while clock.now() < decide_at - 2 * _VAD_UPDATE_S:
                await asyncio.sleep(_VAD_UPDATE_S)
                self._send(vad.VADEventType.INFERENCE_DONE, u)
            await clock.sleep_until(decide_at)
            if not u.noise:
                truth = owner._truth.turns[u.index]
                truth.speech_end = clock.wall(u.end)
                truth.vad_end = time.time()
            self._send(vad.VADEventType.END_OF_SPEECH, u)
        async for _ in self._input_ch:
            pass

    def _send(self, kind: vad.VADEventType, u: _Utterance) -> None:
        now = self._owner._clock.now()
        speaking = now <= u.end
        self._event_ch.send_nowait(
            vad.VADEvent(
                type=kind,
                samples_index=0,
                timestamp=now,
                speech_duration=min(now, u.end) - u.start,
                silence_duration=0.0 if speaking else now - u.end,
                raw_accumulated_speech=now - u.start if speaking else 0.0,
                raw_accumulated_silence=0.0 if speaking else now - u.end,
                speaking=speaking,
            )
        )


class _Router:
    """An A/B router in front of a scripted plugin: each request (keyed by its text) goes to the
    simulated provider `routes` names for it, and `serving` is the one serving now. The plugin's
    `provider` and `model` name it, so LiveKit's metrics metadata says who served the request."""

    def __init__(self, routes: Mapping[str, SimulatedModel] | None) -> None:
        self.routes: dict[str, SimulatedModel] = dict(routes or {})
        self.serving: SimulatedModel | None = None
        self.sessions: set[int] = set()  # sessions whose transcripts it follows (an STT's)

    def serve(self, key: str) -> None:
        """A request with this key is being served: by its route (a key with no route stays
        with the provider serving now, as one connection would)."""
        self.serving = self.routes.get(key, self.serving)

    def names(self, provider: str, model: str) -> tuple[str, str]:
        serving = self.serving
        return (provider, model) if serving is None else (serving.provider, serving.model)


class StreamingOnlySTT(stt.STT[Literal["metrics_collected"]]):
    """A scripted STT: streams only, named `model` by provider "lk_observe" (or, routed by
    `route_providers`, by the simulated provider that transcribed the latest utterance);
    subclasses open their stream in `open_stream`."""

    def __init__(self, model: str, *, interim_results: bool) -> None:
        super().__init__(
            capabilities=stt.STTCapabilities(streaming=True, interim_results=interim_results)
        )
        self._model = model
        # final transcript text -> the provider transcribing it (`route_providers` sets it up)
        self.router = _Router(None)

    @property
    def model(self) -> str:
        return self.router.names("lk_observe", self._model)[1]

    @property
    def provider(self) -> str:
        return self.router.names("lk_observe", self._model)[0]

    async def _recognize_impl(
        self,
        buffer: utils.AudioBuffer,
        *,
        language: NotGivenOr[str] = NOT_GIVEN,
        conn_options: APIConnectOptions,
    ) -> stt.SpeechEvent:
        raise NotImplementedError(f"{self._model} only streams")

    def stream(
        self,
        *,
        language: NotGivenOr[str] = NOT_GIVEN,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
    ) -> stt.RecognizeStream:
        return self.open_stream(conn_options)

    def open_stream(self, conn_options: APIConnectOptions) -> stt.RecognizeStream:
        raise NotImplementedError


class ScriptedSTT(StreamingOnlySTT):
    def __init__(self, utterances: list[_Utterance], clock: _Clock, truth: GroundTruth) -> None:
        super().__init__("scripted-stt", interim_results=True)
        self._utterances = utterances
        self._clock = clock
        self._truth = truth

    def open_stream(self, conn_options: APIConnectOptions) -> stt.RecognizeStream:
        return _ScriptedSTTStream(self, conn_options)


class _ScriptedSTTStream(stt.RecognizeStream):
    def __init__(self, owner: ScriptedSTT, conn_options: APIConnectOptions) -> None:
        super().__init__(stt=owner, conn_options=conn_options)
        self._owner = owner

    async def _run(self) -> None:
        owner = self._owner
        await self._input_ch.recv()
        owner._clock.start()
        clock = owner._clock
        opened = clock.now()  # a stream opened later (a handoff's new agent) hears what follows
        for u in owner._utterances:
            if u.turn.typed or u.noise or u.start < opened:
                continue  # typed (run_pipeline sends it), a noise, or before this stream
            await clock.sleep_until(u.end + u.turn.stt_s / 2)
            self._send(stt.SpeechEventType.INTERIM_TRANSCRIPT, _user_text(u.index).split()[0])
            await clock.sleep_until(u.end + u.turn.stt_s)
            owner._truth.turns[u.index].stt_final = time.time()
            self._send(stt.SpeechEventType.FINAL_TRANSCRIPT, _user_text(u.index))
        async for _ in self._input_ch:
            pass

    def _send(self, kind: stt.SpeechEventType, text: str) -> None:
        data = stt.SpeechData(text=text, language=LanguageCode("en"))
        self._event_ch.send_nowait(stt.SpeechEvent(type=kind, alternatives=[data]))


@dataclass(frozen=True)
class LLMReply:
    truth: TurnTruth
    ttft_s: float
    total_s: float
    content: str = ""
    tool_call: llm.FunctionToolCall | None = None


def _request_key(chat_ctx: llm.ChatContext) -> str:
    """What a scripted LLM answers: the text of the request's last item."""
    if not chat_ctx.items:
        return ""
    item = chat_ctx.items[-1]
    if item.type == "message":
        return item.text_content or ""
    if item.type == "function_call_output":
        return item.output
    return ""


class ScriptedLLM(llm.LLM[Literal["metrics_collected"]]):
    """Answers each request by its last item's text; with `routes` (that text ->
    SimulatedModel) each request is served by, and named after, its routed provider."""

    def __init__(
        self, replies: dict[str, LLMReply], *, routes: Mapping[str, SimulatedModel] | None = None
    ) -> None:
        super().__init__()
        self._replies = replies
        self.router = _Router(routes)

    @property
    def model(self) -> str:
        return self.router.names("lk_observe", "scripted-llm")[1]

    @property
    def provider(self) -> str:
        return self.router.names("lk_observe", "scripted-llm")[0]

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGivenOr[dict[str, Any]] = NOT_GIVEN,
    ) -> llm.LLMStream:
        # routed when asked: LiveKit names the request's metrics after it when it ends
        self.router.serve(_request_key(chat_ctx))
        return _ScriptedLLMStream(self, chat_ctx, tools or [], conn_options)


class _ScriptedLLMStream(llm.LLMStream):
    def __init__(
        self,
        owner: ScriptedLLM,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool],
        conn_options: APIConnectOptions,
    ) -> None:
        super().__init__(owner, chat_ctx=chat_ctx, tools=tools, conn_options=conn_options)
        self._owner = owner

    async def _run(self) -> None:
        started_perf, started = time.perf_counter(), time.time()
        reply = self._owner._replies.get(_request_key(self.chat_ctx))
        if reply is None:
            return
        await asyncio.sleep(reply.ttft_s)
        first_token = time.time()
        if reply.content:
            words = reply.content.split(" ")
            for n, word in enumerate(words):
                self._send(
                    llm.ChoiceDelta(role="assistant", content=word + " " * (n < len(words) - 1))
                )
        if reply.tool_call is not None:
            self._send(llm.ChoiceDelta(role="assistant", tool_calls=[reply.tool_call]))
        reply.truth.llm_requests.append((started, first_token))
        rest = reply.total_s - (time.perf_counter() - started_perf)
        if rest > 0:
            await asyncio.sleep(rest)
        self._event_ch.send_nowait(
            llm.ChatChunk(
                id=str(id(self)),
                usage=llm.CompletionUsage(completion_tokens=12, prompt_tokens=48, total_tokens=60),
            )
        )

    def _send(self, delta: llm.ChoiceDelta) -> None:
        self._event_ch.send_nowait(llm.ChatChunk(id=str(id(self)), delta=delta))


@dataclass(frozen=True)
class TTSReply:
    """How the scripted TTS speaks one reply: `audio_s` of audio, `ttfb_s` after its first text.

    Silent by default (the timing is what the scripted pipeline is about); `audible` replies are
    a tone after `leading_silence_s` of digital silence, as TTS providers often start."""

    truth: TurnTruth
    ttfb_s: float
    audio_s: float
    leading_silence_s: float = 0.0
    audible: bool = False
    reply_level_dbfs: float = -20.0

    def pcm(self) -> bytes:
        """The reply's 16-bit audio: the leading silence, then (if audible) a 220 Hz tone whose
        first sample is already at full level, so its first audible sample is known exactly."""
        total = int(SAMPLE_RATE * self.audio_s)
        silent = min(self.leading_samples, total)
        if not self.audible:
            return b"\x00\x00" * total
        t = np.arange(total - silent, dtype=np.float64) / SAMPLE_RATE
        amplitude = 32767.0 * 10.0 ** (self.reply_level_dbfs / 20.0)
        tone: npt.NDArray[np.int16] = (amplitude * np.cos(2.0 * np.pi * 220.0 * t)).astype(np.int16)
        return b"\x00\x00" * silent + tone.tobytes()

    @property
    def leading_samples(self) -> int:
        return round(SAMPLE_RATE * self.leading_silence_s)


def _reply_head(text: str) -> str:
    """A reply's first word: what tells the scripted replies apart."""
    return text.strip().split(" ", 1)[0]


class ScriptedTTS(tts.TTS[Literal["metrics_collected"]]):
    """Speaks each reply by its first word; with `routes` (that word -> SimulatedModel) each
    reply is synthesized by, and named after, its routed provider."""

    def __init__(
        self, replies: dict[str, TTSReply], *, routes: Mapping[str, SimulatedModel] | None = None
    ) -> None:
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=True),
            sample_rate=SAMPLE_RATE,
            num_channels=1,
        )
        self._replies = replies
        self.router = _Router(routes)

    def reply_for(self, text: str) -> TTSReply | None:
        """The reply whose text starts with what has arrived so far (replies differ early)."""
        return self._replies.get(_reply_head(text))

    @property
    def model(self) -> str:
        return self.router.names("lk_observe", "scripted-tts")[1]

    @property
    def provider(self) -> str:
        return self.router.names("lk_observe", "scripted-tts")[0]

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> tts.ChunkedStream:
        raise NotImplementedError("the scripted TTS only streams")

    def stream(
        self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> tts.SynthesizeStream:
        return _ScriptedTTSStream(self, conn_options)


class _ScriptedTTSStream(tts.SynthesizeStream):
    def __init__(self, owner: ScriptedTTS, conn_options: APIConnectOptions) -> None:
        super().__init__(tts=owner, conn_options=conn_options)
        self._owner = owner

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        output_emitter.initialize(
            request_id=utils.shortuuid("tts_"),
            sample_rate=SAMPLE_RATE,
            num_channels=1,
            mime_type="audio/pcm",
            stream=True,
        )
        text, segment_open = "", False
        async for data in self._input_ch:
            if not isinstance(data, str):  # a flush: the segment's text is complete
                if segment_open:
                    output_emitter.end_segment()
                text, segment_open = "", False
                continue
            text += data
            if segment_open or not text.strip():
                continue
            # like a streaming provider: start on the first text, first audio `ttfb_s` later
            first_text_at = time.time()
            self._mark_started()
            reply = self._owner.reply_for(text)
            if reply is None:
                continue
            # routed as its synthesis starts: LiveKit names the reply's audio after it
            self._owner.router.serve(_reply_head(text))
            segment_open = True
            await asyncio.sleep(reply.ttfb_s)
            if reply.truth.tts_first_text is None:
                reply.truth.tts_first_text = first_text_at
                reply.truth.tts_first_audio = time.time()
            output_emitter.start_segment(segment_id=utils.shortuuid("seg_"))
            pcm = reply.pcm()
            chunk = 2 * SAMPLE_RATE // 50
            for offset in range(0, len(pcm), chunk):
                output_emitter.push(pcm[offset : offset + chunk])
        if segment_open:
            output_emitter.end_segment()


class ScriptedAudioInput(AudioInput):
    """Pushes one frame: the scripted VAD and STT run on the timeline from then on."""

    def __init__(self) -> None:
        super().__init__(label="scripted-input")
        self._ch = utils.aio.Chan[rtc.AudioFrame]()

    async def __anext__(self) -> rtc.AudioFrame:
        return await self._ch.__anext__()

    async def keep_feeding(self, every_s: float = 0.25) -> None:
        """A frame now and then: streams opened later (a handoff, a task) start too."""
        while True:
            await asyncio.sleep(every_s)
            self.push_silence(0.01)

    def push_silence(self, seconds: float = 0.1) -> None:
        n = int(16000 * seconds)
        self._ch.send_nowait(
            rtc.AudioFrame(
                data=b"\x00\x00" * n, sample_rate=16000, num_channels=1, samples_per_channel=n
            )
        )


class ScriptedAudioOutput(AudioOutput):
    """Plays in real time on a virtual clock and notes when each reply's first frame plays."""

    def __init__(self, on_first_frame: Any) -> None:
        super().__init__(
            label="scripted-output",
            capabilities=AudioOutputCapabilities(pause=True),
            sample_rate=SAMPLE_RATE,
        )
        self._on_first_frame = on_first_frame
        self._pushed = 0.0
        self._started_at: float | None = None
        self._paused_at: float | None = None
        self._paused_total = 0.0
        self._finish: asyncio.TimerHandle | None = None
        self._flushed = False

    def _played(self) -> float:
        if self._started_at is None:
            return 0.0
        end = self._paused_at if self._paused_at is not None else time.time()
        return end - self._started_at - self._paused_total

    def _reset(self) -> None:
        self._pushed, self._started_at, self._paused_at = 0.0, None, None
        self._paused_total, self._flushed = 0.0, False
        if self._finish is not None:
            self._finish.cancel()
            self._finish = None

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        self._pushed += frame.duration
        if self._started_at is None and self._paused_at is None:
            self._started_at = time.time()
            self._on_first_frame(self._started_at)
            self.on_playback_started(created_at=self._started_at)

    def _schedule_finish(self) -> None:
        if self._finish is not None:
            self._finish.cancel()
        if self._paused_at is not None:
            return
        pushed = self._pushed

        def finished() -> None:
            self._reset()
            self.on_playback_finished(playback_position=pushed, interrupted=False)

        delay = max(pushed - self._played(), 0.0)
        self._finish = asyncio.get_running_loop().call_later(delay, finished)

    def flush(self) -> None:
        super().flush()
        if self._pushed:
            self._flushed = True
            self._schedule_finish()

    def clear_buffer(self) -> None:
        if not self._pushed:
            return
        position = min(self._played(), self._pushed)
        self._reset()
        self.on_playback_finished(playback_position=position, interrupted=True)

    def pause(self) -> None:
        super().pause()
        if self._paused_at is None:
            self._paused_at = time.time()
        if self._finish is not None:
            self._finish.cancel()
            self._finish = None

    def resume(self) -> None:
        super().resume()
        if self._paused_at is not None:
            self._paused_total += time.time() - self._paused_at
            self._paused_at = None
        if self._flushed:
            self._schedule_finish()


class ScriptedAgent(Agent):
    def __init__(
        self,
        truth: GroundTruth,
        tool_delays: dict[int, float],
        fillers: frozenset[int] = frozenset(),
        hook_delays: Mapping[int, float] | None = None,
    ) -> None:
        super().__init__(instructions="You are a scripted test agent.")
        self._truth = truth
        self._tool_delays = tool_delays
        self._fillers = fillers
        self._hook_delays = hook_delays or {}

    async def on_user_turn_completed(
        self, turn_ctx: llm.ChatContext, new_message: llm.ChatMessage
    ) -> None:
        # EOU ground truth: LiveKit calls this right after it decides the user's turn ended
        text = new_message.text_content or ""
        if text.startswith("user utterance "):
            index = int(text.rsplit(" ", 1)[1])
            if self._truth.turns[index].eou is None:
                self._truth.turns[index].eou = time.time()
            if index in self._fillers:
                self.session.say(_filler_text(index))
            if self._hook_delays.get(index):
                await asyncio.sleep(self._hook_delays[index])
                self._truth.turns[index].hook_end = time.time()

    @function_tool
    async def ask_consent(self, turn: int) -> str:
        """Ask the caller to confirm before going on."""
        confirmed = await ConsentTask(turn)
        return f"consent-{turn}-{confirmed}"

    @function_tool
    async def transfer(self) -> tuple[Agent, str]:
        """Hand the caller over to the specialist."""
        return (
            ScriptedSpecialist(self._truth, self._tool_delays, self._fillers, self._hook_delays),
            "transferred",
        )

    @function_tool
    async def lookup(self, turn: int) -> str:
        """Look something up for the caller."""
        started = time.time()
        await asyncio.sleep(self._tool_delays.get(turn, 0.0))
        self._truth.turns[turn].tool = (started, time.time())
        return _tool_result(turn)


class ConsentTask(AgentTask[bool]):
    """A task run inside a tool call: says its question, then waits for the caller's answer."""

    def __init__(self, turn: int) -> None:
        super().__init__(instructions="Ask the caller to confirm.")
        self._turn = turn

    async def on_enter(self) -> None:
        self.session.say(_task_text(self._turn))

    @function_tool
    async def confirm(self) -> None:
        """The caller confirmed."""
        self.complete(True)


class ScriptedSpecialist(ScriptedAgent):
    """The agent a `transfer` hands off to: same scripted models, its own name."""


@dataclass
class ScriptedPipeline:
    """Everything a scripted session needs, plus the ground truth it fills in."""

    session: AgentSession[None]
    agent: ScriptedAgent
    truth: GroundTruth
    audio_input: ScriptedAudioInput
    utterances: list[_Utterance]
    greeting: bool

    @property
    def duration_s(self) -> float:
        last = self.utterances[-1] if self.utterances else None
        if last is None:
            return 1.0
        t = last.turn
        return last.end + max(t.vad_s, t.stt_s) + 1.0 + (t.tool_s or 0) + t.reply_audio_s


def first_frame_recorder(truth: GroundTruth) -> Callable[[float], None]:
    """Stamps a reply's first frame at the output: it belongs to the reply whose audio the TTS
    produced last."""

    def on_first_frame(at: float) -> None:
        candidates = [
            t
            for t in [truth.greeting, *truth.turns, *truth.fillers.values()]
            if t.tts_first_audio is not None and t.first_audio_played is None
        ]
        if candidates:
            max(candidates, key=lambda t: t.tts_first_audio or 0.0).first_audio_played = at

    return on_first_frame


def scripted_agent_session(
    *,
    vad: vad.VAD,
    stt: stt.STT[Any],
    llm: llm.LLM[Any],
    tts: tts.TTS[Any],
    min_endpointing_s: float,
    preemptive: bool = True,
) -> AgentSession[None]:
    """A real AgentSession on these components, turn detection by VAD, as the scripts time it
    (`preemptive`: LiveKit's preemptive generation, on by default as in LiveKit)."""
    return AgentSession(
        vad=vad,
        stt=stt,
        llm=llm,
        tts=tts,
        turn_handling={
            "turn_detection": "vad",
            "endpointing": {"min_delay": min_endpointing_s, "max_delay": 3.0},
            "interruption": {"min_duration": 0.2, "false_interruption_timeout": 1.0},
            "preemptive_generation": {"enabled": preemptive},
        },
        aec_warmup_duration=None,
        session_close_transcript_timeout=0.05,  # the scripted STT sends no closing transcript
    )


def route_providers(
    session: AgentSession[Any],
    turns: Sequence[ScriptedTurn],
    *,
    greeting: ScriptedTurn | None = None,
) -> None:
    """Route each scripted turn's requests to the simulated providers it names
    (`ScriptedTurn.stt_model`, `llm_model`, `tts_model`), as an A/B router in front of the
    session's scripted STT, LLM and TTS would; stages left None keep their plugin's own name."""
    stt_routes: dict[str, SimulatedModel] = {}
    llm_routes: dict[str, SimulatedModel] = {}
    tts_routes: dict[str, SimulatedModel] = {}
    for i, turn in enumerate(turns):
        if turn.stt_model is not None:
            stt_routes[_user_text(i)] = turn.stt_model
        if turn.llm_model is not None:
            keys = [_user_text(i), _tool_result(i), f"consent-{i}-True"]
            for key in [*keys, *(["transferred"] if turn.handoff else [])]:
                llm_routes[key] = turn.llm_model
        if turn.tts_model is not None:
            for text in (_reply_text(i), _filler_text(i), _check_text(i), _task_text(i)):
                tts_routes[_reply_head(text)] = turn.tts_model
    if greeting is not None and greeting.llm_model is not None:
        llm_routes[GREETING_PROMPT] = greeting.llm_model
    if greeting is not None and greeting.tts_model is not None:
        tts_routes[_reply_head(GREETING_TEXT)] = greeting.tts_model
    for plugin, routes in (
        (session.stt, stt_routes),
        (session.llm, llm_routes),
        (session.tts, tts_routes),
    ):
        if isinstance(plugin, (StreamingOnlySTT, ScriptedLLM, ScriptedTTS)):
            plugin.router.routes.update(routes)
    stt_plugin = session.stt
    if isinstance(stt_plugin, StreamingOnlySTT) and id(session) not in stt_plugin.router.sessions:
        # the STT's router learns which utterance was transcribed from its final transcript,
        # which LiveKit announces as it arrives: before it commits the turn and reads the
        # STT's names into the turn's metrics
        stt_plugin.router.sessions.add(id(session))
        router = stt_plugin.router

        def transcribed(ev: UserInputTranscribedEvent) -> None:
            if ev.is_final:
                router.serve(ev.transcript)

        session.on("user_input_transcribed", transcribed)


def build_pipeline(
    turns: Sequence[ScriptedTurn],
    *,
    greeting: ScriptedTurn | None = None,
    min_endpointing_s: float = 0.1,
    preemptive: bool = True,
    min_silence_s: float | None = None,
) -> ScriptedPipeline:
    """A real AgentSession wired to scripted components; call `run_pipeline` to play it.
    `min_silence_s`: the VAD silence window the turns' `vad_s` stand for (the scripted VAD's
    `min_silence_duration`, which names the setting that owns that wait)."""
    truth = GroundTruth(turns=[TurnTruth() for _ in turns])
    utterances = plan_timeline(turns, lead_s=(greeting.reply_audio_s + 1.0) if greeting else 0.6)
    clock = _Clock(truth)
    llm_replies: dict[str, LLMReply] = {}
    tts_replies: dict[str, TTSReply] = {}
    tool_delays: dict[int, float] = {}
    for i, turn in enumerate(turns):
        t = truth.turns[i]
        if turn.filler:
            f = truth.fillers[i] = TurnTruth()
            tts_replies[_filler_text(i).split(" ")[0]] = TTSReply(f, turn.tts_ttfb_s, 0.5)
        if turn.task:
            ask = llm.FunctionToolCall(
                name="ask_consent", arguments=f'{{"turn": {i}}}', call_id=f"ask_{i}"
            )
            llm_replies[_user_text(i)] = LLMReply(
                t, turn.llm_ttft_s, turn.llm_ttft_s, tool_call=ask
            )
            confirm = llm.FunctionToolCall(name="confirm", arguments="{}", call_id=f"confirm_{i}")
            answer = truth.turns[i + 1] if i + 1 < len(turns) else t
            llm_replies[_user_text(i + 1)] = LLMReply(
                answer, turn.llm_ttft_s, turn.llm_ttft_s, tool_call=confirm
            )
            llm_replies[f"consent-{i}-True"] = LLMReply(
                t, turn.llm_ttft_s, turn.llm_total_s, content=_reply_text(i)
            )
            tts_replies[_task_text(i).split(" ")[0]] = TTSReply(t, turn.tts_ttfb_s, 0.6)
        elif turn.handoff:
            call = llm.FunctionToolCall(name="transfer", arguments="{}", call_id=f"transfer_{i}")
            llm_replies[_user_text(i)] = LLMReply(
                t, turn.llm_ttft_s, turn.llm_ttft_s, tool_call=call
            )
            llm_replies["transferred"] = LLMReply(
                t, turn.llm_ttft_s, turn.llm_total_s, content=_reply_text(i)
            )
        elif turn.tool_s is not None:
            tool_delays[i] = turn.tool_s
            call = llm.FunctionToolCall(
                name="lookup", arguments=f'{{"turn": {i}}}', call_id=f"call_{i}"
            )
            check = _check_text(i) if turn.speak_before_tool else ""
            if check:
                tts_replies[check.split(" ")[0]] = TTSReply(t, turn.tts_ttfb_s, 0.6)
            llm_replies[_user_text(i)] = LLMReply(
                t, turn.llm_ttft_s, turn.llm_ttft_s, content=check, tool_call=call
            )
            llm_replies[_tool_result(i)] = LLMReply(
                t, turn.llm_ttft_s, turn.llm_total_s, content=_reply_text(i)
            )
        elif _user_text(i) not in llm_replies:  # not the answer to an earlier turn's task
            llm_replies[_user_text(i)] = LLMReply(
                t, turn.llm_ttft_s, turn.llm_total_s, content=_reply_text(i)
            )
        tts_replies[_reply_text(i).split(" ")[0]] = TTSReply(t, turn.tts_ttfb_s, turn.reply_audio_s)
    if greeting is not None:
        g = truth.greeting
        llm_replies[GREETING_PROMPT] = LLMReply(
            g, greeting.llm_ttft_s, greeting.llm_total_s, content=GREETING_TEXT
        )
        tts_replies[GREETING_TEXT.split(" ")[0]] = TTSReply(
            g, greeting.tts_ttfb_s, greeting.reply_audio_s
        )

    session = scripted_agent_session(
        vad=ScriptedVAD(utterances, clock, truth, min_silence_duration=min_silence_s),
        stt=ScriptedSTT(utterances, clock, truth),
        llm=ScriptedLLM(llm_replies),
        tts=ScriptedTTS(tts_replies),
        min_endpointing_s=min_endpointing_s,
        preemptive=preemptive,
    )
    route_providers(session, turns, greeting=greeting)
    audio_input = ScriptedAudioInput()
    session.input.audio = audio_input
    session.output.audio = ScriptedAudioOutput(first_frame_recorder(truth))
    agent = ScriptedAgent(
        truth,
        tool_delays,
        frozenset(i for i, t in enumerate(turns) if t.filler),
        {i: t.hook_s for i, t in enumerate(turns) if t.hook_s},
    )
    return ScriptedPipeline(session, agent, truth, audio_input, utterances, greeting is not None)


async def run_pipeline(pipeline: ScriptedPipeline, *, settle_s: float = 0.5) -> GroundTruth:
    """Start the session, play the script to its end, then close the session."""
    session = pipeline.session
    await session.start(pipeline.agent)
    if pipeline.greeting:
        session.generate_reply(instructions=GREETING_PROMPT)
    pipeline.audio_input.push_silence()
    # like a live microphone: an agent or task that takes over opens new VAD/STT streams
    microphone = asyncio.create_task(pipeline.audio_input.keep_feeding())
    loop = asyncio.get_running_loop()
    for u in pipeline.utterances:
        if u.turn.typed:
            loop.call_later(u.end, functools.partial(_type, session, _user_text(u.index)))
    await asyncio.sleep(pipeline.duration_s + settle_s)
    microphone.cancel()
    with contextlib.suppress(RuntimeError):
        await session.drain()
    await session.aclose()
    return pipeline.truth


def _type(session: AgentSession[None], text: str) -> None:
    session.generate_reply(user_input=text)


@contextlib.asynccontextmanager
async def scripted_session(
    turns: Sequence[ScriptedTurn], *, greeting: ScriptedTurn | None = None
) -> AsyncIterator[ScriptedPipeline]:
    pipeline = build_pipeline(turns, greeting=greeting)
    try:
        yield pipeline
    finally:
        with contextlib.suppress(Exception):
            await pipeline.session.aclose()


class _CollectingTextOutput(TextOutput):
    def __init__(self) -> None:
        super().__init__(label="scripted-text", next_in_chain=None)

    async def capture_text(self, text: str) -> None:
        pass  # user-facing text is deliberately not kept

    def flush(self) -> None:
        pass


def build_text_pipeline(turns: Sequence[ScriptedTurn]) -> tuple[AgentSession[None], GroundTruth]:
    """A pipeline with no VAD, STT or TTS (typed input, text output): only the LLM is timed."""
    truth = GroundTruth(turns=[TurnTruth() for _ in turns])
    replies = {
        _user_text(i): LLMReply(truth.turns[i], t.llm_ttft_s, t.llm_total_s, content=_reply_text(i))
        for i, t in enumerate(turns)
    }
    session: AgentSession[None] = AgentSession(llm=ScriptedLLM(replies), aec_warmup_duration=None)
    session.output.transcription = _CollectingTextOutput()
    return session, truth


async def play_text_pipeline(
    session: AgentSession[None], truth: GroundTruth, turns: Sequence[ScriptedTurn]
) -> None:
    await session.start(ScriptedAgent(truth, {}))
    for i in range(len(turns)):
        await session.generate_reply(user_input=_user_text(i))
    await session.aclose()
