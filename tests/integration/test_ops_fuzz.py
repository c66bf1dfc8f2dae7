"""The ops app under hostile or careless clients, over real HTTP on loopback.

Binds 127.0.0.1 by default; hypothesis-generated requests (methods, paths, query strings,
headers, bodies; and raw bytes for HTTP no client library would send) never get a 5xx and the
server keeps answering /health; a 1 MB header or body is refused or handled without memory
blow-up; slow /metrics scrapes do not take /health down; a hanging readiness check cannot hang
/ready; and no endpoint shows what the user said, what the agent answered, or a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

import lk_observe
from lk_observe.demo import ScriptedTurn, build_pipeline, run_pipeline
from lk_observe.metrics import LatencyMetrics
from lk_observe.monitor import LatencyMonitor
from lk_observe.recent import RecentTurns
from lk_observe.server import MAX_CONCURRENT_SCRAPES, Server, serve
from lk_observe.turns import Turn, tier_for

ENDPOINTS = (
    "/",
    "/health",
    "/ready",
    "/ready?report=1",
    "/metrics",
    "/metrics/latency",
    "/slo",
    "/turns/recent",
    "/turns/breakdown",
    "/static/app.js",
    "/static/style.css",
    "/favicon.ico",
)
FUZZ_EXAMPLES = 250
RAW_EXAMPLES = 150


def _rss_kb() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _world() -> tuple[CollectorRegistry, LatencyMonitor, RecentTurns]:
    registry = CollectorRegistry()
    metrics = LatencyMetrics.for_registry(registry)
    monitor = LatencyMonitor()
    recent = RecentTurns()
    for i, ms in enumerate((300.0, 650.0, 1200.0)):
        turn = Turn(
            index=i,
            speech_id=f"speech_{i}",
            started_at=time.time() - 2,
            ended_at=time.time() - 1,
            latency_ms={"e2e": ms, "stt": 150.0},
            interrupted=False,
            tier=tier_for(ms),
            agent="support",
        )
        metrics.observe_turn(turn)
        monitor.record_turn(turn)
        recent.add(turn)
    return registry, monitor, recent


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    registry, monitor, recent = _world()
    running = serve(port=0, registry=registry, monitor=monitor, recent=recent)
    yield running
    assert running.stop()


def _health(server: Server) -> None:
    response = httpx.get(f"{server.url}/health", timeout=5.0)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


# -- binding ------------------------------------------------------------------------------------


def test_ops_app_binds_loopback_only_by_default() -> None:
    running = serve(port=0)
    try:
        host, port = running._socket.getsockname()  # the socket uvicorn serves on
        assert host == "127.0.0.1"
        assert port == running.port != 0
        assert running.url == f"http://127.0.0.1:{running.port}"
    finally:
        assert running.stop()


# -- malformed requests through a client library -----------------------------------------------

_PATH_CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",))
_PERCENT_GARBAGE = st.sampled_from(
    ["%", "%%", "%zz", "%ff%fe", "%00", "%2e%2e/", "%C0%AF", "%u202e"]
)
_segment = st.one_of(
    st.text(_PATH_CHARS, max_size=40),
    _PERCENT_GARBAGE,
    st.sampled_from(["..", ".", "static", "metrics", "latency", "ready", "app.js", "%2F"]),
)
_path = st.one_of(
    st.sampled_from(ENDPOINTS),
    st.lists(_segment, max_size=6).map(lambda parts: "/" + "/".join(parts)),
)
_query = st.one_of(
    st.just(""),
    st.text(_PATH_CHARS, max_size=200),
    st.lists(_PERCENT_GARBAGE, max_size=20).map("".join),
    st.sampled_from(["agent=", "agent=%ff", "report=maybe", "report=1&report=0", "a=b&&&=="]),
    st.integers(1, 60_000).map(lambda n: "agent=" + "x" * n),  # huge, past any header limit
)
_header_value = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=300
).map(str.strip)
_headers = st.dictionaries(
    st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,30}", fullmatch=True).filter(
        lambda h: h.lower() not in {"host", "content-length", "transfer-encoding", "connection"}
    ),
    _header_value,
    max_size=6,
)
_accept = st.one_of(
    st.none(),
    st.sampled_from(["application/openmetrics-text", "text/plain", "*/*", "application/json"]),
    st.integers(1, 40_000).map(lambda n: "application/openmetrics-text;" + "q=0.9," * (n // 6)),
    _header_value,
)
_method = st.one_of(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE"]),
    st.from_regex(r"[A-Z]{1,12}", fullmatch=True),
)


@pytest.mark.timeout(240)
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=_method,
    path=_path,
    query=_query,
    headers=_headers,
    accept=_accept,
    body=st.one_of(st.just(b""), st.binary(max_size=4096)),
)
def test_malformed_requests_never_get_a_server_error(
    server: Server,
    method: str,
    path: str,
    query: str,
    headers: dict[str, str],
    accept: str | None,
    body: bytes,
) -> None:
    if accept is not None:
        headers = {**headers, "Accept": accept}
    raw_headers = [(k.encode(), v.encode("latin-1")) for k, v in headers.items()]
    url = httpx.URL(server.url + "/").copy_with(raw_path=_raw_target(path, query))
    with httpx.Client(timeout=10.0) as client:
        try:
            response = client.request(method, url, headers=raw_headers, content=body or None)
        except httpx.LocalProtocolError:
            reject()  # httpx itself will not send it; the raw-socket tests below do
        except httpx.RemoteProtocolError:
            pass  # the server refused to parse it and closed the connection: fine
        else:
            assert response.status_code < 500, (method, path, query, response.text[:200])
    _health(server)


def _raw_target(path: str, query: str) -> bytes:
    # percent-encode only what cannot go on the request line; keep percent garbage as it is
    target = path.encode("utf-8")
    target = b"".join(
        bytes([b]) if 0x21 <= b <= 0x7E and b not in b"#?" else b"%%%02X" % b for b in target
    )
    if query:
        q = b"".join(
            bytes([b]) if 0x21 <= b <= 0x7E and b != ord("#") else b"%%%02X" % b
            for b in query.encode("utf-8")
        )
        target += b"?" + q
    return target


# -- malformed HTTP on a raw socket -------------------------------------------------------------


def _raw_exchange(server: Server, payload: bytes, timeout: float = 5.0) -> int | None:
    """Send `payload`, half-close, read the reply; its status, or None if the server just closed."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server may reset before taking it all
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        reply = b""
        with contextlib.suppress(OSError):
            while len(reply) < 65536:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
    if not reply:
        return None
    line = reply.split(b"\r\n", 1)[0]
    assert line.startswith(b"HTTP/1."), reply[:200]
    return int(line.split()[1])


