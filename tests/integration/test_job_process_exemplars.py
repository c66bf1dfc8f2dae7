"""Exemplars (trace links) on the worker's /metrics for turns that ran in job processes.

prometheus_client drops exemplars when PROMETHEUS_MULTIPROC_DIR is set; each process keeps its
own (multiprocess.ExemplarStore) and render_metrics puts them on the merged OpenMetrics output.
Files between processes (written, merged, bounded, dead processes, bad files), then the whole
path on a real Prometheus with exemplar storage: LiveKit's own ProcPool job processes run turns
through lk_observe's sinks (tracing first, so each turn has its real trace id), Prometheus
scrapes the ops app, and /api/v1/query_exemplars must return exactly those trace ids.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from livekit.agents.job import JobContext
from prometheus_client import CollectorRegistry, Metric
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.openmetrics.exposition import generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from lk_observe.metrics import LatencyMetrics
from lk_observe.monitor import LatencyMonitor, default_monitor
from lk_observe.multiprocess import (
    ExemplarCollector,
    ExemplarReader,
    ExemplarStore,
    exemplar_reader,
)
from lk_observe.promql import LATENCY_BUCKETS_S
from lk_observe.server import Server, serve
from lk_observe.sinks import TurnSinks
from lk_observe.tracing import TurnTracer
from lk_observe.turns import Turn, tier_for
from tests import promstack
from tests.jobprocs import JOBS, KILLED, livekit_proc_pool, prewarm, running_job
from tests.otel import memory_tracing

OPENMETRICS = {"Accept": "application/openmetrics-text; version=1.0.0"}
BUCKET = "voice_agent_latency_seconds_bucket"
TURNS = "voice_agent_turns_total"


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: the pid is gone, not a zombie
    return child.pid


def families() -> list[Metric]:
    """What MultiProcessCollector yields for one agent: buckets and tier counters."""
    latency = HistogramMetricFamily(
        "voice_agent_latency_seconds", "", labels=["agent", "component"]
    )
    latency.add_metric(
        ["support", "e2e"], buckets=[("0.3", 1), ("0.5", 2), ("+Inf", 3)], sum_value=1.95
    )
    turns = CounterMetricFamily("voice_agent_turns", "", labels=["agent", "tier"])
    turns.add_metric(["support", "good"], 2)
    return [latency, turns]


def bucket(le: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return BUCKET, (("agent", "support"), ("component", "e2e"), ("le", le))


def exemplars_of(metric_families: list[Metric]) -> dict[tuple[str, str], tuple[str, float]]:
    return {
        (s.name, s.labels.get("le", s.labels.get("tier", ""))): (
            s.exemplar.labels["trace_id"],
            s.exemplar.value,
        )
        for family in metric_families
        for s in family.samples
        if s.exemplar is not None
    }


def store_for(directory: Path, pid: int, **kwargs: Any) -> ExemplarStore:
    """A store writing as if it were process `pid` (a reader skips its own pid's file)."""
    store = ExemplarStore(str(directory), **kwargs)
    store.pid = pid
    store.path = str(directory / f"exemplars_{pid}.json")
    # its own temporary file too: two stores in one test process must not share one
    store._temp = str(directory / f".exemplars_{pid}.json.tmp")
    return store


# -- files: store and reader ---------------------------------------------------------------------


def test_the_newest_exemplar_of_each_sample_across_processes_is_exposed(tmp_path: Path) -> None:
    one, two = store_for(tmp_path, os.getppid()), store_for(tmp_path, 1)  # both alive
    one.add(
        [(*bucket("0.3"), 0.25), (TURNS, (("agent", "support"), ("tier", "good")), 1.0)],
        "a" * 32,
        100.0,
    )
    two.add([(*bucket("0.3"), 0.29)], "b" * 32, 200.0)  # newer: wins the 0.3 bucket
    two.add([(*bucket("0.5"), 0.45)], "c" * 32, 50.0)
    one.add([("voice_agent_unknown_bucket", (("le", "1"),), 1.0)], "d" * 32, 300.0)  # no sample
    assert one.write() > 0 and two.write() > 0

    merged = ExemplarReader(str(tmp_path)).attach(families())
    assert exemplars_of(merged) == {
        (BUCKET, "0.3"): ("b" * 32, 0.29),
        (BUCKET, "0.5"): ("c" * 32, 0.45),
        (TURNS, "good"): ("a" * 32, 1.0),
    }
    # valid OpenMetrics: prometheus_client's strict parser reads the exemplars back
    registry = CollectorRegistry()
    registry.register(ExemplarCollector(_Fixed(families()), ExemplarReader(str(tmp_path))))
    text = generate_latest(registry).decode()  # type: ignore[no-untyped-call]
    parsed = list(text_string_to_metric_families(text))  # type: ignore[no-untyped-call]
    assert exemplars_of(parsed) == exemplars_of(merged)
    assert f'le="0.3"}} 1.0 # {{trace_id="{"b" * 32}"}} 0.29 200.0' in text


class _Fixed:
    def __init__(self, metric_families: list[Metric]) -> None:
        self._families = metric_families

    def collect(self) -> list[Metric]:
        return self._families


def test_memory_and_file_size_stay_bounded_whatever_the_traffic(tmp_path: Path) -> None:
    store = store_for(tmp_path, os.getppid(), max_entries=50, max_bytes=4_000)
    for n in range(10_000):  # far more distinct samples than any real label set
        store.add([(BUCKET, (("agent", f"agent-{n}"), ("le", "0.5")), 0.4)], f"{n:032x}", n)
    assert len(store.entries()) == 50 and store.evicted == 10_000 - 50
    assert {trace for trace, _, _ in store.entries().values()} == {
        f"{n:032x}" for n in range(10_000 - 50, 10_000)
    }  # the most recent are kept
    size = store.write()
    assert size <= 4_000 and store.truncated > 0
    kept = json.loads(Path(store.path).read_bytes())["exemplars"]
    assert kept[0][2] == f"{9_999:032x}"  # newest first: a size cap drops the oldest


def test_only_trace_ids_are_kept_never_other_text(tmp_path: Path) -> None:
    store = store_for(tmp_path, os.getppid())
    store.add([(*bucket("0.5"), 0.4)], "what the user said")
    store.add([(*bucket("0.5"), float("nan"))], "e" * 32)
    store.add([(*bucket("0.5"), 0.4)], "E" * 32)  # not how OpenTelemetry spells a trace id
    assert store.entries() == {}
    store.close()
    forged = {"v": 1, "exemplars": [[BUCKET, dict(bucket("0.5")[1]), "my card is 4111", 0.4, 1.0]]}
    (tmp_path / "exemplars_1.json").write_text(json.dumps(forged))  # pid 1 is alive
    reader = ExemplarReader(str(tmp_path))
    assert exemplars_of(reader.attach(families())) == {}
    assert reader.skipped == {"corrupt": 1}


def test_dead_processes_files_count_until_they_expire_then_are_deleted(tmp_path: Path) -> None:
    dead_store = store_for(tmp_path, dead_pid())
    dead_store.add([(*bucket("0.3"), 0.2)], "a" * 32, 10.0)
    dead_store.close()
    temp = tmp_path / f".exemplars_{dead_pid()}.json.tmp"
    temp.write_text("{")  # a writer died between write and rename
    reader = ExemplarReader(str(tmp_path), retention_s=300.0)
    # its counts stay in the .db files, so its exemplars stay true: still exposed
    assert exemplars_of(reader.attach(families())) == {(BUCKET, "0.3"): ("a" * 32, 0.2)}
    assert not temp.exists()
    old = time.time() - 301.0
    os.utime(dead_store.path, (old, old))
    assert exemplars_of(reader.attach(families())) == {}
    assert not Path(dead_store.path).exists()


def test_files_are_bounded_extra_dead_ones_deleted_live_ones_kept(tmp_path: Path) -> None:
    live = store_for(tmp_path, os.getppid())
    live.add([(*bucket("0.3"), 0.2)], "f" * 32, 1.0)
    live.write()
    dead = []
    for n in range(5):
        store = store_for(tmp_path, dead_pid())
        store.add([(*bucket("0.5"), 0.4)], f"{n:032x}", 10.0 + n)
        store.close()  # its last write done: the writer thread must not touch mtime again
        stamp = time.time() - 10 + n  # the higher n, the newer
        os.utime(store.path, (stamp, stamp))
        dead.append(Path(store.path))
    reader = ExemplarReader(str(tmp_path), max_files=3)
    assert exemplars_of(reader.attach(families())) == {
        (BUCKET, "0.3"): ("f" * 32, 0.2),
        (BUCKET, "0.5"): (f"{4:032x}", 0.4),
    }
    assert [p.exists() for p in dead] == [False, False, False, True, True]
    assert Path(live.path).exists()


GARBAGE: dict[str, bytes] = {
    "empty": b"",
    "truncated": b'{"v":1,"exemplars":[["voice_agent',
    "binary": bytes(range(256)) * 4,
    "not_utf8": b'{"v":1,"exemplars":[],"x":"\xff\xfe"}',
    "deeply_nested": b"[" * 100_000 + b"]" * 100_000,  # under the size cap: parsed
    "json_list": b"[1, 2, 3]",
    "bad_row": b'{"v":1,"exemplars":[["a",{},"' + b"a" * 32 + b'",NaN,1.0]]}',
    "not_a_row": b'{"v":1,"exemplars":[{"trace_id":"x"}]}',
}

RECORD_TURNS = """
import json, sys, time
from lk_observe.metrics import LatencyMetrics
from lk_observe.turns import Turn, tier_for
metrics = LatencyMetrics.for_registry()
for index, (e2e_ms, trace_id) in enumerate(json.loads(sys.argv[1]), start=1):
    metrics.observe_turn(Turn(index=index, speech_id=None, started_at=time.time() - 1,
        ended_at=time.time(), latency_ms={"e2e": e2e_ms}, interrupted=False,
        tier=tier_for(e2e_ms), agent="support", trace_id=trace_id))
"""


def record_in_another_process(directory: Path, turns: list[tuple[float, int]]) -> None:
    """Turns observed by a process whose values are file-backed; its exemplars are written at
    exit (the same hook a LiveKit job process runs when it returns)."""
    subprocess.run(
        [sys.executable, "-c", RECORD_TURNS, json.dumps(turns)],
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)},
        check=True,
        timeout=120,
    )


