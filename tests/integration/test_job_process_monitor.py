"""The ops app's live latency, SLOs and recent turns cover every job process.

Snapshot files between processes (written, read, throttled, finalised, dead processes, bad
files; the pure merge is tests/unit/test_monitor_snapshots.py), and LiveKit's own ProcPool job
processes (forkserver, as LiveKit on Linux) that record known turns through the snapshot sink,
read through the ops app over real HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from livekit.agents.job import (
    JobContext,
)
from prometheus_client import CollectorRegistry

import lk_observe.multiprocess as multiprocess_module
from lk_observe.instrument import instrument
from lk_observe.monitor import LatencyMonitor, MergedMonitor, default_monitor
from lk_observe.multiprocess import SnapshotReader, SnapshotWriter, snapshot_sinks
from lk_observe.recent import RecentTurns, default_recent_turns
from lk_observe.server import Server, serve
from lk_observe.sinks import flush
from lk_observe.slo import DEFAULT_SLOS
from lk_observe.turns import Turn, tier_for
from tests.jobprocs import JOBS, KILLED, livekit_proc_pool, prewarm, running_job
from tests.unit.test_monitor import FakeClock
from tests.unit.test_monitor_snapshots import valid_state


def make_turn(e2e_ms: float, agent_name: str = "support", index: int = 1) -> Turn:
    now = time.time()
    return Turn(
        index=index,
        speech_id="speech-private",
        started_at=now - 1.0,
        ended_at=now,
        latency_ms={"e2e": e2e_ms, "stt": 100.0},
        interrupted=False,
        tier=tier_for(e2e_ms),
        agent=agent_name,
        session_id="session-private",
        trace_id=0xABC,
    )


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: the pid is gone, not a zombie
    return child.pid


# -- merging -------------------------------------------------------------------------------------


# -- files: writer and reader --------------------------------------------------------------------


def test_writer_output_round_trips_through_the_reader(tmp_path: Path) -> None:
    clock = FakeClock(10_000.0)
    job, app_monitor = LatencyMonitor(clock=clock), LatencyMonitor(clock=clock)
    recent = RecentTurns()
    for index, ms in enumerate((300.0, 799.0, 800.0, 801.0), start=1):
        turn = make_turn(ms, index=index)
        job.record_turn(turn)
        recent.add(turn)
    app_monitor.record("e2e", 500.0, agent="sales")
    writer = SnapshotWriter(job, str(tmp_path), recent=recent)
    writer.pid = os.getppid()  # as if another live process wrote it (ours is skipped)
    writer.path = str(tmp_path / f"monitor_{writer.pid}.json")
    assert writer.write() == writer.last_bytes > 0
    text = Path(writer.path).read_text()
    assert "private" not in text  # numbers and ids only: no speech or session ids

    view = SnapshotReader(app_monitor, str(tmp_path)).view()
    assert view.processes == 1
    assert view.monitor.get_stats("e2e")["count"] == 5
    assert view.monitor.count_at_or_below("e2e", 800.0) == (4, 5)
    assert view.monitor.get_stats("e2e", agent="support")["count"] == 4
    assert view.monitor.get_stats("stt")["count"] == 4
    assert [t["latency_ms"]["e2e"] for t in view.recent] == [300.0, 799.0, 800.0, 801.0]
    assert view.recent[0]["trace_id"] == f"{0xABC:032x}"


def test_the_writer_throttles_yet_writes_the_last_turn_of_a_burst(tmp_path: Path) -> None:
    monitor = LatencyMonitor()
    writer = SnapshotWriter(monitor, str(tmp_path), min_interval_s=0.3)
    for i in range(200):
        monitor.record("e2e", 100.0 + i)
        writer.notify()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if writer.writes and json.loads(Path(writer.path).read_bytes())["series"][0]["s"]:
            state = json.loads(Path(writer.path).read_bytes())
            if sum(part[1] for part in state["series"][0]["s"]) == 200:
                break
        time.sleep(0.05)
    else:
        raise AssertionError("the trailing write never came")
    assert writer.writes <= 3  # 200 notifications, a handful of writes
    writer.close()
    finals = list(tmp_path.glob(f"monitor_{os.getpid()}.*.final.json"))
    assert len(finals) == 1 and not Path(writer.path).exists()
    assert json.loads(finals[0].read_bytes())["final"] is True
    writer.notify()  # after close: nothing more, no live file again
    time.sleep(0.1)
    assert not Path(writer.path).exists()


def test_final_snapshots_count_until_they_expire_then_are_deleted(tmp_path: Path) -> None:
    job, app_monitor = LatencyMonitor(), LatencyMonitor()
    job.record("e2e", 700.0)
    final = tmp_path / f"monitor_{dead_pid()}.{time.time_ns()}.final.json"
    final.write_text(json.dumps(job.snapshot()))
    reader = SnapshotReader(app_monitor, str(tmp_path), max_age_s=0)
    assert reader.view().monitor.get_stats("e2e")["count"] == 1  # exited cleanly: still counts
    old = time.time() - 2 * app_monitor.window_s
    os.utime(final, (old, old))
    assert reader.view().monitor.get_stats("e2e")["count"] == 0
    assert not final.exists()


def test_a_dead_process_without_a_final_snapshot_is_dropped_and_its_file_deleted(
    tmp_path: Path,
) -> None:
    job, app_monitor = LatencyMonitor(), LatencyMonitor()
    job.record("e2e", 700.0)
    alive = tmp_path / f"monitor_{os.getppid()}.json"
    dead = tmp_path / f"monitor_{dead_pid()}.json"
    temp = tmp_path / f".monitor_{dead_pid()}.json.tmp"
    for path in (alive, dead, temp):
        path.write_text(json.dumps(job.snapshot()))
    reader = SnapshotReader(app_monitor, str(tmp_path), max_age_s=0)
    view = reader.view()
    assert view.processes == 1
    assert view.monitor.get_stats("e2e")["count"] == 1
    assert alive.exists() and not dead.exists() and not temp.exists()
    assert reader.skipped == {"dead": 1}


def test_a_stale_snapshot_of_a_live_process_is_skipped_not_deleted(tmp_path: Path) -> None:
    job, app_monitor = LatencyMonitor(), LatencyMonitor()
    job.record("e2e", 700.0)
    path = tmp_path / f"monitor_{os.getppid()}.json"
    path.write_text(json.dumps(job.snapshot()))
    old = time.time() - 2 * app_monitor.window_s
    os.utime(path, (old, old))
    reader = SnapshotReader(app_monitor, str(tmp_path))
    assert reader.view().processes == 0
    assert path.exists() and reader.skipped == {"stale": 1}


def test_a_process_seen_mid_rename_is_counted_once(tmp_path: Path) -> None:
    job, app_monitor = LatencyMonitor(), LatencyMonitor()
    job.record("e2e", 700.0)
    pid = os.getppid()
    live = tmp_path / f"monitor_{pid}.json"
    final = tmp_path / f"monitor_{pid}.{time.time_ns()}.final.json"
    for path in (live, final):
        path.write_text(json.dumps(job.snapshot()))
    stamp = time.time()
    for path in (live, final):
        os.utime(path, (stamp, stamp))
    view = SnapshotReader(app_monitor, str(tmp_path)).view()
    assert view.processes == 1 and view.monitor.get_stats("e2e")["count"] == 1


def test_files_read_per_merge_are_bounded(tmp_path: Path) -> None:
    job, app_monitor = LatencyMonitor(), LatencyMonitor()
    job.record("e2e", 700.0)
    for n in range(5):
        (tmp_path / f"monitor_{10 + n}.{n}.final.json").write_text(json.dumps(job.snapshot()))
    reader = SnapshotReader(app_monitor, str(tmp_path), max_files=3)
    view = reader.view()
    assert view.processes == 3 and view.monitor.get_stats("e2e")["count"] == 3
    assert reader.skipped == {"over_limit": 2}


def test_a_size_capped_snapshot_keeps_the_aggregates(tmp_path: Path) -> None:
    clock = FakeClock(10_000.0)
    monitor = LatencyMonitor(clock=clock)
    rng = random.Random(3)
    for _ in range(3_000):
        clock.now += 0.1
        monitor.record("e2e", rng.uniform(1.0, 100_000.0), agent=rng.choice("abcdefgh"))
    full = SnapshotWriter(monitor, str(tmp_path / "full")).write()
    # the all-agents series is about half of it (the per-agent ones hold the same samples)
    cap = int(full * 0.6)
    writer = SnapshotWriter(monitor, str(tmp_path), max_bytes=cap)
    size = writer.write()
    assert size <= cap and writer.truncated > 0
    state = json.loads(Path(writer.path).read_bytes())
    assert state["series"][0]["a"] is None  # the all-agents series survived
    assert state["truncated"] == writer.truncated
    merged = MergedMonitor.like(monitor)
    merged.merge(state)
    assert merged.get_stats("e2e") == monitor.get_stats("e2e")


GARBAGE: dict[str, bytes] = {
    "empty": b"",
    "truncated": b'{"v":1,"layout":"x","series":[{"c":"e2e"',
    "binary": bytes(range(256)) * 4,
    "not_utf8": b'{"v":1,"series":[],"x":"\xff\xfe"}',
    "deeply_nested": b"[" * 200_000 + b"]" * 200_000,
    "json_list": b"[1, 2, 3]",
}


async def test_garbage_snapshot_files_are_skipped_counted_and_never_a_500(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    directory = tmp_path / "lk_observe"
    directory.mkdir()
    good = LatencyMonitor()
    good.record("e2e", 450.0)
    (directory / "monitor_1.1.final.json").write_text(json.dumps(good.snapshot()))
    for n, data in enumerate(GARBAGE.values(), start=2):
        (directory / f"monitor_{n}.{n}.final.json").write_bytes(data)
    bad_state = valid_state()
    bad_state["series"][0]["s"][0][1] = 99  # counts that do not add up
    (directory / "monitor_90.90.final.json").write_text(json.dumps(bad_state))
    bad_state = valid_state()
    bad_state["series"][0]["s"][0][2] = math.nan  # Python's json writes and reads NaN
    (directory / "monitor_93.93.final.json").write_text(json.dumps(bad_state))
    wrong_window = valid_state()
    wrong_window["window_s"] = 60.0
    (directory / "monitor_94.94.final.json").write_text(json.dumps(wrong_window))
    (directory / "monitor_91.91.final.json").write_bytes(b" " * (2 << 20))  # over 1 MiB
    (directory / "monitor_92.92.final.json").mkdir()  # not a regular file: ignored
    (directory / "notes.txt").write_text("not a snapshot")

    server: Server = serve(port=0, monitor=LatencyMonitor(), recent=RecentTurns())
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
            latency = await client.get("/metrics/latency")
            slo = await client.get("/slo")
            recent = await client.get("/turns/recent")
            page = await client.get("/")
    finally:
        assert server.stop()
    assert [r.status_code for r in (latency, slo, recent, page)] == [200] * 4
    assert latency.json()["e2e"]["count"] == 1
    assert latency.headers["X-LK-Observe-Processes"] == "2"
    assert slo.json()[0]["turns"] == 1 and slo.json()[0]["good_turns"] == 1
    assert recent.json() == []
    reader = server._server.config.app.state.snapshot_reader
    # read once: /slo and /turns/recent came within the cache age and reused the merge
    assert reader.skipped == {"corrupt": len(GARBAGE) + 2, "too_large": 1, "incompatible": 1}


def test_instrument_adds_the_snapshot_sink_only_in_multiprocess_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Session:
        def emit(self, event: str, *args: Any) -> None:
            pass

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setattr(multiprocess_module, "_writer", None)
    assert snapshot_sinks(default_monitor()) == []
    handle = instrument(Session(), registry=CollectorRegistry())
    assert "snapshot" not in handle.sinks.names
    handle.uninstrument()

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monitor = LatencyMonitor()
    handle = instrument(Session(), registry=CollectorRegistry(), monitor=monitor)
    writer = multiprocess_module._writer
    try:
        assert writer is not None and writer.monitor is monitor
        assert "snapshot" in handle.sinks.names
        # another monitor in the same process cannot share the one file
        assert snapshot_sinks(LatencyMonitor()) == []
        live = dataclasses.replace(make_turn(640.0), complete=False)  # its latency goes live
        handle.sinks.submit([live], lambda _speech_id: None)
        assert flush(5.0)
        deadline = time.monotonic() + 5.0
        while not Path(writer.path).exists():
            assert time.monotonic() < deadline, "no snapshot written"
            time.sleep(0.02)
        state = json.loads(Path(writer.path).read_bytes())
        assert {(s["c"], s["a"]) for s in state["series"]} >= {("e2e", None), ("e2e", "support")}
    finally:
        handle.uninstrument()
        if writer is not None:
            writer.close()


# -- real job processes --------------------------------------------------------------------------


async def job_entrypoint(ctx: JobContext) -> None:
    spec = json.loads(ctx.job.metadata)
    monitor, recent = default_monitor(), default_recent_turns()
    sinks = [sink for _, sink in snapshot_sinks(monitor)]
    assert sinks, "PROMETHEUS_MULTIPROC_DIR did not reach the job process"
    for index, e2e_ms in enumerate(spec["turns"], start=1):
        turn = make_turn(e2e_ms, spec["agent"], index)
        # what instrument()'s sink thread does for each finished turn, in the same order
        monitor.record_turn(turn)
        recent.add(turn)
        for sink in sinks:
            sink(turn)
    # returning keeps the job alive (LiveKit waits for shutdown), like a call in progress


# -- runs in the test process ----------------------------------------------------------------


def expected(jobs: list[str], agent_name: str | None = None) -> list[float]:
    return [
        ms
        for job_id in jobs
        for name, turns in [JOBS[job_id]]
        if agent_name in (None, name)
        for ms in turns
    ]


async def read_all(client: httpx.AsyncClient) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, path in (
        ("all", "/metrics/latency"),
        ("support", "/metrics/latency?agent=support"),
        ("sales", "/metrics/latency?agent=sales"),
        ("slo", "/slo"),
        ("recent", "/turns/recent"),
    ):
        response = await client.get(path)
        assert response.status_code == 200, path
        found[key] = response.json()
    return found


def matches(found: dict[str, Any], jobs: list[str]) -> bool:
    def count(key: str) -> int:
        stats = found[key].get("e2e")
        return 0 if stats is None else int(stats["count"])

    return (
        count("all") == len(expected(jobs))
        and count("support") == len(expected(jobs, "support"))
        and count("sales") == len(expected(jobs, "sales"))
    )


async def wait_until(
    client: httpx.AsyncClient, condition: str, jobs: list[str], timeout_s: float = 60.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    found = await read_all(client)
    while not matches(found, jobs):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition}: {found['all']}")
        await asyncio.sleep(0.2)
        found = await read_all(client)
    return found


def assert_exact(found: dict[str, Any], jobs: list[str]) -> None:
    everything = expected(jobs)
    stats = found["all"]["e2e"]
    assert stats["count"] == len(everything)
    assert stats["min"] == min(everything) and stats["max"] == max(everything)
    assert stats["mean"] == pytest.approx(sum(everything) / len(everything))
    assert found["all"]["stt"]["count"] == len(everything)
    for slo_status, slo in zip(found["slo"], DEFAULT_SLOS, strict=True):
        assert slo_status["name"] == slo.name
        assert slo_status["turns"] == len(everything)
        assert slo_status["good_turns"] == sum(1 for ms in everything if ms <= slo.threshold_ms)
    assert sorted(t["latency_ms"]["e2e"] for t in found["recent"]) == sorted(everything)
    assert all("speech_id" not in t and "session_id" not in t for t in found["recent"])


@pytest.mark.timeout(240)
async def test_ops_app_latency_and_slos_cover_every_job_process(multiproc_dir: Path) -> None:
    pool = livekit_proc_pool(prewarm, job_entrypoint, len(JOBS))
    # the worker's main process: its own monitor sees no turns
    server: Server = serve(
        port=0, monitor=LatencyMonitor(), registry=CollectorRegistry(), recent=RecentTurns()
    )
    snapshots = multiproc_dir / "lk_observe"
    try:
        await pool.start()
        for job_id, spec in JOBS.items():
            await pool.launch_job(running_job(job_id, spec))

        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
            every = list(JOBS)
            found = await wait_until(client, "every job's turns", every)
            assert_exact(found, every)
            response = await client.get("/metrics/latency")
            assert response.headers["X-LK-Observe-Processes"] == str(len(JOBS) + 1)

            # A job process dies without any goodbye (OOM killer, SIGKILL).
            victim = pool.get_by_job_id(KILLED)
            assert victim is not None and victim.pid is not None
            victim_pid = victim.pid
            assert (snapshots / f"monitor_{victim_pid}.json").exists()
            os.kill(victim_pid, signal.SIGKILL)
            await asyncio.wait_for(victim.join(), timeout=30.0)

            survivors = [job_id for job_id in JOBS if job_id != KILLED]
            found = await wait_until(client, "the killed process to drop out", survivors)
            assert_exact(found, survivors)
            assert not (snapshots / f"monitor_{victim_pid}.json").exists()

            # The other jobs end normally: their final snapshots keep their turns in the window.
            await pool.aclose()
            assert not list(snapshots.glob("monitor_*[0-9].json"))  # no live files left
            assert len(list(snapshots.glob("monitor_*.final.json"))) == len(survivors)
            found = await read_all(client)
            assert_exact(found, survivors)
    finally:
        await pool.aclose()
        assert server.stop()
