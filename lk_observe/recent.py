"""The live page's recent turns: a bounded ring per process and the summary shape it shows,
plus what the page and the demo compute from summaries: the mean breakdown of e2e and the
latency of each provider's model.

The same summaries travel between job processes inside monitor snapshot files, so reading one
back checks it field by field.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from lk_observe.monitor import MAX_NAME_LENGTH
from lk_observe.turns import (
    BREAKDOWN_PARTS,
    BREAKDOWN_TITLES,
    COMPONENT_TITLES,
    MAX_MODEL_NAME,
    MODEL_COMPONENTS,
    TIERS,
    Turn,
)

_MAX_KEYS = 16
MAX_SETTING_LENGTH = 128  # of a breakdown setting's text ("endpointing.min_delay=0.5s")
# the summary's (provider, model) fields of each component that one provider's model serves
MODEL_FIELDS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "stt": ("stt_provider", "stt_model"),
        "llm_ttft": ("llm_provider", "llm_model"),
        "tts_ttfb": ("tts_provider", "tts_model"),
    }
)
_NAME_KEYS = tuple(key for pair in MODEL_FIELDS.values() for key in pair)
_SUMMARY_KEYS = (
    "index",
    "kind",
    "agent",
    "tier",
    "interrupted",
    "ended_at",
    "latency_ms",
    "stages",
    "tool_calls",
    "trace_id",
    "breakdown_ms",
    "breakdown_settings",
    *_NAME_KEYS,
)


class RecentTurns:
    """The last `maxlen` turns, for the live page. Thread-safe; `add` is a turn sink."""

    def __init__(self, maxlen: int = 50) -> None:
        self._turns: deque[Turn] = deque(maxlen=maxlen)
        self._lock = threading.Lock()

    def add(self, turn: Turn) -> None:
        with self._lock:
            self._turns.append(turn)

    def __len__(self) -> int:
        return len(self._turns)

    def turns(self) -> list[Turn]:
        """Oldest first."""
        with self._lock:
            return list(self._turns)


_default_recent: RecentTurns | None = None
_default_recent_lock = threading.Lock()


def default_recent_turns() -> RecentTurns:
    """The process-wide ring that instrument() feeds and the ops app's live page reads."""
    global _default_recent
    with _default_recent_lock:
        if _default_recent is None:
            _default_recent = RecentTurns()
        return _default_recent


def turn_summary(turn: Turn) -> dict[str, Any]:
    """A finished turn as the live page shows it: numbers and ids only (no speech or session
    ids, no user text)."""
    origin = min((stage.start for stage in turn.stages.values()), default=turn.started_at)
    return {
        "index": turn.index,
        "kind": turn.kind,
        "agent": turn.agent,
        "tier": turn.tier,
        "interrupted": turn.interrupted,
        "ended_at": turn.ended_at,
        "latency_ms": dict(turn.latency_ms),
        # offsets from the turn's first stage, so the page can draw a waterfall
        "stages": {
            name: [(stage.start - origin) * 1000.0, (stage.end - origin) * 1000.0]
            for name, stage in turn.stages.items()
        },
        "tool_calls": turn.tool_calls,
        "trace_id": None if turn.trace_id is None else f"{turn.trace_id:032x}",
        # e2e's parts in BREAKDOWN_PARTS order, and the settings that own their waits
        "breakdown_ms": {
            p: turn.breakdown_ms[p] for p in BREAKDOWN_PARTS if p in turn.breakdown_ms
        },
        "breakdown_settings": {
            p: turn.breakdown_settings[p][:MAX_SETTING_LENGTH]
            for p in BREAKDOWN_PARTS
            if p in turn.breakdown_settings
        },
        **{key: _short(getattr(turn, key)) for key in _NAME_KEYS},
    }


def _short(name: object) -> str | None:
    return name[:MAX_MODEL_NAME] if isinstance(name, str) and name else None


def _finite(value: object) -> bool:
    # exact types: JSON gives int, float or bool, and a bool is no number here
    return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]