async def test_garbage_exemplar_files_are_skipped_counted_and_never_a_500(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record_in_another_process(tmp_path, [(450.0, 0xABC)])
    directory = tmp_path / "lk_observe"
    assert list(directory.glob("exemplars_*.json"))
    for data in GARBAGE.values():
        (directory / f"exemplars_{dead_pid()}.json").write_bytes(data)
    (directory / f"exemplars_{dead_pid()}.json").write_text('{"v":2,"exemplars":[]}')
    (directory / f"exemplars_{dead_pid()}.json").write_bytes(b" " * (1 << 20))  # too large
    (directory / f"exemplars_{dead_pid()}.json").mkdir()  # not a regular file: ignored
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))

    server: Server = serve(port=0, monitor=LatencyMonitor())
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
            openmetrics = await client.get("/metrics", headers=OPENMETRICS)
            text = await client.get("/metrics")
    finally:
        assert server.stop()
    assert openmetrics.status_code == text.status_code == 200
    parsed = list(text_string_to_metric_families(openmetrics.text))  # type: ignore[no-untyped-call]
    assert exemplars_of(parsed) == {
        (BUCKET, "0.5"): (f"{0xABC:032x}", 0.45),
        (TURNS, str(tier_for(450.0))): (f"{0xABC:032x}", 1.0),
    }
    assert "trace_id" not in text.text  # the text format has no exemplars
    skipped = exemplar_reader(str(tmp_path)).skipped
    assert skipped == {"corrupt": len(GARBAGE), "incompatible": 1, "too_large": 1}


