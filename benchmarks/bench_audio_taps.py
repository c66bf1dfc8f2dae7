"""What listening to the audio costs: lk_observe's per-frame work; a session with and without it.

1. Per frame (the work lk_observe adds on the agent's event loop for each frame the session reads
   or plays), timed over many real 10 ms frames of a voice over noise:
     input   - `SpeechEndFinder.push`: 5 ms block energies into a ring (16 kHz mono; 48 kHz stereo)
     tap     - everything per input frame: reading the session's input through the pass-through
               `AudioInput` lk_observe puts at its head, minus reading the source directly
     output  - `AudibleOnset.push` on a reply's frames until its first audible sample (24 kHz)
   and per turn: `speech_end()`, the search done once when the VAD declares end of speech.
2. Per second of audio, a real `AgentSession` with the real Silero VAD reading a voice over noise
   in 10 ms frames as fast as it can, without lk_observe and with it (same run, interleaved,
   median of the repetitions): CPU (process_time, every thread) per second of audio, and the
   difference.

    uv run python benchmarks/bench_audio_taps.py [--seconds 20] [--repeat 5] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from livekit import rtc
from livekit.agents import Agent, AgentSession
from livekit.agents.voice.io import AudioInput
from prometheus_client import CollectorRegistry

import lk_observe
from lk_observe.audio import AudibleOnset, SpeechEndFinder
from lk_observe.demo_audio import INPUT_RATE, noise_floor, synthetic_voice

FRAME_S = 0.01


def _speech(seconds: float, rate: int = INPUT_RATE, channels: int = 1) -> list[bytes]:
    """`seconds` of a voice (2.5 s utterances, 1 s pauses) over -50 dBFS noise, as 10 ms frames."""
    signal = noise_floor(int(seconds * INPUT_RATE), -50.0, seed=3)
    for i, start in enumerate(range(INPUT_RATE // 2, len(signal), int(3.5 * INPUT_RATE))):
        voice = synthetic_voice(2.5, seed=i)[: len(signal) - start]
        signal[start : start + len(voice)] += voice
    if rate != INPUT_RATE:
        positions = np.arange(int(len(signal) * rate / INPUT_RATE)) * INPUT_RATE / rate
        signal = np.interp(positions, np.arange(len(signal)), signal).astype(np.float32)
    pcm = (np.clip(signal, -1, 1) * 32767).astype(np.int16)
    if channels > 1:
        pcm = np.repeat(pcm, channels)
    step = int(rate * FRAME_S) * channels
    return [pcm[i : i + step].tobytes() for i in range(0, len(pcm) - step + 1, step)]


def _per_call_us(calls: int, run: Callable[[], None], repeat: int) -> float:
    """Median over `repeat` runs of the time per call, in microseconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(times)


