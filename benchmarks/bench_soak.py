"""Soak: many concurrent instrumented AgentSessions, many turns, nothing leaks or goes missing.

`sessions` bare `AgentSession()` objects are open at any time (calls come and go: each call lasts
a random number of turns, then closes through a `close` event, `handle.uninstrument()` or
`lk_observe.uninstrument(session)`, and a new call takes its slot). One recorded turn's real
LiveKit event objects (as in bench_turn_overhead.py), with fresh SpeechHandles per turn, are
replayed through each session's `emit`, the sessions' events interleaved at random. Sinks: a
real TracerProvider + BatchSpanProcessor to a discarding exporter, a fresh CollectorRegistry,
one LatencyMonitor, and an on_turn hook (delivered through the event loop).

Measured: RSS (/proc/self/status) and tracemalloc growth between the 10 % and 100 % marks,
wall/CPU time per turn, /metrics size at 10 % and 100 %, registry sample count, turns fed vs
emitted vs counted, spans exported, leaks after sessions close (instance `emit`, marker,
asyncio tasks and timers, weakrefs to sessions and handles).

    uv run python benchmarks/bench_soak.py [--turns 100000] [--sessions 50] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import threading
import time
import tracemalloc
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from livekit.agents import AgentSession
from livekit.agents.voice.events import (
    CloseEvent,
    CloseReason,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry

import lk_observe
from lk_observe.instrument import InstrumentHandle
from lk_observe.metrics import OTHER
from lk_observe.server import render_metrics
from lk_observe.turns import tier_for
from tests.replay import RecordedEvent, emit_recorded, recorded_turn, speech_of

MARKER = "_lk_observe_handle"
STABLE_AGENTS: tuple[str, ...] = ("support", "sales", "triage")
RANDOM_AGENTS = 30  # random names: with the stable ones, 13 past the limit of 20 -> "other"
AGENT_LIMIT = 20  # LatencyMetrics' default max_agents
# e2e per turn, cycled: every tier appears within each session's first five turns
E2E_CYCLE_S: tuple[float, ...] = (0.30, 0.45, 0.62, 0.95, 1.30)
# Index in a turn's event list of: the user ChatMessage (the turn exists from here on), and the
# agent's first audio ("speaking": e2e and a tier from here on)
ITEM_EVENT = 3
SPEAKING_EVENT = 5
EVENTS_PER_TURN = 8
FLUSH_EVERY_TURNS = 1000  # a real agent makes a turn per session every few seconds: pace it
YIELD_EVERY_EVENTS = 200


def _frozen_clock() -> float:
    return 0.0


class DiscardExporter(SpanExporter):
    """A healthy collector that keeps nothing: counts root spans and all spans."""

    def __init__(self) -> None:
        self.spans = 0
        self.turn_spans = 0
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        roots = sum(1 for span in spans if span.name == "voice.turn")
        with self._lock:
            self.spans += len(spans)
            self.turn_spans += roots
        return SpanExportResult.SUCCESS


Event = RecordedEvent


def turn_events(e2e_s: float) -> list[Event]:
    return recorded_turn(e2e_s, label="soak")


def rss_kb() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def registry_samples(registry: CollectorRegistry) -> int:
    return sum(len(family.samples) for family in registry.collect())


@dataclass
class Mark:
    """State at a checkpoint (after flushing the sinks and a full gc)."""

    turns: int
    rss_kb: int
    traced_bytes: int  # tracemalloc: live bytes allocated since the 10 % mark
    metrics_bytes: int
    metrics_lines: int
    samples: int
    wall_s: float
    cpu_s: float


@dataclass
class SoakResult:
    turns: int
    sessions: int
    calls: int = 0  # sessions opened over the run
    turns_committed: int = 0  # turns fed up to the user's ChatMessage (each must become a Turn)
    turns_with_audio: int = 0  # ... and up to the agent's first audio (each has a tier)
    turns_emitted: int = 0  # handle.turns_emitted, summed
    on_turn_calls: int = 0
    expected_tiers: Counter[tuple[str, str]] = field(default_factory=Counter)  # (label, tier)
    counted_tiers: Counter[tuple[str, str]] = field(default_factory=Counter)  # from the registry
    e2e_count: float = 0.0  # voice_agent_latency_seconds_count{component="e2e"}, all agents
    monitor_e2e_count: int = 0
    sessions_total: float = 0.0
    active_sessions_after: float = 0.0
    agent_labels: set[str] = field(default_factory=set)
    admitted_agents: list[str] = field(default_factory=list)
    label_overflow: float = 0.0
    sink_failures: dict[str, float] = field(default_factory=dict)
    skipped: Counter[str] = field(default_factory=Counter)
    handler_failures: int = 0
    spans_exported: int = 0
    turn_spans_exported: int = 0
    marks: dict[str, Mark] = field(default_factory=dict)
    leaked_emit: int = 0  # closed sessions whose instance still has an `emit` attribute
    leaked_marker: int = 0
    closed_checked: int = 0
    # at any mark, weakrefs to closed sessions / handles still alive after a full gc (max)
    sessions_alive_after_gc: int = 0
    handles_alive_after_gc: int = 0
    closed_collected: int = 0
    tasks_before: int = 0
    tasks_after: int = 0
    new_tasks: list[str] = field(default_factory=list)
    timers_before: int = 0
    timers_after: int = 0
    threads_before: int = 0
    threads_after: int = 0
    top_growth: list[str] = field(default_factory=list)
    peak_traced_bytes: int = 0  # the most allocated-after-10 % memory alive at once (open calls)

    @property
    def traced_growth(self) -> int:
        """Bytes allocated after the 10 % mark and still alive at the 100 % mark (no call open
        at either)."""
        return self.marks["100%"].traced_bytes

    @property
    def traced_growth_late(self) -> int:
        """The same, between the 55 % and the 100 % marks: a leak grows it, a warm-up does not."""
        return self.marks["100%"].traced_bytes - self.marks["55%"].traced_bytes

    @property
    def rss_growth_kb(self) -> int:
        return self.marks["100%"].rss_kb - self.marks["10%"].rss_kb

    def per_turn_ms(self, start: str = "0%", end: str = "10%") -> tuple[float, float]:
        a, b = self.marks[start], self.marks[end]
        n = max(b.turns - a.turns, 1)
        return (b.wall_s - a.wall_s) / n * 1000, (b.cpu_s - a.cpu_s) / n * 1000


@dataclass
class _Call:
    """One open session (a call) in one of the concurrent slots."""

    session: AgentSession[Any]
    handle: InstrumentHandle
    agent: str
    turns_left: int
    cut_last_turn_at: int  # events of the last turn fed before the call ends (8: all)
    turn_number: int = 0
    events: list[Event] = field(default_factory=list)
    pos: int = 0


def _live_timers(loop: asyncio.AbstractEventLoop) -> int:
    scheduled: list[Any] = getattr(loop, "_scheduled", [])  # asyncio's private timer heap
    return sum(1 for timer in scheduled if not timer.cancelled())


class Soak:
    def __init__(
        self, turns: int, sessions: int, *, seed: int = 7, trace_memory: bool = True
    ) -> None:
        self.trace_memory = trace_memory
        self.rng = random.Random(seed)
        self.result = SoakResult(turns=turns, sessions=sessions)
        self.registry = CollectorRegistry()
        self.exporter = DiscardExporter()
        self.provider = TracerProvider()
        # a queue that holds one pacing interval's spans: every span is accounted for
        self.provider.add_span_processor(
            BatchSpanProcessor(self.exporter, max_queue_size=8 * FLUSH_EVERY_TURNS * 8)
        )
        # a frozen clock keeps the whole run in one slice: a run that crossed a slice boundary
        # late would allocate that slice's buckets then, and read as late memory growth
        self.monitor = lk_observe.LatencyMonitor(window_s=3600, clock=_frozen_clock)
        self.random_agents = [f"room-{self.rng.getrandbits(48):012x}" for _ in range(RANDOM_AGENTS)]
        self.first_seen: list[str] = []  # agent names in the order the metrics first saw them
        self.on_turn_tiers: Counter[str] = Counter()
        self.closed: list[tuple[weakref.ref[Any], weakref.ref[InstrumentHandle]]] = []
        self.started_turns = 0
        self.phase_end = 0
        self.events = 0
        self.next_flush = FLUSH_EVERY_TURNS
        self.finished_turns = 0

    # -- accounting ---------------------------------------------------------------------------

    def label(self, agent: str) -> str:
        admitted = self.first_seen[:AGENT_LIMIT]
        return agent if agent in admitted else OTHER

    def on_turn(self, turn: lk_observe.Turn) -> None:
        self.result.on_turn_calls += 1
        self.on_turn_tiers[turn.tier or "none"] += 1

    # -- calls --------------------------------------------------------------------------------

    def pick_agent(self, slot: int, initial: bool) -> str:
        if initial:  # the first calls cover every name: series all exist by the 10 % mark
            if slot >= len(STABLE_AGENTS) and slot - len(STABLE_AGENTS) < RANDOM_AGENTS:
                return self.random_agents[slot - len(STABLE_AGENTS)]
            return STABLE_AGENTS[slot % len(STABLE_AGENTS)]
        if self.rng.random() < 0.6:
            return self.rng.choice(STABLE_AGENTS)
        return self.rng.choice(self.random_agents)

    def open_call(self, slot: int, initial: bool) -> _Call:
        agent = self.pick_agent(slot, initial)
        if agent not in self.first_seen:
            self.first_seen.append(agent)
        session: AgentSession[Any] = AgentSession()
        handle = lk_observe.instrument(
            session,
            agent_name=agent,
            tracer_provider=self.provider,
            registry=self.registry,
            monitor=self.monitor,
            on_turn=self.on_turn,
        )
        self.result.calls += 1
        cut = EVENTS_PER_TURN if self.rng.random() < 0.7 else self.rng.randrange(EVENTS_PER_TURN)
        return _Call(session, handle, agent, self.rng.randint(20, 150), cut)

    def close_call(self, call: _Call) -> None:
        session, handle = call.session, call.handle
        how = self.rng.randrange(3)
        if how == 0:
            session.emit("close", CloseEvent(reason=CloseReason.USER_INITIATED))
        elif how == 1:
            handle.uninstrument()
        else:
            lk_observe.uninstrument(session)
        self.result.closed_checked += 1
        self.result.turns_emitted += handle.turns_emitted  # final: close dispatched the rest
        self.result.leaked_emit += "emit" in session.__dict__
        self.result.leaked_marker += MARKER in session.__dict__
        self.result.skipped.update(handle.skipped)
        self.result.handler_failures += handle.handler_failures
        self.closed.append((weakref.ref(session), weakref.ref(handle)))

    # -- feeding ------------------------------------------------------------------------------

    def advance(self, calls: list[_Call | None], slot: int) -> bool:
        """Feed the call in `slot` one event, or end it and start the next; False: slot done."""
        call = calls[slot]
        assert call is not None
        if self.step(call):
            return True
        self.close_call(call)
        calls[slot] = None
        if self.started_turns >= self.phase_end:
            return False
        calls[slot] = self.open_call(slot, False)
        return True

    def pace(self) -> None:
        """What a real agent's pace gives for free: the sinks and the exporter keep up."""
        lk_observe.flush(60.0)  # blocks the loop: fine in a harness, the loop is ours
        self.provider.force_flush(30_000)

    def step(self, call: _Call) -> bool:
        """Feed one event; False when the call is over."""
        if call.pos >= len(call.events):
            if call.turns_left == 0:
                return False
            call.turns_left -= 1
            call.events = turn_events(E2E_CYCLE_S[call.turn_number % len(E2E_CYCLE_S)])
            call.turn_number += 1
            call.pos = 0
            if call.turns_left == 0:
                call.events = call.events[: call.cut_last_turn_at]
            self.started_turns += 1
            if not call.events:
                self.finished_turns += 1
                return True
        session = call.session
        ev = call.events[call.pos][1]
        emit_recorded(session, call.events[call.pos])
        call.pos += 1
        if call.pos == ITEM_EVENT + 1:
            self.result.turns_committed += 1
        elif call.pos == SPEAKING_EVENT + 1:
            self.result.turns_with_audio += 1
            e2e_s = ev.created_at - call.events[ITEM_EVENT][1].item.metrics["stopped_speaking_at"]
            tier = tier_for(e2e_s * 1000.0)
            assert tier is not None
            self.result.expected_tiers[(self.label(call.agent), tier)] += 1
        if call.pos == len(call.events):
            if len(call.events) == EVENTS_PER_TURN:  # a whole turn: the reply played out
                speech_of(call.events)._mark_done()
            # LiveKit keeps every event for its session report until the session restarts:
            # its memory, not ours; drop it so the soak measures lk_observe
            session._recorded_events.clear()
            self.finished_turns += 1
            call.events = []
            call.pos = 0
        return True

    async def settle(self) -> None:
        """Let every finished turn through the sinks and the on_turn hook; full gc."""
        self.pace()
        for _ in range(3):
            await asyncio.sleep(0)  # on_turn calls were posted to the loop
        gc.collect()

    async def mark(self, name: str, t_wall: float, t_cpu: float) -> None:
        await self.settle()
        body, _ = render_metrics(self.registry)
        traced = tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0
        self.result.marks[name] = Mark(
            turns=self.finished_turns,
            rss_kb=rss_kb(),
            traced_bytes=traced,
            metrics_bytes=len(body),
            metrics_lines=body.count(b"\n"),
            samples=registry_samples(self.registry),
            wall_s=time.perf_counter() - t_wall,
            cpu_s=time.process_time() - t_cpu,
        )
        # every session closed so far is gone: its weakrefs die (then forget them)
        sessions_alive = sum(1 for s, _ in self.closed if s() is not None)
        handles_alive = sum(1 for _, h in self.closed if h() is not None)
        self.result.sessions_alive_after_gc = max(
            self.result.sessions_alive_after_gc, sessions_alive
        )
        self.result.handles_alive_after_gc = max(self.result.handles_alive_after_gc, handles_alive)
        self.result.closed_collected += len(self.closed) - sessions_alive
        self.closed.clear()

    async def phase(self, end: int, *, first: bool) -> None:
        """Run calls in every slot until `end` turns have started, then let them all close."""
        self.phase_end = end
        n = self.result.sessions
        calls: list[_Call | None] = [self.open_call(slot, first) for slot in range(n)]
        live = list(range(n))
        winding_down = False
        while live:
            slot = self.rng.choice(live)
            if not self.advance(calls, slot):
                live.remove(slot)
                continue
            if self.started_turns >= end and not winding_down:
                winding_down = True
                for c in calls:  # no new turns: each call finishes its current one and ends
                    if c is not None:
                        c.turns_left = 0
            self.events += 1
            if self.events % YIELD_EVERY_EVENTS == 0:
                await asyncio.sleep(0)
            if self.finished_turns >= self.next_flush:
                self.next_flush += FLUSH_EVERY_TURNS
                self.pace()

    async def run(self) -> SoakResult:
        loop = asyncio.get_running_loop()
        current = asyncio.current_task()
        before_tasks = {t for t in asyncio.all_tasks() if t is not current}
        self.result.tasks_before = len(before_tasks)
        self.result.timers_before = _live_timers(loop)
        self.result.threads_before = threading.active_count()

        turns = self.result.turns
        t_wall, t_cpu = time.perf_counter(), time.process_time()
        await self.mark("0%", t_wall, t_cpu)
        snapshot_10: tracemalloc.Snapshot | None = None
        # Three phases; at the end of each every call finishes its turn and closes (a shift
        # change), so the 10 %, 55 % and 100 % marks compare like with like: no call open.
        for label, end in (("10%", turns // 10), ("55%", turns * 55 // 100), ("100%", turns)):
            await self.phase(end, first=label == "10%")
            await self.mark(label, t_wall, t_cpu)
            if label == "10%" and self.trace_memory:
                tracemalloc.start(1)
                self.result.marks[label].traced_bytes = 0  # nothing traced before it
                snapshot_10 = tracemalloc.take_snapshot()
        self.result.peak_traced_bytes = tracemalloc.get_traced_memory()[1]
        if snapshot_10 is not None:
            stats = tracemalloc.take_snapshot().compare_to(snapshot_10, "lineno")
            self.result.top_growth = [str(s) for s in stats[:8]]
        tracemalloc.stop()

        self.provider.force_flush(30_000)
        self.provider.shutdown()
        self.result.spans_exported = self.exporter.spans
        self.result.turn_spans_exported = self.exporter.turn_spans
        after = {t for t in asyncio.all_tasks() if t is not current}
        self.result.tasks_after = len(after)
        self.result.new_tasks = sorted(repr(t) for t in after - before_tasks)
        self.result.timers_after = _live_timers(loop)
        self.result.threads_after = threading.active_count()
        self.read_registry()
        self.result.monitor_e2e_count = int(self.monitor.get_stats("e2e")["count"])
        self.result.admitted_agents = self.first_seen[:AGENT_LIMIT]
        return self.result

    def read_registry(self) -> None:
        r = self.result
        for family in self.registry.collect():
            for s in family.samples:
                agent = s.labels.get("agent")
                if agent is not None:
                    r.agent_labels.add(agent)
                if s.name == "voice_agent_turns_total":
                    r.counted_tiers[(s.labels["agent"], s.labels["tier"])] += int(s.value)
                elif (
                    s.name == "voice_agent_latency_seconds_count" and s.labels["component"] == "e2e"
                ):
                    r.e2e_count += s.value
                elif s.name == "voice_agent_sessions_total":
                    r.sessions_total += s.value
                elif s.name == "voice_agent_active_sessions":
                    r.active_sessions_after += s.value
                elif s.name == "voice_agent_label_overflow_total":
                    r.label_overflow += s.value
                elif s.name == "voice_agent_sink_failures_total":
                    r.sink_failures[s.labels["sink"]] = s.value
        r.counted_tiers = +r.counted_tiers  # drop zero entries


async def _baseline(turns: int) -> float:
    """Wall ms per turn of the same replay into an uninstrumented session."""
    session: AgentSession[Any] = AgentSession()
    start = time.perf_counter()
    for i in range(turns):
        for event in turn_events(E2E_CYCLE_S[i % len(E2E_CYCLE_S)]):
            emit_recorded(session, event)
        session._recorded_events.clear()
    return (time.perf_counter() - start) / turns * 1000


@dataclass
class SoakReport:
    """Two runs of the same soak: `plain` without tracemalloc (RSS, time per turn) and `traced`
    with tracemalloc from the 10 % mark (allocation growth). Both check every invariant."""

    plain: SoakResult
    traced: SoakResult
    baseline_wall_per_turn_ms: float | None = None  # the replay into an uninstrumented session


def soak(turns: int, sessions: int, *, quick: bool = False, seed: int = 7) -> SoakReport:
    """Run both soaks in a fresh event loop; `quick` skips the uninstrumented baseline."""

    async def go() -> SoakReport:
        plain = await Soak(turns, sessions, seed=seed, trace_memory=False).run()
        traced = await Soak(turns, sessions, seed=seed + 1).run()
        out = SoakReport(plain, traced)
        if not quick:
            out.baseline_wall_per_turn_ms = await _baseline(min(turns // 10, 10_000))
        return out

    return asyncio.run(go())


def describe(r: SoakResult) -> str:
    m0, m10, m55, m100 = (r.marks[k] for k in ("0%", "10%", "55%", "100%"))
    wall10, cpu10 = r.per_turn_ms("0%", "10%")
    wall_all, cpu_all = r.per_turn_ms("0%", "100%")
    traced = r.peak_traced_bytes > 0
    lines = [
        f"{r.turns} turns, {r.sessions} concurrent sessions, {r.calls} calls"
        + (" (tracemalloc on from the 10 % mark)" if traced else " (no tracemalloc)"),
        f"turns committed {r.turns_committed}, emitted {r.turns_emitted}, "
        f"on_turn {r.on_turn_calls}, with audio {r.turns_with_audio}, "
        f"counted in voice_agent_turns_total {sum(r.counted_tiers.values())}, "
        f"e2e observations {int(r.e2e_count)}, monitor e2e count {r.monitor_e2e_count}",
        f"spans exported {r.spans_exported} (voice.turn roots {r.turn_spans_exported})",
        f"time per turn (replay + lk_observe, all threads): 0-10 % {wall10:.3f} ms wall / "
        f"{cpu10:.3f} ms CPU; whole run {wall_all:.3f} ms wall / {cpu_all:.3f} ms CPU",
        f"RSS kB: start {m0.rss_kb}, 10 % {m10.rss_kb}, 55 % {m55.rss_kb}, 100 % {m100.rss_kb} "
        f"(10->100 %: {r.rss_growth_kb:+d} kB, 55->100 %: {m100.rss_kb - m55.rss_kb:+d} kB)",
    ]
    if traced:
        lines.append(
            f"tracemalloc, live bytes allocated since the 10 % mark (no call open): 55 % "
            f"{m55.traced_bytes}, 100 % {m100.traced_bytes} (55->100 %: "
            f"{r.traced_growth_late:+d}); peak with {r.sessions} calls open {r.peak_traced_bytes}"
        )
    lines += [
        f"/metrics: 10 % {m10.metrics_bytes} B / {m10.metrics_lines} lines; "
        f"100 % {m100.metrics_bytes} B / {m100.metrics_lines} lines",
        f"registry samples: 10 % {m10.samples}, 100 % {m100.samples}; agent label values "
        f"{len(r.agent_labels)} (limit {AGENT_LIMIT} + other), overflow {int(r.label_overflow)}",
        f"sink failures {r.sink_failures or '{}'}, skipped {dict(r.skipped) or '{}'}, "
        f"handler failures {r.handler_failures}",
        f"after close: emit left {r.leaked_emit}/{r.closed_checked}, marker left "
        f"{r.leaked_marker}, sessions collected {r.closed_collected}, alive after gc (max at a "
        f"mark) {r.sessions_alive_after_gc}, handles alive {r.handles_alive_after_gc}, "
        f"tasks {r.tasks_before}->{r.tasks_after}, live timers "
        f"{r.timers_before}->{r.timers_after}, threads {r.threads_before}->{r.threads_after}",
    ]
    if r.top_growth:
        lines.append("top allocation growth 10 % -> 100 % (by line):")
        lines += [f"  {s}" for s in r.top_growth]
    return "\n".join(lines)


def report(out: SoakReport) -> str:
    text = f"soak, plain run:\n{describe(out.plain)}\n\nsoak, traced run:\n{describe(out.traced)}"
    if out.baseline_wall_per_turn_ms is not None:
        text += f"\n\nuninstrumented replay: {out.baseline_wall_per_turn_ms:.3f} ms wall per turn"
    return text


def main(turns: int = 100_000, sessions: int = 50, quick: bool = False) -> SoakReport:
    out = soak(turns, sessions, quick=quick)
    print(report(out))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=100_000)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    main(args.turns, args.sessions, args.quick)