# -- real job processes and a real Prometheus ----------------------------------------------------


def results_dir() -> Path:
    return Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).parent / "turns"


async def job_entrypoint(ctx: JobContext) -> None:
    spec = json.loads(ctx.job.metadata)
    provider, exporter = memory_tracing()
    done: list[Turn] = []
    all_done = asyncio.Event()

    def on_turn(turn: Turn) -> None:
        done.append(turn)
        if len(done) == len(spec["turns"]):
            all_done.set()

    # the sinks instrument() uses: tracing opens each turn's trace, then metrics see its id
    sinks = TurnSinks(
        agent=spec["agent"],
        tracer=TurnTracer(provider),
        metrics=LatencyMetrics.for_registry(),
        monitor=default_monitor(),
        slos=(),
        on_turn=on_turn,
    )
    for index, e2e_ms in enumerate(spec["turns"], start=1):
        now = time.time()
        live = Turn(
            index=index,
            speech_id=None,
            started_at=now - 1.0,
            ended_at=now,
            latency_ms={"e2e": e2e_ms, "stt": 100.0},
            interrupted=False,
            tier=tier_for(e2e_ms),
            agent=spec["agent"],
            session_id=ctx.job.id,
            complete=False,  # the live report at first audio: what metrics observe
        )
        sinks.submit([live, dataclasses.replace(live, complete=True)], lambda _speech_id: None)
    await asyncio.wait_for(all_done.wait(), timeout=30.0)
    root_spans = {s.context.trace_id for s in exporter.get_finished_spans() if s.parent is None}
    record = {
        "pid": os.getpid(),
        "roots_match": root_spans == {t.trace_id for t in done},
        "turns": [
            {
                "trace_id": f"{t.trace_id:032x}",
                "e2e_ms": t.latency_ms["e2e"],
                "tier": t.tier,
                "order": order,
            }
            for order, t in enumerate(done)
            if t.trace_id is not None
        ],
    }
    directory = results_dir()
    directory.mkdir(exist_ok=True)
    temp = directory / f".{ctx.job.id}.tmp"
    temp.write_text(json.dumps(record))
    temp.replace(directory / f"{ctx.job.id}.json")
    # returning keeps the job alive (LiveKit waits for shutdown), like a call in progress


