"""The ops app over real HTTP on loopback: every endpoint, readiness timeouts, a free loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from lk_observe.metrics import LatencyMetrics
from lk_observe.monitor import LatencyMonitor
from lk_observe.recent import RecentTurns
from lk_observe.server import Server, add_readiness_check, create_app, serve
from lk_observe.slo import DEFAULT_SLOS
from lk_observe.turns import Stage, Turn, tier_for

NO_MODEL = 'model="",provider=""'  # e2e belongs to no single provider
E2E_MS = [300.0, 420.0, 480.0, 650.0, 700.0, 790.0, 900.0, 1200.0]
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736


def make_turn(index: int, e2e_ms: float, *, agent: str = "support") -> Turn:
    start = 1_700_000_000.0 + index * 10
    return Turn(
        index=index,
        speech_id=f"SECRET_SPEECH_{index}",
        started_at=start,
        ended_at=start + e2e_ms / 1000 + 2,
        latency_ms={"e2e": e2e_ms, "stt": 150.0, "llm_ttft": 220.0, "tts_ttfb": 60.0},
        interrupted=False,
        tier=tier_for(e2e_ms),
        session_id="SECRET_SESSION",
        agent=agent,
        stages={
            "stt": Stage(start, start + 0.15),
            "llm_ttft": Stage(start + 0.15, start + 0.37),
            "tts_ttfb": Stage(start + 0.37, start + 0.43),
        },
        trace_id=TRACE_ID if index == 0 else None,
    )


class World:
    """One app's inputs, fed with the same turns, so each endpoint has a ground truth."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics = LatencyMetrics.for_registry(self.registry)
        self.monitor = LatencyMonitor(window_s=300)
        self.recent = RecentTurns(maxlen=5)
        self.turns = [make_turn(i, ms) for i, ms in enumerate(E2E_MS)]
        for turn in self.turns:
            self.metrics.observe_turn(turn)
            self.monitor.record_turn(turn)
            self.recent.add(turn)


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def start() -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def _start(**kwargs: Any) -> Server:
        server = serve(port=0, **kwargs)
        servers.append(server)
        return server

    yield _start
    for server in servers:
        assert server.stop(timeout_s=5.0), "server thread did not stop in time"


def app_kwargs(world: World) -> dict[str, Any]:
    return {"monitor": world.monitor, "registry": world.registry, "recent": world.recent}


def test_serve_binds_loopback_on_a_real_port(start: Callable[..., Server], world: World) -> None:
    server = start(**app_kwargs(world))
    assert server.host == "127.0.0.1"
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"


def test_stop_joins_within_its_bound(world: World) -> None:
    server = serve(port=0, **app_kwargs(world))
    with httpx.Client(base_url=server.url) as client:  # a kept-alive connection must not hang it
        assert client.get("/health").status_code == 200
        began = time.monotonic()
        assert server.stop(timeout_s=4.0)
    assert time.monotonic() - began < 4.0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health", timeout=1.0)


