"""SLO specs: what "fast enough" means, shared by in-process evaluation, rules and dashboards.

Offline like rules.py and dashboards.py, which build on it: evaluation takes any object with the
monitor's counting methods, so this module never loads the runtime.
"""

from __future__ import annotations

import logging
import math
import re
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

    def __post_init__(self) -> None:
        long_s, short_s = (
            _positive_duration("long", self.long),
            _positive_duration("short", self.short),
        )
        factor = self.factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise ValueError(f"factor must be a number, got {factor!r}")
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(
                f"factor must be > 0 (a burn rate: 14.4 spends the budget 14.4 times too fast), "
                f"got {factor!r}"
            )
        if short_s >= long_s:
            raise ValueError(
                f"long ({self.long}) must be longer than short ({self.short}): the short window "
                "only confirms that the long one is still burning; swap them"
            )
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be {_SEVERITY_CHOICES}, got {self.severity!r}")


def _positive_duration(what: str, text: object) -> float:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a Prometheus duration like '5m' or '1h', got {text!r}")
    try:
        seconds = duration_seconds(text)
    except ValueError:
        raise ValueError(
            f"{what} must be a Prometheus duration like '5m', '1h' or '30d', got {text!r}"
        ) from None
    if seconds <= 0:
        raise ValueError(f"{what} must be longer than 0, got {text!r}")
    return seconds


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
        self._check_threshold()
        self._check_objective()
        if self.severity not in SEVERITIES:
            raise ValueError(f"SLO severity must be {_SEVERITY_CHOICES}, got {self.severity!r}")
        _positive_duration("period", self.period)
        for window in self.windows:
            if not isinstance(window, BurnWindow):
                raise ValueError(f"SLO windows must be BurnWindow objects, got {window!r}")
        if self.min_turns_per_hour < 0:
            raise ValueError("min_turns_per_hour must be >= 0")

    def _check_threshold(self) -> None:
        value = self.threshold_s
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"SLO threshold_s must be a number of seconds, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"SLO threshold must be a finite number, got {value!r}")
        if value <= 0:
            raise ValueError(f"SLO threshold_s must be > 0 (seconds: 0.8 is 800 ms), got {value!r}")
        if bucket_edge(value) is None:
            hint = ""
            if bucket_edge(value / 1000.0) is not None:
                hint = f" threshold_s is in seconds: did you mean {value / 1000.0:g}?"
            raise ValueError(
                f"SLO {self.name}: threshold {value}s is not a histogram bucket edge; "
                f"choose one of {list(LATENCY_BUCKETS_S)} so Prometheus can count it exactly."
                + hint
            )

    def _check_objective(self) -> None:
        value = self.objective
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"SLO objective must be a number in (0, 1), got {value!r}")
        if 0.0 < value < 1.0:
            return
        hint = ""
        if 1.0 < value < 100.0:
            hint = f": did you mean {value / 100.0:g} ({value:g}%)?"
        elif value == 1.0:
            hint = ": 1 leaves no error budget (every slow turn would page); try 0.999"
        raise ValueError(f"SLO objective must be a ratio in (0, 1), got {value!r}{hint}")

    @property
    def error_budget(self) -> float:
        return 1.0 - self.objective

    @property
    def threshold_ms(self) -> float:
        return self.threshold_s * 1000.0

    def window_severity(self, window: BurnWindow) -> Severity:
        return "ticket" if self.severity == "ticket" else window.severity


def _tier_slo(tier: Tier, below_ms: float, severity: Severity) -> SLO:
    """95% of turns within one of the guide's e2e tiers (e2e: the caller's silence, from the
    real end of the user's speech to the agent's first audible audio)."""
    return SLO(f"e2e_{tier}", "e2e", below_ms / 1000.0, objective=0.95, severity=severity)


# Only falling out of the Good tier pages; missing Excellent is a ticket.
DEFAULT_SLOS: tuple[SLO, ...] = (
    _tier_slo("good", GOOD_BELOW_MS, "page"),
    _tier_slo("excellent", EXCELLENT_BELOW_MS, "ticket"),
)


# The one minimum-traffic guard, shared by the generated alerts and the in-process check: a
# ratio or a p95 over fewer than 20 turns is the verdict of one slow turn.
MIN_TURNS = 20


def traffic_guard(slo: SLO, window_s: float) -> float:
    """Turns a window must hold before anything may fire over it: min_turns_per_hour pro rata,
    and never fewer than MIN_TURNS."""
    return max(float(MIN_TURNS), slo.min_turns_per_hour * window_s / 3600.0)


def slo_warnings(slo: SLO) -> list[str]:
    """What is valid but cannot work as meant: windows that can never fire."""
    warnings = []
    period_s = duration_seconds(slo.period)
    for window in slo.windows:
        where = f"SLO {slo.name}, window {window.long}/{window.short}"
        needed = window.factor * slo.error_budget
        if needed >= 1.0:
            warnings.append(
                f"{where} can never fire: {window.factor:g}x the {slo.error_budget:.4g} error "
                f"budget means more than {needed:.0%} of turns slow; use a factor below "
                f"{1.0 / slo.error_budget:.3g} or a higher objective"
            )
        if duration_seconds(window.long) > period_s:
            warnings.append(f"{where}: the long window is longer than the SLO period {slo.period}")
    return warnings


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


