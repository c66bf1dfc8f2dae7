"""Prometheus families for voice-agent latency; Turn -> observations."""

from __future__ import annotations

import bisect
import logging
import math
import re
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.utils import floatToGoString

from lk_observe import multiprocess, promql
from lk_observe.multiprocess import Labels
from lk_observe.promql import LATENCY_BUCKETS_S
from lk_observe.turns import BREAKDOWN_PARTS, COMPONENTS, TIERS, Turn, component_model

logger = logging.getLogger(__name__)

OTHER = "other"  # the label value that absorbs everything past a cardinality limit
MAX_LABEL_LENGTH = 64

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


ModelLabels = tuple[str, str]  # (provider, model) label values; ("", "") for none
NO_MODEL: ModelLabels = ("", "")


class _ModelGuard:
    """Admits the first `limit` distinct (provider, model) pairs; later ones become
    ("other", "other"), counted under label="model"."""

    def __init__(self, limit: int, overflow: Counter) -> None:
        self._limit = limit
        self._overflow = overflow.labels(label="model")
        self._resolved: dict[tuple[str, str], ModelLabels] = {}
        self._admitted: set[ModelLabels] = set()
        self._lock = threading.Lock()

    def resolve(self, pair: tuple[str, str]) -> ModelLabels:
        admitted = self._resolved.get(pair)
        if admitted is not None:
            return admitted
        clean = (sanitize_label(pair[0]), sanitize_label(pair[1]))
        with self._lock:
            if clean in self._admitted or len(self._admitted) < self._limit:
                self._admitted.add(clean)
                if len(self._resolved) < 4 * self._limit:
                    self._resolved[pair] = clean
                return clean
        self._overflow.inc()
        logger.debug("provider/model over the cardinality limit")
        return (OTHER, OTHER)


# the `le` of each latency bucket as the merged exposition spells it
_BUCKET_LE = (*(floatToGoString(b) for b in LATENCY_BUCKETS_S), "+Inf")  # type: ignore[no-untyped-call]


def _bucket_sample(
    agent: str, component: str, model: ModelLabels, seconds: float
) -> tuple[str, Labels, float]:
    """The latency bucket sample an observation lands in: its exemplar's place."""
    le = _BUCKET_LE[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)]
    labels = (
        ("agent", agent),
        ("component", component),
        ("le", le),
        ("model", model[1]),
        ("provider", model[0]),
    )
    return promql.LATENCY_BUCKET, labels, seconds


