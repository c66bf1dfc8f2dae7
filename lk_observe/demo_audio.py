"""An audible scripted pipeline: the caller's voice is real audio heard by a real VAD.

The caller's utterances (any 16 kHz mono clips: synthesized speech in the tests, a synthetic
voice in the demo) are mixed over a noise floor and pushed into a real `AgentSession` in 10 ms
frames at real pace; the VAD is the one given (Silero's when installed). STT, LLM and TTS are
scripted: the transcript arrives a known time after the voice ends, and the TTS speaks a tone
after a known leading silence. The ground truth is the audio itself: the last input sample above
the speech level and the first agent output sample above the audible level.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from livekit import rtc
from livekit.agents import (
    AgentSession,
    APIConnectOptions,
    LanguageCode,
    stt,
    utils,
    vad,
)
from livekit.agents.voice.io import AudioInput

from lk_observe.demo import (
    GREETING_PROMPT,
    GREETING_TEXT,
    SAMPLE_RATE,
    GroundTruth,
    LLMReply,
    ScriptedAgent,
    ScriptedAudioOutput,
    ScriptedLLM,
    ScriptedTTS,
    StreamingOnlySTT,
    TTSReply,
    TurnTruth,
    first_frame_recorder,
    scripted_agent_session,
)

INPUT_RATE = 16000
FRAME_S = 0.01  # how the caller's audio reaches the session: 10 ms frames, at real pace
SPEECH_LEVEL_DBFS = -40.0  # the caller's voice: samples of the clean clip above this
AUDIBLE_LEVEL_DBFS = -50.0  # the agent's voice: samples above this (lk_observe.audio's level)

Samples = npt.NDArray[np.float32]


def last_voiced_sample(clip: Samples, level_dbfs: float = SPEECH_LEVEL_DBFS) -> int:
    """Index of the clip's last sample above the speech level (-1 if none)."""
    above = np.flatnonzero(np.abs(clip) > 10.0 ** (level_dbfs / 20.0))
    return int(above[-1]) if len(above) else -1


def noise_floor(samples: int, dbfs: float, seed: int) -> Samples:
    """White noise whose RMS level is `dbfs`."""
    rng = np.random.default_rng(seed)
    noise: Samples = (rng.standard_normal(samples) * 10.0 ** (dbfs / 20.0)).astype(np.float32)
    return noise


# (F1, F2, F3) of a few English vowels, Hz
_VOWEL_FORMANTS = (
    (730.0, 1090.0, 2440.0),
    (270.0, 2290.0, 3010.0),
    (530.0, 1840.0, 2480.0),
    (570.0, 840.0, 2410.0),
    (300.0, 870.0, 2240.0),
    (660.0, 1720.0, 2410.0),
    (490.0, 1350.0, 1690.0),
)


def _filtered(excitation: npt.NDArray[np.float64], shape: npt.NDArray[np.float64]) -> Samples:
    out: Samples = np.fft.irfft(np.fft.rfft(excitation) * shape, len(excitation)).astype(np.float32)
    return out


def _syllable(samples: int, rng: np.random.Generator, pitch_hz: float) -> Samples:
    """A voiced syllable: a glottal pulse train with a pitch glide, through a random vowel's
    formants, with 10 ms onset and offset ramps."""
    t = np.arange(samples) / INPUT_RATE
    glide = rng.uniform(-0.1, 0.1) * t / max(float(t[-1]), 1e-3)
    f0 = pitch_hz * (1.0 + rng.uniform(-0.15, 0.15) + glide)
    pulses = (np.diff(np.floor(np.cumsum(f0 / INPUT_RATE)), prepend=0.0) > 0).astype(np.float64)
    pulses += 0.02 * rng.standard_normal(samples)  # breath
    freqs = np.fft.rfftfreq(samples, 1.0 / INPUT_RATE)
    shape = np.zeros_like(freqs)
    vowel = _VOWEL_FORMANTS[int(rng.integers(len(_VOWEL_FORMANTS)))]
    for centre, width in zip(vowel, (90.0, 110.0, 170.0), strict=True):
        shape += 1.0 / (1.0 + ((freqs - centre) / (width / 2.0)) ** 2)
    shape /= 1.0 + freqs / 3000.0
    edge = np.minimum(np.arange(samples), np.arange(samples)[::-1]) / (0.01 * INPUT_RATE)
    wave = _filtered(pulses, shape) * np.minimum(edge, 1.0)  # 10 ms onset and offset
    peak = float(np.max(np.abs(wave))) or 1.0
    scaled: Samples = (wave / peak * rng.uniform(0.6, 1.0)).astype(np.float32)
    return scaled


