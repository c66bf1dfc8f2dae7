"""What makes a PromQL expression a fleet's view: every series it reads is summed, and nothing
groups or matches by a label Prometheus adds per scrape target (one pod, never the fleet)."""

from __future__ import annotations

import re

# A raw series, with the aggregation (if any) and the rate()/increase() around it.
RAW_SERIES = re.compile(
    r"(?P<outer>sum(?: by \((?P<by>[^)]*)\))? ?\()?(?:(?:rate|increase)\()?voice_agent_\w+"
)
TARGET_LABELS = {"instance", "pod", "job", "namespace", "container", "node"}


def assert_sum_across_pods(exprs: list[str], *, at_least: int) -> None:
    """Each pod's ops app is its own scrape target: an expression that kept `instance` (or read
    a series without summing it) judges each pod alone (tests/integration/test_fleet.py)."""
    reads = [m for e in exprs for m in RAW_SERIES.finditer(e)]
    assert len(reads) >= at_least
    for read in reads:
        assert read["outer"], f"a series read without sum(): {read[0]}"
        assert not set(re.split(r",\s*", read["by"] or "")) & TARGET_LABELS, read[0]
    for expr in exprs:
        for labels in re.findall(r"\b(?:by|on|ignoring) \(([^)]*)\)", expr):
            assert not set(re.split(r",\s*", labels)) & TARGET_LABELS, expr