@dataclass(frozen=True)
class _AgentSeries:
    """One agent's pre-bound children: the hot path is a dict lookup and .observe()."""

    agent: str
    # (component, provider, model) -> child, filled on first use: unmeasured stages export none
    latency: dict[tuple[str, str, str], Histogram]
    breakdown: dict[str, Counter]  # by breakdown part, filled on first use
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
        max_models: int = 20,
        max_measured: int = 32,
    ) -> None:
        # Families are registered here and nowhere else: for_registry() makes sure it runs once.
        self.latency = Histogram(
            promql.LATENCY_METRIC,
            "Voice agent latency per turn by pipeline component",
            ["component", "agent", "provider", "model"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.breakdown = Counter(
            promql.BREAKDOWN_METRIC.removesuffix("_total"),
            "Seconds of end-to-end latency spent in each part of the critical path (the parts "
            "of a turn add up to its e2e; divide by the e2e count for the mean per turn)",
            ["agent", "part"],
            registry=registry,
        )
        self.turns = Counter(
            promql.TURNS_METRIC,
            "Finished user turns by end-to-end latency tier",
            ["agent", "tier"],
            registry=registry,
        )
        # livesum: in multiprocess mode a dead job process's sessions drop out of the sum.
        self.active_sessions = Gauge(
            promql.ACTIVE_SESSIONS_METRIC,
            "Agent sessions currently running",
            ["agent"],
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.sessions = Counter(
            promql.SESSIONS_METRIC, "Agent sessions started", ["agent"], registry=registry
        )
        self.errors = Counter(
            promql.ERRORS_METRIC,
            "Agent errors by type",
            ["agent", "error_type"],
            registry=registry,
        )
        self.sink_failures = Counter(
            promql.SINK_FAILURES_METRIC,
            "Turn sinks that raised (the turn was still delivered to the other sinks)",
            ["sink"],
            registry=registry,
        )
        self.interruptions = Counter(
            promql.INTERRUPTIONS_METRIC,
            "Agent replies the user cut short (barge-in), before or after their first audio",
            ["agent"],
            registry=registry,
        )
        self._interruptions_by_agent: dict[str, Counter] = {}
        self.traces_sampled_out = Counter(
            promql.TRACES_SAMPLED_OUT_METRIC,
            "Finished turns whose trace trace sampling did not keep (their latency still counts)",
            ["agent"],
            registry=registry,
        )
        self._sampled_out_by_agent: dict[str, Counter] = {}
        self.budget_overruns = Counter(
            promql.BUDGET_OVERRUNS_METRIC,
            "Turns whose component latency exceeded its budget",
            ["agent", "component"],
            registry=registry,
        )
        self._overrun_children: dict[tuple[str, str], Counter] = {}
        self.label_overflow = Counter(
            promql.LABEL_OVERFLOW_METRIC,
            "Label values folded into 'other' by the cardinality guard, or dropped",
            ["label"],
            registry=registry,
        )
        self._agents = _LabelGuard("agent", max_agents, self.label_overflow)
        self._error_types = _LabelGuard("error_type", max_error_types, self.label_overflow)
        self._sinks = _LabelGuard("sink", max_sinks, self.label_overflow)
        self._models = _ModelGuard(max_models, self.label_overflow)
        self._measured = _LabelGuard("measured_component", max_measured, self.label_overflow)
        self._unknown_component = self.label_overflow.labels(label="component")
        self._series: dict[str, _AgentSeries] = {}  # by admitted agent value
        self._series_by_raw: dict[str, _AgentSeries] = {}  # by raw agent, admitted ones only
        self._active_count: dict[str, int] = {}
        # file-backed values drop exemplars: multiprocess.ExemplarStore keeps them instead
        self._exemplars = not multiprocess.values_are_file_backed()
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
                # before the first child: a missing or read-only directory must not raise
                multiprocess.ensure_multiproc_dir()
                found = cls(target)
                cls._instances[target] = found
                multiprocess.warn_if_misconfigured()
                multiprocess.register_exit_cleanup()
        return found

    # -- turns -------------------------------------------------------------------------------

    def observe_turn(self, turn: Turn) -> None:
        """Latency per measured component (seconds) and, for user turns, the tier count."""
        series = self._series_by_raw.get(turn.agent) or self._series_for(turn.agent)
        trace_id = None if turn.trace_id is None else f"{turn.trace_id:032x}"
        exemplar = {"trace_id": trace_id} if trace_id is not None and self._exemplars else None
        # multiprocess mode: (sample, labels, value) that this turn is the latest exemplar of
        kept: list[tuple[str, Labels, float]] | None = (
            [] if trace_id is not None and not self._exemplars else None
        )
        for component, ms in turn.latency_ms.items():
            pair = component_model(turn, component)
            model = NO_MODEL if pair is None else self._models.resolve(pair)
            child = series.latency.get((component, *model)) or self._bind_latency(
                series, component, model
            )
            if child is None:
                continue
            if not (ms >= 0.0 and math.isfinite(ms)):
                self.skipped_observations += 1
                logger.debug("skipped invalid latency", extra={"component": component})
                continue
            child.observe(ms / 1000.0, exemplar)
            if kept is not None:
                kept.append(_bucket_sample(series.agent, component, model, ms / 1000.0))
        if "e2e" in turn.latency_ms:
            for part, ms in turn.breakdown_ms.items():
                if ms > 0.0 and math.isfinite(ms):
                    counter = series.breakdown.get(part) or self._bind_breakdown(series, part)
                    if counter is not None:
                        counter.inc(ms / 1000.0)
        if turn.kind == "user" and turn.tier is not None:
            counter = series.turns.get(turn.tier)
            if counter is not None:
                counter.inc(1, exemplar)
                if kept is not None:
                    labels = (("agent", series.agent), ("tier", turn.tier))
                    kept.append((promql.TURNS_METRIC, labels, 1.0))
        if kept and trace_id is not None:
            store = multiprocess.exemplar_store()
            if store is not None:
                store.add(kept, trace_id)
        for component in turn.budget_overruns_ms:
            if component in COMPONENTS:
                self._overrun_child(series.agent, component).inc()

    def observe_completed_turn(self, turn: Turn) -> None:
        """A reply ended: count it when the user cut it short (its latency went live already)."""
        if not turn.interrupted:
            return
        agent = (self._series_by_raw.get(turn.agent) or self._series_for(turn.agent)).agent
        self._interruptions_child(agent).inc()

    def trace_sampled_out(self, agent: str) -> None:
        """A finished turn whose trace was not kept."""
        self._sampled_out_child(agent).inc()

    def export_sampling(self, agent: str) -> None:
        """Export the sampled-out count at zero for a session that samples its traces."""
        self._sampled_out_child(agent)

    def _sampled_out_child(self, agent: str) -> Counter:
        key = (self._series_by_raw.get(agent) or self._series_for(agent)).agent
        child = self._sampled_out_by_agent.get(key)
        if child is None:  # agent labels are bounded by the cardinality guard
            child = self._sampled_out_by_agent[key] = self.traces_sampled_out.labels(agent=key)
        return child

    def _interruptions_child(self, agent: str) -> Counter:
        child = self._interruptions_by_agent.get(agent)
        if child is None:  # agent labels are bounded by the cardinality guard
            child = self._interruptions_by_agent[agent] = self.interruptions.labels(agent=agent)
        return child

    def export_components(self, agent: str, components: Iterable[str]) -> None:
        """Export these latency series at zero now: Prometheus cannot see the increase of a
        series whose first sample already counts a turn, so the first slow turns would vanish
        from rate()-based SLO alerts."""
        series = self._series_by_raw.get(agent) or self._series_for(agent)
        for component in components:
            if (component, *NO_MODEL) not in series.latency:
                self._bind_latency(series, component, NO_MODEL)
        if "e2e" in components:  # its parts too: the breakdown panel's first turns count
            for part in BREAKDOWN_PARTS:
                if part not in series.breakdown:
                    self._bind_breakdown(series, part)

    def observe_measured(self, agent: str, component: str, seconds: float) -> None:
        """A user's own code timed with measure_latency: the latency histogram under its name
        (the first `max_measured` names; later ones are counted, not exported)."""
        if not (seconds >= 0.0 and math.isfinite(seconds)):
            self.skipped_observations += 1
            return
        if component in COMPONENTS or self._measured.resolve(component) != component:
            self._unknown_component.inc()
            return
        series = self._series_by_raw.get(agent) or self._series_for(agent)
        child = series.latency.get((component, *NO_MODEL))
        if child is None:
            with self._lock:
                child = series.latency.get((component, *NO_MODEL))
                if child is None:
                    child = self.latency.labels(
                        component=component, agent=series.agent, provider="", model=""
                    )
                    series.latency[(component, *NO_MODEL)] = child
        child.observe(seconds)

    # -- sessions ----------------------------------------------------------------------------

    def session_started(self, agent: str) -> None:
        series = self._series_by_raw.get(agent) or self._series_for(agent)
        key = series.agent  # resolved once: an overflowing name is counted once per call
        with self._lock:
            self._active_count[key] = self._active_count.get(key, 0) + 1
        series.active.inc()
        series.sessions.inc()
        self._interruptions_child(key)  # exported at zero: rate() sees the first barge-in

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

    def _bind_latency(
        self, series: _AgentSeries, component: str, model: ModelLabels
    ) -> Histogram | None:
        if component not in COMPONENTS:
            self._unknown_component.inc()
            return None
        key = (component, *model)
        with self._lock:
            child = series.latency.get(key)
            if child is None:
                child = self.latency.labels(
                    component=component, agent=series.agent, provider=model[0], model=model[1]
                )
                series.latency[key] = child
        return child

    def _bind_breakdown(self, series: _AgentSeries, part: str) -> Counter | None:
        if part not in BREAKDOWN_PARTS:
            self._unknown_component.inc()
            return None
        with self._lock:
            child = series.breakdown.get(part)
            if child is None:
                child = series.breakdown[part] = self.breakdown.labels(
                    agent=series.agent, part=part
                )
        return child

    def _series_for(self, raw_agent: str) -> _AgentSeries:
        agent = self._agents.resolve(raw_agent)
        with self._lock:
            series = self._series.get(agent)
            if series is None:
                series = _AgentSeries(
                    agent=agent,
                    latency={},
                    breakdown={},
                    turns={t: self.turns.labels(agent=agent, tier=t) for t in TIERS},
                    active=self.active_sessions.labels(agent=agent),
                    sessions=self.sessions.labels(agent=agent),
                )
                self._series[agent] = series
            # Only raw names the guard cached are keys here, so this dict stays bounded too.
            if self._agents.is_cached(raw_agent):
                self._series_by_raw[raw_agent] = series
        return series