def _fricative(samples: int, rng: np.random.Generator) -> Samples:
    """A consonant: band-passed noise."""
    freqs = np.fft.rfftfreq(samples, 1.0 / INPUT_RATE)
    centre = rng.uniform(2500.0, 6000.0)
    shape = np.asarray(1.0 / (1.0 + ((freqs - centre) / 1500.0) ** 2), dtype=np.float64)
    noise = _filtered(rng.standard_normal(samples), shape) * np.hanning(samples)
    peak = float(np.max(np.abs(noise))) or 1.0
    scaled: Samples = (noise / peak * 0.15).astype(np.float32)
    return scaled


def synthetic_voice(seconds: float, *, pitch_hz: float = 120.0, seed: int = 0) -> Samples:
    """A voice-like sound a speech VAD such as Silero hears as speech from start to end:
    syllables of changing vowels and pitch, some led by a fricative; the demo's caller when no
    recorded or synthesized speech is at hand. Stops within 10 ms, as voices do."""
    rng = np.random.default_rng(seed)
    total = int(seconds * INPUT_RATE)
    voice = np.zeros(total, dtype=np.float32)
    position = 0
    while position < total:
        if rng.random() < 0.4:
            part = _fricative(min(int(rng.uniform(0.04, 0.08) * INPUT_RATE), total - position), rng)
            voice[position : position + len(part)] += part
            position += len(part)
        length = min(int(rng.uniform(0.15, 0.3) * INPUT_RATE), total - position)
        if length <= 1:
            break
        voice[position : position + length] += _syllable(length, rng, pitch_hz)
        position += length
    fade = int(0.01 * INPUT_RATE)
    voice[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    peak = float(np.max(np.abs(voice))) or 1.0
    scaled: Samples = (voice / peak * 0.5).astype(np.float32)
    return scaled


@dataclass(frozen=True)
class SpokenTurn:
    """One utterance of the caller and how the scripted agent answers it (seconds)."""

    clip: Samples  # 16 kHz mono, -1..1
    leading_silence_s: float = 0.0  # the TTS's silence before the reply's first audible sample
    stt_s: float = 0.15  # final transcript this long after the voice ends
    llm_ttft_s: float = 0.1
    tts_ttfb_s: float = 0.05
    reply_audio_s: float = 0.4
    gap_s: float = 0.5  # silence between the end of the reply and the next utterance


@dataclass
class SpokenTruth:
    """When one utterance really ended and when the answer became audible (unix seconds)."""

    text: str
    end_s: float  # on the input timeline: just after the last sample above the speech level
    leading_samples: int
    turn: TurnTruth = field(default_factory=TurnTruth)
    heard_end: float | None = None

    @property
    def audible_at(self) -> float | None:
        played = self.turn.first_audio_played
        return None if played is None else played + self.leading_samples / SAMPLE_RATE

    @property
    def e2e_ms(self) -> float | None:
        audible = self.audible_at
        if audible is None or self.heard_end is None:
            return None
        return (audible - self.heard_end) * 1000.0


class PacedAudioInput(AudioInput):
    """Plays a prepared signal as 10 ms int16 frames, each delivered when its last sample would
    have been spoken; `origin` is the wall time of the signal's first sample."""

    def __init__(self, signal: Samples) -> None:
        super().__init__(label="paced-input")
        self._pcm = (np.clip(signal, -1.0, 1.0) * 32767.0).astype(np.int16)
        self._ch = utils.aio.Chan[rtc.AudioFrame]()
        self.origin: float | None = None
        self.started = asyncio.Event()

    async def __anext__(self) -> rtc.AudioFrame:
        return await self._ch.__anext__()

    @property
    def duration_s(self) -> float:
        return len(self._pcm) / INPUT_RATE

    async def play(self, zero: float | None = None) -> None:
        """Deliver the signal, frame k at `zero` (a perf_counter() reading; default now) plus
        (k + 1) * 10 ms."""
        step = int(INPUT_RATE * FRAME_S)
        zero = time.perf_counter() if zero is None else zero
        self.origin = time.time() - (time.perf_counter() - zero)
        self.started.set()
        for k, offset in enumerate(range(0, len(self._pcm) - step + 1, step)):
            delay = zero + (k + 1) * FRAME_S - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            chunk = self._pcm[offset : offset + step]
            self._ch.send_nowait(rtc.AudioFrame(chunk.tobytes(), INPUT_RATE, 1, step))


class TimedSTT(StreamingOnlySTT):
    """Final transcripts a fixed delay after each utterance's real end of voice."""

    def __init__(self, source: PacedAudioInput, truths: list[SpokenTruth], delays: list[float]):
        super().__init__("timed-stt", interim_results=False)
        self._source = source
        self._truths = truths
        self._delays = delays

    def open_stream(self, conn_options: APIConnectOptions) -> stt.RecognizeStream:
        return _TimedSTTStream(self, conn_options)


class _TimedSTTStream(stt.RecognizeStream):
    def __init__(self, owner: TimedSTT, conn_options: APIConnectOptions) -> None:
        super().__init__(stt=owner, conn_options=conn_options)
        self._owner = owner

    async def _run(self) -> None:
        owner = self._owner
        drain = asyncio.create_task(self._drain())
        try:
            await owner._source.started.wait()
            origin = owner._source.origin
            assert origin is not None
            opened = time.time()
            for truth, delay in zip(owner._truths, owner._delays, strict=True):
                final_at = origin + truth.end_s + delay
                if final_at < opened:
                    continue  # said before this stream opened
                await asyncio.sleep(max(final_at - time.time(), 0.0))
                truth.turn.stt_final = time.time()
                data = stt.SpeechData(text=truth.text, language=LanguageCode("en"))
                self._event_ch.send_nowait(
                    stt.SpeechEvent(type=stt.SpeechEventType.FINAL_TRANSCRIPT, alternatives=[data])
                )
            await drain
        finally:
            drain.cancel()

    async def _drain(self) -> None:
        async for _ in self._input_ch:
            pass


@dataclass
class SpokenPipeline:
    session: AgentSession[None]
    agent: ScriptedAgent
    audio_input: PacedAudioInput
    truths: list[SpokenTruth]
    greeting: bool = False


def build_spoken_pipeline(
    turns: Sequence[SpokenTurn],
    *,
    vad: vad.VAD,
    noise_dbfs: float,
    seed: int = 0,
    lead_s: float = 0.8,
    min_endpointing_s: float = 0.1,
    greeting_audio_s: float | None = None,
) -> SpokenPipeline:
    """A real AgentSession hearing the turns' clips over a noise floor through `vad`; with
    `greeting_audio_s` the agent greets first (an audible reply that long) and the caller waits
    for it."""
    truth = GroundTruth(turns=[TurnTruth() for _ in turns])
    truths: list[SpokenTruth] = []
    placed: list[tuple[int, Samples]] = []
    t = lead_s
    llm_replies: dict[str, LLMReply] = {}
    tts_replies: dict[str, TTSReply] = {}
    if greeting_audio_s is not None:
        g = truth.greeting
        llm_replies[GREETING_PROMPT] = LLMReply(g, 0.2, 0.25, content=GREETING_TEXT)
        tts_replies[GREETING_TEXT.split(" ")[0]] = TTSReply(
            g, 0.05, greeting_audio_s, leading_silence_s=0.05, audible=True
        )
        t += 0.5 + greeting_audio_s
    for i, turn in enumerate(turns):
        start = int(t * INPUT_RATE)
        last = last_voiced_sample(turn.clip)
        text = f"user utterance {i}"
        reply = TTSReply(
            truth.turns[i],
            turn.tts_ttfb_s,
            turn.reply_audio_s,
            leading_silence_s=turn.leading_silence_s,
            audible=True,
        )
        spoken = SpokenTruth(text, (start + last + 1) / INPUT_RATE, reply.leading_samples)
        spoken.turn = truth.turns[i]
        truths.append(spoken)
        placed.append((start, turn.clip))
        reply_text = f"R{i}: here is the answer."
        llm_replies[text] = LLMReply(
            truth.turns[i], turn.llm_ttft_s, turn.llm_ttft_s + 0.05, content=reply_text
        )
        tts_replies[reply_text.split(" ")[0]] = reply
        # the VAD's silence window, the end-of-turn wait, the reply, then the gap
        answer_s = 1.0 + turn.llm_ttft_s + turn.tts_ttfb_s + turn.leading_silence_s
        t = spoken.end_s + answer_s + turn.reply_audio_s + turn.gap_s
    signal = noise_floor(int((t + 1.0) * INPUT_RATE), noise_dbfs, seed)
    for start, clip in placed:
        signal[start : start + len(clip)] += clip
    audio_input = PacedAudioInput(signal)

    session = scripted_agent_session(
        vad=vad,
        stt=TimedSTT(audio_input, truths, [turn.stt_s for turn in turns]),
        llm=ScriptedLLM(llm_replies),
        tts=ScriptedTTS(tts_replies),
        min_endpointing_s=min_endpointing_s,
    )
    session.input.audio = audio_input
    session.output.audio = ScriptedAudioOutput(first_frame_recorder(truth))
    return SpokenPipeline(
        session, ScriptedAgent(truth, {}), audio_input, truths, greeting_audio_s is not None
    )


async def run_spoken_pipeline(pipeline: SpokenPipeline, *, settle_s: float = 0.3) -> None:
    """Start the session, play the caller's audio at real pace to its end, close the session;
    fills in each truth's wall-clock end of voice."""
    session = pipeline.session
    await session.start(pipeline.agent)
    if pipeline.greeting:
        session.generate_reply(instructions=GREETING_PROMPT)
    player = asyncio.create_task(pipeline.audio_input.play())
    try:
        await player
        await asyncio.sleep(settle_s)
    finally:
        player.cancel()
    origin = pipeline.audio_input.origin
    assert origin is not None
    for truth in pipeline.truths:
        truth.heard_end = origin + truth.end_s
    with contextlib.suppress(RuntimeError):
        await session.drain()
    await session.aclose()
