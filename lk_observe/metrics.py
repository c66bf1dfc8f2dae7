"""Prometheus families for voice-agent latency; Turn -> observations."""

from __future__ import annotations

import glob
import logging
import math
import multiprocessing.util
import os
import re
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import multiprocess as _mp
from prometheus_client import values as _values
from prometheus_client.exposition import generate_latest as _render_text
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as _render_openmetrics

from lk_observe.turns import Turn

logger = logging.getLogger(__name__)

# Every SLO threshold must be one of these edges (slo.SLO checks it) so `le` matches exactly.
# fmt: off
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9,
    1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0,
)
# fmt: on

# Pinned to 0.0.4: the same bytes as prometheus_client's default, and every Prometheus parses it.
TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

COMPONENTS: tuple[str, ...] = ("e2e", "vad", "stt", "eou", "llm_ttft", "tts_ttfb")
TIERS: tuple[str, ...] = ("excellent", "good", "slow")
OTHER = "other"  # the label value that absorbs everything past a cardinality limit
MAX_LABEL_LENGTH = 64
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # the variable LiveKit's worker sets too

_UNSAFE_LABEL_CHARS = re.compile(r"[^\x20-\x7e]")


def sanitize_label(value: object) -> str:
    """A bounded, printable label value: odd input must not mint odd series."""
    text = _UNSAFE_LABEL_CHARS.sub("_", str(value)).strip()[:MAX_LABEL_LENGTH]
    return text or "unknown"


class _LabelGuard:
    """Admits the first `limit` distinct values of one label; later ones become "other"."""

    def __init__(self, label: str, limit: int, overflow: Counter) -> None:
        self._label = label
        self._limit = limit
        self._overflow = overflow.labels(label=label)
        self._admitted: set[str] = set()
        # raw -> admitted value; bounded so a flood of distinct raw strings cannot grow it
        self._resolved: dict[str, str] = {}
        self._lock = threading.Lock()

    def resolve(self, raw: str) -> str:
        admitted = self._resolved.get(raw)
        if admitted is not None:
            return admitted
        return self._admit(raw)

    def is_cached(self, raw: str) -> bool:
        return raw in self._resolved

    def _admit(self, raw: str) -> str:
        clean = sanitize_label(raw)
        with self._lock:
            if clean in self._admitted or len(self._admitted) < self._limit:
                self._admitted.add(clean)
                if len(self._resolved) < 4 * self._limit:
                    self._resolved[raw] = clean
                return clean
        self._overflow.inc()
        logger.debug("label value over the cardinality limit", extra={"label": self._label})
        return OTHER


@dataclass(frozen=True)
class _AgentSeries:
    """One agent's pre-bound children: the hot path is a dict lookup and .observe()."""

    agent: str
    latency: dict[str, Histogram]  # filled on first use: unmeasured stages export no series
    turns: Mapping[str, Counter]
    active: Gauge
    sessions: Counter


