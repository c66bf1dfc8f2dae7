"""lk_observe's audio hooks on a real (not started) AgentSession: frames pass unchanged, the
session's input and output are put back exactly on uninstrument, unreadable frames are counted,
never raised."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from livekit import rtc
from livekit.agents import AgentSession
from livekit.agents.voice.io import AudioInput
from prometheus_client import CollectorRegistry

import lk_observe
from lk_observe.demo import ScriptedAudioOutput


class _Frames(AudioInput):
    def __init__(self, frames: list[rtc.AudioFrame]) -> None:
        super().__init__(label="frames")
        self._frames = list(frames)

    async def __anext__(self) -> rtc.AudioFrame:
        if not self._frames:
            raise StopAsyncIteration
        return self._frames.pop(0)


class _NoSamples:
    """A frame-like object the output accepts (it reads only `duration`) with no samples."""

    duration = 0.01


def _frame(level: float, samples: int = 160, rate: int = 16000) -> rtc.AudioFrame:
    pcm = np.full(samples, int(level * 32767), dtype=np.int16)
    return rtc.AudioFrame(pcm.tobytes(), rate, 1, samples)


def _instrument(session: AgentSession[None]) -> lk_observe.InstrumentHandle:
    return lk_observe.instrument(
        session, registry=CollectorRegistry(), monitor=lk_observe.LatencyMonitor()
    )


def test_the_input_tap_passes_frames_unchanged_and_is_removed_on_uninstrument() -> None:
    async def go() -> None:
        session: AgentSession[None] = AgentSession()
        frames = [_frame(0.0), _frame(0.3), _frame(0.0)]
        source = _Frames(frames)
        session.input.audio = source
        handle = _instrument(session)
        tap = session.input.audio
        assert tap is not source and tap.source is source and tap.label == source.label
        read = [frame async for frame in tap]
        assert [f.data.tobytes() for f in read] == [f.data.tobytes() for f in frames]
        assert handle.events.audio.frames_heard == 3
        handle.uninstrument()
        assert session.input.audio is source

    asyncio.run(go())


def test_the_output_hooks_are_instance_attributes_and_are_put_back() -> None:
    async def go() -> None:
        session: AgentSession[None] = AgentSession()
        output = ScriptedAudioOutput(lambda at: None)
        session.output.audio = output
        assert "capture_frame" not in output.__dict__
        handle = _instrument(session)
        assert {"capture_frame", "flush", "clear_buffer"} <= set(output.__dict__)
        audio = handle.events.audio
        await output.capture_frame(_frame(0.0, 240, 24000))
        await output.capture_frame(_frame(0.2, 240, 24000))
        assert audio.onset.leading_s == 0.01  # one silent 10 ms frame, then audible
        output.flush()
        handle.uninstrument()
        assert not {"capture_frame", "flush", "clear_buffer"} & set(output.__dict__)

    asyncio.run(go())


def test_unreadable_frames_are_counted_and_never_raised() -> None:
    async def go() -> None:
        session: AgentSession[None] = AgentSession()
        broken: Any = object()  # no data, no sample rate
        session.input.audio = _Frames([broken])  # type: ignore[list-item]
        session.output.audio = ScriptedAudioOutput(lambda at: None)
        handle = _instrument(session)
        tap = session.input.audio
        assert tap is not None
        assert await tap.__anext__() is broken  # handed on as it came
        await session.output.audio.capture_frame(_NoSamples())  # type: ignore[union-attr,arg-type]
        assert handle.events.audio.unreadable == 2
        assert handle.handler_failures == 0 and handle.skipped == {}
        handle.uninstrument()

    asyncio.run(go())


def test_a_session_without_audio_is_left_alone() -> None:
    async def go() -> None:
        session: AgentSession[None] = AgentSession()
        handle = _instrument(session)
        assert session.input.audio is None and session.output.audio is None
        assert handle.events.audio.speech_end(1.0, (1.0, 1.5)) is None
        assert handle.events.audio.output_verdict("s1") == (None, False)
        handle.uninstrument()

    asyncio.run(go())


def test_hear_audio_false_puts_no_hook_on_the_session() -> None:
    async def go() -> None:
        session: AgentSession[None] = AgentSession()
        source = _Frames([_frame(0.3)])
        session.input.audio = source
        output = ScriptedAudioOutput(lambda _at: None)
        session.output.audio = output
        handle = lk_observe.instrument(
            session,
            registry=CollectorRegistry(),
            monitor=lk_observe.LatencyMonitor(),
            hear_audio=False,
        )
        assert session.input.audio is source
        assert "capture_frame" not in output.__dict__  # the class's own method, unwrapped
        assert [f async for f in source] and handle.events.audio.frames_heard == 0
        handle.uninstrument()

    asyncio.run(go())


def test_hear_audio_must_be_a_bool() -> None:
    class Emitting:
        def emit(self, event: str, *args: Any) -> None:
            del event, args

    with pytest.raises(TypeError, match="hear_audio"):
        lk_observe.instrument(Emitting(), hear_audio="no")  # type: ignore[arg-type]