_KUBERNETES_FIELDS: dict[str, tuple[type, ...]] = {"namespace": (str,), "labels": (dict,)}
_FILE_FIELDS: dict[str, tuple[type, ...]] = {
    "slos": (list,),
    "runbook_base_url": (str,),
    "kubernetes": (dict,),
}
_DOCS = 'see docs/configuration.md, "SLO files"'
# Kubernetes label values and namespace names (RFC 1123 labels for namespaces)
_LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")
_LABEL_KEY = re.compile(
    r"^(?:[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?/)?[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$"
)
_NAMESPACE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_TYPE_NAMES = {"str": "text", "int": "a whole number", "float": "a number", "list": "a list"}
_TYPE_NAMES["dict"] = "a mapping"


@dataclass(frozen=True)
class SLOFile:
    """An SLO file: the specs, and options for what `lk-observe generate` writes from them."""

    slos: tuple[SLO, ...] = DEFAULT_SLOS
    runbook_base_url: str | None = None
    kubernetes_namespace: str | None = None
    kubernetes_labels: Mapping[str, str] = field(default_factory=dict)


def _kind(value: object) -> str:
    if value is None:
        return "nothing (an empty value)"
    return f"{_TYPE_NAMES.get(type(value).__name__, type(value).__name__)} {value!r}"


def _check_fields(
    where: str, data: object, fields: Mapping[str, tuple[type, ...]], required: Sequence[str]
) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise SLOFileError(f"{where}: expected a mapping of {sorted(fields)}, got {_kind(data)}")
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
            hint = ""
            if isinstance(value, str) and (int in fields[key] or float in fields[key]):
                hint = " (a quoted number: remove the quotes)"
            raise SLOFileError(f"{where}: {key} must be {wanted}, got {value!r}{hint}")
    return dict(data)


def _parse_window(where: str, item: object) -> BurnWindow:
    w = _check_fields(where, item, _WINDOW_FIELDS, tuple(_WINDOW_FIELDS))
    try:
        return BurnWindow(w["long"], w["short"], float(w["factor"]), w["severity"])
    except ValueError as exc:
        raise SLOFileError(f"{where}: {exc}") from exc


def _parse_slo(where: str, data: object) -> SLO:
    raw = _check_fields(where, data, _SLO_FIELDS, _SLO_REQUIRED)
    if "windows" in raw:
        windows = [
            _parse_window(f"{where}.windows[{i}]", item) for i, item in enumerate(raw["windows"])
        ]
        if not windows:
            raise SLOFileError(f"{where}: windows must not be empty (omit it for the defaults)")
        raw["windows"] = tuple(windows)
    for key in ("threshold_s", "objective"):
        if key in raw:
            raw[key] = float(raw[key])
    try:
        return SLO(**raw)
    except ValueError as exc:
        raise SLOFileError(f"{where}: {exc}") from exc


def _parse_kubernetes(where: str, data: object) -> tuple[str | None, dict[str, str]]:
    raw = _check_fields(where, data, _KUBERNETES_FIELDS, ())
    namespace = raw.get("namespace")
    if namespace is not None and not _NAMESPACE.match(namespace):
        raise SLOFileError(
            f"{where}: namespace must be a Kubernetes namespace name (lower-case letters, digits "
            f"and '-', at most 63), got {namespace!r}"
        )
    labels: dict[str, str] = {}
    for key, value in raw.get("labels", {}).items():
        if not (isinstance(key, str) and _LABEL_KEY.match(key)):
            raise SLOFileError(f"{where}.labels: {key!r} is not a Kubernetes label key")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise SLOFileError(f"{where}.labels.{key}: expected text, got {_kind(value)}")
        text = str(value)
        if not _LABEL_VALUE.match(text):
            raise SLOFileError(
                f"{where}.labels.{key}: {text!r} is not a Kubernetes label value (letters, "
                "digits, '-', '_', '.', at most 63)"
            )
        labels[key] = text
    return namespace, labels


def _parse_runbook_url(where: str, url: str) -> str:
    if not url.startswith(("https://", "http://")):
        raise SLOFileError(
            f"{where}: runbook_base_url must be an http(s) URL such as "
            f"https://wiki.example.com/runbooks/, got {url!r}"
        )
    return url


