"""Fleet view: three pods, one Prometheus, the generated rules and dashboards across them.

A "pod" here is what one Kubernetes pod of the agent runs: a worker process serving the ops app
(lk_observe.serve; its /metrics merges the pod's PROMETHEUS_MULTIPROC_DIR) and LiveKit's own
ProcPool job processes (a forkserver preloaded with the agent's code, as LiveKit's worker does),
each playing a real scripted AgentSession under lk_observe.instrument(). Three such pods, each
with its own multiprocess directory and loopback port, are scraped by one real Prometheus as one
job (a distinct `instance` each, plus the `pod` label a PodMonitor adds). Prometheus loads the
generated rules for the default page SLO with its burn window shrunk as in test_alerting_e2e.py
(1h/5m shrunk 60x to 1m/5s; the traffic guard stays slo.MIN_TURNS = 20 turns), and sends to a
real Alertmanager with the shipped routing.

The traffic is a breach only the fleet shows: nearly every turn is slow on every pod, but no pod
ever holds 20 turns in the 1 min window, while the three together do. The generated rules sum
across pods (`by (agent)`), so they must page; the same rules grouped per pod (`by (agent,
instance)`, loaded next to them under other names) must stay silent, held back by the guard
alone. Then every dashboard query, as Grafana sends it, must aggregate across pods and return
the fleet's numbers (turn rates and tier shares, the quantiles of the merged histogram, SLO
compliance and burn), checked against the latencies the job processes measured, which are
checked against the scripted latencies they were played with.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import pytest
import yaml
from livekit.agents.job import JobContext

import lk_observe
from lk_observe.dashboards import render_dashboards
from lk_observe.demo import ScriptedTurn, build_pipeline, run_pipeline
from lk_observe.promql import (
    LATENCY_BUCKETS_S,
    duration_seconds,
    error_ratio_record,
    slo_rates,
    turns_rate_record,
)
from lk_observe.rules import BURN_ALERT, P95_ALERT, RULES_FILE, AlertOptions, render_rule_file
from lk_observe.server import serve
from lk_observe.slo import DEFAULT_SLOS, MIN_TURNS, BurnWindow, traffic_guard
from lk_observe.turns import COMPONENT_TITLES, Turn
from tests import promstack
from tests.integration.test_alerting_e2e import Webhook, alertmanager_config, webhook_receiver
from tests.jobprocs import livekit_proc_pool, prewarm, running_job

pytestmark = pytest.mark.timeout(240)

# -- the fleet's design --------------------------------------------------------------------------

# The default page SLO (e2e <= 800 ms for 95% of turns) with its 1h/5m window shrunk 60x.
LONG, SHORT = "1m", "5s"
PAGE_WINDOW = BurnWindow(LONG, SHORT, 14.4, "page")
FLEET_SLO = replace(DEFAULT_SLOS[0], windows=(PAGE_WINDOW,))
OPTIONS = AlertOptions(p95_window=LONG, p95_for="0s")
GUARD = traffic_guard(FLEET_SLO, duration_seconds(LONG))  # MIN_TURNS: 30/h * 1 min is far less

AGENT = "support"  # one agent, replicated across the pods
JOB = "voice-agent"
FAST_MS = 350.0  # the first turn of each pod's first job: Excellent


@dataclass(frozen=True)
class PodSpec:
    name: str
    slow_ms: float  # every other turn's e2e: each pod is slow in its own way
    turns_per_job: int


# Each pod alone: 10-14 turns in all, under the guard in any window. Together: 36, over it.
PODS = (PodSpec("pod-0", 1120.0, 7), PodSpec("pod-1", 1750.0, 6), PodSpec("pod-2", 2200.0, 5))
JOBS_PER_POD = 2


def job_turns(pod: PodSpec, job: int) -> list[float]:
    """The e2e latencies (ms) one job plays: slow, but for the pod's very first turn."""
    return [FAST_MS if job == 0 and i == 0 else pod.slow_ms for i in range(pod.turns_per_job)]


def pod_turns(pod: PodSpec) -> int:
    return JOBS_PER_POD * pod.turns_per_job


# e2e = end of speech -> first audio: eou (VAD 0.17 s) + the LLM's first token + ~10 ms of TTS
# and playout in the scripted pipeline; measured values are checked against the scripted ones.
E2E_BEYOND_LLM_S = 0.18


def scripted_turn(e2e_ms: float, *, first: bool) -> ScriptedTurn:
    llm_ttft_s = e2e_ms / 1000.0 - E2E_BEYOND_LLM_S
    return ScriptedTurn(
        # the first reply plays ~2.4 s into the session: the series instrument() exports at
        # zero are scraped before any turn counts in them
        speech_s=1.4 if first else 0.4,
        vad_s=0.17,
        stt_s=0.12,
        llm_ttft_s=llm_ttft_s,
        llm_total_s=llm_ttft_s + 0.1,
        tts_ttfb_s=0.06,
        reply_audio_s=0.2,
        gap_s=0.2,
    )


