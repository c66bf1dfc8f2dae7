"""What the caller hears: the user's real end of speech and the agent's first audible sample.

Pure signal work on 16-bit PCM (numpy), no LiveKit and no clock reads: callers pass the wall time
each frame arrived. Nothing here keeps audio beyond the last half second: the input side keeps
one energy figure per 5 ms block (a bounded ring), computed for 50 frames at a time, and the
output side counts samples until the first audible one.

- `SpeechEndFinder` (the user's microphone): per frame, the energy of each 5 ms block and the
  wall time the block ended. When the VAD has declared end of speech, `speech_end()` looks at
  the blocks around the VAD's estimate, tracks the noise floor from the quiet blocks around it,
  and returns where the voice really stopped: the end of the last run of blocks above the floor
  (the middle of its last block)
  that is connected to the speech the VAD heard (a late VAD moves back to it; a VAD that clipped
  a quiet tail moves forward to it; a click well after the speech is not speech).
- `AudibleOnset` (the agent's output): samples of a reply's audio before the first audible one,
  so the reply's leading silence is measured instead of assumed to be zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

BLOCK_S = 0.005  # resolution of the input's level trace
HISTORY_S = 30.0  # input blocks kept: covers a long end-of-turn wait after the VAD's decision
LOOKBACK_S = 1.5  # how far before the VAD's speech end the real end may lie
MERGE_GAP_S = 0.15  # quieter stretches shorter than this inside speech (stops, pauses) join it
FLOOR_WINDOW_S = 3.0  # blocks the noise floor is estimated from, ending at the VAD's decision
FLOOR_PERCENTILE = 10.0  # the floor: this percentile of those blocks' levels
SPEECH_MARGIN_DB = 9.0  # a block is voice when this far above the floor...
MIN_SPEECH_DBFS = -70.0  # ...and above this absolute level (digital silence has no floor)
MIN_QUIET_BEFORE_DECISION_S = 0.1  # a VAD decides after silence: "voice" up to it is noise
MIN_FLOOR_BLOCKS = 40  # 200 ms of audio at least before a floor is trusted
AUDIBLE_DBFS = -50.0  # the agent's output is audible from the first sample above this
MAX_LEADING_SILENCE_S = 2.0  # a reply silent for longer has no measurable audible start
DRIFT_ALLOWANCE = 0.001  # the input's sample clock may run this much slower than the wall clock
RESYNC_S = 0.25  # a frame this much later than the stream's clock: the stream paused
_FULL_SCALE = 32768.0
PCM = bytes | bytearray | memoryview  # interleaved int16 samples (rtc.AudioFrame.data)
_Frame = tuple[PCM, int, int, float]  # (pcm, sample rate, channels, arrival)
BATCH_FRAMES = 50  # input frames whose levels are computed together (0.5 s of 10 ms frames)


def _db(energy: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Mean-square energy of int16 samples (normalised) -> dBFS; silence is -200 dBFS."""
    return 10.0 * np.log10(np.maximum(energy, 1e-20))


class StreamClock:
    """Wall time of each sample of a live stream whose frames arrive with jitter.

    A frame is delivered once its last sample exists, and only ever late: the stream's origin is
    the earliest `arrival - position / rate` seen (allowed to creep by `DRIFT_ALLOWANCE` for a
    slow sender clock), reset when the stream pauses.
    """

    def __init__(self) -> None:
        self.origin: float | None = None
        self.position = 0  # samples of the stream so far
        self._last_arrival: float | None = None

    def advance(self, samples: int, sample_rate: int, arrived_at: float) -> float:
        """The wall time of the stream's start of this frame (the frame's first sample)."""
        start_position = self.position
        self.position += samples
        offset = arrived_at - self.position / sample_rate
        origin = self.origin
        last = self._last_arrival
        self._last_arrival = arrived_at
        if origin is None or offset - origin > RESYNC_S:
            origin = offset
        else:
            creep = DRIFT_ALLOWANCE * (arrived_at - last) if last is not None else 0.0
            origin = min(offset, origin + max(creep, 0.0))
        self.origin = origin
        return origin + start_position / sample_rate