@dataclasses.dataclass(frozen=True)
class TrueTurn:
    job: str
    pid: int
    agent: str
    e2e_ms: float
    tier: str
    order: int  # in its process: a later turn's exemplar replaces an earlier one's


async def read_truth(directory: Path, timeout_s: float = 60.0) -> dict[str, TrueTurn]:
    deadline = time.monotonic() + timeout_s
    while not all((directory / f"{job_id}.json").exists() for job_id in JOBS):
        assert time.monotonic() < deadline, "job processes did not report their turns"
        await asyncio.sleep(0.1)
    truth: dict[str, TrueTurn] = {}
    for job_id, (agent_name, turns) in JOBS.items():
        record = json.loads((directory / f"{job_id}.json").read_text())
        assert record["roots_match"], job_id  # trace ids are those of the exported root spans
        assert sorted(t["e2e_ms"] for t in record["turns"]) == sorted(turns)
        for t in record["turns"]:
            truth[t["trace_id"]] = TrueTurn(
                job_id, record["pid"], agent_name, t["e2e_ms"], t["tier"], t["order"]
            )
    return truth


def exact_le(seconds: float) -> str:
    """The `le` of the one bucket an observation lands in (where its exemplar goes)."""
    edge = next((e for e in LATENCY_BUCKETS_S if seconds <= e), None)
    return "+Inf" if edge is None else repr(edge)


