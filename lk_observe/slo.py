"""SLO specs: what "fast enough" means, shared by in-process evaluation, rules and dashboards.

Offline like rules.py and dashboards.py, which build on it: evaluation takes any object with the
monitor's counting methods, so this module never loads the runtime.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, get_args

from lk_observe.promql import LATENCY_BUCKETS_S, bucket_edge, duration_seconds
from lk_observe.turns import COMPONENTS, EXCELLENT_BELOW_MS, GOOD_BELOW_MS, Tier

Severity = Literal["page", "ticket"]
SEVERITIES: tuple[Severity, ...] = get_args(Severity)
_SEVERITY_CHOICES = " or ".join(repr(s) for s in SEVERITIES)  # "'page' or 'ticket'"


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
        if bucket_edge(self.threshold_s) is None:
            raise ValueError(
                f"SLO {self.name}: threshold {self.threshold_s}s is not a histogram bucket edge; "
                f"choose one of {list(LATENCY_BUCKETS_S)} so Prometheus can count it exactly"
            )
        if not 0.0 < self.objective < 1.0:
            raise ValueError(f"SLO objective must be in (0, 1), got {self.objective!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"SLO severity must be {_SEVERITY_CHOICES}, got {self.severity!r}")
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


def _tier_slo(tier: Tier, below_ms: float, severity: Severity) -> SLO:
    """95% of turns within one of the guide's e2e tiers."""
    return SLO(f"e2e_{tier}", "e2e", below_ms / 1000.0, objective=0.95, severity=severity)


# Only falling out of the Good tier pages; missing Excellent is a ticket.
DEFAULT_SLOS: tuple[SLO, ...] = (
    _tier_slo("good", GOOD_BELOW_MS, "page"),
    _tier_slo("excellent", EXCELLENT_BELOW_MS, "ticket"),
)


# --- User SLO files -----------------------------------------------------------------------


class SLOFileError(ValueError):
    """A user SLO file that cannot be turned into SLO specs; the message says where and why."""


_SLO_FIELDS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "component": (str,),
    "threshold_s": (int, float),
    "objective": (int, float),
    "severity": (str,),
    "period": (str,),
    "windows": (list,),
    "min_turns_per_hour": (int,),
}
_SLO_REQUIRED = ("name", "component", "threshold_s", "objective")
_WINDOW_FIELDS: dict[str, tuple[type, ...]] = {
    "long": (str,),
    "short": (str,),
    "factor": (int, float),
    "severity": (str,),
}


def _check_fields(
    where: str, data: object, fields: Mapping[str, tuple[type, ...]], required: Sequence[str]
) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise SLOFileError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise SLOFileError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    missing = [k for k in required if k not in data]
    if missing:
        raise SLOFileError(f"{where}: missing required key(s) {missing}")
    for key, value in data.items():
        # bool is an int subclass; `objective: true` is a typo, not 1.0.
        if isinstance(value, bool) or not isinstance(value, fields[key]):
            wanted = " or ".join(t.__name__ for t in fields[key])
            raise SLOFileError(f"{where}: {key} must be {wanted}, got {value!r}")
    return dict(data)


def _parse_slo(where: str, data: object) -> SLO:
    raw = _check_fields(where, data, _SLO_FIELDS, _SLO_REQUIRED)
    if "windows" in raw:
        windows = []
        for i, item in enumerate(raw["windows"]):
            w = _check_fields(f"{where}.windows[{i}]", item, _WINDOW_FIELDS, tuple(_WINDOW_FIELDS))
            if w["severity"] not in SEVERITIES:
                raise SLOFileError(f"{where}.windows[{i}]: severity must be {_SEVERITY_CHOICES}")
            windows.append(BurnWindow(w["long"], w["short"], float(w["factor"]), w["severity"]))
        if not windows:
            raise SLOFileError(f"{where}: windows must not be empty (omit it for the defaults)")
        raw["windows"] = tuple(windows)
    if "threshold_s" in raw:
        raw["threshold_s"] = float(raw["threshold_s"])
    try:
        return SLO(**raw)
    except ValueError as exc:
        raise SLOFileError(f"{where}: {exc}") from exc


def parse_slos(data: object, *, source: str = "<data>") -> tuple[SLO, ...]:
    """SLO specs from parsed YAML/TOML: a mapping with one key, `slos`, a list of SLO tables."""
    top = _check_fields(source, data, {"slos": (list,)}, ("slos",))
    items = top["slos"]
    if not items:
        raise SLOFileError(f"{source}: slos is empty")
    slos = tuple(_parse_slo(f"{source}: slos[{i}]", item) for i, item in enumerate(items))
    names = [s.name for s in slos]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SLOFileError(f"{source}: duplicate SLO name(s) {duplicates}")
    return slos


def load_slos(path: str | Path) -> tuple[SLO, ...]:
    """Read SLO specs from a .toml file or a YAML file (.yaml/.yml or anything else).

    ```yaml
    slos:
      - name: e2e_good
        component: e2e
        threshold_s: 0.8
        objective: 0.95
        severity: page           # optional, default page
        min_turns_per_hour: 30   # optional
        windows:                 # optional, default: DEFAULT_BURN_WINDOWS
          - {long: 1h, short: 5m, factor: 14.4, severity: page}
    ```
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SLOFileError(f"{path}: cannot read SLO file: {exc.strerror or exc}") from exc
    # parsers imported here: the agent imports this module for evaluation and never reads files
    data: object
    if path.suffix.lower() == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib as toml
        else:  # pragma: no cover - exercised only on 3.10
            try:
                import tomli as toml
            except ImportError:
                msg = f"{path}: TOML needs Python 3.11+ or `pip install tomli`"
                raise SLOFileError(msg) from None
        try:
            data = toml.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, toml.TOMLDecodeError) as exc:
            raise SLOFileError(f"{path}: invalid TOML: {exc}") from exc
    else:
        import yaml

        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise SLOFileError(f"{path}: invalid YAML: {exc}") from exc
    return parse_slos(data, source=str(path))


# --- In-process evaluation over the monitor's rolling window ---------------------------------

logger = logging.getLogger(__name__)


class CountingMonitor(Protocol):
    """What evaluation reads from a monitor (lk_observe.LatencyMonitor is one)."""

    @property
    def window_s(self) -> float: ...

    def count_at_or_below(
        self, component: str, threshold_ms: float, *, agent: str | None = None
    ) -> tuple[int, int]: ...


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


def evaluate(slo: SLO, monitor: CountingMonitor, *, agent: str | None = None) -> SLOStatus:
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
        monitor: CountingMonitor,
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