# -- runs in a pod's job processes ---------------------------------------------------------------

FLEET_DIR_ENV = "LK_OBSERVE_TEST_FLEET_DIR"
POD_ENV = "LK_OBSERVE_TEST_POD"
GO = "go"  # the file that starts every pod's jobs at once


def write_json(path: Path, data: object) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(data))
    temp.replace(path)


def parent_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise LookupError(f"no parent for {pid}")


async def job_entrypoint(ctx: JobContext) -> None:
    """One call: a real AgentSession, instrumented, playing the job's scripted turns."""
    spec = json.loads(ctx.job.metadata)
    results = Path(os.environ[FLEET_DIR_ENV]) / "results"
    record: dict[str, Any] = {"job": ctx.job.id, "pod": os.environ[POD_ENV], "pid": os.getpid()}
    try:
        targets: list[float] = spec["turns"]
        pipeline = build_pipeline([scripted_turn(ms, first=i == 0) for i, ms in enumerate(targets)])
        seen: list[Turn] = []
        all_seen = asyncio.Event()

        def on_turn(turn: Turn) -> None:
            seen.append(turn)
            if sum(t.kind == "user" for t in seen) == len(targets):
                all_seen.set()

        # the process-wide registry: file-backed, so the pod's ops app merges it
        lk_observe.instrument(pipeline.session, agent_name=spec["agent"], on_turn=on_turn)
        truth = await run_pipeline(pipeline)
        await asyncio.wait_for(all_seen.wait(), timeout=30.0)
        user = [t for t in seen if t.kind == "user"]
        record["turns"] = [
            {
                "latency_ms": dict(turn.latency_ms),
                "tier": turn.tier,
                "interrupted": turn.interrupted,
                "scripted_e2e_ms": target,
                "played_e2e_ms": played.latency_ms().get("e2e"),
            }
            for turn, target, played in zip(user, targets, truth.turns, strict=True)
        ]
        record["other_turns"] = len(seen) - len(user)
        record["pod_pid"] = parent_of(os.getppid())  # job -> LiveKit's forkserver -> the pod
    except Exception as exc:  # reported to the test, which fails with it instead of waiting
        record["error"] = repr(exc)
    results.mkdir(exist_ok=True)
    write_json(results / f"{ctx.job.id}.json", record)
    # returning keeps the job alive (LiveKit waits for shutdown), like a call in progress


# -- runs in a pod's worker process --------------------------------------------------------------

POD_COMMAND = "from tests.integration.test_fleet import pod_main; pod_main()"


def pod_main() -> None:
    """A pod's worker: the ops app, then LiveKit's job process pool; jobs start on GO."""
    asyncio.run(_run_pod(Path(os.environ[FLEET_DIR_ENV]), os.environ[POD_ENV]))


async def _run_pod(workdir: Path, name: str) -> None:
    spec = next(pod for pod in PODS if pod.name == name)
    # as LiveKit's worker does on Linux: job processes fork from a forkserver that imported
    # the agent's code (this module) and LiveKit's warm-up once
    multiprocessing.get_context("forkserver").set_forkserver_preload(
        [__name__, "livekit.agents.ipc._preload", "livekit.agents.ipc._preload_freeze"]
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    server = serve(port=0)  # reads PROMETHEUS_MULTIPROC_DIR: this pod's job processes only
    pool = livekit_proc_pool(prewarm, job_entrypoint, JOBS_PER_POD)
    try:
        write_json(workdir / f"{name}.json", {"url": server.url, "pid": os.getpid()})
        await pool.start()  # returns once the idle job processes are warm
        (workdir / f"{name}.ready").touch()
        while not (workdir / GO).exists():
            if stop.is_set():
                return
            await asyncio.sleep(0.05)
        for job in range(JOBS_PER_POD):
            info = running_job(f"{name}-job-{job}", (AGENT, job_turns(spec, job)))
            await pool.launch_job(info)
        await stop.wait()
    finally:
        await pool.aclose()
        server.stop()


# -- runs in the test process: the pods ----------------------------------------------------------


@dataclass
class Pod:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    pid: int = 0

    @property
    def address(self) -> str:
        return self.url.removeprefix("http://")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def wait_for_files(paths: Sequence[Path], pods: Sequence[Pod], timeout: float, what: str) -> None:
    """Until every path exists; fails at once, with its log, when a pod process dies."""
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in paths):
        for pod in pods:
            if pod.process.poll() is not None:
                raise RuntimeError(f"{pod.name} exited ({pod.process.returncode}):\n{pod.log()}")
        if time.monotonic() > deadline:
            missing = [path.name for path in paths if not path.exists()]
            logs = "\n".join(f"--- {pod.name}\n{pod.log()}" for pod in pods)
            raise TimeoutError(f"{what}: {missing} missing after {timeout}s\n{logs}")
        time.sleep(0.1)


