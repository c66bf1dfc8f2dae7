"""SLO specs: what "fast enough" means, shared by in-process evaluation, rules and dashboards."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from lk_observe.metrics import LATENCY_BUCKETS_S

Severity = Literal["page", "ticket"]
COMPONENTS = ("e2e", "vad", "stt", "eou", "llm_ttft", "tts_ttfb")


@dataclass(frozen=True)
class BurnWindow:
    """One multi-window burn-rate condition (Google SRE workbook, ch. 5)."""

    long: str  # Prometheus duration, e.g. "1h"
    short: str  # e.g. "5m"
    factor: float  # burn rate that trips the alert
    severity: Severity


DEFAULT_BURN_WINDOWS: tuple[BurnWindow, ...] = (
    BurnWindow("1h", "5m", 14.4, "page"),
    BurnWindow("6h", "30m", 6.0, "page"),
    BurnWindow("1d", "2h", 3.0, "ticket"),
    BurnWindow("3d", "6h", 1.0, "ticket"),
)


def duration_seconds(text: str) -> float:
    """Parse a single-unit Prometheus duration ("5m", "1h", "30d") into seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit():
        raise ValueError(f"not a Prometheus duration like '5m' or '1h': {text!r}")
    return int(text[:-1]) * units[text[-1]]


@dataclass(frozen=True)
class SLO:
    """`objective` of turns must have `component` latency at or under `threshold_s`.

    `severity` is the most urgent notification the SLO may raise: a "page" SLO pages on its
    fast-burn windows and tickets on slow ones; a "ticket" SLO only ever tickets.
    """

    name: str
    component: str
    threshold_s: float
    objective: float
    severity: Severity = "page"
    period: str = "30d"
    windows: tuple[BurnWindow, ...] = field(default=DEFAULT_BURN_WINDOWS)
    min_turns_per_hour: int = 30  # traffic guard: below this nothing pages

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"SLO name must be [A-Za-z0-9_]+, got {self.name!r}")
        if self.component not in COMPONENTS:
            raise ValueError(f"SLO component must be one of {COMPONENTS}, got {self.component!r}")
        if not (isinstance(self.threshold_s, (int, float)) and math.isfinite(self.threshold_s)):
            raise ValueError(f"SLO threshold must be a finite number, got {self.threshold_s!r}")
        if not any(math.isclose(self.threshold_s, edge) for edge in LATENCY_BUCKETS_S):
            raise ValueError(
                f"SLO {self.name}: threshold {self.threshold_s}s is not a histogram bucket edge; "
                f"choose one of {list(LATENCY_BUCKETS_S)} so Prometheus can count it exactly"
            )
        if not 0.0 < self.objective < 1.0:
            raise ValueError(f"SLO objective must be in (0, 1), got {self.objective!r}")
        if self.severity not in ("page", "ticket"):
            raise ValueError(f"SLO severity must be 'page' or 'ticket', got {self.severity!r}")
        duration_seconds(self.period)
        for window in self.windows:
            duration_seconds(window.long)
            duration_seconds(window.short)
        if self.min_turns_per_hour < 0:
            raise ValueError("min_turns_per_hour must be >= 0")

    @property
    def error_budget(self) -> float:
        return 1.0 - self.objective

    @property
    def threshold_ms(self) -> float:
        return self.threshold_s * 1000.0

    def window_severity(self, window: BurnWindow) -> Severity:
        return "ticket" if self.severity == "ticket" else window.severity


DEFAULT_SLOS: tuple[SLO, ...] = (
    SLO(name="e2e_good", component="e2e", threshold_s=0.8, objective=0.95, severity="page"),
    SLO(name="e2e_excellent", component="e2e", threshold_s=0.5, objective=0.95, severity="ticket"),
)
