"""Generated alert rules on a real Prometheus, routed by a real Alertmanager to a webhook.

Four agents share one stack so their scenarios run concurrently (the module stays ~30 s):
  breach   healthy for a few seconds, then every turn slow: must page (p95 and fast burn)
  healthy  fast turns throughout: must never notify, nor even go pending
  quiet    one slow turn at "3 a.m." on an idle agent: must never notify (traffic guard)
  stuck    a session open and no turn ever: must page VoiceAgentNoTurns

Windows: the rules come from the same generator as alerting/lk-observe.rules.yml, for an SLO
whose burn windows are shrunk (1m/10s page, 3m/30s ticket) and with `for` durations cut, so the
alerts fire in seconds. We shrink rather than backfill history because backfilling needs blocks
ending at "now" written before Prometheus starts, plus one `create-blocks-from rules` pass per
level of recorded series; shrinking runs the exact expressions the generator writes for any
window, and promtool tests (alerting/tests/) cover the real 1h..3d windows.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from lk_observe.promql import LATENCY_BUCKETS_S
from lk_observe.rules import (
    BURN_ALERT,
    NO_TURNS_ALERT,
    P95_ALERT,
    RULES_FILE,
    AlertOptions,
    alertmanager_example,
    render_alerting_files,
    render_rule_file,
)
from lk_observe.slo import SLO, BurnWindow
from tests import promstack

pytestmark = pytest.mark.timeout(120)

HOST = promstack.HOST
FAST_S = 0.3
SLOW_S = 1.2
TURNS_PER_S = 10.0
WARMUP_S = 3.0  # healthy traffic seen before the breach, so the burn has history to overcome
QUIET_WAIT_S = 20.0  # evaluations that must pass before "never notified" means something

E2E_SLO = SLO(
    name="e2e_good",
    component="e2e",
    threshold_s=0.8,
    objective=0.95,
    severity="page",
    windows=(BurnWindow("1m", "10s", 14.4, "page"), BurnWindow("3m", "30s", 1.0, "ticket")),
    # 10 turns/min: one turn in the 1m window is under the guard, 10 turns/s is well over it.
    min_turns_per_hour=600,
)
# NoTurns must hold longer than two scrapes: increase() needs two samples to see any turn.
E2E_OPTIONS = AlertOptions(p95_for="0s", no_turns_window="15s", no_turns_for="5s")


# --- Traffic source -----------------------------------------------------------------------


def tier_of(e2e_s: float) -> str:
    return "excellent" if e2e_s < 0.5 else "good" if e2e_s < 0.8 else "slow"


@dataclass
class TurnMetrics:
    """The metric families an instrumented agent exports, and where Prometheus scrapes them."""

    target: str
    latency: Histogram
    turns: Counter
    active_sessions: Gauge

    def turn(self, agent: str, e2e_s: float) -> None:
        self.latency.labels(component="e2e", agent=agent).observe(e2e_s)
        self.turns.labels(agent=agent, tier=tier_of(e2e_s)).inc()

    def set_active_sessions(self, agent: str, count: int) -> None:
        self.active_sessions.labels(agent=agent).set(count)


@contextmanager
def serve_turn_metrics(agents: list[str]) -> Iterator[TurnMetrics]:
    """Serve the metric contract on a loopback port; feed it with `.turn(...)`.

    The one place the e2e test gets its metrics: swap the body for a real instrumented
    AgentSession (lk_observe.instrument + its /metrics) and the assertions stay the same.
    """
    registry = CollectorRegistry()
    metrics = TurnMetrics(
        target="",
        latency=Histogram(
            "voice_agent_latency_seconds",
            "Voice agent latency by component",
            ["component", "agent"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        ),
        turns=Counter(
            "voice_agent_turns", "Turns by latency tier", ["agent", "tier"], registry=registry
        ),
        active_sessions=Gauge(
            "voice_agent_active_sessions", "Open sessions", ["agent"], registry=registry
        ),
    )
    Counter("voice_agent_sessions", "Sessions started", ["agent"], registry=registry)
    Counter("voice_agent_errors", "Errors", ["agent", "error_type"], registry=registry)
    server, thread = start_http_server(0, addr=HOST, registry=registry)
    metrics.target = f"{HOST}:{server.server_port}"
    try:
        for agent in agents:
            # Export zeros before the first turn, as an instrumented session does: Prometheus
            # cannot see the increase of a series whose first sample is already 1.
            metrics.latency.labels(component="e2e", agent=agent)
            for tier in ("excellent", "good", "slow"):
                metrics.turns.labels(agent=agent, tier=tier)
            metrics.set_active_sessions(agent, 0)
        yield metrics
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class Traffic(threading.Thread):
    """Emits turns per agent at a steady rate; change `latency_s[agent]` to change the mix."""

    def __init__(self, metrics: TurnMetrics, latency_s: dict[str, float]) -> None:
        super().__init__(daemon=True)
        self.metrics = metrics
        self.latency_s = dict(latency_s)
        self.stopped = threading.Event()

    def run(self) -> None:
        tick = 1.0 / TURNS_PER_S
        while not self.stopped.wait(tick):
            for agent, latency in list(self.latency_s.items()):
                self.metrics.turn(agent, latency)


# --- Webhook receiver ---------------------------------------------------------------------


@dataclass
class Notification:
    path: str  # /pager or /tickets: which Alertmanager receiver sent it
    received: float  # time.monotonic()
    status: str
    labels: dict[str, str]
    annotations: dict[str, str]


@dataclass
class Webhook:
    url: str
    notifications: list[Notification] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def matching(self, **labels: str) -> list[Notification]:
        with self.lock:
            return [
                n
                for n in self.notifications
                if n.status == "firing" and all(n.labels.get(k) == v for k, v in labels.items())
            ]

    def wait_for(self, timeout: float, **labels: str) -> Notification:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.matching(**labels)
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"no notification with {labels} after {timeout}s: {self.all()}")

    def all(self) -> list[Notification]:
        with self.lock:
            return list(self.notifications)


@contextmanager
def webhook_receiver() -> Iterator[Webhook]:
    hook = Webhook(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            now = time.monotonic()
            with hook.lock:
                for alert in body["alerts"]:
                    hook.notifications.append(
                        Notification(
                            self.path, now, alert["status"], alert["labels"], alert["annotations"]
                        )
                    )
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep pytest output for the measurements

    server = ThreadingHTTPServer((HOST, 0), Handler)
    hook.url = f"http://{HOST}:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hook
    finally:
        server.shutdown()
        server.server_close()


def alertmanager_config(hook_url: str) -> dict[str, Any]:
    """The shipped example's routing (pages vs tickets), pointed at the test's webhook.

    Each receiver posts to <hook>/<receiver name>, so the path says where an alert was routed.
    """
    config = alertmanager_example()
    for receiver in config["receivers"]:
        receiver["webhook_configs"] = [{"url": f"{hook_url}/{receiver['name']}"}]
    # Notify at once: the test measures our rules and routing, not production batching.
    config["route"].update(group_wait="0s", group_interval="1s", repeat_interval="1h")
    for child in config["route"]["routes"]:
        child["group_wait"] = "0s"
    # The example holds a ticket back while a page fires for the same SLO and agent; compressed
    # into minutes, the p95 page and the slow burn fire within a second of each other, and which
    # comes first is a race. Routing is what this measures (the inhibition is checked apart).
    config.pop("inhibit_rules", None)
    return config


def test_the_example_holds_tickets_back_while_the_same_slo_pages() -> None:
    [rule] = alertmanager_example()["inhibit_rules"]
    assert rule["source_matchers"] == ['severity="page"']
    assert rule["target_matchers"] == ['severity="ticket"']
    assert set(rule["equal"]) == {"slo", "agent"}


# --- The stack ----------------------------------------------------------------------------


@dataclass
class Stack:
    prom: promstack.Server
    hook: Webhook
    traffic: Traffic
    breach_started: float

    def wait_quiet_period(self) -> None:
        """Let enough evaluations pass that silence is evidence, not just an early look."""
        remaining = self.breach_started + QUIET_WAIT_S - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    rules: Path = tmp_path_factory.mktemp("rules") / "e2e.rules.yml"
    rules.write_text(render_rule_file([E2E_SLO], E2E_OPTIONS))
    agents = ["breach", "healthy", "quiet", "stuck"]
    with (
        webhook_receiver() as hook,
        serve_turn_metrics(agents) as metrics,
        promstack.alertmanager(alertmanager_config(hook.url)) as am,
    ):
        for agent in ("breach", "healthy", "stuck"):
            metrics.set_active_sessions(agent, 2)
        # Traffic starts before Prometheus so the first two scrapes already see turns flowing.
        traffic = Traffic(metrics, {"breach": FAST_S, "healthy": FAST_S})
        traffic.start()
        try:
            with promstack.prometheus(
                {"scrape_configs": [promstack.scrape_job("voice-agent", metrics.target)]},
                [rules],
                alertmanager_url=am.url,
            ) as prom:
                prom.wait_for('up{job="voice-agent"} == 1')
                metrics.turn("quiet", 2.0)  # the lone slow turn at 3 a.m.
                time.sleep(WARMUP_S)
                traffic.latency_s["breach"] = SLOW_S
                yield Stack(prom, hook, traffic, breach_started=time.monotonic())
        finally:
            traffic.stopped.set()
            traffic.join(timeout=5)


# --- Tests --------------------------------------------------------------------------------


def test_latency_breach_pages_p95_and_fast_burn(stack: Stack) -> None:
    p95 = stack.hook.wait_for(45, alertname=P95_ALERT, agent="breach")
    burn = stack.hook.wait_for(45, alertname=BURN_ALERT, agent="breach", long_window="1m")
    p95_s = p95.received - stack.breach_started
    burn_s = burn.received - stack.breach_started
    print(f"\nbreach -> page: {P95_ALERT} {p95_s:.1f}s, {BURN_ALERT} (1m/10s) {burn_s:.1f}s")
    for note in (p95, burn):
        assert note.path == "/pager"
        assert note.labels["severity"] == "page"
        assert note.labels["slo"] == "e2e_good"
        assert note.labels["component"] == "e2e"
        assert note.annotations["runbook_url"].endswith(".md")
    assert "s above 800ms" in p95.annotations["summary"]  # measured p95 rendered, e.g. 1.4s
    assert "%" in burn.annotations["description"]
    # Scrape 1s + evaluation 1s + Alertmanager group_wait 0s: a few seconds, not a minute.
    assert p95_s < 15
    assert burn_s < 30


def test_ticket_windows_route_to_tickets_not_pager(stack: Stack) -> None:
    ticket = stack.hook.wait_for(45, alertname=BURN_ALERT, agent="breach", long_window="3m")
    assert ticket.path == "/tickets"
    assert ticket.labels["severity"] == "ticket"
    stack.wait_quiet_period()
    assert all(n.labels["severity"] == "page" for n in stack.hook.all() if n.path == "/pager")


def test_sessions_without_turns_page(stack: Stack) -> None:
    note = stack.hook.wait_for(45, alertname=NO_TURNS_ALERT, agent="stuck")
    assert note.path == "/pager"
    assert note.annotations["description"].startswith("Agent stuck has 2 active session(s)")


def test_healthy_traffic_never_notifies(stack: Stack) -> None:
    stack.wait_quiet_period()
    assert stack.prom.query('slo:sli_turns:rate10s{agent="healthy"} > 5'), "no healthy traffic?"
    assert stack.hook.matching(agent="healthy") == []
    # Not even pending: Prometheus itself holds no alert for the healthy agent.
    assert [a for a in stack.prom.alerts() if a["labels"].get("agent") == "healthy"] == []


def test_single_slow_turn_on_idle_agent_never_notifies(stack: Stack) -> None:
    stack.wait_quiet_period()
    # The SLI really is 100% bad for the quiet agent; only the traffic guard keeps it silent.
    assert stack.prom.query('slo:sli_error:ratio_rate1m{agent="quiet"} > 0.72')
    assert stack.hook.matching(agent="quiet") == []
    assert [a for a in stack.prom.alerts() if a["labels"].get("agent") == "quiet"] == []


def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_promtool_accepts_generated_rules_and_configs(tmp_path: Path) -> None:
    write_tree(tmp_path, render_alerting_files())
    checked = promstack.promtool("check", "rules", str(tmp_path / RULES_FILE))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 49 rules found" in checked.stdout  # 24 per SLO (3 for its period), 1 more
    config = promstack.promtool("check", "config", str(tmp_path / "prometheus.example.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    amtool = promstack.binaries() / "amtool"
    am = subprocess.run(
        [str(amtool), "check-config", str(tmp_path / "alertmanager.example.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert am.returncode == 0, am.stdout + am.stderr


def test_promtool_accepts_rules_for_custom_slos(tmp_path: Path) -> None:
    slos = (
        SLO(
            name="ttft",
            component="llm_ttft",
            threshold_s=0.3,
            objective=0.99,
            windows=(BurnWindow("2h", "10m", 10.0, "page"),),
        ),
        SLO(name="tts", component="tts_ttfb", threshold_s=0.1, objective=0.9, severity="ticket"),
    )
    path = tmp_path / "custom.rules.yml"
    path.write_text(render_rule_file(slos))
    checked = promstack.promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
