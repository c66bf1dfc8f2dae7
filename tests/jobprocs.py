"""Job processes as LiveKit starts them, for the multiprocess tests (not a test module)."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import multiprocessing.forkserver
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from livekit.agents.ipc.proc_pool import ProcPool
from livekit.agents.job import JobAcceptArguments, JobExecutorType, RunningJobInfo
from livekit.protocol import agent, models

# job id -> (agent, e2e latencies in ms of the turns that job observes)
JOBS: dict[str, tuple[str, list[float]]] = {
    "job-a": ("support", [300.0, 450.0, 700.0]),
    "job-b": ("support", [820.0, 640.0, 310.0, 990.0, 505.0]),
    "job-c": ("sales", [250.0, 480.0, 799.0, 800.0, 1500.0, 620.0, 410.0]),
}
KILLED = "job-b"  # the job the tests SIGKILL mid-call


def running_job(job_id: str, spec: tuple[str, list[float]]) -> RunningJobInfo:
    """A fake job (no room, no server) whose metadata tells the entrypoint what to play."""
    agent_name, turns = spec
    return RunningJobInfo(
        accept_arguments=JobAcceptArguments(name="", identity=f"agent-{job_id}", metadata=""),
        job=agent.Job(
            id=job_id,
            type=agent.JobType.JT_ROOM,
            room=models.Room(sid=f"RM_{job_id}", name=f"room-{job_id}"),
            metadata=json.dumps({"agent": agent_name, "turns": turns}),
        ),
        url="ws://127.0.0.1:1",  # never dialled: fake jobs use a mock room
        token="",
        worker_id="test-worker",
        fake_job=True,
    )


def prewarm(proc: Any) -> None:
    """LiveKit's per-process setup hook; nothing to warm here."""


def stop_forkserver() -> None:
    # The forkserver is one per process and inherits the environment it started with: a fresh
    # one is needed for job processes to see PROMETHEUS_MULTIPROC_DIR (LiveKit's worker sets the
    # variable before its pool starts the forkserver, for the same reason).
    multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]


@pytest.fixture
def multiproc_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """PROMETHEUS_MULTIPROC_DIR set for this test and the job processes it starts."""
    directory = tmp_path / "prometheus"
    directory.mkdir()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
    stop_forkserver()
    yield directory
    stop_forkserver()  # later tests must not inherit a forkserver that has the variable set


def livekit_proc_pool(
    prewarm: Callable[[Any], Any], entrypoint: Callable[[Any], Any], processes: int
) -> ProcPool:
    """LiveKit's own job process pool (forkserver, as on Linux), without a LiveKit server."""
    return ProcPool(
        initialize_process_fnc=prewarm,
        job_entrypoint_fnc=entrypoint,
        session_end_fnc=None,
        simulation_end_fnc=None,
        num_idle_processes=processes,
        initialize_timeout=90.0,
        close_timeout=20.0,
        session_end_timeout=5.0,
        inference_executor=None,
        job_executor_type=JobExecutorType.PROCESS,
        mp_ctx=multiprocessing.get_context("forkserver"),  # LiveKit's default on Linux
        memory_warn_mb=0,
        memory_limit_mb=0,
        http_proxy=None,
        loop=asyncio.get_running_loop(),
    )