def test_health_is_always_ok(start: Callable[..., Server], world: World) -> None:
    async def never_ready() -> bool:
        return False

    server = start(**app_kwargs(world), checks={"llm": never_ready})
    response = httpx.get(f"{server.url}/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready_is_200_when_every_check_passes(start: Callable[..., Server], world: World) -> None:
    async def vad_loaded() -> bool:
        return True

    server = start(**app_kwargs(world), checks={"vad": vad_loaded})
    response = httpx.get(f"{server.url}/ready")
    assert response.status_code == 200
    body = response.json()
    assert body.pop("span_export")["healthy"] is True  # exporter health rides along as detail
    assert body == {"ready": True, "checks": {"vad": "ok"}, "failing": []}


def test_ready_is_503_listing_failing_raising_and_hanging_checks(
    start: Callable[..., Server], world: World
) -> None:
    async def ok() -> bool:
        return True

    async def stt_down() -> bool:
        return False

    async def tts_raises() -> bool:
        raise ConnectionError("https://api.example/tts?key=SECRET_KEY")

    async def llm_hangs() -> bool:
        await asyncio.sleep(3600)
        return True

    async def stubborn() -> bool:  # swallows cancellation: must still not hang /ready
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                return True

    server = start(
        **app_kwargs(world),
        checks={"vad": ok, "stt": stt_down, "tts": tts_raises, "llm": llm_hangs, "x": stubborn},
        check_timeout_s=0.3,
    )
    began = time.monotonic()
    response = httpx.get(f"{server.url}/ready", timeout=5.0)
    elapsed = time.monotonic() - began
    assert response.status_code == 503
    body = response.json()
    assert body["ready"] is False
    assert body["checks"] == {
        "vad": "ok",
        "stt": "failed",
        "tts": "error",
        "llm": "timeout",
        "x": "timeout",
    }
    assert body["failing"] == ["llm", "stt", "tts", "x"]
    report = httpx.get(f"{server.url}/ready", params={"report": "1"}, timeout=5.0)
    assert report.status_code == 200
    assert report.json()["failing"] == ["llm", "stt", "tts", "x"]
    assert 0.3 <= elapsed < 1.5  # concurrent: one timeout, not one per check
    assert "SECRET_KEY" not in response.text


def test_checks_added_after_creation_are_run(start: Callable[..., Server], world: World) -> None:
    app = create_app(**app_kwargs(world))

    async def stt_down() -> bool:
        return False

    add_readiness_check(app, "stt", stt_down)
    server = Server(app, "127.0.0.1", 0)
    server.start()
    try:
        response = httpx.get(f"{server.url}/ready")
        assert response.status_code == 503
        assert response.json()["failing"] == ["stt"]
    finally:
        assert server.stop()


def test_metrics_text_matches_the_observed_turns(
    start: Callable[..., Server], world: World
) -> None:
    server = start(**app_kwargs(world))
    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    n = len(E2E_MS)
    assert (
        f'voice_agent_latency_seconds_count{{agent="support",component="e2e",{NO_MODEL}}} {n}.0'
        in text
    )
    under_800 = sum(1 for ms in E2E_MS if ms <= 800)
    assert (
        f'voice_agent_latency_seconds_bucket{{agent="support",component="e2e",le="0.8",'
        f"{NO_MODEL}}} "
        f"{under_800}.0" in text
    )
    slow = sum(1 for ms in E2E_MS if ms >= 800)
    assert f'voice_agent_turns_total{{agent="support",tier="slow"}} {slow}.0' in text
    assert "trace_id" not in text


def test_metrics_speaks_openmetrics_with_exemplars_when_asked(
    start: Callable[..., Server], world: World
) -> None:
    server = start(**app_kwargs(world))
    response = httpx.get(
        f"{server.url}/metrics",
        headers={"Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"},
    )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert f'# {{trace_id="{TRACE_ID:032x}"}} 0.3' in response.text
    assert response.text.rstrip().endswith("# EOF")


def test_latency_endpoint_returns_the_monitor_stats(
    start: Callable[..., Server], world: World
) -> None:
    world.monitor.record_turn(make_turn(99, 250.0, agent="sales"))
    server = start(**app_kwargs(world))
    everything = httpx.get(f"{server.url}/metrics/latency").json()
    assert everything == world.monitor.get_all_stats()
    assert everything["e2e"]["count"] == len(E2E_MS) + 1
    sales = httpx.get(f"{server.url}/metrics/latency", params={"agent": "sales"}).json()
    assert sales == world.monitor.get_all_stats(agent="sales")
    assert sales["e2e"]["count"] == 1
    assert httpx.get(f"{server.url}/metrics/latency", params={"agent": "nobody"}).json() == {}


def test_slo_endpoint_evaluates_each_slo(start: Callable[..., Server], world: World) -> None:
    server = start(**app_kwargs(world))
    statuses = httpx.get(f"{server.url}/slo").json()
    assert [s["name"] for s in statuses] == [slo.name for slo in DEFAULT_SLOS]
    by_name = {s["name"]: s for s in statuses}
    assert by_name["e2e_good"]["turns"] == len(E2E_MS)
    assert by_name["e2e_good"]["good_turns"] == sum(1 for ms in E2E_MS if ms <= 800)
    assert by_name["e2e_excellent"]["good_turns"] == sum(1 for ms in E2E_MS if ms <= 500)


def test_recent_turns_are_bounded_and_carry_no_private_ids(
    start: Callable[..., Server], world: World
) -> None:
    server = start(**app_kwargs(world))
    response = httpx.get(f"{server.url}/turns/recent")
    turns = response.json()
    assert [t["index"] for t in turns] == [3, 4, 5, 6, 7]  # maxlen 5, oldest first
    last = turns[-1]
    assert last["latency_ms"]["e2e"] == E2E_MS[7]
    assert last["tier"] == "slow"
    assert last["stages"]["stt"] == pytest.approx([0.0, 150.0], abs=1e-3)
    assert last["stages"]["tts_ttfb"] == pytest.approx([370.0, 430.0], abs=1e-3)
    assert "SECRET" not in response.text
    assert "speech_id" not in last and "session_id" not in last


def test_live_page_and_its_assets_are_local_only(
    start: Callable[..., Server], world: World
) -> None:
    server = start(**app_kwargs(world))
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for asset, kind in (("/static/app.js", "text/javascript"), ("/static/style.css", "text/css")):
        response = httpx.get(f"{server.url}{asset}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(kind)
        assert "http://" not in response.text and "https://" not in response.text
    assert "http://" not in page.text and "https://" not in page.text
    assert httpx.get(f"{server.url}/static/../server.py").status_code == 404
    assert httpx.get(f"{server.url}/static/secret.txt").status_code == 404
    assert httpx.get(f"{server.url}/favicon.ico").status_code == 204


class _SlowCollector(Collector):
    """Stands in for a huge registry: collecting holds the calling thread for `seconds`."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def collect(self) -> Iterator[GaugeMetricFamily]:
        time.sleep(self.seconds)
        yield GaugeMetricFamily("slow_collector_value", "A value slow to collect", value=1.0)


def test_metrics_render_does_not_block_the_event_loop(
    start: Callable[..., Server], world: World
) -> None:
    world.registry.register(_SlowCollector(1.0))
    server = start(**app_kwargs(world))
    scraped: list[httpx.Response] = []
    scrape = threading.Thread(
        target=lambda: scraped.append(httpx.get(f"{server.url}/metrics", timeout=10.0))
    )
    health_latencies: list[float] = []
    with httpx.Client(base_url=server.url, timeout=5.0) as client:
        client.get("/health")
        scrape.start()
        time.sleep(0.1)  # the scrape is now rendering
        while scrape.is_alive():
            began = time.monotonic()
            assert client.get("/health").status_code == 200
            health_latencies.append(time.monotonic() - began)
            time.sleep(0.02)
    scrape.join()
    assert b"slow_collector_value 1.0" in scraped[0].content
    assert len(health_latencies) >= 10
    # rendered on the loop, /health would have waited ~1 s behind it
    assert max(health_latencies) < 0.25, max(health_latencies)


def test_metrics_render_of_a_large_registry_keeps_the_loop_responsive(
    start: Callable[..., Server], world: World
) -> None:
    # the realistic case: many series, CPU-bound rendering holding the GIL in bursts
    for agent in range(20):
        for i in range(6):
            world.metrics.observe_turn(make_turn(i, 100.0 * (i + 1), agent=f"agent-{agent}"))
    for n in range(1000):
        big = GaugeMetricFamily(f"filler_{n}", "Filler", labels=["k"])
        for k in range(100):
            big.add_metric([str(k)], float(k))
        world.registry.register(_Static(big))
    server = start(**app_kwargs(world))
    began = time.monotonic()
    body = httpx.get(f"{server.url}/metrics", timeout=30.0).content
    render_s = time.monotonic() - began
    assert body.count(b"\n") > 100_000
    lags: list[float] = []
    scrape = threading.Thread(target=lambda: httpx.get(f"{server.url}/metrics", timeout=30.0))
    with httpx.Client(base_url=server.url, timeout=5.0) as client:
        scrape.start()
        while scrape.is_alive():
            began = time.monotonic()
            client.get("/health")
            lags.append(time.monotonic() - began)
    scrape.join()
    assert lags
    assert max(lags) < max(0.15, render_s / 3), (max(lags), render_s)


class _Static(Collector):
    def __init__(self, family: GaugeMetricFamily) -> None:
        self.family = family

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield self.family


def test_nan_in_stats_does_not_break_json(start: Callable[..., Server], world: World) -> None:
    class NanMonitor(LatencyMonitor):
        def get_all_stats(self, *, agent: str | None = None) -> dict[str, dict[str, float | int]]:
            return {"e2e": {"count": 1, "mean": float("nan"), "p95": float("inf")}}

    server = start(monitor=NanMonitor(), registry=world.registry, recent=world.recent)
    response = httpx.get(f"{server.url}/metrics/latency")
    assert response.status_code == 200
    assert response.json() == {"e2e": {"count": 1, "mean": None, "p95": None}}


def test_ready_shows_a_dead_collector_as_detail_and_stays_ready(
    start: Callable[..., Server], world: World
) -> None:
    import socket

    import lk_observe

    with socket.socket() as probe:  # a loopback port nobody listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    provider = lk_observe.configure_tracing(
        endpoint=f"http://127.0.0.1:{dead}", protocol="http/protobuf", timeout_s=0.5
    )
    try:
        provider.get_tracer("t").start_span("s").end()
        lk_observe.flush_tracing(provider, 2.0)
        server = start(**app_kwargs(world))
        response = httpx.get(f"{server.url}/ready")
        assert response.status_code == 200
        body = response.json()
        assert body["ready"] is True and body["failing"] == []
        assert body["span_export"]["healthy"] is False
        assert body["span_export"]["failed"] >= 1
    finally:
        lk_observe.shutdown_tracing(provider, 2.0)