class LatencyMetrics:
    """The voice_agent_* families of one registry. Get it with `LatencyMetrics.for_registry`."""

    _instances: ClassVar[weakref.WeakKeyDictionary[CollectorRegistry, LatencyMetrics]] = (
        weakref.WeakKeyDictionary()
    )
    _instances_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        max_agents: int = 20,
        max_error_types: int = 30,
        max_sinks: int = 20,
    ) -> None:
        # Families are registered here and nowhere else: for_registry() makes sure it runs once.
        self.latency = Histogram(
            "voice_agent_latency_seconds",
            "Voice agent latency per turn by pipeline component",
            ["component", "agent"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.turns = Counter(
            "voice_agent_turns_total",
            "Finished user turns by end-to-end latency tier",
            ["agent", "tier"],
            registry=registry,
        )
        # livesum: in multiprocess mode a dead job process's sessions drop out of the sum.
        self.active_sessions = Gauge(
            "voice_agent_active_sessions",
            "Agent sessions currently running",
            ["agent"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.sessions = Counter(
            "voice_agent_sessions_total", "Agent sessions started", ["agent"], registry=registry
        )
        self.errors = Counter(
            "voice_agent_errors_total",
            "Agent errors by type",
            ["agent", "error_type"],
            registry=registry,
        )
        self.sink_failures = Counter(
            "voice_agent_sink_failures_total",
            "Turn sinks that raised (the turn was still delivered to the other sinks)",
            ["sink"],
            registry=registry,
        )
        self.budget_overruns = Counter(
            "voice_agent_budget_overruns_total",
            "Turns whose component latency exceeded its budget",
            ["agent", "component"],
            registry=registry,
        )
        self._overrun_children: dict[tuple[str, str], Counter] = {}
        self.label_overflow = Counter(
            "voice_agent_label_overflow_total",
            "Label values folded into 'other' by the cardinality guard, or dropped",
            ["label"],
            registry=registry,
        )
        self._agents = _LabelGuard("agent", max_agents, self.label_overflow)
        self._error_types = _LabelGuard("error_type", max_error_types, self.label_overflow)
        self._sinks = _LabelGuard("sink", max_sinks, self.label_overflow)
        self._unknown_component = self.label_overflow.labels(label="component")
        self._series: dict[str, _AgentSeries] = {}  # by admitted agent value
        self._series_by_raw: dict[str, _AgentSeries] = {}  # by raw agent, admitted ones only
        self._active_count: dict[str, int] = {}
        # file-backed values drop exemplars; skip building and validating them for nothing
        self._exemplars = not getattr(_values.ValueClass, "_multiprocess", False)
        self._lock = threading.Lock()
        self.skipped_observations = 0  # NaN / negative latencies: counted, never exported wrong

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None = None) -> LatencyMetrics:
        """The one LatencyMetrics of `registry` (default: prometheus_client.REGISTRY)."""
        target = REGISTRY if registry is None else registry
        found = cls._instances.get(target)
        if found is not None:
            return found
        with cls._instances_lock:
            found = cls._instances.get(target)
            if found is None:
                found = cls(target)
                cls._instances[target] = found
                _warn_if_multiprocess_misconfigured()
                _register_exit_cleanup()
        return found

    # -- turns -------------------------------------------------------------------------------

    def observe_turn(self, turn: Turn) -> None:
        """Latency per measured component (seconds) and, for user turns, the tier count."""
        series = self._series_by_raw.get(turn.agent) or self._series_for(turn.agent)
        exemplar = (
            {"trace_id": f"{turn.trace_id:032x}"}
            if turn.trace_id is not None and self._exemplars
            else None
        )
        for component, ms in turn.latency_ms.items():
            child = series.latency.get(component) or self._bind_latency(series, component)
            if child is None:
                continue
            if not (ms >= 0.0 and math.isfinite(ms)):
                self.skipped_observations += 1
                logger.debug("skipped invalid latency", extra={"component": component})
                continue
            child.observe(ms / 1000.0, exemplar)
        if turn.kind == "user" and turn.tier is not None:
            counter = series.turns.get(turn.tier)
            if counter is not None:
                counter.inc(1, exemplar)
        for component in turn.budget_overruns_ms:
            if component in COMPONENTS:
                self._overrun_child(series.agent, component).inc()

    def export_components(self, agent: str, components: Iterable[str]) -> None:
        """Export these latency series at zero now: Prometheus cannot see the increase of a
        series whose first sample already counts a turn, so the first slow turns would vanish
        from rate()-based SLO alerts."""
        series = self._series_by_raw.get(agent) or self._series_for(agent)
        for component in components:
            if component not in series.latency:
                self._bind_latency(series, component)

    # -- sessions ----------------------------------------------------------------------------

    def session_started(self, agent: str) -> None:
        series = self._series_by_raw.get(agent) or self._series_for(agent)
        key = series.agent  # resolved once: an overflowing name is counted once per call
        with self._lock:
            self._active_count[key] = self._active_count.get(key, 0) + 1
        series.active.inc()
        series.sessions.inc()

    def session_ended(self, agent: str) -> None:
        """Decrement the active gauge; an unmatched end is ignored rather than going below 0."""
        series = self._series_by_raw.get(agent) or self._series_for(agent)
        key = series.agent
        with self._lock:
            live = self._active_count.get(key, 0)
            if live <= 0:
                logger.debug("session_ended without session_started", extra={"agent": key})
                return
            self._active_count[key] = live - 1
        series.active.dec()

    # -- failures ----------------------------------------------------------------------------

    def error(self, agent: str, error_type: str) -> None:
        self.errors.labels(
            agent=self._agents.resolve(agent), error_type=self._error_types.resolve(error_type)
        ).inc()

    def sink_failure(self, sink: str, amount: float = 1.0) -> None:
        """Count failures of a sink; `amount` for batches (e.g. spans lost in one export)."""
        if amount > 0 and math.isfinite(amount):
            self.sink_failures.labels(sink=self._sinks.resolve(sink)).inc(amount)

    def _overrun_child(self, agent: str, component: str) -> Counter:
        key = (agent, component)
        child = self._overrun_children.get(key)
        if child is None:  # .labels() takes a lock and validates: bind once per label set
            child = self._overrun_children[key] = self.budget_overruns.labels(
                agent=agent, component=component
            )
        return child

    def budget_overrun(self, agent: str, component: str) -> None:
        if component not in COMPONENTS:
            self._unknown_component.inc()
            return
        self.budget_overruns.labels(agent=self._agents.resolve(agent), component=component).inc()

    # -- binding -----------------------------------------------------------------------------

    def _bind_latency(self, series: _AgentSeries, component: str) -> Histogram | None:
        if component not in COMPONENTS:
            self._unknown_component.inc()
            return None
        with self._lock:
            child = series.latency.get(component)
            if child is None:
                child = self.latency.labels(component=component, agent=series.agent)
                series.latency[component] = child
        return child

    def _series_for(self, raw_agent: str) -> _AgentSeries:
        agent = self._agents.resolve(raw_agent)
        with self._lock:
            series = self._series.get(agent)
            if series is None:
                series = _AgentSeries(
                    agent=agent,
                    latency={},
                    turns={t: self.turns.labels(agent=agent, tier=t) for t in TIERS},
                    active=self.active_sessions.labels(agent=agent),
                    sessions=self.sessions.labels(agent=agent),
                )
                self._series[agent] = series
            # Only raw names the guard cached are keys here, so this dict stays bounded too.
            if self._agents.is_cached(raw_agent):
                self._series_by_raw[raw_agent] = series
        return series


# -- multiprocess ------------------------------------------------------------------------------


def multiproc_dir() -> str | None:
    """The shared metrics directory when multiprocess mode is on (LiveKit's convention)."""
    path = os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower())
    return path or None


def _warn_if_multiprocess_misconfigured() -> None:
    # prometheus_client picks file-backed values at import time; setting the variable later
    # silently leaves this process's metrics out of every multiprocess /metrics.
    if multiproc_dir() and not getattr(_values.ValueClass, "_multiprocess", False):
        logger.warning(
            "PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was imported; "
            "this process's metrics are not shared. Set it before the worker starts."
        )


_exit_cleanup_registered = False


def _register_exit_cleanup() -> None:
    # multiprocessing.util finalizers run both at interpreter exit and when a
    # multiprocessing child (LiveKit's job process) returns, which skips atexit (os._exit).
    global _exit_cleanup_registered
    if _exit_cleanup_registered or not multiproc_dir():
        return
    _exit_cleanup_registered = True
    multiprocessing.util.Finalize(None, _mark_this_process_dead, exitpriority=10)


def _mark_this_process_dead() -> None:
    try:
        mark_process_dead(os.getpid())
    except Exception:
        logger.debug("could not clean up live gauges at exit", exc_info=True)


def mark_process_dead(pid: int, path: str | None = None) -> None:
    """Drop a finished process's live gauges (active sessions) from the aggregate."""
    directory = path or multiproc_dir()
    if directory:
        _mp.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


_LIVE_GAUGE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # A SIGKILLed child stays a zombie until its parent reaps it: that is dead too.
            return stat.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead_processes(path: str | None = None) -> list[int]:
    """mark_process_dead for every process that left live gauges behind and is gone (SIGKILL,
    OOM kill): nothing else runs for those, and LiveKit's pool does not call it either."""
    directory = path or multiproc_dir()
    if not directory:
        return []
    reaped: list[int] = []
    pids: set[int] = set()
    for file in glob.glob(os.path.join(directory, "gauge_live*.db")):
        match = _LIVE_GAUGE_FILE.match(os.path.basename(file))
        if match:
            pids.add(int(match.group(1)))
    for pid in sorted(pids):
        if pid != os.getpid() and not _pid_alive(pid):
            mark_process_dead(pid, directory)
            reaped.append(pid)
    return reaped


def render_metrics(
    registry: CollectorRegistry | None = None, openmetrics: bool = False
) -> tuple[bytes, str]:
    """Exposition bytes and content type. In multiprocess mode every process's files are merged
    (as LiveKit's own /metrics does) and `registry` is ignored. Blocking: call it off the loop."""
    directory = multiproc_dir()
    target: CollectorRegistry
    if directory and os.path.isdir(directory):
        reap_dead_processes(directory)
        target = CollectorRegistry()
        _mp.MultiProcessCollector(target, path=directory)  # type: ignore[no-untyped-call]
    else:
        target = REGISTRY if registry is None else registry
    if openmetrics:
        return _render_openmetrics(target), OPENMETRICS_CONTENT_TYPE  # type: ignore[no-untyped-call]
    return _render_text(target), TEXT_CONTENT_TYPE