@contextmanager
def running_pods(workdir: Path) -> Iterator[list[Pod]]:
    """Three pod processes, each with its own multiprocess directory, ops app up."""
    pods: list[Pod] = []
    logs: list[IO[bytes]] = []
    try:
        for spec in PODS:
            multiproc = workdir / spec.name / "prometheus"
            multiproc.mkdir(parents=True)
            env = {
                **os.environ,
                "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
                FLEET_DIR_ENV: str(workdir),
                POD_ENV: spec.name,
                # LiveKit's warm-up would load its local VAD and turn models: no job uses them
                "LIVEKIT_AGENTS_PRELOAD_LOCAL_INFERENCE": "0",
            }
            env.pop("prometheus_multiproc_dir", None)
            log_path = workdir / f"{spec.name}.log"
            log = log_path.open("wb")
            logs.append(log)
            process = subprocess.Popen(
                [sys.executable, "-c", POD_COMMAND],
                cwd=promstack.REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            pods.append(Pod(spec.name, process, log_path))
        wait_for_files([workdir / f"{pod.name}.json" for pod in pods], pods, 120, "ops apps")
        for pod in pods:
            info = json.loads((workdir / f"{pod.name}.json").read_text())
            pod.url, pod.pid = info["url"], info["pid"]
        yield pods
    finally:
        for pod in pods:  # all at once: each pod closes its jobs in parallel
            if pod.process.poll() is None:
                pod.process.terminate()
        for pod in pods:
            promstack.stop(pod.process)
        for handle in logs:
            handle.close()


# -- runs in the test process: the generated rules, per pod --------------------------------------

_GROUPING = re.compile(r"\b(by|on) \(([^)]*)\)")
_RECORD = re.compile(r"\bslo:")
PER_POD_RECORD_PREFIX = "pod_slo:"
PER_POD_ALERT_PREFIX = "PerPod"


def per_pod_rules(generated: str) -> str:
    """The generated SLO rule group evaluated per pod: every `by (...)` and `on (...)` also keeps
    `instance`, records are renamed pod_slo:*, alerts PerPod*. What the generated rules would do
    if they did not aggregate across pods."""
    data = yaml.safe_load(generated)
    [group] = [g for g in data["groups"] if g["name"] == f"lk-observe-slo-{FLEET_SLO.name}"]
    rules: list[dict[str, Any]] = []
    for rule in group["rules"]:
        expr = _GROUPING.sub(lambda m: f"{m[1]} ({m[2]}, instance)", rule["expr"])
        per_pod = {**rule, "expr": _RECORD.sub(PER_POD_RECORD_PREFIX, expr)}
        if "record" in rule:
            per_pod["record"] = _RECORD.sub(PER_POD_RECORD_PREFIX, rule["record"])
        else:
            per_pod["alert"] = PER_POD_ALERT_PREFIX + rule["alert"]
        rules.append(per_pod)
    assert len(groupings(generated)) >= 3, "the generated rules no longer group as expected"
    return yaml.safe_dump({"groups": [{"name": f"per-pod-{group['name']}", "rules": rules}]})


def groupings(rule_file: str) -> set[tuple[str, str]]:
    """Every distinct `by (...)` / `on (...)` of the page SLO's rule group."""
    [group] = [
        g
        for g in yaml.safe_load(rule_file)["groups"]
        if g["name"] == f"lk-observe-slo-{FLEET_SLO.name}"
    ]
    return {m for rule in group["rules"] for m in _GROUPING.findall(rule["expr"])}


# -- runs in the test process: the stack ---------------------------------------------------------


@dataclass(frozen=True)
class TrueTurn:
    pod: str
    job: str
    latency_ms: dict[str, float]
    tier: str | None
    interrupted: bool


@dataclass
class Fleet:
    prom: promstack.Server
    hook: Webhook
    pods: list[Pod]
    turns: list[TrueTurn]
    started: float  # Prometheus ready (unix s): nothing was scraped before
    go: float  # every pod's jobs started
    go_monotonic: float  # the same, on the clock the webhook stamps notifications with
    fired: float  # the evaluation at which the fleet's burn-rate page started firing
    settled: float  # every turn scraped and evaluated: the dashboards are read here

    @property
    def window(self) -> str:
        """A window covering the whole run: what Grafana's range and rate interval stand for."""
        return f"{math.ceil(self.settled - self.started) + 5}s"

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        return self.prom.query(expr, at=self.settled if at is None else at)

    def pod_of(self, labels: dict[str, str]) -> str:
        return next(pod.name for pod in self.pods if pod.address == labels["instance"])

    def per_pod(self, expr: str, at: float | None = None) -> dict[str, float]:
        return {self.pod_of(row["metric"]): number(row) for row in self.query(expr, at)}

    def e2e(self, pod: str | None = None) -> list[float]:
        """Measured e2e (s) of the fleet's turns, or of one pod's."""
        return [
            t.latency_ms["e2e"] / 1000.0
            for t in self.turns
            if "e2e" in t.latency_ms and pod in (None, t.pod)
        ]


def number(row: dict[str, Any]) -> float:
    return float(row["value"][1])


def single(rows: list[dict[str, Any]], what: str) -> float:
    assert len(rows) == 1, f"{what}: expected one series, got {rows}"
    return number(rows[0])


def read_turns(results: Path, pods: list[Pod]) -> list[TrueTurn]:
    turns: list[TrueTurn] = []
    for pod in pods:
        for job in range(JOBS_PER_POD):
            record = json.loads((results / f"{pod.name}-job-{job}.json").read_text())
            assert "error" not in record, f"{record['job']} failed: {record['error']}"
            # the pod's own job processes, each its own process
            assert record["pod"] == pod.name and record["pod_pid"] == pod.pid, record
            assert record["pid"] != pod.pid and record["other_turns"] == 0
            for turn in record["turns"]:
                measured = turn["latency_ms"]["e2e"]
                # what lk_observe measured is what the pipeline played, and what was scripted
                assert measured == pytest.approx(turn["played_e2e_ms"], abs=20.0), turn
                # (event-loop lag on a busy machine can only add to the script's latency)
                assert measured == pytest.approx(turn["scripted_e2e_ms"], abs=150.0), turn
                turns.append(
                    TrueTurn(
                        pod.name,
                        record["job"],
                        turn["latency_ms"],
                        turn["tier"],
                        turn["interrupted"],
                    )
                )
    return turns


def first_firing(prom: promstack.Server, alert: str, window: str) -> float:
    rows = prom.query(f'ALERTS{{alertname="{alert}",alertstate="firing"}}[{window}]')
    assert rows, f"{alert} never fired"
    return min(float(t) for row in rows for t, _ in row["values"])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("fleet")
    generated = render_rule_file([FLEET_SLO], OPTIONS)
    rules = workdir / "fleet.rules.yml"
    rules.write_text(generated)
    per_pod = workdir / "per-pod.rules.yml"
    per_pod.write_text(per_pod_rules(generated))
    begun = time.time()
    with ExitStack() as stack:
        pods = stack.enter_context(running_pods(workdir))
        serving = time.time()
        hook = stack.enter_context(webhook_receiver())
        am = stack.enter_context(promstack.alertmanager(alertmanager_config(hook.url)))
        scrape = {
            "job_name": JOB,
            "metrics_path": "/metrics",
            "static_configs": [
                {"targets": [pod.address], "labels": {"pod": pod.name}} for pod in pods
            ],
        }
        prom = stack.enter_context(
            promstack.prometheus(
                {"scrape_configs": [scrape]}, [rules, per_pod], alertmanager_url=am.url
            )
        )
        started = time.time()
        prom.wait_for(f'count(up{{job="{JOB}"}} == 1) == {len(pods)}')
        ready = [workdir / f"{pod.name}.ready" for pod in pods]
        wait_for_files(ready, pods, 120, "warm job processes")
        (workdir / GO).touch()
        go, go_monotonic = time.time(), time.monotonic()
        results = [
            workdir / "results" / f"{pod.name}-job-{job}.json"
            for pod in pods
            for job in range(JOBS_PER_POD)
        ]
        wait_for_files(results, pods, 120, "the jobs' turns")
        played = time.time()
        turns = read_turns(workdir / "results", pods)
        # every turn scraped; then the SLO's period records, sums over time of the short
        # window's rates, need that window to pass over the last turn
        prom.wait_for(f'sum(voice_agent_turns_total{{job="{JOB}"}}) == {len(turns)}')
        time.sleep(max(0.0, played + duration_seconds(SHORT) + 2.0 - time.time()))
        fleet = Fleet(prom, hook, pods, turns, started, go, go_monotonic, 0.0, time.time())
        fleet.fired = first_firing(prom, BURN_ALERT, fleet.window)
        print(
            f"\nfleet: {len(turns)} turns from {len(pods)} pods x {JOBS_PER_POD} job processes; "
            f"ops apps up {serving - begun:.1f}s, Prometheus {started - begun:.1f}s, jobs "
            f"started {go - begun:.1f}s, played {played - begun:.1f}s, settled "
            f"{fleet.settled - begun:.1f}s; {BURN_ALERT} fired {fleet.fired - go:.1f}s after the "
            "jobs started"
        )
        yield fleet
        closing = time.time()
    print(f"\nfleet: stopped in {time.time() - closing:.1f}s")


# -- the rules -----------------------------------------------------------------------------------


def test_only_the_fleet_pages_each_pod_alone_stays_under_the_guard(fleet: Fleet) -> None:
    # The rules under test are the shipped ones (alerting/, from `lk-observe generate`) but for
    # the shrunk windows: they aggregate exactly as those do.
    shipped = (promstack.REPO / "alerting" / RULES_FILE).read_text()
    assert groupings(shipped) == groupings(render_rule_file([FLEET_SLO], OPTIONS))
    assert GUARD == MIN_TURNS
    assert all(pod_turns(pod) < GUARD for pod in PODS)
    assert sum(pod_turns(pod) for pod in PODS) >= GUARD

    # The fleet's page went out, through Alertmanager, to the pager.
    burn = fleet.hook.wait_for(30, alertname=BURN_ALERT, long_window=LONG)
    p95 = fleet.hook.wait_for(30, alertname=P95_ALERT)
    for note in (burn, p95):
        assert note.path == "/pager" and note.labels["severity"] == "page", note
        assert note.labels["agent"] == AGENT
        assert not {"instance", "pod", "job"} & set(note.labels), note.labels  # the fleet's

    # At the evaluation that paged: the fleet's window held enough turns, no pod's did, and the
    # fleet's count is the pods' sum.
    sel = f'{{slo="{FLEET_SLO.name}"}}'
    seconds = duration_seconds(LONG)
    fleet_turns = single(
        fleet.query(f"{turns_rate_record(LONG)}{sel} * {seconds:g}", fleet.fired), "fleet turns"
    )
    # the recording rule's own expression, for the fleet and kept apart per pod, at that time
    _, fleet_total = slo_rates(FLEET_SLO, LONG, by=("agent",))
    fleet_raw = single(fleet.query(f"{fleet_total} * {seconds:g}", fleet.fired), "fleet")
    good, total = slo_rates(FLEET_SLO, LONG, by=("agent", "instance"))
    per_pod = fleet.per_pod(f"{total} * {seconds:g}", fleet.fired)
    pod_burn = {
        pod: (1.0 - ratio) / FLEET_SLO.error_budget
        for pod, ratio in fleet.per_pod(f"{good} / {total}", fleet.fired).items()
    }
    assert set(per_pod) == set(pod_burn) == {pod.name for pod in PODS}
    assert fleet_turns >= GUARD
    assert all(turns < GUARD for turns in per_pod.values()), per_pod
    assert sum(per_pod.values()) == pytest.approx(fleet_raw, rel=1e-9)
    fleet_burn = {
        window: single(fleet.query(f"{error_ratio_record(window)}{sel}", fleet.fired), window)
        / FLEET_SLO.error_budget
        for window in (LONG, SHORT)
    }
    assert all(burn_rate > PAGE_WINDOW.factor for burn_rate in fleet_burn.values()), fleet_burn

    # Over the whole run: each pod alone burned past the page factor, but never reached the
    # guard, so the per-pod rules never fired, nor even went pending.
    run = fleet.window
    pod_record = PER_POD_RECORD_PREFIX + turns_rate_record(LONG).removeprefix("slo:")
    pod_max_turns = fleet.per_pod(f"max_over_time(({pod_record}{sel} * {seconds:g})[{run}:1s])")
    pod_ratio = PER_POD_RECORD_PREFIX + error_ratio_record(LONG).removeprefix("slo:")
    pod_max_burn = {
        pod: ratio / FLEET_SLO.error_budget
        for pod, ratio in fleet.per_pod(f"max_over_time({pod_ratio}{sel}[{run}])").items()
    }
    assert all(turns < GUARD for turns in pod_max_turns.values()), pod_max_turns
    assert all(burn_rate > PAGE_WINDOW.factor for burn_rate in pod_max_burn.values())
    assert len(pod_max_turns) == len(pod_max_burn) == len(PODS)
    per_pod_alerts = f'ALERTS{{alertname=~"{PER_POD_ALERT_PREFIX}.*"}}'
    assert fleet.query(f"count_over_time({per_pod_alerts}[{run}])") == []
    assert not any(
        a["labels"]["alertname"].startswith(PER_POD_ALERT_PREFIX) for a in fleet.prom.alerts()
    )
    assert fleet.hook.matching(alertname=PER_POD_ALERT_PREFIX + BURN_ALERT) == []

    print(
        f"\nat the paging evaluation ({fleet.fired - fleet.go:.1f}s after the jobs started), "
        f"turns in the {LONG} window: fleet {fleet_turns:.1f} (guard {GUARD:g}), "
        + ", ".join(f"{pod} {turns:.1f}" for pod, turns in sorted(per_pod.items()))
        + "; burn per pod "
        + ", ".join(f"{pod} {burn_rate:.1f}x" for pod, burn_rate in sorted(pod_burn.items()))
        + f"; fleet burn {fleet_burn[LONG]:.1f}x over {LONG}, {fleet_burn[SHORT]:.1f}x over "
        f"{SHORT} (page at {PAGE_WINDOW.factor:g}x)\n"
        f"over the run, per pod: most turns in {LONG} "
        + ", ".join(f"{pod} {turns:.1f}" for pod, turns in sorted(pod_max_turns.items()))
        + "; highest burn "
        + ", ".join(f"{pod} {burn_rate:.1f}x" for pod, burn_rate in sorted(pod_max_burn.items()))
        + f"; per-pod alerts: none. Paged {burn.received - fleet.go_monotonic:.1f}s "
        f"({BURN_ALERT}) and {p95.received - fleet.go_monotonic:.1f}s ({P95_ALERT}) after the "
        "jobs started"
    )


# -- the dashboards ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    dashboard: str
    panel: str
    ref: str
    legend: str
    expr: str


def dashboard_targets() -> list[Target]:
    """Every query of every generated dashboard (for the fleet's SLO), as its JSON holds it."""
    found = []
    for name, text in sorted(render_dashboards([FLEET_SLO]).items()):
        for panel in json.loads(text)["panels"]:
            for target in panel.get("targets", []):
                found.append(
                    Target(
                        name,
                        panel["title"],
                        target["refId"],
                        target.get("legendFormat", ""),
                        target["expr"],
                    )
                )
    return found


TARGETS = dashboard_targets()


def panel(title: str) -> list[Target]:
    found = [t for t in TARGETS if t.panel == title]
    assert found, f"no panel {title!r} in {sorted({t.panel for t in TARGETS})}"
    return found


def grafana(expr: str, window: str) -> str:
    """The query Grafana sends over the whole run: its range and rate interval both cover it
    (a zoom on the run), and the agent variable is All."""
    for macro in ("$__rate_interval", "$__range", "$__interval"):
        expr = expr.replace(macro, window)
    expr = expr.replace("$agent", ".*")
    leftover = re.findall(r"\$\w+", expr)
    assert not leftover, f"uninterpolated variables {leftover} in {expr}"
    return expr


def histogram_quantile(q: float, values_s: Sequence[float]) -> float:
    """What Prometheus's histogram_quantile returns for a histogram holding exactly `values_s`:
    the bucket that holds rank q * count, linearly interpolated."""
    edges = [*LATENCY_BUCKETS_S, math.inf]
    counts = [sum(value <= edge for value in values_s) for edge in edges]
    rank = q * counts[-1]
    i = next(i for i, count in enumerate(counts) if count >= rank)
    if edges[i] == math.inf:
        return edges[-2]
    lower, below = (0.0, 0) if i == 0 else (edges[i - 1], counts[i - 1])
    return lower + (edges[i] - lower) * (rank - below) / (counts[i] - below)


def seen_buckets(turns: list[TrueTurn], component: str, q: float) -> tuple[float, float]:
    """The buckets the q-quantile of `component` can fall in as Prometheus sees it: of every
    turn, or without each pod's first observation (the component's first sample in a pod is not
    in rate(): only e2e is exported at zero before the first turn; which job of the pod observed
    first is not known, so both jobs' first turns are left out)."""
    measured = [t for t in turns if component in t.latency_ms]
    jobs = {(t.pod, t.job) for t in measured}
    firsts = {id(next(t for t in measured if (t.pod, t.job) == job)) for job in jobs}
    every = [t.latency_ms[component] / 1000.0 for t in measured]
    trimmed = [t.latency_ms[component] / 1000.0 for t in measured if id(t) not in firsts]
    edges = [bucket_of(histogram_quantile(q, every))]
    if trimmed:
        edges.append(bucket_of(histogram_quantile(q, trimmed)))
    return min(low for low, _ in edges), max(high for _, high in edges)


def bucket_of(seconds: float) -> tuple[float, float]:
    """(lower, upper] of the latency bucket holding `seconds`."""
    i = bisect.bisect_left(LATENCY_BUCKETS_S, seconds)
    return (0.0 if i == 0 else LATENCY_BUCKETS_S[i - 1]), LATENCY_BUCKETS_S[i]


# rate() and increase() extrapolate each pod's counters by at most one scrape interval at the
# window's end: a ratio within one pod is exact, a sum across pods is at most ~3% high.
RATE_TOLERANCE = 0.04
QUANTILE_TOLERANCE = 0.015  # the same skew moves a quantile well under 1% of its value


def test_the_dashboards_show_the_fleets_numbers(fleet: Fleet) -> None:
    window = fleet.window
    seconds = duration_seconds(window)

    def run(target: Target, at: float | None = None) -> list[dict[str, Any]]:
        rows = fleet.query(grafana(target.expr, window), at)
        assert rows, f"{target.dashboard}: {target.panel} [{target.ref}] returned nothing"
        return rows

    report: list[str] = []
    turns = fleet.turns
    e2e = fleet.e2e()
    assert len(e2e) == len(turns) == sum(pod_turns(pod) for pod in PODS)
    assert not any(t.interrupted for t in turns)

    # rate() sees a pod's first turns only if it saw their series at 0 first (instrument()
    # exports them before the first turn): a failure here is the harness, not the dashboards.
    for series in ('voice_agent_latency_seconds_count{component="e2e"}', "voice_agent_turns_total"):
        first = fleet.query(f"min_over_time({series}[{window}])")
        assert len(first) >= len(PODS) and all(number(row) == 0 for row in first), first

    # Overview: turns per second by tier are the fleet's (the pods' sum), every turn counted.
    [rate_target] = panel("Turns per second by tier")
    by_tier = {row["metric"]["tier"]: number(row) for row in run(rate_target)}
    for tier in ("excellent", "good", "slow"):
        want = float(sum(t.tier == tier for t in turns))
        got = by_tier.get(tier, 0.0) * seconds
        assert math.isclose(got, want, rel_tol=RATE_TOLERANCE), (tier, got, want)
    pods_rate = fleet.per_pod(f"sum by (instance) (rate(voice_agent_turns_total[{window}]))")
    assert sum(by_tier.values()) == pytest.approx(sum(pods_rate.values()), rel=1e-9)
    report.append(
        f"turns/s over {window}: fleet {sum(by_tier.values()):.3f} = "
        + " + ".join(f"{pod} {rate:.3f}" for pod, rate in sorted(pods_rate.items()))
        + f" (x {seconds:g} s = {sum(by_tier.values()) * seconds:.1f}; {len(turns)} turns)"
    )

    # Overview: e2e p50 / p95 / p99 of the merged histogram, not of any one pod.
    for target, q in zip(
        panel("End-to-end latency p50 / p95 / p99"), (0.5, 0.95, 0.99), strict=True
    ):
        assert target.legend == f"p{q * 100:g}"
        got = single(run(target), target.legend)
        want = histogram_quantile(q, e2e)
        assert got == pytest.approx(want, rel=QUANTILE_TOLERANCE), (target.legend, got, want)
        pods = {pod.name: histogram_quantile(q, fleet.e2e(pod.name)) for pod in PODS}
        report.append(
            f"e2e {target.legend}: dashboard {got:.3f}s, merged truth {want:.3f}s (per pod "
            + ", ".join(f"{pod} {value:.3f}s" for pod, value in pods.items())
            + ")"
        )
        if q == 0.5:  # the check has teeth: no one pod's median, nor their mean, would pass
            values = [*pods.values(), sum(pods.values()) / len(pods)]
            assert all(abs(v - want) > QUANTILE_TOLERANCE * want for v in values), pods

    # Overview: each tier's share of the turns.
    [share_target] = panel("Turns by tier (dashboard range)")
    shares = {row["metric"]["tier"]: number(row) for row in run(share_target)}
    for tier in ("excellent", "good", "slow"):
        want = sum(t.tier == tier for t in turns) / len(turns)
        assert shares.get(tier, 0.0) == pytest.approx(want, abs=0.01), (tier, shares)
    report.append("tier shares: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(shares.items())))

    # Overview: no reply was cut short anywhere.
    [barge_in] = panel("Barge-in rate")
    assert single(run(barge_in), "barge-in rate") == 0.0

    # Overview: active sessions add up across pods (a gauge: exact). Its B query, sessions
    # started per second, is not checked: voice_agent_sessions_total is not exported at zero, so
    # the sessions that start a pod's counter (here all of them: each pod's jobs start within one
    # scrape) are counted before Prometheus saw it at 0, and rate() cannot see them.
    sessions = next(t for t in panel("Active sessions") if t.ref == "A")
    most = single(
        fleet.query(f"max_over_time(({grafana(sessions.expr, window)})[{window}:1s])"),
        "active sessions",
    )
    pods_most = fleet.per_pod(
        f"max_over_time(sum by (instance) (voice_agent_active_sessions)[{window}:1s])"
    )
    assert pods_most == {pod.name: JOBS_PER_POD for pod in PODS}
    assert most == len(PODS) * JOBS_PER_POD
    report.append(f"active sessions at most: fleet {most:g}, each pod {JOBS_PER_POD}")

    # Components: p95 per component and p50 per stage of the merged histograms, in the bucket of
    # the merged truth. Only e2e is exported at zero before the first turn, so another
    # component's first observation in each pod is not in rate(): the bucket, not the value.
    [p95_target] = panel("p95 latency by component")
    p95s = {row["metric"]["component"]: number(row) for row in run(p95_target)}
    components = sorted({c for t in turns for c in t.latency_ms})
    assert set(p95s) == set(components)
    for component in components:
        lower, upper = seen_buckets(turns, component, 0.95)
        assert lower < p95s[component] <= upper, (component, p95s[component], lower, upper)
    assert p95s["e2e"] == pytest.approx(histogram_quantile(0.95, e2e), rel=QUANTILE_TOLERANCE)
    for target in panel("p50 per stage vs the guide (dashboard range)"):
        component = target.legend
        lower, upper = seen_buckets(turns, component, 0.5)
        got = single(run(target), component)
        assert lower < got <= upper, (component, got, lower, upper)
    report.append(
        "p95 by component: " + ", ".join(f"{c} {v * 1000:.0f}ms" for c, v in sorted(p95s.items()))
    )

    # Components: the e2e heatmap's buckets hold every turn of every pod.
    [heat] = panel(COMPONENT_TITLES["e2e"])
    cells = {row["metric"]["le"]: number(row) for row in run(heat)}
    for edge in (*LATENCY_BUCKETS_S, math.inf):
        le = "+Inf" if edge == math.inf else repr(edge)
        want = float(sum(value <= edge for value in e2e))
        assert math.isclose(cells[le], want, rel_tol=RATE_TOLERANCE), (le, cells[le], want)

    # SLO: compliance over the range and over the period, and the budget left.
    good = sum(value <= FLEET_SLO.threshold_s for value in e2e) / len(e2e)
    [compliance] = panel("Compliance (dashboard range)")
    assert single(run(compliance), "compliance") == pytest.approx(good, abs=0.01)
    [period] = panel(f"Compliance ({FLEET_SLO.period})")
    period_good = single(run(period), "period compliance")
    assert period_good == pytest.approx(good, abs=0.02)
    [budget] = panel(f"Error budget left ({FLEET_SLO.period})")
    budget_left = single(run(budget), "budget left")
    want_left = 1.0 - (1.0 - good) / FLEET_SLO.error_budget
    assert budget_left == pytest.approx(want_left, abs=0.02 / FLEET_SLO.error_budget)
    report.append(
        f"compliance: range {good:.3f} (truth {good:.3f}), {FLEET_SLO.period} {period_good:.3f}; "
        f"budget left {budget_left:.2f} (truth {want_left:.2f})"
    )

    # SLO, at the evaluation that paged: both burn windows over the factor, as the alert saw
    # them, and the page in the alerts table.
    sel = f'{{slo="{FLEET_SLO.name}"}}'
    for title in ("Burn rate now, per alert window", "Burn rate by window"):
        for target in panel(title):
            length = LONG if target.legend.startswith(LONG) else SHORT
            got = single(run(target, fleet.fired), f"{title} {target.legend}")
            recorded = fleet.query(f"{error_ratio_record(length)}{sel}", fleet.fired)
            assert got == pytest.approx(single(recorded, length) / FLEET_SLO.error_budget, rel=1e-9)
            assert got > PAGE_WINDOW.factor, (title, target.legend, got)
    [alerts] = panel("Alerts firing or pending")
    firing = [row["metric"] for row in run(alerts, fleet.fired)]
    assert any(
        m["alertname"] == BURN_ALERT and m["alertstate"] == "firing" and m["severity"] == "page"
        for m in firing
    ), firing
    print("\n" + "\n".join(report))


def test_every_dashboard_query_aggregates_across_pods(fleet: Fleet) -> None:
    """No query returns a series per pod: each one sums (or quantiles) across the fleet."""
    answered = 0
    for target in TARGETS:
        for at in (fleet.fired, fleet.settled):
            rows = fleet.query(grafana(target.expr, fleet.window), at)
            answered += bool(rows)
            per_pod = [
                m for m in (row["metric"] for row in rows) if {"instance", "pod", "job"} & set(m)
            ]
            assert not per_pod, f"{target.dashboard}: {target.panel} [{target.ref}]: {per_pod}"
    assert answered >= len(TARGETS)  # most answer at both times; failure panels stay empty