def _name(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME_LENGTH


def _text(value: object, limit: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit


def parse_turn_summary(raw: object) -> dict[str, Any]:
    """A turn summary read back from another process, checked field by field (ValueError).
    The breakdown and model fields may be missing (a process of an older lk_observe)."""
    if not isinstance(raw, dict):
        raise ValueError("recent turn is not an object")
    latency, stages = raw.get("latency_ms"), raw.get("stages")
    tier, trace_id = raw.get("tier"), raw.get("trace_id")
    breakdown = raw.get("breakdown_ms", {})
    settings = raw.get("breakdown_settings", {})
    if not (
        type(raw.get("index")) is int
        and raw.get("kind") in ("user", "agent")
        and _name(raw.get("agent"))
        and (tier is None or tier in TIERS)
        and isinstance(raw.get("interrupted"), bool)
        and _finite(raw.get("ended_at"))
        and type(raw.get("tool_calls")) is int
        and (trace_id is None or (isinstance(trace_id, str) and len(trace_id) == 32))
        and isinstance(latency, dict)
        and len(latency) <= _MAX_KEYS
        and all(_name(k) and _finite(v) for k, v in latency.items())
        and isinstance(stages, dict)
        and len(stages) <= _MAX_KEYS
        and all(
            _name(k) and isinstance(v, list) and len(v) == 2 and all(map(_finite, v))
            for k, v in stages.items()
        )
        and isinstance(breakdown, dict)
        and all(k in BREAKDOWN_PARTS and _finite(v) for k, v in breakdown.items())
        and isinstance(settings, dict)
        and all(k in BREAKDOWN_PARTS and _text(v, MAX_SETTING_LENGTH) for k, v in settings.items())
        and all(raw.get(key) is None or _text(raw.get(key), MAX_MODEL_NAME) for key in _NAME_KEYS)
    ):
        raise ValueError("bad recent turn")
    defaults: dict[str, Any] = {"breakdown_ms": {}, "breakdown_settings": {}}
    return {key: raw.get(key, defaults.get(key)) for key in _SUMMARY_KEYS}


# -- what the recent turns say: the mean breakdown, the providers compared -----------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of `values`, interpolated between the two nearest (numpy's
    default, "linear"); 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def mean_breakdown(summaries: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The mean of e2e's parts over the summaries that have a breakdown: a part a turn did
    not have counts 0 there, so the parts' means add up to the mean e2e. Parts in order, with
    their titles and the setting that owns each (the newest turn's)."""
    sums: dict[str, float] = {}
    settings: dict[str, str] = {}
    turns, e2e = 0, 0.0
    for summary in summaries:
        breakdown = summary.get("breakdown_ms") or {}
        if not breakdown:
            continue
        turns += 1
        e2e += sum(breakdown.values())
        for part, ms in breakdown.items():
            sums[part] = sums.get(part, 0.0) + ms
        settings.update(summary.get("breakdown_settings") or {})
    parts = [
        {
            "part": part,
            "title": BREAKDOWN_TITLES[part],
            "mean_ms": sums[part] / turns,
            "setting": settings.get(part),
        }
        for part in BREAKDOWN_PARTS
        if part in sums
    ]
    return {"turns": turns, "e2e_ms": e2e / turns if turns else None, "parts": parts}


def provider_comparison(summaries: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """p50 and p95 (ms) of each component one provider's model serves (stt, llm_ttft,
    tts_ttfb), per (provider, model), over the summaries that measured it with a known model:
    components in order, then providers by name."""
    values: dict[tuple[str, str, str], list[float]] = {}
    for summary in summaries:
        latency = summary.get("latency_ms") or {}
        for component in MODEL_COMPONENTS:
            provider_key, model_key = MODEL_FIELDS[component]
            provider, model = summary.get(provider_key), summary.get(model_key)
            value = latency.get(component)
            if value is None or (provider is None and model is None):
                continue
            key = (component, provider or "unknown", model or "unknown")
            values.setdefault(key, []).append(value)
    rows = []
    for component, provider, model in sorted(
        values, key=lambda k: (MODEL_COMPONENTS.index(k[0]), k[1], k[2])
    ):
        found = values[(component, provider, model)]
        rows.append(
            {
                "component": component,
                "title": COMPONENT_TITLES[component],
                "provider": provider,
                "model": model,
                "turns": len(found),
                "p50_ms": percentile(found, 0.50),
                "p95_ms": percentile(found, 0.95),
            }
        )
    return rows
