"""The latency guide as data: VAD presets, a model latency map, speed profiles, the budget.

Everything here is the guide's *typical* figures (vendor-published and commonly reported
numbers), not measurements: lk_observe's own histograms are the measurements. Use these to set
expectations (`expected_latency`) and to say which stage of a measured turn blew its share of
the budget (`budget_overruns`). Pure data and pure functions; no I/O, no livekit imports.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, TypedDict

from lk_observe.turns import Turn

Range = tuple[float, float]  # (low, high) in milliseconds
ModelKind = Literal["stt", "llm", "tts"]

# One VAD window of the bundled Silero model (32 ms at 16 kHz) plus scheduling slack: how much
# later than the configured silence the end-of-turn decision typically lands.
_DETECTION_SLACK_MS = 50.0


def _check_range(what: str, value: Range) -> None:
    low, high = value
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high < low:
        raise ValueError(f"{what}: expected 0 <= low <= high (ms), got {value!r}")


# -- VAD presets ----------------------------------------------------------------------------------


class SileroKwargs(TypedDict):
    """Typed so `silero.VAD.load(**preset.silero_kwargs())` type-checks in the user's code."""

    min_speech_duration: float
    min_silence_duration: float
    prefix_padding_duration: float
    activation_threshold: float


@dataclass(frozen=True)
class VADPreset:
    """Silero VAD parameters plus the endpointing delays that go with them (seconds).

    With VAD turn detection LiveKit waits `min_endpointing_delay` from the (back-dated) end of
    speech, and the VAD itself reports the end after `min_silence_duration`; the later of the two
    decides when the turn ends, so both are tuned together.
    """

    name: str
    intent: str
    min_speech_duration: float
    min_silence_duration: float
    prefix_padding_duration: float
    activation_threshold: float
    min_endpointing_delay: float
    max_endpointing_delay: float

    def __post_init__(self) -> None:
        for field_name in (
            "min_speech_duration",
            "min_silence_duration",
            "prefix_padding_duration",
            "min_endpointing_delay",
            "max_endpointing_delay",
        ):
            value = getattr(self, field_name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{self.name}.{field_name} must be >= 0 seconds, got {value!r}")
        if not 0.0 < self.activation_threshold < 1.0:
            raise ValueError(f"{self.name}.activation_threshold must be in (0, 1)")
        if self.max_endpointing_delay < self.min_endpointing_delay:
            raise ValueError(f"{self.name}: max_endpointing_delay < min_endpointing_delay")

    def silero_kwargs(self) -> SileroKwargs:
        """Keyword arguments for `silero.VAD.load(...)` (or livekit.agents.inference.VAD)."""
        return {
            "min_speech_duration": self.min_speech_duration,
            "min_silence_duration": self.min_silence_duration,
            "prefix_padding_duration": self.prefix_padding_duration,
            "activation_threshold": self.activation_threshold,
        }

    def endpointing(self) -> dict[str, float]:
        """`turn_handling={"endpointing": preset.endpointing()}` for AgentSession (1.8.x)."""
        return {"min_delay": self.min_endpointing_delay, "max_delay": self.max_endpointing_delay}

    @property
    def turn_detection_ms(self) -> Range:
        """Typical end-of-speech -> end-of-turn decision time with VAD turn detection."""
        low = max(self.min_silence_duration, self.min_endpointing_delay) * 1000.0
        return (low, low + _DETECTION_SLACK_MS)


VAD_PRESETS: Mapping[str, VADPreset] = MappingProxyType(
    {
        preset.name: preset
        for preset in (
            VADPreset(
                name="fast_qa",
                intent="Short questions and commands; answer as soon as the user stops. "
                "Accepts the occasional cut-off when a user pauses mid-sentence.",
                min_speech_duration=0.05,
                min_silence_duration=0.15,
                prefix_padding_duration=0.2,
                activation_threshold=0.5,
                min_endpointing_delay=0.15,
                max_endpointing_delay=1.5,
            ),
            VADPreset(
                name="conversation",
                intent="General back-and-forth (the default): quick replies without cutting off "
                "the short pauses people make between clauses.",
                min_speech_duration=0.1,
                min_silence_duration=0.25,
                prefix_padding_duration=0.3,
                activation_threshold=0.5,
                min_endpointing_delay=0.25,
                max_endpointing_delay=2.5,
            ),
            VADPreset(
                name="noisy",
                intent="Call centres, cars, streets: a higher threshold and a longer minimum "
                "speech so background noise and clicks do not start or interrupt turns.",
                min_speech_duration=0.2,
                min_silence_duration=0.4,
                prefix_padding_duration=0.4,
                activation_threshold=0.7,
                min_endpointing_delay=0.4,
                max_endpointing_delay=3.0,
            ),
            VADPreset(
                name="thoughtful",
                intent="Interviews, coaching, older or non-native speakers: users pause to think, "
                "so wait longer before answering; latency is traded for not interrupting.",
                min_speech_duration=0.1,
                min_silence_duration=0.6,
                prefix_padding_duration=0.5,
                activation_threshold=0.45,
                min_endpointing_delay=0.8,
                max_endpointing_delay=6.0,
            ),
        )
    }
)
DEFAULT_VAD_PRESET = "conversation"


def vad_preset(name: str) -> VADPreset:
    """The named VAD preset; KeyError listing the known names otherwise."""
    try:
        return VAD_PRESETS[name]
    except KeyError:
        raise KeyError(
            f"unknown VAD preset {name!r}; known presets: {', '.join(VAD_PRESETS)}"
        ) from None


# -- model latency map ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelLatency:
    """A model's typical latency for the component it owns (the guide's figures, not ours)."""

    name: str  # "provider/model", as LiveKit Inference spells it
    kind: ModelKind
    component: str  # the Turn.latency_ms key this model's latency lands in
    typical_ms: Range
    note: str = ""

    def __post_init__(self) -> None:
        _check_range(self.name, self.typical_ms)

    @property
    def provider(self) -> str:
        return self.name.partition("/")[0]

    @property
    def model(self) -> str:
        return self.name.partition("/")[2]


_COMPONENT_OF: Mapping[ModelKind, str] = MappingProxyType(
    {"stt": "stt", "llm": "llm_ttft", "tts": "tts_ttfb"}
)


def _model(name: str, kind: ModelKind, low: float, high: float, note: str = "") -> ModelLatency:
    return ModelLatency(name, kind, _COMPONENT_OF[kind], (float(low), float(high)), note)


# STT: end of speech -> final transcript (streaming); LLM: request -> first token (TTFT);
# TTS: first text -> first audio byte (TTFB).
MODEL_LATENCY: Mapping[str, ModelLatency] = MappingProxyType(
    {
        m.name: m
        for m in (
            _model("deepgram/nova-3", "stt", 150, 200, "streaming; the guide's STT pick"),
            _model("deepgram/nova-2", "stt", 200, 300, "streaming"),
            _model("assemblyai/universal-streaming", "stt", 250, 400, "streaming"),
            _model(
                "openai/gpt-4o-mini-transcribe", "stt", 400, 800, "finals slower than streaming"
            ),
            _model("groq/llama-3.1-8b-instant", "llm", 100, 200, "Groq LPU; fastest TTFT"),
            _model("groq/llama-3.3-70b-versatile", "llm", 200, 400, "Groq LPU"),
            _model("openai/gpt-4.1-nano", "llm", 200, 350),
            _model("openai/gpt-4o-mini", "llm", 200, 400),
            _model("openai/gpt-4.1-mini", "llm", 200, 400, "the guide's LLM pick"),
            _model("openai/gpt-4o", "llm", 400, 700, "quality over latency"),
            _model("cartesia/sonic-turbo", "tts", 40, 60, "streaming; lowest TTFB"),
            _model("cartesia/sonic-2", "tts", 40, 80, "streaming; the guide's TTS pick"),
            _model("elevenlabs/eleven_flash_v2_5", "tts", 75, 150, "streaming"),
            _model("elevenlabs/eleven_turbo_v2_5", "tts", 150, 300, "streaming"),
            _model("deepgram/aura-2", "tts", 100, 200, "streaming"),
            _model("openai/gpt-4o-mini-tts", "tts", 200, 400),
        )
    }
)


def known_models(kind: ModelKind | None = None) -> list[str]:
    """Names in the latency map, optionally only one kind ("stt", "llm", "tts")."""
    return [name for name, m in MODEL_LATENCY.items() if kind is None or m.kind == kind]


def model_latency(name: str, kind: ModelKind | None = None) -> ModelLatency:
    """Look a model up by "provider/model" or, when unambiguous, by the bare model name.

    KeyError (listing the known models of that kind) for an unknown name or the wrong kind.
    """
    candidates = known_models(kind)
    wanted = name.strip().lower()
    exact = [n for n in candidates if n.lower() == wanted]
    by_model = [n for n in candidates if MODEL_LATENCY[n].model.lower() == wanted]
    matches = exact or by_model
    if len(matches) == 1:
        return MODEL_LATENCY[matches[0]]
    what = f"{kind.upper()} model" if kind else "model"
    reason = "ambiguous" if matches else "unknown"
    raise KeyError(f"{reason} {what} {name!r}; known {what}s: {', '.join(candidates)}")


# -- the budget -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyBudget:
    """Expected range per component and for the whole turn (ms).

    `components` keys are Turn.latency_ms keys ("network" is in the guide but invisible from the
    agent, so no turn ever reports it); `total` is compared with a turn's "e2e".
    """

    components: Mapping[str, Range]
    total: Range

    def __post_init__(self) -> None:
        for name, value in self.components.items():
            _check_range(name, value)
        _check_range("total", self.total)
        # a caller's dict must not change a budget that is already in use
        object.__setattr__(self, "components", MappingProxyType(dict(self.components)))

    def upper_bound(self, component: str) -> float | None:
        """The most `component` may take (e2e: the total), or None if it has no budget."""
        if component == "e2e":
            return self.total[1]
        bounds = self.components.get(component)
        return None if bounds is None else bounds[1]


@dataclass(frozen=True)
class BudgetLine:
    """One line of the guide's budget table."""

    component: str  # the Turn.latency_ms key it bounds; no turn reports "network"
    title: str  # the guide's name for the line
    range_ms: Range


# The guide's budget, the one table behind DEFAULT_BUDGET and the dashboards' budget panels.
# eou has no line: it is timed from the same end of speech as vad, and the guide budgets that
# stretch once ("VAD/turn detection", vad's line), so an eou line would count it twice.
GUIDE_BUDGET: tuple[BudgetLine, ...] = (
    BudgetLine("network", "network (WebRTC)", (50.0, 100.0)),
    BudgetLine("vad", "VAD/turn detection", (150.0, 200.0)),
    BudgetLine("stt", "STT", (150.0, 200.0)),
    BudgetLine("llm_ttft", "LLM TTFT", (200.0, 300.0)),
    BudgetLine("tts_ttfb", "TTS TTFB", (40.0, 80.0)),
)
GUIDE_TOTAL_MS: Range = (600.0, 900.0)  # the guide's rounded sum, compared with a turn's e2e

DEFAULT_BUDGET = LatencyBudget(
    components={line.component: line.range_ms for line in GUIDE_BUDGET}, total=GUIDE_TOTAL_MS
)


def budget_overruns(turn: Turn, budget: LatencyBudget = DEFAULT_BUDGET) -> dict[str, float]:
    """Component -> ms over the upper bound of its budget, for the components that overran.

    e2e is compared with the budget's total; components without a budget (e.g. "eou") and
    non-finite values are left out, never guessed.
    """
    over: dict[str, float] = {}
    for component, value in turn.latency_ms.items():
        bound = budget.upper_bound(component)
        if bound is None or not math.isfinite(value):
            continue
        if value > bound:
            over[component] = value - bound
    return over


# -- speed profiles and expectations --------------------------------------------------------------


@dataclass(frozen=True)
class SpeedProfile:
    """A model choice for a latency target (names are MODEL_LATENCY keys)."""

    name: str
    intent: str
    stt: str
    llm: str
    tts: str
    vad_preset: str

    def expected_latency(self, budget: LatencyBudget = DEFAULT_BUDGET) -> dict[str, Range]:
        return expected_latency(self.stt, self.llm, self.tts, vad=self.vad_preset, budget=budget)


SPEED_PROFILES: Mapping[str, SpeedProfile] = MappingProxyType(
    {
        p.name: p
        for p in (
            SpeedProfile(
                name="ultra",
                intent="Lowest latency: a small open model on Groq, the fastest TTS.",
                stt="deepgram/nova-3",
                llm="groq/llama-3.1-8b-instant",
                tts="cartesia/sonic-turbo",
                vad_preset="fast_qa",
            ),
            SpeedProfile(
                name="fast",
                intent="The guide's low-latency stack: a capable model, the Good tier "
                "(< 800 ms) on typical turns.",
                stt="deepgram/nova-3",
                llm="openai/gpt-4.1-mini",
                tts="cartesia/sonic-2",
                vad_preset="conversation",
            ),
            SpeedProfile(
                name="balanced",
                intent="Better answers and voices for a slower reply; expect the Good tier, "
                "not Excellent.",
                stt="deepgram/nova-3",
                llm="openai/gpt-4o",
                tts="elevenlabs/eleven_flash_v2_5",
                vad_preset="conversation",
            ),
        )
    }
)
DEFAULT_SPEED_PROFILE = "fast"


def speed_profile(name: str) -> SpeedProfile:
    """The named speed profile; KeyError listing the known names otherwise."""
    try:
        return SPEED_PROFILES[name]
    except KeyError:
        raise KeyError(
            f"unknown speed profile {name!r}; known profiles: {', '.join(SPEED_PROFILES)}"
        ) from None


def expected_latency(
    stt: str,
    llm: str,
    tts: str,
    *,
    vad: str | None = None,
    budget: LatencyBudget = DEFAULT_BUDGET,
) -> dict[str, Range]:
    """Typical range per component and in total for a model choice.

    network (and vad, unless `vad` names a VAD preset) come from the budget; stt, llm_ttft and
    tts_ttfb from the model map. "total" adds the lows and the highs, as the guide does (STT
    overlaps turn detection in practice, so it is a conservative sum). KeyError with the known
    models for an unknown name.
    """
    ranges: dict[str, Range] = {}
    if "network" in budget.components:
        ranges["network"] = budget.components["network"]
    if vad is not None:
        ranges["vad"] = vad_preset(vad).turn_detection_ms
    elif "vad" in budget.components:
        ranges["vad"] = budget.components["vad"]
    chosen: tuple[tuple[str, ModelKind], ...] = ((stt, "stt"), (llm, "llm"), (tts, "tts"))
    for name, kind in chosen:
        model = model_latency(name, kind)
        ranges[model.component] = model.typical_ms
    ranges["total"] = (
        sum(low for low, _ in ranges.values()),
        sum(high for _, high in ranges.values()),
    )
    return ranges
