"""One /metrics for every LiveKit job process (PROMETHEUS_MULTIPROC_DIR), dead ones included.

The job processes are real: LiveKit's own ProcPool with ProcJobExecutor, the forkserver start
method LiveKit uses on Linux, and fake jobs (LiveKit's console mode: a mock room, so no LiveKit
server is needed). Each job observes known turns through LatencyMetrics; the ops app in this
process must add them all up.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from livekit.agents.job import (
    JobContext,
)
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from lk_observe.metrics import LatencyMetrics
from lk_observe.monitor import LatencyMonitor
from lk_observe.server import Server, serve
from lk_observe.turns import Turn, tier_for
from tests.jobprocs import JOBS, KILLED, livekit_proc_pool, prewarm, running_job

# -- runs in the job processes ------------------------------------------------------------------


async def job_entrypoint(ctx: JobContext) -> None:
    spec = json.loads(ctx.job.metadata)
    agent_name: str = spec["agent"]
    metrics = LatencyMetrics.for_registry()
    metrics.session_started(agent_name)

    async def end_session(reason: str) -> None:
        metrics.session_ended(agent_name)

    ctx.add_shutdown_callback(end_session)
    for index, e2e_ms in enumerate(spec["turns"]):
        metrics.observe_turn(
            Turn(
                index=index,
                speech_id=None,
                started_at=time.time(),
                ended_at=time.time(),
                latency_ms={"e2e": e2e_ms, "stt": 100.0},
                interrupted=False,
                tier=tier_for(e2e_ms),
                agent=agent_name,
            )
        )
    # returning keeps the job alive (LiveKit waits for shutdown), like a call in progress


# -- runs in the test process ----------------------------------------------------------------


def live_gauge_files(directory: Path) -> list[Path]:
    return list(directory.glob("gauge_live*.db"))


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    if name.startswith("voice_agent_latency_seconds"):  # no provider/model unless given
        labels = {"provider": "", "model": "", **labels}
    return found.get((name, frozenset(labels.items())), 0.0)


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return samples(response.text)


async def wait_for(
    client: httpx.AsyncClient, condition: str, predicate: object, timeout_s: float = 60.0
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    deadline = time.monotonic() + timeout_s
    found = await scrape(client)
    while not predicate(found):  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition}")
        await asyncio.sleep(0.2)
        found = await scrape(client)
    return found


def totals(agent_name: str) -> list[float]:
    return [ms for name, turns in JOBS.values() if name == agent_name for ms in turns]


def assert_counts_are_the_sum_of_every_job(
    found: dict[tuple[str, frozenset[tuple[str, str]]], float],
) -> None:
    for agent_name in ("support", "sales"):
        e2e = totals(agent_name)
        count = sample(
            found, "voice_agent_latency_seconds_count", component="e2e", agent=agent_name
        )
        assert count == len(e2e), agent_name
        assert sample(
            found, "voice_agent_latency_seconds_sum", component="e2e", agent=agent_name
        ) == pytest.approx(sum(e2e) / 1000)
        for edge in ("0.5", "0.8", "1.0"):
            expected = sum(1 for ms in e2e if ms / 1000 <= float(edge))
            assert (
                sample(
                    found,
                    "voice_agent_latency_seconds_bucket",
                    component="e2e",
                    agent=agent_name,
                    le=edge,
                )
                == expected
            ), (agent_name, edge)
        for tier in ("excellent", "good", "slow"):
            expected = sum(1 for ms in e2e if tier_for(ms) == tier)
            assert (
                sample(found, "voice_agent_turns_total", agent=agent_name, tier=tier) == expected
            ), (agent_name, tier)
    assert sample(found, "voice_agent_sessions_total", agent="support") == 2
    assert sample(found, "voice_agent_sessions_total", agent="sales") == 1


@pytest.mark.timeout(240)
async def test_one_metrics_endpoint_aggregates_every_job_process(multiproc_dir: Path) -> None:
    pool = livekit_proc_pool(prewarm, job_entrypoint, len(JOBS))
    # registry= is ignored in multiprocess mode: /metrics merges the processes' files
    server: Server = serve(port=0, monitor=LatencyMonitor(), registry=CollectorRegistry())
    try:
        await pool.start()
        for job_id, spec in JOBS.items():
            await pool.launch_job(running_job(job_id, spec))

        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
            n_turns = sum(len(turns) for _, turns in JOBS.values())

            def all_turns_seen(found: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> bool:
                seen = sum(
                    v for (name, labels), v in found.items() if name == "voice_agent_turns_total"
                )
                return seen == n_turns

            found = await wait_for(client, "every job's turns", all_turns_seen)
            assert_counts_are_the_sum_of_every_job(found)
            assert sample(found, "voice_agent_active_sessions", agent="support") == 2
            assert sample(found, "voice_agent_active_sessions", agent="sales") == 1

            # A job process dies without any goodbye (OOM killer, SIGKILL).
            victim = pool.get_by_job_id(KILLED)
            assert victim is not None and victim.pid is not None
            victim_pid = victim.pid
            assert (multiproc_dir / f"gauge_livesum_{victim_pid}.db").exists()
            os.kill(victim_pid, signal.SIGKILL)
            await asyncio.wait_for(victim.join(), timeout=30.0)

            found = await wait_for(
                client,
                "the killed process's sessions to drop out",
                lambda f: sample(f, "voice_agent_active_sessions", agent="support") == 1,
            )
            # mark_process_dead ran for it (render_metrics reaps dead pids)...
            assert not (multiproc_dir / f"gauge_livesum_{victim_pid}.db").exists()
            assert sample(found, "voice_agent_active_sessions", agent="sales") == 1
            # ...while its counters stay: a counter must never go backwards
            assert_counts_are_the_sum_of_every_job(found)

            # The other jobs end normally: their shutdown ends the session, their exit cleans up.
            survivors = [pool.get_by_job_id(j) for j in JOBS if j != KILLED]
            await pool.aclose()
            assert [p.exitcode for p in survivors if p is not None] == [0, 0]
            # their exit hook already ran mark_process_dead, before any scrape reaped them
            assert not live_gauge_files(multiproc_dir)
            found = await scrape(client)
            assert sample(found, "voice_agent_active_sessions", agent="support") == 0
            assert sample(found, "voice_agent_active_sessions", agent="sales") == 0
            assert_counts_are_the_sum_of_every_job(found)
    finally:
        await pool.aclose()
        assert server.stop()
