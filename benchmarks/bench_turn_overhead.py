"""CPU cost per turn of lk_observe (assembler + spans + Prometheus + monitor), with baselines.

Replays one recorded turn's real LiveKit event objects through a session's `emit`:
  baseline    - the same session with no instrumentation (LiveKit's emitter, no listeners)
  listeners   - the naive alternative: one `session.on(...)` callback per event type
  no-op spans - lk_observe.instrument() with OpenTelemetry's no-op provider: our own code only
  lk_observe  - lk_observe.instrument() with a TracerProvider + BatchSpanProcessor
  fast at 10% - the same with trace sampling keeping 10% of fast turns' traces (the recorded
                turn is fast: e2e 470 ms, under both default SLOs)
CPU time (process_time: all threads, so the sink thread's and the span processor's work count)
over N turns, the median of several interleaved repetitions.

Periodic work counts as a call pays it: lk_observe's SLO check runs on its sink thread's timer
(time.monotonic), at most once a second and only after new turns; here time.monotonic follows
the benchmark's call clock, so paced turns 8 s apart pay one check each, as in a call.
LiveKit's own tracing is not a variant here: its spans are made by its pipeline (LLM, TTS,
agent_turn...), which a replay of events never runs; bench_session_overhead.py compares the
two on whole scripted sessions.

The process is set up like a LiveKit job process: livekit-agents' forkserver imports the
framework and then calls gc.collect(); gc.freeze() (livekit/agents/ipc/_preload_freeze.py), so
full garbage collections in a job never walk the imported modules; this benchmark does the same
after its imports (--no-gc-freeze: as under `spawn`, the default off Linux, where every full
collection walks the whole heap).

All threads run on one CPU (--no-pin to let them move). lk_observe hands each turn from the
event loop to its sink thread; on a VM with an idle second vCPU every such hand-off wakes that
vCPU, and the hypervisor's cost of it lands in the process's CPU time, swinging run to run by
+-30% with the host's load. On one CPU the same work measures within a few percent.

    uv run python benchmarks/bench_turn_overhead.py [--turns 2000] [--repeat 5] [--no-gc-freeze]
        [--no-pin] [--check]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from livekit.agents import AgentSession
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry

import lk_observe
from tests.replay import RecordedEvent, emit_recorded, recorded_turn, speech_of

_CHUNK = 50
_SECONDS_BETWEEN_TURNS = 8.0  # a user turn and the agent's reply
TARGET_MS_PER_TURN = 0.2  # the project's target for the whole add-on, OTel SDK included


class _DiscardExporter(SpanExporter):
    """Stands in for a healthy collector: serialisation-free, so we time the SDK and us."""

    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class _CallLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock the benchmark moves: between paced turns it jumps ahead as the
    seconds of a real call would, so timers that come due between turns (lk_observe's reply
    expiry) run, and are counted, as they would in a call."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def time(self) -> float:
        return self.now


async def _play(
    session: AgentSession,
    turns: list[list[RecordedEvent]],
    *,
    paced: bool,
    between_turns: Callable[[], Any],
) -> None:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, _CallLoop)
    for events in turns:
        for event in events:
            emit_recorded(session, event)
        session._recorded_events.clear()  # LiveKit keeps every event of a session: not ours
        speech_of(events)._mark_done()  # the reply played out
        if paced:
            loop.now += _SECONDS_BETWEEN_TURNS
        for _ in range(2):  # the first pass moves due timers to the ready queue
            await asyncio.sleep(0)  # done callbacks and timers that came due run
        if paced:
            lk_observe.flush(30.0)  # blocking the loop is fine here: nothing else runs on it
            between_turns()


def _replay(
    loop: _CallLoop,
    session: AgentSession,
    turns: int,
    *,
    paced: bool,
    between_turns: Callable[[], Any],
) -> float:
    """CPU seconds (all threads) to play `turns` recorded turns on `loop`.

    Paced, as in a real call where turns are seconds apart: each turn's sink work finishes and
    the span processor exports its spans (`between_turns`; the SDK's batch processor exports
    every 5 s) before the next turn starts. Back to back (a worst case no single call reaches):
    the sink thread and the loop contend for the GIL the whole time, and spans wait in the
    batch processor's queue until 512 have piled up, long enough to reach the garbage
    collector's oldest generation.

    Each chunk's events are built just before it is played, outside the timed part: a real
    session creates its events as they happen, and thousands of pre-built turns kept alive would
    make every variant pay for full garbage collections of them.
    """
    spent = 0.0
    for chunk_start in range(0, turns, _CHUNK):
        chunk = [recorded_turn() for _ in range(min(_CHUNK, turns - chunk_start))]
        lk_observe.flush(30.0)
        start = time.process_time()
        loop.run_until_complete(_play(session, chunk, paced=paced, between_turns=between_turns))
        lk_observe.flush(30.0)
        spent += time.process_time() - start
    return spent


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


def run(loop: _CallLoop, turns: int, repeat: int = 5, *, freeze: bool = True) -> dict[str, float]:
    """Median CPU seconds per variant and pacing, e.g. results["lk_observe, paced"]."""
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_DiscardExporter(), max_queue_size=65536))
    registry = CollectorRegistry()
    # slices come and go with the call's clock, as turns 8 s apart make them in a call
    monitor = lk_observe.LatencyMonitor(clock=lambda: loop.now)
    recorded_turn()  # import what a turn needs before freezing, as LiveKit's forkserver would
    gc.collect()
    if freeze:
        gc.freeze()

    def instrumented(
        tracer_provider: trace.TracerProvider, sampling: lk_observe.TraceSampling | None = None
    ) -> Callable[[], AgentSession]:
        def make() -> AgentSession:
            session = AgentSession()
            lk_observe.instrument(
                session,
                tracer_provider=tracer_provider,
                registry=registry,
                monitor=monitor,
                trace_sampling=sampling,
            )
            return session

        return make

    variants: dict[str, Callable[[], AgentSession]] = {
        "baseline": AgentSession,
        "naive listeners (no work)": _listening_session,
        "lk_observe, no-op spans": instrumented(trace.NoOpTracerProvider()),
        "lk_observe": instrumented(provider),
        "lk_observe, fast at 10%": instrumented(provider, lk_observe.TraceSampling(0.1)),
    }
    samples: dict[str, list[float]] = {}
    for _ in range(repeat):
        for paced in (True, False):
            mode = "paced" if paced else "back to back"
            for name, make in variants.items():
                session = make()
                seconds = _replay(
                    loop, session, turns, paced=paced, between_turns=provider.force_flush
                )
                handle = getattr(session, "_lk_observe_handle", None)
                if handle is not None:
                    assert handle.turns_emitted == turns, (handle.turns_emitted, handle.skipped)
                    handle.uninstrument()
                samples.setdefault(f"{name}, {mode}", []).append(seconds)
    provider.shutdown()
    gc.unfreeze()
    return {name: statistics.median(values) for name, values in samples.items()}


def _pin_to_one_cpu() -> Callable[[], None]:
    """Run every thread of this process (and the threads it starts later) on one CPU; returns
    what undoes it. A no-op where the OS has no CPU affinity."""
    if not hasattr(os, "sched_setaffinity"):
        return lambda: None
    allowed = os.sched_getaffinity(0)

    def set_all(cpus: set[int]) -> None:
        for tid in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):  # a thread that just ended
                os.sched_setaffinity(int(tid), cpus)

    set_all({min(allowed)})
    return lambda: set_all(allowed)


def added_ms_per_turn(results: dict[str, float], name: str, turns: int) -> float:
    mode = name.rsplit(", ", 1)[1]
    return (results[name] - results[f"baseline, {mode}"]) / turns * 1000


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5, help="repetitions; medians reported")
    parser.add_argument(
        "--no-gc-freeze",
        action="store_true",
        help="don't freeze the imported heap (like a job process started with `spawn`)",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="let the threads move between CPUs (noisy: waking a sleeping vCPU costs the process)",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when lk_observe adds more than the target"
    )
    args = parser.parse_args(argv)
    unpin = (lambda: None) if args.no_pin else _pin_to_one_cpu()
    loop = _CallLoop()
    asyncio.set_event_loop(loop)
    real_monotonic = time.monotonic
    time.monotonic = lambda: loop.now  # the sink thread's timer follows the call's clock
    try:
        results = run(loop, args.turns, args.repeat, freeze=not args.no_gc_freeze)
    finally:
        time.monotonic = real_monotonic
        asyncio.set_event_loop(None)
        loop.close()
        unpin()
    print(
        f"threads {'free to move' if args.no_pin else 'on one CPU'}, imported heap "
        f"{'not frozen' if args.no_gc_freeze else 'frozen'}, {args.turns} turns x "
        f"{args.repeat} repetitions (medians)"
    )
    print(f"{'variant':<42} {'CPU ms/turn':>12} {'added ms/turn':>14} {'x baseline':>11}")
    for mode in ("paced", "back to back"):
        base = results[f"baseline, {mode}"]
        for name, seconds in results.items():
            if name.endswith(f", {mode}"):
                per_turn = seconds / args.turns * 1000
                added = added_ms_per_turn(results, name, args.turns)
                print(f"{name:<42} {per_turn:>12.4f} {added:>14.4f} {seconds / base:>10.1f}x")
    added_paced = added_ms_per_turn(results, "lk_observe, paced", args.turns)
    verdict = "within" if added_paced <= TARGET_MS_PER_TURN else "ABOVE"
    print(
        f"lk_observe adds {added_paced:.3f} ms/turn (paced, OTel SDK spans included): {verdict} "
        f"the {TARGET_MS_PER_TURN} ms target"
    )
    if args.check and added_paced > TARGET_MS_PER_TURN:
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