def check_exemplars(
    rows: list[dict[str, Any]], truth: dict[str, TrueTurn], start: float, end: float
) -> tuple[set[tuple[str, ...]], set[str]]:
    """Asserts every exemplar Prometheus returned is a real turn's trace, on the right series;
    returns the series that have exemplars and the trace ids seen."""
    series: set[tuple[str, ...]] = set()
    seen: set[str] = set()
    for row in rows:
        labels = row["seriesLabels"]
        for exemplar in row["exemplars"]:
            assert set(exemplar["labels"]) == {"trace_id"}
            trace_id = exemplar["labels"]["trace_id"]
            assert len('trace_id=""') + len(trace_id) <= 128  # OpenMetrics' limit
            turn = truth[trace_id]  # KeyError: a trace id no turn had
            assert turn.agent == labels["agent"]
            assert start <= float(exemplar["timestamp"]) <= end
            value = float(exemplar["value"])
            if labels["__name__"] == TURNS:
                assert turn.tier == labels["tier"] and value == 1.0
                series.add((TURNS, labels["agent"], labels["tier"]))
            elif labels["component"] == "e2e":
                assert value == pytest.approx(turn.e2e_ms / 1000) and labels["le"] == exact_le(
                    value
                )
                series.add(("e2e", labels["agent"], labels["le"]))
            else:
                assert labels["component"] == "stt" and labels["le"] == "0.1" and value == 0.1
                series.add(("stt", labels["agent"], labels["le"]))
            seen.add(trace_id)
    return series, seen


def newest_per_e2e_bucket(rows: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """(agent, le) -> the trace id of the newest exemplar Prometheus holds for that bucket."""
    newest: dict[tuple[str, str], tuple[float, str]] = {}
    for row in rows:
        labels = row["seriesLabels"]
        if labels.get("component") != "e2e":
            continue
        for exemplar in row["exemplars"]:
            key = (labels["agent"], labels["le"])
            at = float(exemplar["timestamp"])
            if key not in newest or at > newest[key][0]:
                newest[key] = (at, exemplar["labels"]["trace_id"])
    return {key: trace_id for key, (_, trace_id) in newest.items()}


def assert_latest_turn_wins(rows: list[dict[str, Any]], truth: dict[str, TrueTurn]) -> None:
    """A bucket whose turns all ran in one process links to that process's last of them."""
    for (agent, le), trace_id in newest_per_e2e_bucket(rows).items():
        in_bucket = {
            t: turn
            for t, turn in truth.items()
            if turn.agent == agent and exact_le(turn.e2e_ms / 1000) == le
        }
        if len({turn.job for turn in in_bucket.values()}) == 1:
            assert trace_id == max(in_bucket, key=lambda t: in_bucket[t].order), (agent, le)
        else:  # several processes: the newest by time, which must be one of them
            assert trace_id in in_bucket


def expected_series(truth: dict[str, TrueTurn]) -> set[tuple[str, ...]]:
    found: set[tuple[str, ...]] = set()
    for turn in truth.values():
        found.add(("e2e", turn.agent, exact_le(turn.e2e_ms / 1000)))
        found.add(("stt", turn.agent, "0.1"))
        found.add((TURNS, turn.agent, turn.tier))
    return found


@pytest.mark.timeout(300)
async def test_prometheus_stores_exemplars_of_turns_that_ran_in_job_processes(
    multiproc_dir: Path,
) -> None:
    pool = livekit_proc_pool(prewarm, job_entrypoint, len(JOBS))
    # the worker's main process: registry= is ignored, /metrics merges the processes' files
    server: Server = serve(port=0, monitor=LatencyMonitor(), registry=CollectorRegistry())
    start = time.time() - 1.0  # Prometheus keeps exemplar times in ms: no same-ms edge
    scrape = {"scrape_configs": [promstack.scrape_job("agent", server.url.removeprefix("http://"))]}
    try:
        with promstack.prometheus(scrape, exemplars=True) as prom:
            await pool.start()
            for job_id, spec in JOBS.items():
                await pool.launch_job(running_job(job_id, spec))
            truth = await read_truth(multiproc_dir.parent / "turns")
            assert len(truth) == sum(len(turns) for _, turns in JOBS.values())
            # Prometheus calls block: keep the pool's loop (and its IPC pings) running
            await asyncio.to_thread(prom.wait_for, f"sum({TURNS}) == {len(truth)}", timeout=60)

            wanted = expected_series(truth)
            expr = f'{{__name__=~"{BUCKET}|{TURNS}"}}'
            deadline = time.monotonic() + 30
            while True:
                rows = await asyncio.to_thread(prom.query_exemplars, expr, start, time.time())
                series, seen = check_exemplars(rows, truth, start, time.time())
                if series == wanted or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            assert series == wanted  # every bucket and tier that had a turn links to one
            assert_latest_turn_wins(rows, truth)
            assert {truth[t].job for t in seen} == set(JOBS)  # from every job process
            print(f"\nquery_exemplars: {len(seen)} trace ids on {len(series)} series, all real:")
            for trace_id in sorted(seen, key=lambda t: (truth[t].job, truth[t].e2e_ms)):
                turn = truth[trace_id]
                print(
                    f"  {turn.job} pid {turn.pid} {turn.agent} e2e={turn.e2e_ms:.0f}ms {trace_id}"
                )

            # A killed job process's turns keep their trace links (their counts stay too).
            victim = pool.get_by_job_id(KILLED)
            assert victim is not None and victim.pid is not None
            os.kill(victim.pid, signal.SIGKILL)
            await asyncio.wait_for(victim.join(), timeout=30.0)
            await pool.aclose()  # the others exit cleanly: their last exemplars are written
            async with httpx.AsyncClient(base_url=server.url, timeout=10.0) as client:
                response = await client.get("/metrics", headers=OPENMETRICS)
            assert response.status_code == 200
            parsed = list(text_string_to_metric_families(response.text))  # type: ignore[no-untyped-call]
            exposed = {trace for trace, _ in exemplars_of(parsed).values()}
            assert exposed <= set(truth)
            assert {truth[t].job for t in exposed} == set(JOBS)
    finally:
        await pool.aclose()
        assert server.stop()


@pytest.fixture
def single_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)
    yield