def parse_slo_file(data: object, *, source: str = "<data>") -> SLOFile:
    """An SLO file's content, parsed from YAML/TOML (the format: docs/configuration.md)."""
    if data is None or data == {}:
        raise SLOFileError(
            f"{source}: the file is empty; it needs at least a `slos:` list, e.g.\n"
            "slos:\n  - {name: e2e_good, component: e2e, threshold_s: 0.8, objective: 0.95}\n"
            f"({_DOCS})"
        )
    if not isinstance(data, dict):
        raise SLOFileError(
            f"{source}: expected a mapping with a `slos:` list at the top, got {_kind(data)} "
            f"({_DOCS})"
        )
    top = _check_fields(source, data, _FILE_FIELDS, ())
    slos = DEFAULT_SLOS
    if "slos" in top:
        items = top["slos"]
        if not items:
            raise SLOFileError(f"{source}: slos is empty (omit it for the default SLOs)")
        slos = tuple(_parse_slo(f"{source}: slos[{i}]", item) for i, item in enumerate(items))
        names = [s.name for s in slos]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise SLOFileError(f"{source}: duplicate SLO name(s) {duplicates}")
    namespace: str | None = None
    labels: dict[str, str] = {}
    if "kubernetes" in top:
        namespace, labels = _parse_kubernetes(f"{source}: kubernetes", top["kubernetes"])
    url = top.get("runbook_base_url")
    return SLOFile(
        slos=slos,
        runbook_base_url=None if url is None else _parse_runbook_url(source, url),
        kubernetes_namespace=namespace,
        kubernetes_labels=labels,
    )


def parse_slos(data: object, *, source: str = "<data>") -> tuple[SLO, ...]:
    """SLO specs from parsed YAML/TOML: a mapping whose `slos` is a list of SLO tables."""
    return parse_slo_file(data, source=source).slos


def read_slo_file(path: str | Path) -> SLOFile:
    """Read an SLO file: .toml as TOML, anything else (.yaml/.yml) as YAML."""
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
    return parse_slo_file(data, source=str(path))


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
    The whole format, with the file's other keys: docs/configuration.md, "SLO files".
    """
    return read_slo_file(path).slos


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
    min_turns: float  # traffic_guard(): what the generated alerts demand, for this window
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
    return _status(slo, breach_burn_rate(slo), monitor, agent)


def _status(slo: SLO, factor: float, monitor: CountingMonitor, agent: str | None) -> SLOStatus:
    good, total = monitor.count_at_or_below(slo.component, slo.threshold_ms, agent=agent)
    bad = total - good
    burn = (bad / total) / slo.error_budget if total else 0.0
    min_turns = traffic_guard(slo, monitor.window_s)
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
    """Evaluates SLOs on demand and calls `on_breach` once each time an SLO enters breach.

    What does not change between checks (each SLO's breach burn rate and traffic guard) is
    worked out once; `watch()` is the check without a status per SLO, for the sink thread.
    """

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
        window_s = monitor.window_s
        # (slo, the burn rate that breaches it, the turns the window must hold first)
        self._plan = tuple(
            (slo, breach_burn_rate(slo), traffic_guard(slo, window_s)) for slo in self._slos
        )

    @property
    def slos(self) -> tuple[SLO, ...]:
        return self._slos

    @property
    def breaching(self) -> frozenset[str]:
        """Names of the SLOs breaching as of the last `check()` or `watch()`."""
        with self._lock:
            return frozenset(self._breaching)

    def status(self, name: str) -> SLOStatus:
        """The named SLO's status now, without logging or changing what is breaching;
        KeyError for a name it does not evaluate."""
        for slo, factor, _ in self._plan:
            if slo.name == name:
                return _status(slo, factor, self._monitor, self._agent)
        raise KeyError(f"no SLO named {name!r}; evaluating {[s.name for s in self._slos]}")

    def check(self) -> list[SLOStatus]:
        """Every SLO's status; logs (and hands to `on_breach`) each SLO that entered breach."""
        statuses = [
            _status(slo, factor, self._monitor, self._agent) for slo, factor, _ in self._plan
        ]
        self._update({s.name for s in statuses if s.breaching}, statuses)
        return statuses

    def watch(self) -> bool:
        """What `check()` does, counting only: a status is built just for an SLO entering
        breach. Whether any SLO is breaching."""
        breaching: set[str] = set()
        for slo, factor, min_turns in self._plan:
            good, total = self._monitor.count_at_or_below(
                slo.component, slo.threshold_ms, agent=self._agent
            )
            # the same expression as _status(), so both agree at the edge
            if total and total >= min_turns and (total - good) / total / slo.error_budget >= factor:
                breaching.add(slo.name)
        if breaching - self._breaching:
            entering = [
                _status(slo, factor, self._monitor, self._agent)
                for slo, factor, _ in self._plan
                if slo.name in breaching
            ]
            self._update(breaching, entering)
        else:
            with self._lock:
                self._breaching &= breaching  # re-arm those that ended
        return bool(breaching)

    def _update(self, breaching: set[str], statuses: list[SLOStatus]) -> None:
        entered: list[SLOStatus] = []
        with self._lock:
            for status in statuses:
                if status.breaching and status.name not in self._breaching:
                    entered.append(status)
            self._breaching = (self._breaching & breaching) | {s.name for s in entered}
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
