"""Eight job processes, SIGKILLed mid-turn: one /metrics still adds up, exactly.

Each child (forkserver, as LiveKit starts its job processes on Linux) instruments 2-3 bare
AgentSessions, replays a random number of whole turns through them (benchmarks/bench_soak.py's
recorded LiveKit events), flushes the sinks after each one and only then reports "done" with
its running counts through a pipe. Then it feeds part of one more turn (the user spoke, the
agent may even be speaking, but the LLM's timing never arrives: the turn is still pending),
reports "parked" and blocks; the parent SIGKILLs it there. Two more "flood" children run turns
flat out and are killed at a random moment, wherever their sink thread is writing.

The scrape (render_metrics, and the real ops app over loopback) must equal what the children
reported, drop each killed process's active sessions, leave no live-gauge file of a dead pid,
read every .db file, and keep aggregating for a process started after the kills.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.forkserver
import os
import random
import signal
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.benchmods import load_benchmark

CHILDREN = 8
FLOODERS = 2
AGENTS = ("support", "sales", "triage")
FLOOD_AGENT = "flood"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- runs in the children -----------------------------------------------------------------------


def _feed(bench: ModuleType, session: Any, events: list[Any]) -> None:
    from tests.replay import emit_recorded

    for event in events:
        emit_recorded(session, event)


async def _child(conn: Connection, agents: list[str], seed: int, flood: bool) -> None:
    import lk_observe
    from lk_observe.turns import tier_for

    bench = load_benchmark("bench_soak")
    rng = random.Random(seed)
    monitor = lk_observe.LatencyMonitor()
    sessions: list[tuple[Any, str]] = []
    from livekit.agents import AgentSession
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()  # no processor: spans are made and dropped
    for agent in agents:
        session = AgentSession()
        lk_observe.instrument(session, agent_name=agent, tracer_provider=provider, monitor=monitor)
        sessions.append((session, agent))
    tiers: Counter[str] = Counter()  # "agent/tier" -> whole turns flushed into the metrics
    conn.send(("ready", os.getpid(), len(sessions)))
    if flood:
        conn.recv()  # go: the parent reads our reports while we run
    turns = 10_000 if flood else rng.randint(3, 25)
    for i in range(turns):
        session, agent = rng.choice(sessions)
        e2e_s = bench.E2E_CYCLE_S[i % len(bench.E2E_CYCLE_S)]
        events = bench.turn_events(e2e_s)
        _feed(bench, session, events[:6])
        conn.send(("intent", dict(tiers), f"{agent}/{tier_for(e2e_s * 1000)}"))
        _feed(bench, session, events[6:])  # metrics_collected: the turn is finished
        session._recorded_events.clear()
        assert lk_observe.flush(30.0)
        tiers[f"{agent}/{tier_for(e2e_s * 1000)}"] += 1
        conn.send(("done", dict(tiers)))
    # part of one more turn, never finished: up to the agent speaking, without the LLM timing
    session, _ = rng.choice(sessions)
    events = bench.turn_events(0.4)
    _feed(bench, session, events[: rng.randrange(7)])
    conn.send(("parked", dict(tiers)))
    conn.recv()  # blocks the event loop: no timer fires; the parent kills us here


def child_entry(conn: Connection, agents: list[str], seed: int, flood: bool) -> None:
    asyncio.run(_child(conn, agents, seed, flood))


# -- runs in the test process ----------------------------------------------------------------


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(found: Samples, name: str, **labels: str) -> float:
    if name.startswith("voice_agent_latency_seconds"):  # no provider/model unless given
        labels = {"provider": "", "model": "", **labels}
    return found.get((name, frozenset(labels.items())), 0.0)


def scrape() -> Samples:
    from lk_observe.server import render_metrics

    body, _ = render_metrics()
    return samples(body.decode())


class Child:
    def __init__(self, ctx: Any, agents: list[str], seed: int, flood: bool = False) -> None:
        self.conn, child_conn = ctx.Pipe()
        self.agents = agents
        self.flood = flood
        self.process = ctx.Process(
            target=child_entry, args=(child_conn, agents, seed, flood), daemon=True
        )
        self.process.start()
        child_conn.close()
        self.pid = 0
        self.done: dict[str, int] = {}  # last "done": whole turns flushed, by "agent/tier"
        self.intent: str | None = None  # the turn that may be in the metrics, unreported
        self.parked = False

    def ready(self, timeout: float = 120.0) -> None:
        assert self.conn.poll(timeout), "child did not start"
        kind, self.pid, n = self.conn.recv()
        assert kind == "ready" and n == len(self.agents)

    def read(self, until: str | None, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.conn.poll(0 if until is None else max(0.0, deadline - time.monotonic())):
            try:
                message = self.conn.recv()
            except EOFError:  # the child is gone and everything it sent has been read
                break
            if message[0] == "intent":
                self.intent = message[2]
            else:
                self.done, self.intent = message[1], None
            if message[0] == until:
                self.parked = True
                return
        assert until is None, f"child {self.pid} never sent {until!r}"

    def drain_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.read(None)
            time.sleep(0.002)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.process.join(30)
        assert self.process.exitcode == -signal.SIGKILL
        self.read(None)  # whatever it managed to send before dying


def expected_tiers(children: list[Child]) -> Counter[str]:
    total: Counter[str] = Counter()
    for child in children:
        total.update(child.done)
    return total


def counted_tiers(found: Samples) -> Counter[str]:
    out: Counter[str] = Counter()
    for (name, labels), value in found.items():
        if name == "voice_agent_turns_total" and value:
            d = dict(labels)
            out[f"{d['agent']}/{d['tier']}"] += int(value)
    return out


def not_flood(counts: Counter[str]) -> Counter[str]:
    return Counter({k: v for k, v in counts.items() if not k.startswith(f"{FLOOD_AGENT}/")})


def _active(found: Samples) -> float:
    return sum(v for (name, _), v in found.items() if name == "voice_agent_active_sessions")


def _e2e_count(found: Samples, agent: str) -> float:
    return sample(found, "voice_agent_latency_seconds_count", component="e2e", agent=agent)


def assert_db_files_parse(directory: Path) -> int:
    files = sorted(directory.glob("*.db"))
    assert files
    families = list(MultiProcessCollector(CollectorRegistry(), path=str(directory)).collect())
    assert families  # merged without error: no torn or truncated file
    return len(files)


@pytest.mark.timeout(300)
def test_sigkilled_job_processes_leave_exact_counts_and_no_live_sessions(
    multiproc_dir: Path,
) -> None:
    from lk_observe.server import serve

    ctx = multiprocessing.get_context("forkserver")
    rng = random.Random(11)
    parked = [
        Child(ctx, [AGENTS[(i + j) % 3] for j in range(2 + i % 2)], seed=100 + i)
        for i in range(CHILDREN)
    ]
    flooders = [Child(ctx, [FLOOD_AGENT] * 2, seed=900 + i, flood=True) for i in range(FLOODERS)]
    everyone = parked + flooders
    try:
        for child in everyone:
            child.ready()
        for child in parked:
            child.read("parked")

        # all alive, sessions open, each child in the middle of a turn
        found = scrape()
        assert _active(found) == sum(len(c.agents) for c in everyone)
        assert not_flood(counted_tiers(found)) == expected_tiers(parked)

        # the flooders die wherever they are: their sink thread may be writing a .db file
        for child in flooders:
            child.conn.send("go")
            child.drain_for(rng.uniform(0.2, 0.6))
            child.kill()
        # the parked children die one by one; after each kill its sessions drop out
        live_sessions = sum(len(c.agents) for c in parked)
        for child in rng.sample(parked, len(parked)):
            child.kill()
            live_sessions -= len(child.agents)
            found = scrape()
            assert _active(found) == live_sessions, child.pid
            assert not (multiproc_dir / f"gauge_livesum_{child.pid}.db").exists()

        assert_db_files_parse(multiproc_dir)
        found = scrape()
        assert _active(found) == 0
        assert not list(multiproc_dir.glob("gauge_live*.db"))  # no dead-process gauge lingers
        assert not_flood(counted_tiers(found)) == expected_tiers(parked)
        for agent in AGENTS:
            want = sum(v for k, v in expected_tiers(parked).items() if k.startswith(f"{agent}/"))
            assert _e2e_count(found, agent) == want, agent
        sessions_total = Counter[str]()
        for child in everyone:
            sessions_total.update(child.agents)
        for agent, n in sessions_total.items():
            assert sample(found, "voice_agent_sessions_total", agent=agent) == n
        # a flooder's count is its last report, or that plus the one turn it was finishing
        flood_done = sum(sum(c.done.values()) for c in flooders)
        flood_counted = sum(counted_tiers(found).values()) - sum(
            not_flood(counted_tiers(found)).values()
        )
        in_flight = sum(1 for c in flooders if c.intent is not None)
        assert flood_done <= flood_counted <= flood_done + in_flight
        assert flood_done > 0

        # a process started after the kills adds to the same totals
        late = Child(ctx, ["support", "sales"], seed=7777)
        late.ready()
        late.read("parked")
        server = serve(port=0)
        try:
            response = httpx.get(f"{server.url}/metrics", timeout=10.0)
            assert response.status_code == 200
            found = samples(response.text)
        finally:
            assert server.stop()
        assert _active(found) == 2
        assert not_flood(counted_tiers(found)) == expected_tiers([*parked, late])
        late.kill()
        found = scrape()
        assert _active(found) == 0
        n_files = assert_db_files_parse(multiproc_dir)
        print(
            f"killed {len(everyone) + 1} processes; {n_files} .db files; parked turns "
            f"{sum(expected_tiers([*parked, late]).values())}, flood turns {flood_counted} "
            f"(reported {flood_done}, in flight {in_flight})"
        )
    finally:
        for child in everyone:
            if child.process.is_alive():
                child.process.kill()
                child.process.join(10)