@pytest.mark.timeout(120)
def test_single_process_exemplars_reach_prometheus_as_before(single_process: None) -> None:
    registry = CollectorRegistry()
    metrics = LatencyMetrics.for_registry(registry)
    truth: dict[str, TrueTurn] = {}
    start = time.time() - 1.0  # Prometheus keeps exemplar times in ms: no same-ms edge
    for index, e2e_ms in enumerate((300.0, 640.0, 990.0), start=1):
        trace_id = (0x5EED << 64) + index
        metrics.observe_turn(
            Turn(
                index=index,
                speech_id=None,
                started_at=time.time() - 1.0,
                ended_at=time.time(),
                latency_ms={"e2e": e2e_ms, "stt": 100.0},
                interrupted=False,
                tier=tier_for(e2e_ms),
                agent="support",
                trace_id=trace_id,
            )
        )
        truth[f"{trace_id:032x}"] = TrueTurn(
            "main", os.getpid(), "support", e2e_ms, str(tier_for(e2e_ms)), index
        )
    server: Server = serve(port=0, monitor=LatencyMonitor(), registry=registry)
    scrape = {"scrape_configs": [promstack.scrape_job("agent", server.url.removeprefix("http://"))]}
    try:
        with promstack.prometheus(scrape, exemplars=True) as prom:
            prom.wait_for(f"sum({TURNS}) == 3")
            expr = f'{{__name__=~"{BUCKET}|{TURNS}"}}'
            deadline = time.monotonic() + 30
            while True:
                rows = prom.query_exemplars(expr, start, time.time())
                series, seen = check_exemplars(rows, truth, start, time.time())
                if series == expected_series(truth) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert series == expected_series(truth)
            assert seen == set(truth)
            assert_latest_turn_wins(rows, truth)
    finally:
        assert server.stop()
