"""lk_observe's series as Prometheus names them, and the PromQL that rules and dashboards share.

Pure string building with no prometheus_client import, so the offline generators (rules.py,
dashboards.py) never load the runtime; metrics.py registers its families from these names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # slo.py imports this module: the SLO type is only needed for annotations
    from lk_observe.slo import SLO

# Every SLO threshold must be one of these edges (slo.SLO checks it) so `le` matches exactly.
# fmt: off
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9,
    1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0,
)
# fmt: on

LATENCY_METRIC = "voice_agent_latency_seconds"
LATENCY_BUCKET = f"{LATENCY_METRIC}_bucket"
LATENCY_COUNT = f"{LATENCY_METRIC}_count"
LATENCY_SUM = f"{LATENCY_METRIC}_sum"
TURNS_METRIC = "voice_agent_turns_total"
ACTIVE_SESSIONS_METRIC = "voice_agent_active_sessions"
SESSIONS_METRIC = "voice_agent_sessions_total"
ERRORS_METRIC = "voice_agent_errors_total"
SINK_FAILURES_METRIC = "voice_agent_sink_failures_total"
INTERRUPTIONS_METRIC = "voice_agent_interruptions_total"
TRACES_SAMPLED_OUT_METRIC = "voice_agent_traces_sampled_out_total"
BUDGET_OVERRUNS_METRIC = "voice_agent_budget_overruns_total"
LABEL_OVERFLOW_METRIC = "voice_agent_label_overflow_total"
# Seconds of e2e spent in each part of the critical path (label `part`): per agent, the parts'
# rates over the e2e count's rate add up to the mean e2e exactly.
BREAKDOWN_METRIC = "voice_agent_e2e_breakdown_seconds_total"

# Every generated alert's name starts with this, so a dashboard can list them all from ALERTS.
ALERT_PREFIX = "VoiceAgent"

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration_seconds(text: str) -> float:
    """Parse a single-unit Prometheus duration ("5m", "1h", "30d") into seconds."""
    if len(text) < 2 or text[-1] not in _DURATION_UNITS or not text[:-1].isdigit():
        raise ValueError(f"not a Prometheus duration like '5m' or '1h': {text!r}")
    return int(text[:-1]) * _DURATION_UNITS[text[-1]]


def bucket_edge(threshold_s: float) -> float | None:
    """The histogram bucket edge `threshold_s` stands for (float noise forgiven), or None."""
    return next((edge for edge in LATENCY_BUCKETS_S if math.isclose(edge, threshold_s)), None)


def le_label(threshold_s: float) -> str:
    """The `le` label value prometheus_client writes for the bucket edge at `threshold_s`.

    prometheus_client renders edges with Python's float repr ("0.8", "1.0"); Prometheus compares
    `le` as a string, so "0.80" or "1" would silently match nothing.
    """
    edge = bucket_edge(threshold_s)
    if edge is None:
        raise ValueError(f"threshold {threshold_s}s is not a bucket edge of {LATENCY_BUCKETS_S}")
    return repr(float(edge))


def num(value: float) -> str:
    """A number without float noise (14.4 * 0.05 -> 0.72, not 0.7200000000000001)."""
    return f"{value:.10g}"


def percent(ratio: float) -> str:
    return f"{num(ratio * 100)}%"


def component_matcher(component: str) -> str:
    return f'component="{component}"'


def selector(metric: str, *matchers: str) -> str:
    """`metric{a,b}`, or the bare name when there is nothing to match."""
    return f"{metric}{{{','.join(matchers)}}}" if matchers else metric


def summed(function: str, series: str, window: str, by: Sequence[str] = ()) -> str:
    """`sum by (by) (function(series[window]))`; a plain `sum(...)` when `by` is empty."""
    inner = f"{function}({series}[{window}])"
    return f"sum by ({', '.join(by)}) ({inner})" if by else f"sum({inner})"


def quantile_expr(q: float, window: str, *matchers: str, by: Sequence[str] = ()) -> str:
    """The q-quantile of the latency histogram over `window`, kept apart by the labels `by`."""
    buckets = summed("rate", selector(LATENCY_BUCKET, *matchers), window, (*by, "le"))
    return f"histogram_quantile({num(q)}, {buckets})"


def mean_expr(window: str, *matchers: str, by: Sequence[str] = ()) -> str:
    """The mean of the latency histogram over `window`: rate of its sum over rate of its count.

    Unlike a quantile, means add up: the mean e2e is the sum of the mean of each of its parts.
    """
    total = summed("rate", selector(LATENCY_SUM, *matchers), window, by)
    count = summed("rate", selector(LATENCY_COUNT, *matchers), window, by)
    return f"{total} / {count}"


def breakdown_expr(window: str, *matchers: str, part: str | None = None) -> str:
    """Mean seconds per e2e turn spent in a breakdown part (`part`), or in each, one series per
    `part`.

    Each part's seconds per second over the e2e turns per second (all selected agents together:
    a scalar, so every part divides by the same count); stacked, the parts sum to `mean_expr`
    of component="e2e" with the same matchers.
    """
    only = () if part is None else (f'part="{part}"',)
    parts = summed("rate", selector(BREAKDOWN_METRIC, *only, *matchers), window, ("part",))
    turns = summed("rate", selector(LATENCY_COUNT, component_matcher("e2e"), *matchers), window)
    return f"{parts} / scalar({turns})"


def slo_rates(slo: SLO, window: str, *matchers: str, by: Sequence[str] = ()) -> tuple[str, str]:
    """(good, all): rates of the SLO's turns at or under its threshold, and of all its turns.

    Both come from the raw histogram (the threshold is a bucket edge), so their ratio is exact.
    """
    component = component_matcher(slo.component)
    le = f'le="{le_label(slo.threshold_s)}"'
    good = summed("rate", selector(LATENCY_BUCKET, component, le, *matchers), window, by)
    total = summed("rate", selector(LATENCY_COUNT, component, *matchers), window, by)
    return good, total


def slo_windows(slo: SLO) -> list[str]:
    """Every window the SLO's burn-rate alerts read, shortest first, each once."""
    names = {w for bw in slo.windows for w in (bw.long, bw.short)}
    return sorted(names, key=lambda w: (duration_seconds(w), w))


def error_ratio_record(window: str) -> str:
    """The recording rule holding an SLO's share of slow turns over `window`, by agent."""
    return f"slo:sli_error:ratio_rate{window}"


def turns_rate_record(window: str) -> str:
    """The recording rule holding an SLO's turns per second over `window`, by agent."""
    return f"slo:sli_turns:rate{window}"


def bad_turns_rate_record(window: str) -> str:
    """Slow turns per second over `window`: the period's ratio sums it over time."""
    return f"slo:sli_bad_turns:rate{window}"


def recorded_windows(slo: SLO) -> list[str]:
    """Every window with error-ratio and turn-rate records: the alerts' windows and the
    SLO period, shortest first."""
    windows = slo_windows(slo)
    return windows if slo.period in windows else [*windows, slo.period]
