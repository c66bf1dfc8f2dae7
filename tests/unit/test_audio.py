"""lk_observe.audio on synthetic signals: a voice over a -60 or -45 dBFS noise floor, pushed in
frames with known arrival times; the caller's real end of speech and the agent's first audible
sample are known to the sample."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lk_observe import audio
from lk_observe.audio import (
    MAX_LEADING_SILENCE_S,
    AudibleOnset,
    SpeechEndFinder,
    StreamClock,
)
from lk_observe.demo_audio import last_voiced_sample, noise_floor, synthetic_voice

RATE = 16000
ORIGIN = 1_700_000_000.0
TOLERANCE_S = 0.006  # one 5 ms block, plus rounding
NOISE_FLOORS = (-60.0, -45.0)


def _signal(noise_dbfs: float, *, voice_s: float = 1.2, lead_s: float = 1.0, tail_s: float = 1.5):
    voice = synthetic_voice(voice_s, seed=3)
    total = int((lead_s + voice_s + tail_s) * RATE)
    signal = noise_floor(total, noise_dbfs, seed=1)
    start = int(lead_s * RATE)
    signal[start : start + len(voice)] += voice
    end_s = (start + last_voiced_sample(voice) + 1) / RATE
    return signal, end_s


def _pcm(signal: np.ndarray, rate: int = RATE, channels: int = 1) -> bytes:
    mono = (np.clip(signal, -1, 1) * 32767).astype(np.int16)
    return np.repeat(mono, channels).tobytes() if channels > 1 else mono.tobytes()


def _feed(
    finder: SpeechEndFinder,
    signal: np.ndarray,
    *,
    frame_s: float = 0.01,
    rate: int = RATE,
    channels: int = 1,
    lateness: np.ndarray | None = None,
) -> None:
    step = int(rate * frame_s)
    for k, offset in enumerate(range(0, len(signal) - step + 1, step)):
        late = 0.0 if lateness is None else float(lateness[k % len(lateness)])
        arrived = ORIGIN + (offset + step) / rate + late
        finder.push(_pcm(signal[offset : offset + step], rate, channels), rate, channels, arrived)


@pytest.mark.parametrize("noise_dbfs", NOISE_FLOORS)
@pytest.mark.parametrize("vad_late_s", [0.03, 0.1, 0.18])
def test_finds_the_voice_end_before_a_late_vad(noise_dbfs: float, vad_late_s: float) -> None:
    signal, end_s = _signal(noise_dbfs)
    finder = SpeechEndFinder()
    _feed(finder, signal)
    vad_end = ORIGIN + end_s + vad_late_s
    heard = finder.speech_end(vad_end, vad_end + 0.55)
    assert heard is not None
    assert abs(heard.at - (ORIGIN + end_s)) <= TOLERANCE_S, (heard.at - ORIGIN, end_s)
    assert heard.floor_dbfs == pytest.approx(noise_dbfs, abs=3.0)


@pytest.mark.parametrize("noise_dbfs", NOISE_FLOORS)
def test_a_vad_that_clipped_the_tail_moves_forward_to_the_voice_end(noise_dbfs: float) -> None:
    signal, end_s = _signal(noise_dbfs)
    finder = SpeechEndFinder()
    _feed(finder, signal)
    vad_end = ORIGIN + end_s - 0.2  # the VAD lost the voice 200 ms before it ended
    heard = finder.speech_end(vad_end, vad_end + 0.75)
    assert heard is not None
    assert abs(heard.at - (ORIGIN + end_s)) <= TOLERANCE_S


@pytest.mark.parametrize("noise_dbfs", NOISE_FLOORS)
def test_a_click_after_the_speech_is_not_speech(noise_dbfs: float) -> None:
    signal, end_s = _signal(noise_dbfs)
    click = int((end_s + 0.35) * RATE)
    signal[click : click + 40] += 0.5
    finder = SpeechEndFinder()
    _feed(finder, signal)
    vad_end = ORIGIN + end_s + 0.1
    heard = finder.speech_end(vad_end, vad_end + 0.55)
    assert heard is not None
    assert abs(heard.at - (ORIGIN + end_s)) <= TOLERANCE_S


@pytest.mark.parametrize("noise_dbfs", NOISE_FLOORS)
def test_frames_that_arrive_late_and_in_bursts(noise_dbfs: float) -> None:
    signal, end_s = _signal(noise_dbfs)
    rng = np.random.default_rng(5)
    lateness = rng.uniform(0.0, 0.03, 400)
    lateness[::7] = 0.0  # some frames arrive on time: the stream's clock is the earliest
    finder = SpeechEndFinder()
    _feed(finder, signal, lateness=lateness)
    heard = finder.speech_end(ORIGIN + end_s + 0.1, ORIGIN + end_s + 0.65)
    assert heard is not None
    assert abs(heard.at - (ORIGIN + end_s)) <= TOLERANCE_S


@pytest.mark.parametrize(("rate", "channels", "frame_s"), [(48000, 2, 0.02), (24000, 1, 0.0125)])
def test_other_rates_channels_and_frame_sizes(rate: int, channels: int, frame_s: float) -> None:
    signal, end_s = _signal(-45.0)
    resampled = np.interp(
        np.arange(int(len(signal) * rate / RATE)) * RATE / rate, np.arange(len(signal)), signal
    ).astype(np.float32)
    finder = SpeechEndFinder()
    _feed(finder, resampled, frame_s=frame_s, rate=rate, channels=channels)
    heard = finder.speech_end(ORIGIN + end_s + 0.1, ORIGIN + end_s + 0.65)
    assert heard is not None
    assert abs(heard.at - (ORIGIN + end_s)) <= TOLERANCE_S


def test_the_ring_wraps_and_keeps_the_newest_audio() -> None:
    signal, end_s = _signal(-60.0, lead_s=12.0)
    finder = SpeechEndFinder(history_s=5.0)
    _feed(finder, signal)
    heard = finder.speech_end(ORIGIN + end_s + 0.1, ORIGIN + end_s + 0.65)
    assert heard is not None and abs(heard.at - (ORIGIN + end_s)) <= TOLERANCE_S
    assert finder.speech_end(ORIGIN + 2.0, ORIGIN + 2.5) is None  # long gone


@pytest.mark.parametrize(
    "signal",
    [np.zeros(3 * RATE, np.float32), noise_floor(3 * RATE, -45.0, seed=2)],
    ids=["digital-silence", "noise-only"],
)
def test_no_voice_no_answer(signal: np.ndarray) -> None:
    finder = SpeechEndFinder()
    _feed(finder, signal)
    assert finder.speech_end(ORIGIN + 1.5, ORIGIN + 2.05) is None


def test_level_up_to_the_decision_is_not_trusted() -> None:
    """A VAD decides after hearing silence: "voice" right up to its decision is noise the floor
    estimate did not catch (noise that just got louder), not a speech end."""
    signal = noise_floor(3 * RATE, -60.0, seed=2)
    signal[RATE:] += noise_floor(2 * RATE, -20.0, seed=3)
    finder = SpeechEndFinder()
    _feed(finder, signal)
    assert finder.speech_end(ORIGIN + 2.0, ORIGIN + 2.55) is None


def test_unusable_vad_times_and_no_audio() -> None:
    finder = SpeechEndFinder()
    assert finder.speech_end(ORIGIN, ORIGIN + 0.5) is None  # nothing heard yet
    _feed(finder, _signal(-60.0)[0])
    assert finder.speech_end(math.nan, ORIGIN + 1.0) is None
    assert finder.speech_end(ORIGIN + 2.0, ORIGIN + 1.0) is None  # decided before it ended
    with pytest.raises(ValueError):
        finder.push(b"\x00\x00", 0, 1, ORIGIN)


def test_stream_clock_takes_the_earliest_arrival_and_resyncs_after_a_pause() -> None:
    clock = StreamClock()
    assert clock.advance(160, RATE, 100.02) == pytest.approx(100.01)  # 10 ms late
    assert clock.advance(160, RATE, 100.02) == pytest.approx(100.01)  # on time: origin 100.0
    assert clock.origin == pytest.approx(100.0)
    assert clock.advance(160, RATE, 100.06) == pytest.approx(100.02)  # late: origin kept
    assert clock.advance(160, RATE, 101.04) == pytest.approx(101.03)  # a 1 s pause: resync


@pytest.mark.parametrize("leading_s", [0.0, 0.0375, 0.15])
def test_audible_onset_counts_the_leading_silence_to_the_sample(leading_s: float) -> None:
    rate = 24000
    lead = round(leading_s * rate)
    tone = (0.1 * np.cos(2 * np.pi * 220 * np.arange(rate) / rate)).astype(np.float32)
    reply = np.concatenate((np.zeros(lead, np.float32), tone))
    onset = AudibleOnset()
    settled_at = None
    for k, offset in enumerate(range(0, len(reply), 480)):
        if onset.push(_pcm(reply[offset : offset + 480]), rate, 1):
            settled_at = k
    assert onset.leading_s == pytest.approx(lead / rate, abs=1e-9)
    assert settled_at == lead // 480 and not onset.gave_up


def test_audible_onset_ignores_quiet_hiss_and_gives_up_on_silence() -> None:
    onset = AudibleOnset()
    hiss = noise_floor(RATE, -75.0, seed=4)
    onset.push(_pcm(hiss), RATE, 1)
    assert not onset.settled and onset.silent_s == pytest.approx(1.0)
    onset.push(_pcm(np.zeros(int(RATE * MAX_LEADING_SILENCE_S), np.float32)), RATE, 1)
    assert onset.gave_up and onset.leading_s is None
    assert not onset.push(_pcm(np.full(160, 0.5, np.float32)), RATE, 1)  # settled: ignored
    onset.reset()
    assert onset.push(_pcm(np.full(160, 0.5, np.float32)), RATE, 2)
    assert onset.leading_s == 0.0


@pytest.mark.parametrize(("rate", "channels", "frame_s"), [(16000, 1, 0.01), (48000, 2, 0.0125)])
def test_levels_computed_in_batches_are_those_of_frame_by_frame(
    monkeypatch: pytest.MonkeyPatch, rate: int, channels: int, frame_s: float
) -> None:
    # the loop only keeps each frame; levels come 50 frames at a time (or when asked): the same
    # block energies and times as computing every frame as it comes, formats changing included
    signal, end_s = _signal(-45.0)
    rng = np.random.default_rng(11)
    lateness = rng.uniform(0.0, 0.03, 97)

    def levels(batch: int) -> tuple[np.ndarray, np.ndarray, object]:
        monkeypatch.setattr(audio, "BATCH_FRAMES", batch)
        finder = SpeechEndFinder()
        _feed(finder, signal[: len(signal) // 3], lateness=lateness)  # 16 kHz mono first
        _feed(finder, signal, frame_s=frame_s, rate=rate, channels=channels, lateness=lateness)
        heard = finder.speech_end(ORIGIN + end_s + 0.1, ORIGIN + end_s + 0.65)
        energy, ends = finder._blocks()
        return energy, ends, heard

    one_by_one, batched = levels(1), levels(50)
    np.testing.assert_allclose(batched[0], one_by_one[0], rtol=1e-12)
    np.testing.assert_allclose(batched[1], one_by_one[1], rtol=0, atol=1e-9)
    assert batched[2] == one_by_one[2]