HANDCRAFTED = [
    b"GARBAGE\r\n\r\n",
    b"\r\n\r\n\r\n",
    b"\x00\x01\x02\xff\xfe\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /health\r\n\r\n",  # HTTP/0.9
    b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\n\r\n",  # no Host
    b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\n: empty name\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX: \x00\x01\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\n folded: continuation\r\n\r\n",
    b"GET /\xff\xfe\x80 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /metrics?%ff%zz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /metrics/latency?agent=%ff%fe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /static/..%2f..%2fpyproject.toml HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /static/../../pyproject.toml HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET http://evil.example/health HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
    b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\nab",
    b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n0\r\n\r\n",
    b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n"
    b"\r\n0\r\n\r\n",
    b"POST /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nshort",
    b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\n\r\n",  # pipelined, 2nd bad
    b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(5000)) + b"\r\n",
]


@pytest.mark.timeout(120)
def test_handcrafted_broken_http_gets_a_4xx_or_a_closed_connection(server: Server) -> None:
    statuses = []
    for payload in HANDCRAFTED:
        status = _raw_exchange(server, payload)
        statuses.append(status)
        assert status is None or status < 500, (payload[:80], status)
    _health(server)
    assert any(s is not None and 400 <= s < 500 for s in statuses)


@pytest.mark.timeout(240)
@settings(
    max_examples=RAW_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    line=st.one_of(
        st.binary(max_size=300),
        st.tuples(
            st.sampled_from([b"GET", b"POST", b"HEAD", b"get", b"G\x00T", b""]),
            st.binary(max_size=80),
            st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1\x00", b""]),
        ).map(lambda t: b" ".join(t)),
    ),
    headers=st.lists(st.binary(max_size=120), max_size=8),
    body=st.binary(max_size=512),
)
def test_random_bytes_on_the_wire_never_get_a_server_error(
    server: Server, line: bytes, headers: list[bytes], body: bytes
) -> None:
    payload = line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body
    status = _raw_exchange(server, payload)
    assert status is None or status < 500, (payload[:120], status)
    _health(server)


