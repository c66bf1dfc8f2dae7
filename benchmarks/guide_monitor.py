"""The latency guide's LatencyMonitor, reproduced as the benchmark baseline.

A deque of (timestamp, value) per component, pruned on record; get_stats sorts the window.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping


class GuideLatencyMonitor:
    def __init__(self, window_s: float = 300.0, *, clock: Callable[[], float] = time.time) -> None:
        self.window_s = window_s
        self._clock = clock
        self.metrics: defaultdict[str, deque[tuple[float, float]]] = defaultdict(deque)

    def record(
        self, component: str, duration_ms: float, metadata: Mapping[str, object] | None = None
    ) -> None:
        now = self._clock()
        samples = self.metrics[component]
        samples.append((now, duration_ms))
        cutoff = now - self.window_s
        while samples and samples[0][0] < cutoff:
            samples.popleft()

    def get_stats(self, component: str) -> dict[str, float | int]:
        values = [value for _, value in self.metrics.get(component, ())]
        if not values:
            return {"count": 0, "mean": 0.0, "median": 0.0, "p95": 0.0, "p99": 0.0}
        ordered = sorted(values)
        n = len(ordered)
        return {
            "count": n,
            "mean": statistics.mean(values),
            "median": statistics.median(ordered),
            "p95": ordered[int(n * 0.95)] if n > 1 else ordered[0],
            "p99": ordered[int(n * 0.99)] if n > 1 else ordered[0],
            "min": ordered[0],
            "max": ordered[-1],
        }

    def get_all_stats(self) -> dict[str, dict[str, float | int]]:
        return {component: self.get_stats(component) for component in self.metrics}
