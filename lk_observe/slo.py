"""SLO specs: what "fast enough" means, shared by in-process evaluation, rules and dashboards."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Literal

from lk_observe.metrics import LATENCY_BUCKETS_S
from lk_observe.monitor import LatencyMonitor

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


# --- In-process evaluation over the monitor's rolling window ---------------------------------

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SLOStatus:
    """One SLO over the monitor's window: how many turns were good and how fast budget burns.

    `burn_rate` is the window's error ratio over the error budget (1.0 spends the budget exactly
    over the SLO period); `error_budget_remaining` is 1 - burn_rate and goes negative when the
    window alone overspends. Both None/0.0 fields below mean "no turns in the window".
    """

    name: str
    component: str
    threshold_ms: float
    objective: float
    severity: Severity
    agent: str | None
    window_s: float
    turns: int
    good_turns: int
    compliance: float | None  # good / turns; None without turns
    burn_rate: float  # 0.0 without turns: nothing is burning
    error_budget_remaining: float | None  # None without turns
    breach_burn_rate: float  # burn rate at which `breaching` turns true
    min_turns: float  # traffic guard scaled to the window
    breaching: bool

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly (plain str/int/float/bool/None) for the /slo endpoint."""
        return asdict(self)


def breach_burn_rate(slo: SLO) -> float:
    """Burn-rate factor of the SLO's fastest window at its own severity.

    Falls back to the fastest window of any severity, then to 1.0 (budget spent exactly on time).
    """
    own = [w for w in slo.windows if slo.window_severity(w) == slo.severity]
    candidates = own or list(slo.windows)
    if not candidates:
        return 1.0
    return min(candidates, key=lambda w: duration_seconds(w.long)).factor


def evaluate(slo: SLO, monitor: LatencyMonitor, *, agent: str | None = None) -> SLOStatus:
    """The SLO's standing over the monitor's window, counted exactly at the threshold edge."""
    good, total = monitor.count_at_or_below(slo.component, slo.threshold_ms, agent=agent)
    bad = total - good
    burn = (bad / total) / slo.error_budget if total else 0.0
    min_turns = slo.min_turns_per_hour * monitor.window_s / 3600.0
    factor = breach_burn_rate(slo)
    return SLOStatus(
        name=slo.name,
        component=slo.component,
        threshold_ms=slo.threshold_ms,
        objective=slo.objective,
        severity=slo.severity,
        agent=agent,
        window_s=monitor.window_s,
        turns=total,
        good_turns=good,
        compliance=good / total if total else None,
        burn_rate=burn,
        error_budget_remaining=1.0 - burn if total else None,
        breach_burn_rate=factor,
        min_turns=min_turns,
        breaching=total > 0 and total >= min_turns and burn >= factor,
    )


class SLOEvaluator:
    """Evaluates SLOs on demand and calls `on_breach` once each time an SLO enters breach."""

    def __init__(
        self,
        slos: Iterable[SLO],
        monitor: LatencyMonitor,
        on_breach: Callable[[SLOStatus], None] | None = None,
        *,
        agent: str | None = None,
    ) -> None:
        self._slos = tuple(slos)
        self._monitor = monitor
        self._on_breach = on_breach
        self._agent = agent
        self._lock = threading.Lock()  # check() may run from the loop and an HTTP thread at once
        self._breaching: set[str] = set()

    @property
    def slos(self) -> tuple[SLO, ...]:
        return self._slos

    def check(self) -> list[SLOStatus]:
        statuses = [evaluate(slo, self._monitor, agent=self._agent) for slo in self._slos]
        entered: list[SLOStatus] = []
        with self._lock:
            for status in statuses:
                if status.breaching and status.name not in self._breaching:
                    self._breaching.add(status.name)
                    entered.append(status)
                elif not status.breaching:
                    self._breaching.discard(status.name)  # re-arm: the next breach is news
        for status in entered:
            logger.warning(
                "SLO %s breaching: burn rate %.1fx >= %.1fx over %.0fs (%d/%d turns <= %.0f ms)",
                status.name,
                status.burn_rate,
                status.breach_burn_rate,
                status.window_s,
                status.good_turns,
                status.turns,
                status.threshold_ms,
            )
            if self._on_breach is None:
                continue
            try:
                self._on_breach(status)
            except Exception:
                # A user's hook must never break evaluation or the agent calling it.
                logger.exception("on_breach hook raised for SLO %s", status.name)
        return statuses