def per_frame(seconds: float, repeat: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for label, rate, channels in (("16 kHz mono", 16000, 1), ("48 kHz stereo", 48000, 2)):
        frames = _speech(seconds, rate, channels)

        def push(frames: list[bytes] = frames, rate: int = rate, channels: int = channels) -> None:
            finder = SpeechEndFinder()
            for k, pcm in enumerate(frames):
                finder.push(pcm, rate, channels, 1000.0 + k * FRAME_S)

        push()  # warm up numpy's first calls
        out[f"input frame, {label} (us)"] = _per_call_us(len(frames), push, repeat)

    frames16 = _speech(seconds)
    finder = SpeechEndFinder()
    for k, pcm in enumerate(frames16):
        finder.push(pcm, 16000, 1, 1000.0 + (k + 1) * FRAME_S)
    ends = [1000.0 + 0.5 + 2.5 + 0.1 + 3.5 * i for i in range(int(seconds / 3.5))]
    ends = [e for e in ends if e + 0.6 < 1000.0 + seconds - 1.0]

    def search() -> None:
        for end in ends:
            finder.speech_end(end, end + 0.55)

    out["speech_end per turn (us)"] = _per_call_us(len(ends), search, repeat)

    reply = np.zeros(int(24000 * 0.15), dtype=np.int16)  # 150 ms of leading silence, then a tone
    tone = (3000 * np.cos(2 * np.pi * 220 * np.arange(24000) / 24000)).astype(np.int16)
    pcm = np.concatenate((reply, tone))
    out_frames = [pcm[i : i + 240].tobytes() for i in range(0, len(pcm) - 239, 240)]

    def onset() -> None:
        tracker = AudibleOnset()
        for frame in out_frames:
            if tracker.push(frame, 24000, 1):
                break

    settled_after = 16  # 15 silent frames and the first audible one
    out["output frame until audible (us)"] = _per_call_us(settled_after, onset, repeat * 50)
    return out


def tap_per_frame_us(seconds: float, repeat: int) -> float:
    """Reading a session's input through lk_observe's tap, less reading the source itself."""
    frames = _speech(seconds)

    async def read(through_tap: bool) -> float:
        session: AgentSession[None] = AgentSession()
        source = _Frames(frames, yield_every=0)
        session.input.audio = source
        handle = lk_observe.instrument(
            session, registry=CollectorRegistry(), monitor=lk_observe.LatencyMonitor()
        )
        stream = session.input.audio if through_tap else source
        assert stream is not None
        started = time.perf_counter()
        for _ in range(len(frames)):
            await stream.__anext__()
        spent = time.perf_counter() - started
        handle.uninstrument()
        return spent / len(frames) * 1e6

    async def go() -> float:
        await read(True)  # warm up
        direct = statistics.median([await read(False) for _ in range(repeat)])
        tapped = statistics.median([await read(True) for _ in range(repeat)])
        return tapped - direct

    return asyncio.run(go())


class _Frames(AudioInput):
    """Hands the session prepared frames as fast as it reads them; `done` when all are read."""

    def __init__(self, frames: Sequence[bytes], *, yield_every: int = 20) -> None:
        super().__init__(label="bench-frames")
        self._frames = [rtc.AudioFrame(f, INPUT_RATE, 1, len(f) // 2) for f in frames]
        self._next = 0
        self._yield_every = yield_every
        self.done = asyncio.Event()

    async def __anext__(self) -> rtc.AudioFrame:
        if self._next >= len(self._frames):
            self.done.set()
            await asyncio.Event().wait()  # a live microphone: no more frames, never ends
        frame = self._frames[self._next]
        self._next += 1
        if self._yield_every and self._next % self._yield_every == 0:
            await asyncio.sleep(0)  # let the session's other tasks run, as a paced source does
        return frame


async def _session_cpu_s(frames: Sequence[bytes], vad: Any, instrumented: bool) -> float:
    session: AgentSession[None] = AgentSession(vad=vad, aec_warmup_duration=None)
    source = _Frames(frames)
    session.input.audio = source
    if instrumented:
        lk_observe.instrument(
            session, registry=CollectorRegistry(), monitor=lk_observe.LatencyMonitor()
        )
    await session.start(Agent(instructions="benchmark"))
    started = time.process_time()
    await source.done.wait()
    await asyncio.sleep(0.2)  # the VAD's last windows
    spent = time.process_time() - started
    await session.aclose()
    return spent


def per_second_of_audio(seconds: float, repeat: int) -> dict[str, float]:
    from livekit.plugins import silero

    frames = _speech(seconds)
    vad = silero.VAD.load()
    runs: dict[bool, list[float]] = {False: [], True: []}

    async def go() -> None:
        await _session_cpu_s(frames[:200], vad, True)  # warm up both paths
        for _ in range(repeat):
            for instrumented in (False, True):
                runs[instrumented].append(await _session_cpu_s(frames, vad, instrumented))

    asyncio.run(go())
    audio_s = len(frames) * FRAME_S
    bare = statistics.median(runs[False]) / audio_s * 1000.0
    with_taps = statistics.median(runs[True]) / audio_s * 1000.0
    return {
        "session + Silero, CPU ms per s of audio": bare,
        "same with lk_observe, CPU ms per s of audio": with_taps,
        "added by lk_observe, CPU ms per s of audio": with_taps - bare,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="audio per run")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions (median)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args(argv)
    seconds, repeat = (8.0, 1) if args.quick else (args.seconds, args.repeat)
    results = per_frame(seconds, repeat)
    results["input frame through the tap, all in (us)"] = tap_per_frame_us(seconds, repeat)
    results.update(per_second_of_audio(seconds, repeat))
    width = max(map(len, results))
    for name, value in results.items():
        print(f"{name:<{width}}  {value:9.2f}")
    frame_us = results["input frame through the tap, all in (us)"]
    print(
        f"{'input work per s of audio (100 frames), CPU ms':<{width}}  {frame_us * 100 / 1000:9.2f}"
    )
    return results


if __name__ == "__main__":
    main()
