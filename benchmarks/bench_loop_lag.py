"""Event-loop lag during a scripted AgentSession, with and without lk_observe exporting spans.

A probe task sleeps 5 ms in a loop and records how late it wakes up (the overshoot): that is
the delay any coroutine of the agent would see. Variants, interleaved and repeated so that
machine noise hits all of them alike (the baseline is measured in the same run):
  baseline             - the session, no lk_observe
  <proto> healthy      - instrument() + configure_tracing() to an OTLP receiver on 127.0.0.1
  <proto> black hole   - the same, to a port that accepts TCP and never answers
(the collectors are the fault tests' own, tests/otlp_collectors.py)
Spans are exported every 100 ms (OTEL_BSP_SCHEDULE_DELAY) so exports run during the session.

    uv run python benchmarks/bench_loop_lag.py [--quick] [--turns N] [--repeats R]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

import lk_observe
from lk_observe.demo import ScriptedTurn, build_pipeline, run_pipeline
from lk_observe.otlp import configure_tracing, export_health, shutdown_tracing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for tests/
from tests.otlp_collectors import (  # the fault tests' own collectors
    Behaviour,
    Collector,
    GrpcCollector,
    HttpCollector,
    SocketCollector,
)

PROBE_S = 0.005
TIMEOUT_S = 1.0
TURN = ScriptedTurn(
    speech_s=0.4,
    vad_s=0.15,
    stt_s=0.1,
    llm_ttft_s=0.15,
    llm_total_s=0.25,
    tts_ttfb_s=0.05,
    reply_audio_s=0.3,
    gap_s=0.1,
)


@dataclass
class Variant:
    name: str
    protocol: str | None = None  # None: no lk_observe at all
    receiver: Callable[[], Collector] | None = None
    lag_ms: list[float] = field(default_factory=list)
    exported: int = 0
    failed: int = 0
    dropped: int = 0
    received: int = 0
    shutdown_s: float = 0.0
    gc_max_ms: float = 0.0  # longest full (gen 2) collection during the session, any thread


class _GcWatch:
    """Times gen-2 collections: they stop the loop as well (~150 ms here once the heap holds
    LiveKit, grpc and protobuf) and explain a max that no exporter caused."""

    def __init__(self) -> None:
        self.longest_ms = 0.0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.longest_ms = max(self.longest_ms, (time.perf_counter() - self._start) * 1000.0)


async def _probe(out: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        await asyncio.sleep(PROBE_S)
        out.append((time.perf_counter() - start - PROBE_S) * 1000.0)


async def _session(variant: Variant, turns: int) -> None:
    receiver = variant.receiver() if variant.receiver else None
    provider = None
    pipeline = build_pipeline([TURN] * turns)
    try:
        if receiver is not None and variant.protocol is not None:
            provider = configure_tracing(
                endpoint=receiver.endpoint,
                protocol=variant.protocol,
                timeout_s=TIMEOUT_S,
                registry=CollectorRegistry(),
            )
            lk_observe.instrument(
                pipeline.session,
                tracer_provider=provider,
                registry=CollectorRegistry(),
                monitor=lk_observe.LatencyMonitor(),
            )
        stop = asyncio.Event()
        watch = _GcWatch()
        gc.callbacks.append(watch)
        probe = asyncio.create_task(_probe(variant.lag_ms, stop))
        try:
            await run_pipeline(pipeline)
        finally:
            stop.set()
            await probe
            gc.callbacks.remove(watch)
        variant.gc_max_ms = max(variant.gc_max_ms, watch.longest_ms)
        if provider is not None:
            await asyncio.to_thread(lk_observe.flush, 5.0)
            health = export_health(provider)
            start = time.perf_counter()
            await asyncio.to_thread(shutdown_tracing, provider, TIMEOUT_S + 1.0)
            variant.shutdown_s = max(variant.shutdown_s, time.perf_counter() - start)
            variant.exported += int(str(health["exported"]))
            variant.failed += int(str(health["failed"]))
            variant.dropped += int(str(health["dropped"]))
    finally:
        if receiver is not None:
            variant.received += receiver.span_count
            receiver.close()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main(
    quick: bool = False, turns: int | None = None, repeats: int | None = None
) -> dict[str, dict[str, float]]:
    """Run every variant `repeats` times, interleaved; print the table; return the figures."""
    turns = turns or (2 if quick else 5)
    repeats = repeats or (1 if quick else 3)
    variants = [
        Variant("baseline (no lk_observe)"),
        Variant("http healthy", "http/protobuf", lambda: HttpCollector(Behaviour("ok"))),
        Variant("http black hole", "http/protobuf", lambda: SocketCollector(listen=True)),
    ]
    if not quick:
        variants += [
            Variant("grpc healthy", "grpc", lambda: GrpcCollector(Behaviour("ok"))),
            Variant("grpc black hole", "grpc", lambda: SocketCollector(listen=True)),
        ]
    previous = os.environ.get("OTEL_BSP_SCHEDULE_DELAY")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # export during the session, not after it
    try:

        async def run_all() -> None:
            for _ in range(repeats):
                for variant in variants:
                    await _session(variant, turns)

        asyncio.run(run_all())
    finally:
        if previous is None:
            os.environ.pop("OTEL_BSP_SCHEDULE_DELAY", None)
        else:
            os.environ["OTEL_BSP_SCHEDULE_DELAY"] = previous

    base = variants[0].lag_ms
    b50, b99 = _pct(base, 0.5), _pct(base, 0.99)
    results: dict[str, dict[str, float]] = {}
    print(
        f"loop lag (probe sleeps {PROBE_S * 1000:.0f} ms; overshoot in ms), {turns} turns x "
        f"{repeats} runs per variant, export timeout {TIMEOUT_S} s"
    )
    header = (
        f"{'variant':<26}{'n':>6}{'p50':>7}{'p99':>7}{'max':>7}{'mean':>7}"
        f"{'p99 x':>7}{'p99 +ms':>8}{'export':>8}{'failed':>7}{'dropped':>8}{'recv':>6}"
        f"{'shutdown s':>11}{'gen2 gc ms':>11}"
    )
    print(header)
    print("-" * len(header))
    for v in variants:
        p50, p99, top = _pct(v.lag_ms, 0.5), _pct(v.lag_ms, 0.99), max(v.lag_ms)
        mean = statistics.fmean(v.lag_ms)
        results[v.name] = {
            "samples": float(len(v.lag_ms)),
            "p50_ms": p50,
            "p99_ms": p99,
            "max_ms": top,
            "p99_ratio": p99 / b99 if b99 > 0 else float("nan"),
            "p99_added_ms": p99 - b99,
            "p50_added_ms": p50 - b50,
            "exported": float(v.exported),
            "failed": float(v.failed),
            "dropped": float(v.dropped),
            "shutdown_s": v.shutdown_s,
            "gc_max_ms": v.gc_max_ms,
        }
        print(
            f"{v.name:<26}{len(v.lag_ms):>6}{p50:>7.2f}{p99:>7.2f}{top:>7.2f}{mean:>7.2f}"
            f"{results[v.name]['p99_ratio']:>7.2f}{p99 - b99:>+8.2f}{v.exported:>8}"
            f"{v.failed:>7}{v.dropped:>8}{v.received:>6}{v.shutdown_s:>11.2f}{v.gc_max_ms:>11.1f}"
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="2 turns, 1 run, HTTP only")
    parser.add_argument("--turns", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    main(args.quick, args.turns, args.repeats)
