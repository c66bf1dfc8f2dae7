"""Prometheus families for voice-agent latency; Turn -> observations."""

from __future__ import annotations

# Every SLO threshold must be one of these edges (slo.SLO checks it) so `le` matches exactly.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9,
    1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0,
)
