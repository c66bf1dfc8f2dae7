"""CPU cost per turn of lk_observe (assembler + spans + Prometheus + monitor), with baselines.

Replays one recorded turn's real LiveKit event objects through a session's `emit`:
  baseline  - the same session with no instrumentation (LiveKit's emitter, no listeners)
  listeners - the naive alternative: one `session.on(...)` callback per event type
  ours      - lk_observe.instrument() with a TracerProvider + BatchSpanProcessor
CPU time (process_time: all threads, so the sink thread's work counts) over N turns.

    uv run python benchmarks/bench_turn_overhead.py [--turns 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from livekit.agents import AgentSession
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry

import lk_observe
from lk_observe.simulation import RecordedEvent, emit_recorded, recorded_turn


class _DiscardExporter(SpanExporter):
    """Stands in for a healthy collector: serialisation-free, so we time the SDK and us."""

    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _replay(session: AgentSession, turns: list[list[RecordedEvent]], *, paced: bool) -> float:
    """CPU seconds (all threads) to play `turns`. Paced: each turn's sink work finishes before
    the next turn starts, as in a real call (turns are seconds apart); unpaced: back to back,
    the sink thread and the loop contending for the GIL the whole time (a worst case)."""
    start = time.process_time()
    for events in turns:
        if paced:
            lk_observe.flush(30.0)
        for event in events:
            emit_recorded(session, event)
        session._recorded_events.clear()  # LiveKit keeps every event of a session: not ours
    lk_observe.flush(30.0)
    return time.process_time() - start


def _listening_session() -> AgentSession:
    session = AgentSession()
    for name in (
        "user_state_changed",
        "speech_created",
        "conversation_item_added",
        "agent_state_changed",
        "function_tools_executed",
        "error",
        "close",
    ):
        session.on(name, lambda ev: None)  # the cost is LiveKit's dispatch
    return session


def run(turns: int) -> dict[str, float]:
    """CPU seconds per variant and pacing, e.g. results["lk_observe, paced"]."""
    results: dict[str, float] = {}
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_DiscardExporter(), max_queue_size=65536))
    for paced in (True, False):
        mode = "paced" if paced else "back to back"
        results[f"baseline, {mode}"] = _replay(
            AgentSession(), [recorded_turn() for _ in range(turns)], paced=paced
        )
        results[f"naive listeners (no work), {mode}"] = _replay(
            _listening_session(),
            [recorded_turn() for _ in range(turns)],
            paced=paced,
        )
        session = AgentSession()
        handle = lk_observe.instrument(
            session,
            tracer_provider=provider,
            registry=CollectorRegistry(),
            monitor=lk_observe.LatencyMonitor(),
        )
        results[f"lk_observe, {mode}"] = _replay(
            session, [recorded_turn() for _ in range(turns)], paced=paced
        )
        assert handle.turns_emitted == turns, (handle.turns_emitted, turns, handle.skipped)
        handle.uninstrument()
    provider.shutdown()
    return results


TARGET_MS_PER_TURN = 0.2  # the project's target for the whole add-on, OTel SDK included


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=2000)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when lk_observe adds more than the target"
    )
    args = parser.parse_args(argv)
    asyncio.set_event_loop(asyncio.new_event_loop())
    results = run(args.turns)
    print(f"{'variant':<40} {'CPU ms/turn':>12} {'added ms/turn':>14} {'x baseline':>11}")
    for name, seconds in results.items():
        base = results["baseline, " + name.rsplit(", ", 1)[1]]
        per_turn = seconds / args.turns * 1000
        added = (seconds - base) / args.turns * 1000
        print(f"{name:<40} {per_turn:>12.4f} {added:>14.4f} {seconds / base:>10.1f}x")
    added_paced = (results["lk_observe, paced"] - results["baseline, paced"]) / args.turns * 1000
    verdict = "within" if added_paced <= TARGET_MS_PER_TURN else "ABOVE"
    print(
        f"lk_observe adds {added_paced:.3f} ms/turn (paced): {verdict} the "
        f"{TARGET_MS_PER_TURN} ms target"
    )
    if args.check and added_paced > TARGET_MS_PER_TURN:
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
