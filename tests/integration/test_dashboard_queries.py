"""Every dashboard query, with Grafana's macros and variables filled in, returns data from a real
Prometheus holding the project's metrics.

The data: three days of history written with lk_observe's own metric families (a fresh registry),
exported as OpenMetrics and backfilled with `promtool tsdb create-blocks-from openmetrics` into
the TSDB that Prometheus then starts on, so the 1d, 3d and 30d windows read real samples; plus
live traffic from the same families served on 127.0.0.1 and scraped every second, so the 5m and
$__rate_interval windows do too. The generated rules are loaded (the SLO dashboard reads their
recordings) and the traffic breaches the SLOs, so ALERTS has series.
"""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server

from lk_observe.dashboards import render_dashboards
from lk_observe.metrics import LatencyMetrics
from lk_observe.slo import DEFAULT_SLOS
from lk_observe.turns import BREAKDOWN_PARTS, BREAKDOWN_TITLES, COMPONENTS, MODEL_COMPONENTS
from tests import promstack

AGENTS = ("support", "sales")
# Median seconds per component, spread so that the e2e SLOs are breached (alerts fire) and every
# bucket edge the dashboards read has samples on both sides.
MEDIAN_S = {
    "e2e": 0.7,
    "vad": 0.18,
    "stt": 0.3,
    "eou": 0.4,
    "llm_ttft": 0.25,
    "tts_ttfb": 0.06,
    "leading_silence": 0.04,
}
# Two (provider, model) pairs per stage, as during an A/B rollout; a few turns name none.
MODELS = {
    "stt": (("deepgram", "nova-3"), ("assemblyai", "universal")),
    "llm_ttft": (("openai", "gpt-4o-mini"), ("google", "gemini-2.0-flash")),
    "tts_ttfb": (("cartesia", "sonic-2"), ("elevenlabs", "eleven_flash_v2_5")),
}
UNKNOWN_MODEL_SHARE = 0.1
# Relative weight of each part of e2e; "tool" only on some turns (a part can be absent).
PART_WEIGHTS = {
    "vad_silence": 5.0,
    "transcription": 1.0,
    "end_of_turn": 2.0,
    "on_user_turn_completed": 0.2,
    "llm": 3.0,
    "tool": 2.0,
    "tts": 1.0,
    "playback": 0.3,
    "leading_silence": 0.5,
    "scheduling": 0.2,
}
TOOL_SHARE = 0.2
HISTORY_S = 3 * 86400 + 2 * 3600  # a little more than the longest burn window (3d)
HISTORY_STEP_S = 300
# What Grafana substitutes for the dashboards' default range (now-6h) with a 1s scrape interval.
MACROS = {"$__rate_interval": "1m", "$__range": "6h", "$__interval": "15s"}
AGENT_VALUES = (".*", "support", "(support|sales)")  # All, one agent, a multi-selection


class Traffic:
    """Plausible turns, sessions and failures written into lk_observe's metric families."""

    def __init__(self, seed: int) -> None:
        self.registry = CollectorRegistry()
        self.metrics = LatencyMetrics.for_registry(self.registry)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()

    def turn(self, agent: str) -> None:
        for component in COMPONENTS:
            seconds = MEDIAN_S[component] * math.exp(self.rng.gauss(0.0, 0.4))
            provider, model = self.model(component)
            self.metrics.latency.labels(
                component=component, agent=agent, provider=provider, model=model
            ).observe(seconds)
            if component == "e2e":
                tier = "excellent" if seconds < 0.5 else "good" if seconds < 0.8 else "slow"
                self.metrics.turns.labels(agent=agent, tier=tier).inc()
                for part, part_s in self.breakdown(seconds).items():
                    self.metrics.breakdown.labels(agent=agent, part=part).inc(part_s)
            elif seconds > 1.5 * MEDIAN_S[component]:
                self.metrics.budget_overrun(agent, component)

    def model(self, component: str) -> tuple[str, str]:
        """The (provider, model) labels of one observation; ("", "") when there are none."""
        if component not in MODEL_COMPONENTS or self.rng.random() < UNKNOWN_MODEL_SHARE:
            return "", ""
        return self.rng.choice(MODELS[component])

    def breakdown(self, e2e_s: float) -> dict[str, float]:
        """`e2e_s` split into parts that add up to it, "scheduling" being the remainder."""
        present = [p for p in BREAKDOWN_PARTS if p != "tool" or self.rng.random() < TOOL_SHARE]
        weights = {p: PART_WEIGHTS[p] * self.rng.uniform(0.5, 1.5) for p in present}
        total = sum(weights.values())
        parts = {p: e2e_s * w / total for p, w in weights.items() if p != "scheduling"}
        parts["scheduling"] = max(e2e_s - sum(parts.values()), 0.0)
        return parts

    def step(self, turns: int) -> None:
        with self.lock:
            for agent in AGENTS:
                self.metrics.session_started(agent)
                for _ in range(turns):
                    self.turn(agent)
                self.metrics.error(agent, self.rng.choice(("stt_timeout", "llm_error")))
                self.metrics.session_ended(agent)
            self.metrics.session_started(AGENTS[0])  # the gauge is never all zeros
            self.metrics.sink_failure("tracing")


