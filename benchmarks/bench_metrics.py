"""Cost of Turn -> Prometheus and of rendering /metrics, against baselines measured in this run.

    uv run python benchmarks/bench_metrics.py [--turns 20000]

Rows: LatencyMetrics.observe_turn (pre-bound children) vs the same observations through
`.labels(...)` on every call (the unbound baseline), with and without a trace exemplar; then
render_metrics for 1, 5 and 20 agents. Each figure is the best of several rounds; the machine is
noisy, so read the ratios. Multiprocess mode is measured in a child interpreter, because
prometheus_client picks file-backed values when it is first imported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from lk_observe.metrics import LatencyMetrics
from lk_observe.multiprocess import multiproc_dir
from lk_observe.server import render_metrics
from lk_observe.turns import COMPONENTS, Turn, tier_for

ROUNDS = 5
AGENT_COUNTS = (1, 5, 20)


def make_turn(index: int, agent: str = "default", trace_id: int | None = None) -> Turn:
    e2e = 400.0 + (index % 9) * 60.0
    return Turn(
        index=index,
        speech_id=None,
        started_at=0.0,
        ended_at=1.0,
        latency_ms={"e2e": e2e, "vad": 180.0, "stt": 170.0, "llm_ttft": 250.0, "tts_ttfb": 60.0},
        interrupted=False,
        tier=tier_for(e2e),
        agent=agent,
        trace_id=trace_id,
    )


def best_per_call_us(run: Callable[[], None], calls: int) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        began = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - began)
    return best / calls * 1e6


def observe_costs(n_turns: int) -> dict[str, float]:
    turns = [make_turn(i) for i in range(n_turns)]
    traced = [make_turn(i, trace_id=0x1234 + i) for i in range(n_turns)]

    metrics = LatencyMetrics.for_registry(CollectorRegistry())

    def prebound() -> None:
        for turn in turns:
            metrics.observe_turn(turn)

    def prebound_exemplar() -> None:
        for turn in traced:
            metrics.observe_turn(turn)

    # The baseline: the same families, a .labels() lookup on every observation.
    base = LatencyMetrics.for_registry(CollectorRegistry())
    latency, counter = base.latency, base.turns

    def unbound() -> None:
        for turn in turns:
            for component, ms in turn.latency_ms.items():
                latency.labels(
                    component=component, agent=turn.agent, provider="", model=""
                ).observe(ms / 1000.0)
            counter.labels(agent=turn.agent, tier=turn.tier).inc()

    def unbound_exemplar() -> None:
        for turn in traced:
            exemplar = {"trace_id": f"{turn.trace_id:032x}"}
            for component, ms in turn.latency_ms.items():
                latency.labels(
                    component=component, agent=turn.agent, provider="", model=""
                ).observe(ms / 1000.0, exemplar)
            counter.labels(agent=turn.agent, tier=turn.tier).inc(1, exemplar)

    return {
        "prebound": best_per_call_us(prebound, n_turns),
        "unbound": best_per_call_us(unbound, n_turns),
        "prebound_exemplar": best_per_call_us(prebound_exemplar, n_turns),
        "unbound_exemplar": best_per_call_us(unbound_exemplar, n_turns),
    }


def render_costs(agent_counts: tuple[int, ...] = AGENT_COUNTS) -> dict[str, float]:
    """ms per render_metrics for a registry with every series of `agents` agents."""
    results: dict[str, float] = {}
    for agents in agent_counts:
        registry = CollectorRegistry()
        metrics = LatencyMetrics.for_registry(registry)
        for a in range(agents):
            name = f"agent-{a}"
            metrics.session_started(name)
            metrics.error(name, "stt_timeout")
            for i in range(9):  # every tier and a spread of buckets
                metrics.observe_turn(make_turn(i, agent=name, trace_id=i + 1))
        for openmetrics in (False, True):
            key = f"render_{agents}_{'om' if openmetrics else 'text'}"

            def render(registry: CollectorRegistry = registry, om: bool = openmetrics) -> None:
                render_metrics(registry, om)

            results[key] = best_per_call_us(render, 1) / 1e3
        text, _ = render_metrics(registry)
        results[f"lines_{agents}"] = float(text.count(b"\n"))
    return results


def _child(args: list[str]) -> dict[str, float]:
    # A fresh interpreter and metrics directory: file-backed values are chosen at import, and
    # one process's files would otherwise pile up across agent counts.
    with tempfile.TemporaryDirectory(prefix="lk_observe_bench_") as directory:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory}
        out = subprocess.run(
            [sys.executable, __file__, "--json", *args],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    result: dict[str, float] = json.loads(out)
    return result


def measure_multiprocess(n_turns: int) -> dict[str, float]:
    result = _child(["--part", "observe", "--turns", str(n_turns)])
    for agents in AGENT_COUNTS:
        result.update(_child(["--part", "render", "--agents", str(agents)]))
    return result


def table(single: dict[str, float], multi: dict[str, float]) -> str:
    rows = [
        f"{'measure':44} {'single-proc':>12} {'multiproc':>12} {'mp/sp':>7}",
        "-" * 78,
    ]

    def row(label: str, key: str, unit: str, ratio_to: str | None = None) -> None:
        sp, mp = single[key], multi[key]
        line = f"{label + ' (' + unit + ')':44} {sp:12.2f} {mp:12.2f} {mp / sp:6.2f}x"
        if ratio_to:
            line += (
                f"   vs baseline: sp {single[ratio_to] / sp:.2f}x, mp {multi[ratio_to] / mp:.2f}x"
            )
        rows.append(line)

    row("observe_turn, pre-bound", "prebound", "us/turn", "unbound")
    row("baseline: .labels() per observation", "unbound", "us/turn")
    row("observe_turn + exemplar, pre-bound", "prebound_exemplar", "us/turn", "unbound_exemplar")
    row("baseline: .labels() + exemplar", "unbound_exemplar", "us/turn")
    rows.append("")
    rows.append(f"{'render_metrics':44} {'single-proc':>12} {'multiproc':>12} {'mp/sp':>7}")
    rows.append("-" * 78)
    for agents in AGENT_COUNTS:
        for fmt in ("text", "om"):
            key = f"render_{agents}_{fmt}"
            lines = int(single[f"lines_{agents}"])
            label = f"{agents:>2} agent(s), {fmt:4}, {lines} lines"
            sp, mp = single[key], multi[key]
            base_sp, base_mp = single[f"render_1_{fmt}"], multi[f"render_1_{fmt}"]
            rows.append(
                f"{label + ' (ms)':44} {sp:12.2f} {mp:12.2f} {mp / sp:6.2f}x"
                f"   vs 1 agent: sp {sp / base_sp:.1f}x, mp {mp / base_mp:.1f}x"
            )
    per_turn_components = len(COMPONENTS) - 1  # the benchmark turn has 5 of the 6 components
    rows.append("")
    rows.append(
        f"a turn = {per_turn_components} histogram observations + 1 counter increment; "
        f"multiprocess mode skips exemplars (prometheus_client cannot store them there)"
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=20_000)
    parser.add_argument("--json", action="store_true", help="print raw figures (used internally)")
    parser.add_argument("--part", choices=("observe", "render"), default="observe")
    parser.add_argument("--agents", type=int, default=1)
    args = parser.parse_args()
    if args.json:
        if multiproc_dir() is None:
            raise SystemExit("--json is for the multiprocess child; PROMETHEUS_MULTIPROC_DIR unset")
        part = observe_costs(args.turns) if args.part == "observe" else render_costs((args.agents,))
        print(json.dumps(part))
        return
    single = {**observe_costs(args.turns), **render_costs()}
    multi = measure_multiprocess(args.turns)
    print(table(single, multi))


if __name__ == "__main__":
    main()