# -- huge requests -----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_one_megabyte_headers_and_bodies_are_refused_without_memory_blow_up(
    server: Server,
) -> None:
    big = b"x" * (1024 * 1024)
    requests = [
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + big + b"\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: " + big + b"\r\n\r\n",
        b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big) + big,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big) + big,
        b"POST /ready HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % len(big)
        + big
        + b"\r\n0\r\n\r\n",
    ]
    for payload in requests:  # warm-up: buffers and code paths exist before we measure
        _raw_exchange(server, payload, timeout=15.0)
    before = _rss_kb()
    for _ in range(6):
        for payload in requests:
            status = _raw_exchange(server, payload, timeout=15.0)
            assert status is None or status < 500
    growth_kb = _rss_kb() - before
    # 30 MB went over the wire; what stays is at most a few buffers' worth
    assert growth_kb < 24 * 1024, growth_kb
    _health(server)


# -- slow scrapes and the liveness probe ---------------------------------------------------------


class _SlowCollector:
    """A collector that takes `delay_s` to collect (a slow multiprocess dir, a big registry)."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def collect(self) -> Iterator[GaugeMetricFamily]:
        time.sleep(self.delay_s)
        yield GaugeMetricFamily("slow_collector", "takes its time", value=1.0)


async def _health_during_scrapes(url: str, scrapes: int) -> tuple[int, float, list[int]]:
    limits = httpx.Limits(max_connections=scrapes + 8)
    async with httpx.AsyncClient(base_url=url, timeout=30.0, limits=limits) as client:
        in_flight = [asyncio.create_task(client.get("/metrics")) for _ in range(scrapes)]
        await asyncio.sleep(0.5)  # every scrape is inside the app, rendering
        async with httpx.AsyncClient(base_url=url, timeout=30.0) as probe:
            start = time.monotonic()
            health = await probe.get("/health")
            took = time.monotonic() - start
        statuses = [r.status_code for r in await asyncio.gather(*in_flight)]
    return health.status_code, took, statuses


@pytest.fixture
def slow_metrics_server() -> Iterator[Server]:
    registry = CollectorRegistry()
    registry.register(_SlowCollector(1.5))  # type: ignore[arg-type]
    running = serve(port=0, registry=registry, monitor=LatencyMonitor())
    yield running
    assert running.stop()


@pytest.mark.timeout(60)
async def test_slow_scrapes_under_the_limit_leave_health_fast(slow_metrics_server: Server) -> None:
    scrapes = MAX_CONCURRENT_SCRAPES
    status, took, statuses = await _health_during_scrapes(slow_metrics_server.url, scrapes)
    assert status == 200
    assert took < 0.5  # rendering runs off the loop: the probe does not wait for it
    assert statuses == [200] * scrapes


@pytest.mark.timeout(60)
async def test_scrapes_past_the_limit_are_refused_not_queued(slow_metrics_server: Server) -> None:
    start = time.monotonic()
    status, took, statuses = await _health_during_scrapes(slow_metrics_server.url, 80)
    assert status == 200 and took < 0.5
    assert statuses.count(200) <= MAX_CONCURRENT_SCRAPES
    # refused at once, not queued behind the slow ones
    assert statuses.count(503) >= 80 - MAX_CONCURRENT_SCRAPES
    assert time.monotonic() - start < 10.0


@pytest.mark.timeout(60)
async def test_slow_scrapes_at_the_limit_do_not_fail_the_liveness_probe(
    slow_metrics_server: Server,
) -> None:
    status, took, _ = await _health_during_scrapes(slow_metrics_server.url, 31)
    assert status == 200
    assert took < 0.5


# -- readiness checks that hang ----------------------------------------------------------------


async def _hangs() -> bool:
    await asyncio.Event().wait()
    return True


async def _ignores_cancellation() -> bool:
    while True:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(30)


@pytest.mark.timeout(60)
async def test_ready_with_hanging_checks_answers_within_the_timeout() -> None:
    running = serve(
        port=0,
        monitor=LatencyMonitor(),
        checks={"hangs": _hangs, "deaf": _ignores_cancellation},
        check_timeout_s=0.5,
    )
    try:
        async with httpx.AsyncClient(base_url=running.url, timeout=10.0) as client:
            for _ in range(3):  # the abandoned checks pile up on the loop; /ready keeps answering
                start = time.monotonic()
                response = await client.get("/ready")
                assert time.monotonic() - start < 1.5
                assert response.status_code == 503
                assert response.json()["checks"] == {"hangs": "timeout", "deaf": "timeout"}
            start = time.monotonic()
            assert (await client.get("/health")).status_code == 200
            assert time.monotonic() - start < 0.5
    finally:
        running.stop()


@pytest.mark.timeout(60)
async def test_ready_with_a_blocking_plain_check_answers_within_the_timeout() -> None:
    def blocks() -> bool:
        time.sleep(3.0)
        return True

    running = serve(
        port=0,
        monitor=LatencyMonitor(),
        checks={"blocks": blocks},  # type: ignore[dict-item]
        check_timeout_s=0.5,
    )
    try:
        async with httpx.AsyncClient(base_url=running.url, timeout=10.0) as client:
            ready = asyncio.create_task(client.get("/ready"))
            await asyncio.sleep(0.2)
            start = time.monotonic()
            health = await client.get("/health")
            health_took = time.monotonic() - start
            response = await ready
        assert response.json()["checks"] == {"blocks": "timeout"}
        assert health.status_code == 200
        assert health_took < 0.5
    finally:
        running.stop()


# -- no user text, no secrets --------------------------------------------------------------------

SECRET_ENV = {
    "OPENAI_API_KEY": "sk-proj-LKOBSERVEFUZZ0123456789abcdef",
    "LIVEKIT_API_KEY": "APIfuzzKey12345",
    "LIVEKIT_API_SECRET": "fuzz-livekit-secret-0123456789",
    "DEEPGRAM_API_KEY": "dg-fuzz-0123456789abcdef",
}
FORBIDDEN = (
    "user utterance",
    "here is the answer",
    "R0:",
    "R1:",
    "api_key",
    "api-key",
    "sk-",
    "Bearer",
    "Authorization",
    *SECRET_ENV.values(),
)


@pytest.mark.timeout(120)
async def test_no_endpoint_shows_user_text_or_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRET_ENV.items():
        monkeypatch.setenv(name, value)
    registry = CollectorRegistry()
    monitor = LatencyMonitor()
    recent = RecentTurns()
    seen: list[Turn] = []
    pipeline = build_pipeline([ScriptedTurn(), ScriptedTurn(llm_ttft_s=0.3)])
    handle = lk_observe.instrument(
        pipeline.session,
        agent_name="support",
        registry=registry,
        monitor=monitor,
        on_turn=seen.append,
    )
    await run_pipeline(pipeline)
    assert await asyncio.to_thread(lk_observe.flush, 10.0)
    assert not handle.active
    user_turns = [t for t in seen if t.kind == "user"]
    assert len(user_turns) == 2
    for turn in seen:
        recent.add(turn)
    running = serve(port=0, registry=registry, monitor=monitor, recent=recent)
    bodies: dict[str, str] = {}
    try:
        async with httpx.AsyncClient(base_url=running.url, timeout=10.0) as client:
            for path in ENDPOINTS:
                response = await client.get(path)
                assert response.status_code in (200, 204, 503), path
                bodies[path] = str(response.headers) + response.text
            om = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
            bodies["/metrics (openmetrics)"] = str(om.headers) + om.text
            for path in ("/nope", "/static/nope.js", "/metrics/latency?agent=user%20utterance%200"):
                response = await client.get(path)
                bodies[path] = response.text
    finally:
        running.stop()
    assert "voice_agent_turns_total" in bodies["/metrics"]  # the session's turns are there
    assert '"index"' in bodies["/turns/recent"]
    for path, body in bodies.items():
        for forbidden in FORBIDDEN:
            assert forbidden not in body, (path, forbidden)