@dataclass(frozen=True)
class HeardEnd:
    """Where the user's voice really stopped, and the level figures it was found with."""

    at: float  # unix seconds: the middle of the last voiced 5 ms block
    floor_dbfs: float
    threshold_dbfs: float


class SpeechEndFinder:
    """The user's real end of speech, from the level of the audio the session received."""

    def __init__(self, history_s: float = HISTORY_S) -> None:
        self._capacity = max(int(history_s / BLOCK_S), 1)
        self._energy = np.zeros(self._capacity, dtype=np.float64)
        self._ends = np.full(self._capacity, -math.inf, dtype=np.float64)
        self._write = 0
        self._filled = 0
        self._clock = StreamClock()
        self._rate: int | None = None
        self._carry = np.zeros(0, dtype=np.float64)  # samples of a block split across frames
        self._pending: list[_Frame] = []  # frames pushed since levels were last computed

    def push(self, pcm: PCM, sample_rate: int, channels: int, arrived_at: float) -> None:
        """One frame of interleaved int16 PCM as it arrived (first channel is used).

        Runs on the agent's loop for every frame, so it only keeps the frame: levels are
        computed for `BATCH_FRAMES` frames at a time (numpy's per-call cost paid once per batch)
        and for what is pending when `speech_end()` asks.
        """
        if sample_rate <= 0 or channels <= 0:
            raise ValueError("sample_rate and channels must be positive")
        self._pending.append((bytes(pcm), sample_rate, channels, arrived_at))  # a copy: ours
        if len(self._pending) >= BATCH_FRAMES:
            self._level_pending()

    def _level_pending(self) -> None:
        pending, self._pending = self._pending, []
        first = 0
        while first < len(pending):  # runs of frames with one format, in order
            _, rate, channels, _ = pending[first]
            last = first + 1
            while last < len(pending) and pending[last][1:3] == (rate, channels):
                last += 1
            self._level_run(pending[first:last], rate, channels)
            first = last

    def _level_run(self, frames: list[_Frame], sample_rate: int, channels: int) -> None:
        if sample_rate != self._rate:
            self._rate = sample_rate
            self._carry = np.zeros(0, dtype=np.float64)
            self._clock = StreamClock()
        counts = [memoryview(pcm).nbytes // (2 * channels) for pcm, _, _, _ in frames]
        starts = np.array(
            [
                self._clock.advance(n, sample_rate, arrived_at)
                for n, (_, _, _, arrived_at) in zip(counts, frames, strict=True)
            ]
        )
        samples = np.frombuffer(b"".join(pcm for pcm, _, _, _ in frames), dtype=np.int16)
        if channels > 1:
            samples = samples[::channels]
        block = max(int(sample_rate * BLOCK_S), 1)
        carried = len(self._carry)
        mono = samples.astype(np.float64)
        if carried:
            mono = np.concatenate((self._carry, mono))
        whole = len(mono) // block
        self._carry = mono[whole * block :]
        if whole == 0:
            return
        blocks = mono[: whole * block].reshape(whole, block)
        energy = np.einsum("ij,ij->i", blocks, blocks) / (block * _FULL_SCALE * _FULL_SCALE)
        # each block ends in some frame: its time is that frame's start plus the samples into it
        block_ends = np.arange(1, whole + 1, dtype=np.int64) * block - carried  # in this run
        frame_starts = np.cumsum([0, *counts[:-1]])
        frame = np.searchsorted(frame_starts, block_ends - 1, side="right") - 1
        ends = starts[frame] + (block_ends - frame_starts[frame]) / sample_rate
        self._store(energy, ends)

    def _store(self, energy: npt.NDArray[np.float64], ends: npt.NDArray[np.float64]) -> None:
        n = len(energy)
        if n >= self._capacity:
            energy, ends, n = energy[-self._capacity :], ends[-self._capacity :], self._capacity
        first = min(n, self._capacity - self._write)
        self._energy[self._write : self._write + first] = energy[:first]
        self._ends[self._write : self._write + first] = ends[:first]
        if first < n:
            self._energy[: n - first] = energy[first:]
            self._ends[: n - first] = ends[first:]
        self._write = (self._write + n) % self._capacity
        self._filled = min(self._filled + n, self._capacity)

    def _blocks(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Every kept block, oldest first: (energy, end time)."""
        if self._pending:
            self._level_pending()
        if self._filled < self._capacity:
            return self._energy[: self._filled], self._ends[: self._filled]
        w = self._write
        return (
            np.concatenate((self._energy[w:], self._energy[:w])),
            np.concatenate((self._ends[w:], self._ends[:w])),
        )

    def speech_end(self, vad_end: float, decided_at: float) -> HeardEnd | None:
        """Where the voice the VAD heard really stopped: `vad_end` is the VAD's (back-dated)
        estimate, `decided_at` when it declared end of speech. None when the audio cannot say
        (no audio around it, digital silence, a level that never drops back to the floor)."""
        if not (math.isfinite(vad_end) and math.isfinite(decided_at)) or decided_at < vad_end:
            return None
        energy, ends = self._blocks()
        in_floor = (ends > decided_at - FLOOR_WINDOW_S) & (ends <= decided_at + BLOCK_S)
        floor_energy = energy[in_floor]
        if len(floor_energy) < MIN_FLOOR_BLOCKS:
            return None
        # a percentile by partial sort (np.percentile costs ~80 ms on its first call)
        rank = int(len(floor_energy) * FLOOR_PERCENTILE / 100.0)
        floor = float(_db(np.partition(floor_energy, rank)[rank : rank + 1])[0])
        threshold = max(floor + SPEECH_MARGIN_DB, MIN_SPEECH_DBFS)
        voiced = energy > 10.0 ** (threshold / 10.0)
        window = (ends > vad_end - LOOKBACK_S) & (ends <= decided_at + BLOCK_S)
        voiced_ends = ends[window & voiced]
        if len(voiced_ends) == 0:
            return None
        # the run of voice the VAD heard: the last voiced block at or before its estimate (or
        # the first one just after it, when the VAD ended before the voice started to count)
        before = voiced_ends[voiced_ends <= vad_end + MERGE_GAP_S]
        if len(before) == 0:
            return None
        start = int(np.searchsorted(voiced_ends, before[-1]))
        tail = voiced_ends[start:]
        gaps = np.diff(tail) > MERGE_GAP_S
        end = float(tail[int(np.argmax(gaps))] if gaps.any() else tail[-1])
        if end > decided_at - MIN_QUIET_BEFORE_DECISION_S:
            return None  # "voice" right up to the VAD's decision: the floor is not understood
        # the voice stopped somewhere in its last voiced block: its middle is off by half a block
        # at most, either way
        return HeardEnd(at=end - BLOCK_S / 2, floor_dbfs=floor, threshold_dbfs=threshold)


class AudibleOnset:
    """Samples of one reply's audio before its first audible sample (the leading silence)."""

    def __init__(self) -> None:
        self._level = math.ceil(_FULL_SCALE * 10.0 ** (AUDIBLE_DBFS / 20.0))
        self.silent_s = 0.0  # audio of the current segment seen so far, all of it silent
        self.leading_s: float | None = None  # set once the first audible sample is found
        self.gave_up = False  # MAX_LEADING_SILENCE_S of silence: no audible start to measure

    @property
    def settled(self) -> bool:
        return self.leading_s is not None or self.gave_up

    def reset(self) -> None:
        """A new segment (reply) starts with the next frame."""
        self.silent_s, self.leading_s, self.gave_up = 0.0, None, False

    def push(self, pcm: PCM, sample_rate: int, channels: int) -> bool:
        """One frame of the segment, in order; True when this frame settled it."""
        if self.settled:
            return False
        if sample_rate <= 0 or channels <= 0:
            raise ValueError("sample_rate and channels must be positive")
        samples = np.frombuffer(pcm, dtype=np.int16)
        if channels > 1:
            samples = samples[::channels]
        level = self._level
        if len(samples) and (int(samples.max()) >= level or -int(samples.min()) >= level):
            first = int(np.argmax(np.abs(samples.astype(np.int32)) >= level))
            self.leading_s = self.silent_s + first / sample_rate
            return True
        self.silent_s += len(samples) / sample_rate
        if self.silent_s >= MAX_LEADING_SILENCE_S:
            self.gave_up = True
            return True
        return False