def openmetrics_history(end: float) -> str:
    """OpenMetrics text, one sample per series every HISTORY_STEP_S, ending at `end`."""
    traffic = Traffic(seed=7)
    families: dict[str, tuple[str, list[str]]] = {}
    start = end - HISTORY_S
    for step in range(HISTORY_S // HISTORY_STEP_S + 1):
        traffic.step(turns=10)
        at = start + step * HISTORY_STEP_S
        for family in traffic.registry.collect():
            _, lines = families.setdefault(family.name, (family.type, []))
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                labels = {**sample.labels, "source": "backfill"}
                text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
                lines.append(f"{sample.name}{{{text}}} {sample.value!r} {at:.3f}")
    out: list[str] = []
    for name, (kind, lines) in families.items():
        out.append(f"# TYPE {name} {kind}")
        out.extend(lines)
    return "\n".join([*out, "# EOF"]) + "\n"


@dataclass
class BackfilledPrometheus:
    url: str
    workdir: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        return promstack.query(self.url, expr)

    def wait_for(self, expr: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.query(expr):
            if time.monotonic() > deadline:
                log = (self.workdir / "prometheus.log").read_text(errors="replace")
                raise TimeoutError(f"{expr!r} still empty after {timeout}s\n{log[-3000:]}")
            time.sleep(0.25)


@contextmanager
def backfilled_prometheus(
    config: dict[str, Any], history: str, workdir: Path
) -> Iterator[BackfilledPrometheus]:
    """Prometheus started on a TSDB holding `history`.

    promstack.prometheus() always starts on an empty temp TSDB (and Prometheus refuses a second
    --storage.tsdb.path), so this starts the same Debian binary on a directory we backfilled.
    """
    (workdir / "history.om").write_text(history)
    data = workdir / "data"
    done = promstack.promtool(
        "tsdb", "create-blocks-from", "openmetrics", str(workdir / "history.om"), str(data)
    )
    assert done.returncode == 0, done.stderr + done.stdout
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = promstack.free_port()
    server = BackfilledPrometheus(f"http://{promstack.HOST}:{port}", workdir)
    with (workdir / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                str(promstack.binaries() / "prometheus"),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={data}",
                "--storage.tsdb.retention.time=60d",
                f"--web.listen-address={promstack.HOST}:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
        try:
            _wait_ready(server, process)
            yield server
        finally:
            promstack.stop(process)


def _wait_ready(server: BackfilledPrometheus, process: subprocess.Popen[bytes]) -> None:
    # opening a few dozen backfilled blocks takes a moment
    if not promstack.wait_ready(server.url, process, 60, interval=0.2):
        log = (server.workdir / "prometheus.log").read_text(errors="replace")
        raise RuntimeError(f"Prometheus not ready (exit code {process.poll()}):\n{log[-3000:]}")


def _rule_file(workdir: Path) -> Path | None:
    """The generated alert rules, or None while lk_observe.rules cannot produce them."""
    try:
        from lk_observe.rules import render_rule_file
    except ImportError:
        return None
    path = workdir / "lk-observe.rules.yml"
    path.write_text(render_rule_file(DEFAULT_SLOS))
    return path


@pytest.fixture(scope="module")
def prom() -> Iterator[tuple[BackfilledPrometheus, bool]]:
    """(Prometheus with history and live traffic, whether the alert rules are loaded)."""
    live = Traffic(seed=11)
    http_server, _thread = start_http_server(0, addr=promstack.HOST, registry=live.registry)
    stop = threading.Event()

    def generate() -> None:
        while not stop.wait(0.1):
            live.step(turns=2)

    generator = threading.Thread(target=generate, daemon=True)
    generator.start()
    try:
        with tempfile.TemporaryDirectory(prefix="lk-dash-queries-") as tmp:
            workdir = Path(tmp)
            rules = _rule_file(workdir)
            config: dict[str, Any] = {
                "global": dict(promstack.TEST_GLOBAL),
                "scrape_configs": [
                    promstack.scrape_job("agent", f"{promstack.HOST}:{http_server.server_port}")
                ],
            }
            if rules is not None:
                config["rule_files"] = [str(rules)]
            history = openmetrics_history(end=time.time() - 30)
            with backfilled_prometheus(config, history, workdir) as server:
                server.wait_for('sum(rate(voice_agent_latency_seconds_count{job="agent"}[1m])) > 0')
                if rules is not None:
                    server.wait_for('ALERTS{alertname=~"VoiceAgent.*"}')
                    # the SLO dashboard reads the recordings: every SLO's group has evaluated
                    series = len(AGENTS) * len(DEFAULT_SLOS)
                    for record in ("slo:sli_turns:rate5m", "slo:sli_error:ratio_rate30d"):
                        server.wait_for(f"count({record}) == {series}")
                yield server, rules is not None
    finally:
        stop.set()
        generator.join(timeout=5)
        http_server.shutdown()


def _targets() -> list[tuple[str, str, str]]:
    """(dashboard, panel title + refId, expr) for every query of every generated dashboard."""
    found = []
    for name, text in sorted(render_dashboards(DEFAULT_SLOS).items()):
        board = json.loads(text)
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found.append((name, f"{panel['title']} [{target['refId']}]", target["expr"]))
    return found


def grafana_interpolate(expr: str, agent: str) -> str:
    """The query Grafana sends: macros and $agent filled in ($datasource is not in exprs)."""
    for macro, value in MACROS.items():
        expr = expr.replace(macro, value)
    expr = expr.replace("$agent", agent)
    leftover = re.findall(r"\$\w+", expr)
    assert not leftover, f"uninterpolated variables {leftover} in {expr}"
    return expr


def _has_number(rows: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(row["value"][1])) for row in rows)


def test_history_reaches_back_past_the_longest_burn_window(
    prom: tuple[BackfilledPrometheus, bool],
) -> None:
    server, _ = prom
    rows = server.query('count_over_time(voice_agent_active_sessions{source="backfill"}[3d])')
    assert rows and min(float(r["value"][1]) for r in rows) >= 3 * 86400 / HISTORY_STEP_S - 1


@pytest.mark.parametrize(("dashboard", "panel", "expr"), _targets(), ids=lambda v: str(v)[:60])
def test_panel_query_returns_data(
    prom: tuple[BackfilledPrometheus, bool], dashboard: str, panel: str, expr: str
) -> None:
    server, rules_loaded = prom
    if expr.startswith("ALERTS") and not rules_loaded:
        pytest.skip("lk_observe.rules not importable: without rules ALERTS is legitimately empty")
    for agent in AGENT_VALUES:
        query = grafana_interpolate(expr, agent)
        rows = server.query(query)
        assert rows, f"{dashboard}: {panel} returned nothing for agent={agent!r}: {query}"
        if not expr.startswith("ALERTS"):
            assert _has_number(rows), f"{dashboard}: {panel}: only NaN for {agent!r}: {rows}"


def _panel_exprs(title: str) -> dict[str, str]:
    """legendFormat -> expr of the components dashboard's panel `title`."""
    board = json.loads(render_dashboards(DEFAULT_SLOS)["voice-agent-components.json"])
    [panel] = [p for p in board["panels"] if p["title"] == title]
    return {t["legendFormat"]: t["expr"] for t in panel["targets"]}


@pytest.mark.parametrize("agent", AGENT_VALUES)
def test_where_the_wait_goes_stacks_up_to_the_mean_e2e(
    prom: tuple[BackfilledPrometheus, bool], agent: str
) -> None:
    """The breakdown parts, stacked, equal the mean e2e line: means add up. Read a day back,
    where only the backfill is (every series sampled at the same instants), over a window
    holding several of its 5-minute samples."""
    server, _ = prom
    exprs = _panel_exprs("Where the wait goes")
    at = time.time() - 86400

    def run(expr: str) -> list[dict[str, Any]]:
        query = grafana_interpolate(expr.replace("$__rate_interval", "30m"), agent)
        return promstack.query(server.url, query, at=at)

    parts = {
        row["metric"]["part"]: float(row["value"][1])
        for title in BREAKDOWN_TITLES.values()
        for row in run(exprs[title])
    }
    [mean] = [float(row["value"][1]) for row in run(exprs["mean e2e"])]
    assert set(parts) == set(BREAKDOWN_PARTS)
    assert all(value > 0 for value in parts.values()), parts
    assert 0.3 < mean < 2.0  # the e2e median is 0.7 s
    assert math.isclose(sum(parts.values()), mean, rel_tol=1e-6), (sum(parts.values()), mean)


def test_providers_table_has_one_row_per_component_provider_and_model(
    prom: tuple[BackfilledPrometheus, bool],
) -> None:
    """The three queries Grafana merges into the table: each gives one row per (component,
    provider, model) that served turns, none for turns without a provider."""
    server, _ = prom
    exprs = _panel_exprs("Providers per component")
    want = {(c, p, m) for c, pairs in MODELS.items() for p, m in pairs}
    for agent in AGENT_VALUES:
        for legend, expr in exprs.items():
            rows = server.query(grafana_interpolate(expr, agent))
            keys = [
                (r["metric"]["component"], r["metric"]["provider"], r["metric"]["model"])
                for r in rows
            ]
            assert sorted(keys) == sorted(want), (legend, agent, keys)
            values = [float(r["value"][1]) for r in rows]
            assert all(math.isfinite(v) and v > 0 for v in values), (legend, agent, rows)
            assert set(rows[0]["metric"]) == {"component", "provider", "model"}, rows[0]
