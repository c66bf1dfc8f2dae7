"""The live page's recent turns: a bounded ring per process and the summary shape it shows.

The same summaries travel between job processes inside monitor snapshot files, so reading one
back checks it field by field.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from typing import Any

from lk_observe.monitor import MAX_NAME_LENGTH
from lk_observe.turns import TIERS, Turn

_MAX_KEYS = 16
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
    }


def _finite(value: object) -> bool:
    # exact types: JSON gives int, float or bool, and a bool is no number here
    return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]


def _name(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_NAME_LENGTH


def parse_turn_summary(raw: object) -> dict[str, Any]:
    """A turn summary read back from another process, checked field by field (ValueError)."""
    if not isinstance(raw, dict):
        raise ValueError("recent turn is not an object")
    latency, stages = raw.get("latency_ms"), raw.get("stages")
    tier, trace_id = raw.get("tier"), raw.get("trace_id")
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
    ):
        raise ValueError("bad recent turn")
    return {key: raw[key] for key in _SUMMARY_KEYS}
