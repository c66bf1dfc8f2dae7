"""Speech for tests: espeak-ng (Debian's, see scripts/setup-espeak.sh) synthesizes utterances.

The synthesizer is fetched on first use and never skipped: CI must have it.
"""

from __future__ import annotations

import functools
import io
import subprocess
import wave
from pathlib import Path

import numpy as np

from lk_observe.demo_audio import INPUT_RATE, Samples

REPO = Path(__file__).resolve().parents[1]
SETUP_SCRIPT = REPO / "scripts" / "setup-espeak.sh"

UTTERANCES = (
    "Hello, can you hear me?",
    "I need to change my booking for tomorrow.",
    "What time does the store close?",
    "Yes.",
    "Please send it to my office address.",
    "Could you repeat the last part?",
    "My order number is four five six.",
    "Thanks, that is all.",
)


@functools.cache
def espeak() -> Path:
    """The espeak-ng wrapper scripts/setup-espeak.sh prints (fetched and unpacked once)."""
    done = subprocess.run(
        ["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{SETUP_SCRIPT} failed ({done.returncode}):\n{done.stderr}")
    return Path(done.stdout.strip().splitlines()[-1])


@functools.cache
def speak(text: str) -> Samples:
    """`text` spoken by espeak-ng, as 16 kHz mono float samples."""
    wav = subprocess.run(
        [str(espeak()), "--stdout", text], capture_output=True, check=True, timeout=60
    ).stdout
    with wave.open(io.BytesIO(wav)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    samples = pcm.astype(np.float64) / 32768.0
    # espeak speaks at 22.05 kHz: resample (linear; the clip's end is what matters, not timbre)
    positions = np.arange(int(len(samples) * INPUT_RATE / rate)) * (rate / INPUT_RATE)
    return np.interp(positions, np.arange(len(samples)), samples).astype(np.float32)
