"""The whole path with real parts: instrumented scripted AgentSessions -> lk_observe's ops app
/metrics -> Prometheus (generated rules) -> Alertmanager (shipped routing) -> a webhook.

Agent "slowbot" answers every turn in ~1.3 s (its LLM is slow): it must page. Agent "fastbot"
answers in ~0.45 s: it must never notify. Windows are shrunk as in test_alerting_e2e.py so the
burn-rate page fires in seconds; the p95 alert looks at the last minute.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import lk_observe
from lk_observe.demo import ScriptedTurn, build_pipeline, run_pipeline
from lk_observe.rules import BURN_ALERT, P95_ALERT, AlertOptions, render_rule_file
from lk_observe.server import serve
from lk_observe.slo import SLO, BurnWindow
from tests import promstack
from tests.integration.test_alerting_e2e import Webhook, alertmanager_config, webhook_receiver

pytestmark = pytest.mark.timeout(180)

SLO_UNDER_TEST = SLO(
    name="e2e_good",
    component="e2e",
    threshold_s=0.8,
    objective=0.95,
    severity="page",
    windows=(BurnWindow("1m", "10s", 14.4, "page"),),
    min_turns_per_hour=600,
)
OPTIONS = AlertOptions(p95_window="1m", p95_for="0s")
SESSIONS_PER_AGENT = 3
TURNS_PER_SESSION = 14


def _script(slow: bool) -> list[ScriptedTurn]:
    turn = ScriptedTurn(
        speech_s=0.5,
        vad_s=0.2 if slow else 0.15,
        stt_s=0.15 if slow else 0.1,
        llm_ttft_s=0.9 if slow else 0.1,
        llm_total_s=1.0 if slow else 0.3,
        tts_ttfb_s=0.05,
        reply_audio_s=0.3,
        gap_s=0.2,
    )
    return [turn] * TURNS_PER_SESSION


@dataclass
class Traffic:
    thread: threading.Thread
    started: float
    turns: dict[str, list[lk_observe.Turn]]


def _play(registry: CollectorRegistry, monitor: lk_observe.LatencyMonitor, out: Traffic) -> None:
    async def one(agent: str, slow: bool) -> None:
        pipeline = build_pipeline(_script(slow))
        lk_observe.instrument(
            pipeline.session,
            agent_name=agent,
            registry=registry,
            monitor=monitor,
            on_turn=out.turns[agent].append,
        )
        await run_pipeline(pipeline)

    async def main() -> None:
        await asyncio.gather(
            *(one("slowbot", True) for _ in range(SESSIONS_PER_AGENT)),
            *(one("fastbot", False) for _ in range(SESSIONS_PER_AGENT)),
        )

    asyncio.run(main())


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Webhook, Traffic, object]]:
    rules: Path = tmp_path_factory.mktemp("rules") / "session.rules.yml"
    rules.write_text(render_rule_file([SLO_UNDER_TEST], OPTIONS))
    registry = CollectorRegistry()
    monitor = lk_observe.LatencyMonitor()
    ops = serve(port=0, registry=registry, monitor=monitor)
    traffic = Traffic(threading.Thread(), 0.0, {"slowbot": [], "fastbot": []})
    try:
        with (
            webhook_receiver() as hook,
            promstack.alertmanager(alertmanager_config(hook.url)) as am,
            promstack.prometheus(
                {"scrape_configs": [promstack.scrape_job("agents", f"127.0.0.1:{ops.port}")]},
                [rules],
                alertmanager_url=am.url,
            ) as prom,
        ):
            prom.wait_for('up{job="agents"} == 1')
            traffic.thread = threading.Thread(
                target=_play, args=(registry, monitor, traffic), daemon=True
            )
            traffic.started = time.monotonic()
            traffic.thread.start()
            yield hook, traffic, prom
            traffic.thread.join(timeout=120)
    finally:
        ops.stop()


def test_slow_agent_pages_through_the_real_pipeline(run: tuple[Webhook, Traffic, object]) -> None:
    hook, traffic, _ = run
    p95 = hook.wait_for(90, alertname=P95_ALERT, agent="slowbot")
    burn = hook.wait_for(90, alertname=BURN_ALERT, agent="slowbot")
    first_slow = min(
        (t.ended_at for t in traffic.turns["slowbot"] if t.tier == "slow"), default=None
    )
    assert first_slow is not None
    print(
        f"\nreal sessions -> page: {P95_ALERT} {p95.received - traffic.started:.1f}s, "
        f"{BURN_ALERT} {burn.received - traffic.started:.1f}s after traffic started"
    )
    assert p95.path == "/pager" and burn.path == "/pager"
    assert p95.labels["severity"] == "page"


def test_fast_agent_never_notifies(run: tuple[Webhook, Traffic, object]) -> None:
    hook, traffic, prom = run
    traffic.thread.join(timeout=120)
    assert not traffic.thread.is_alive()
    fast = traffic.turns["fastbot"]
    assert len(fast) == SESSIONS_PER_AGENT * TURNS_PER_SESSION
    assert all(t.tier in ("excellent", "good") for t in fast)  # ~0.35 s, even on a busy machine
    assert hook.matching(agent="fastbot") == []
    assert [a for a in prom.alerts() if a["labels"].get("agent") == "fastbot"] == []  # type: ignore[attr-defined]


def test_scraped_counts_equal_the_turns_that_happened(run: tuple[Webhook, Traffic, object]) -> None:
    _, traffic, prom = run
    traffic.thread.join(timeout=120)
    time.sleep(2.5)  # two scrape intervals after the last turn
    for agent, turns in traffic.turns.items():
        result = prom.query(  # type: ignore[attr-defined]
            f'sum(voice_agent_latency_seconds_count{{component="e2e",agent="{agent}"}})'
        )
        assert float(result[0]["value"][1]) == len([t for t in turns if "e2e" in t.latency_ms])
        tiers = prom.query(f'sum(voice_agent_turns_total{{agent="{agent}"}})')  # type: ignore[attr-defined]
        assert float(tiers[0]["value"][1]) == len([t for t in turns if t.tier is not None])
