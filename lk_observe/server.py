"""The ops HTTP app: health, readiness, Prometheus /metrics, live latency, SLOs, a live page."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from importlib import resources
from typing import Any

import anyio.to_thread
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client.exposition import generate_latest as render_text
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as render_openmetrics

from lk_observe.monitor import LatencyMonitor, default_monitor
from lk_observe.multiprocess import (
    ExemplarCollector,
    MergedView,
    SnapshotReader,
    exemplar_reader,
    multiproc_dir,
    reap_dead_processes,
    snapshot_dir,
)
from lk_observe.otlp import export_health
from lk_observe.presets import DEFAULT_BUDGET
from lk_observe.recent import (
    RecentTurns,
    default_recent_turns,
    mean_breakdown,
    provider_comparison,
    turn_summary,
)
from lk_observe.slo import DEFAULT_SLOS, SLO, evaluate
from lk_observe.tracing import CHILD_SPANS
from lk_observe.turns import (
    BREAKDOWN_TITLES,
    COMPONENTS,
    EXCELLENT_BELOW_MS,
    GOOD_BELOW_MS,
    MODEL_COMPONENTS,
)

logger = logging.getLogger(__name__)

ReadinessCheck = Callable[[], Awaitable[bool]]

DEFAULT_CHECK_TIMEOUT_S = 2.0
MAX_CONCURRENT_SCRAPES = 4  # more are refused at once: slow renders cannot pile up
# uvicorn counts idle keep-alive connections against this; the work itself is bounded per
# endpoint (scrapes above, readiness checks by their timeout), so keep it well above both
DEFAULT_CONNECTION_LIMIT = 256
_STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
# The page loads only its own files and talks only to this app.
_PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_JSON_HEADERS = {"Cache-Control": "no-store"}
# Pinned to 0.0.4: the same bytes as prometheus_client's default, and every Prometheus parses it.
TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _finite(value: Any) -> Any:
    # JSON has no NaN/Infinity; a stray one must not turn an ops endpoint into a 500.
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json(
    data: Any, status_code: int = 200, headers: Mapping[str, str] = _JSON_HEADERS
) -> JSONResponse:
    return JSONResponse(_finite(data), status_code=status_code, headers=dict(headers))


def render_metrics(
    registry: CollectorRegistry | None = None, openmetrics: bool = False
) -> tuple[bytes, str]:
    """Exposition bytes and content type. In multiprocess mode every process's files are merged
    (as LiveKit's own /metrics does), OpenMetrics with every process's newest exemplars, and
    `registry` is ignored. Blocking: call it off the loop."""
    directory = multiproc_dir()
    target: CollectorRegistry
    if directory and os.path.isdir(directory):
        reap_dead_processes(directory)
        target = CollectorRegistry()
        files = prometheus_multiprocess.MultiProcessCollector(None, path=directory)  # type: ignore[no-untyped-call]
        exemplars = exemplar_reader(directory)
        if openmetrics:
            # prometheus_client leaves exemplars out here: add the ones lk_observe kept
            target.register(ExemplarCollector(files, exemplars))
        else:
            exemplars.prune()
            target.register(files)
    else:
        target = REGISTRY if registry is None else registry
    if openmetrics:
        return render_openmetrics(target), OPENMETRICS_CONTENT_TYPE  # type: ignore[no-untyped-call]
    return render_text(target), TEXT_CONTENT_TYPE


def add_readiness_check(app: FastAPI, name: str, check: ReadinessCheck) -> None:
    """Register an async check (e.g. "stt": can we reach the STT provider?) for /ready."""
    checks: dict[str, ReadinessCheck] = app.state.readiness_checks
    checks[name] = check


def _dir_writable(directory: str) -> bool:
    return os.path.isdir(directory) and os.access(directory, os.W_OK)


async def _multiproc_dir_writable() -> bool:
    directory = multiproc_dir()
    # a stalled filesystem must not stall the loop
    return directory is not None and await anyio.to_thread.run_sync(_dir_writable, directory)


def _builtin_checks() -> dict[str, ReadinessCheck]:
    checks: dict[str, ReadinessCheck] = {}
    if multiproc_dir():
        # job processes write their metrics there; without it /metrics silently loses them
        checks["metrics_multiproc_dir"] = _multiproc_dir_writable
    return checks


async def _run_check(check: ReadinessCheck) -> bool:
    if inspect.iscoroutinefunction(check) or inspect.iscoroutinefunction(
        getattr(check, "__call__", None)  # noqa: B004 - an instance with an async __call__
    ):
        return bool(await check())
    # a plain function may block: run it in a thread so the timeout applies and the loop stays free
    result: object = await anyio.to_thread.run_sync(check, abandon_on_cancel=True)
    if inspect.isawaitable(result):
        result = await result
    return bool(result)


async def run_readiness_checks(
    checks: Mapping[str, ReadinessCheck], timeout_s: float
) -> dict[str, str]:
    """Run every check at once; each ends "ok", "failed", "error" or "timeout" within timeout_s."""
    tasks = {name: asyncio.ensure_future(_run_check(check)) for name, check in checks.items()}
    if not tasks:
        return {}
    done, pending = await asyncio.wait(tasks.values(), timeout=timeout_s)
    for task in pending:
        task.cancel()  # not awaited: a check that ignores cancellation must not hang /ready
        task.add_done_callback(_consume_result)
    results: dict[str, str] = {}
    for name, task in tasks.items():
        if task not in done:
            results[name] = "timeout"
        elif task.exception() is not None:
            # the type only: exception messages can carry URLs or keys
            logger.warning("readiness check %s raised %s", name, type(task.exception()).__name__)
            results[name] = "error"
        else:
            results[name] = "ok" if task.result() else "failed"
    return results


def _consume_result(task: asyncio.Future[bool]) -> None:
    if not task.cancelled():
        task.exception()  # mark retrieved: no "exception was never retrieved" noise


def _wants_openmetrics(accept: str) -> bool:
    return "application/openmetrics-text" in accept


def _static_text(name: str) -> str:
    return resources.files("lk_observe").joinpath("static", name).read_text(encoding="utf-8")


def _page_config() -> str:
    """What the live page needs of lk_observe's constants, so the page holds no copy of them."""
    config = {
        "components": COMPONENTS,
        "stages": ["e2e", *CHILD_SPANS],  # the waterfall's bars and legend, tool time included
        "budget_ms": {c: DEFAULT_BUDGET.upper_bound(c) for c in COMPONENTS},
        "excellent_below_ms": EXCELLENT_BELOW_MS,
        "good_below_ms": GOOD_BELOW_MS,
        "breakdown_titles": dict(BREAKDOWN_TITLES),  # e2e's parts, in order, with their titles
        "model_components": MODEL_COMPONENTS,
    }
    return json.dumps(config).replace("<", "\\u003c")  # inert inside a <script> element


def _live_page_html() -> str:
    return (
        _static_text("index.html")
        .replace("__PAGE_CONFIG__", _page_config())
        .replace("__EXCELLENT_BELOW_MS__", f"{EXCELLENT_BELOW_MS:g}")
        .replace("__GOOD_BELOW_MS__", f"{GOOD_BELOW_MS:g}")
    )


def create_app(
    monitor: LatencyMonitor | None = None,
    registry: CollectorRegistry | None = None,
    checks: Mapping[str, ReadinessCheck] | None = None,
    slos: Iterable[SLO] | None = None,
    recent: RecentTurns | None = None,
    *,
    check_timeout_s: float = DEFAULT_CHECK_TIMEOUT_S,
) -> FastAPI:
    """The ops app. `registry` None means prometheus_client.REGISTRY (or, when
    PROMETHEUS_MULTIPROC_DIR is set, every process's metrics files)."""
    the_monitor = monitor if monitor is not None else default_monitor()
    the_slos = tuple(DEFAULT_SLOS if slos is None else slos)
    the_recent = recent if recent is not None else default_recent_turns()
    page = {"index.html": _live_page_html(), **{name: _static_text(name) for name in _STATIC_FILES}}

    app = FastAPI(title="lk_observe", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.readiness_checks = {**_builtin_checks(), **(checks or {})}
    app.state.monitor = the_monitor
    app.state.recent = the_recent
    app.state.snapshot_reader = None  # made on first use in multiprocess mode

    scrape_slots = anyio.CapacityLimiter(MAX_CONCURRENT_SCRAPES)

    @app.get("/health")
    async def health() -> JSONResponse:
        return _json({"status": "ok"})

    @app.get("/ready")
    async def ready(report: bool = False) -> JSONResponse:
        """503 until every check passes; ?report=1 gives the same body with 200 (for the live
        page, which shows readiness rather than probes it: a 503 is a browser console error)."""
        results = await run_readiness_checks(app.state.readiness_checks, check_timeout_s)
        failing = sorted(name for name, status in results.items() if status != "ok")
        body: dict[str, Any] = {"ready": not failing, "checks": results, "failing": failing}
        # detail, not a check: a dead collector costs spans, it must not take the agent out
        body["span_export"] = export_health()
        return _json(body, status_code=503 if failing and not report else 200)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        openmetrics = _wants_openmetrics(request.headers.get("accept", ""))
        if scrape_slots.borrowed_tokens >= scrape_slots.total_tokens:
            # answer at once: queued slow scrapes would use up the connections /health needs
            return Response(
                "too many concurrent scrapes\n",
                status_code=503,
                headers={"Retry-After": "1"},
                media_type="text/plain",
            )
        async with scrape_slots:
            # generate_latest takes milliseconds per label set: keep it off the event loop
            body, content_type = await anyio.to_thread.run_sync(
                render_metrics, registry, openmetrics
            )
        return Response(body, media_type=content_type)

    def snapshot_reader() -> SnapshotReader | None:
        # Checked per request: LiveKit's worker may set the variable after the app was made.
        base = multiproc_dir()
        if base is None:
            return None
        directory = snapshot_dir(base)
        reader: SnapshotReader | None = app.state.snapshot_reader
        if reader is None or reader.directory != directory:
            reader = SnapshotReader(the_monitor, directory, recent=the_recent)
            app.state.snapshot_reader = reader
        return reader

    async def merged_view() -> MergedView | None:
        """Every job process's window in multiprocess mode (None: this process alone)."""
        reader = snapshot_reader()
        if reader is None:
            return None
        # file reads and JSON parsing: off the loop, like /metrics
        return await anyio.to_thread.run_sync(reader.view)

    def view_headers(view: MergedView | None) -> dict[str, str]:
        if view is None:
            return _JSON_HEADERS
        return {**_JSON_HEADERS, "X-LK-Observe-Processes": str(view.processes + 1)}

    @app.get("/metrics/latency")
    async def latency(agent: str | None = None) -> JSONResponse:
        view = await merged_view()
        source = the_monitor if view is None else view.monitor
        return _json(source.get_all_stats(agent=agent), headers=view_headers(view))

    @app.get("/slo")
    async def slo_status() -> JSONResponse:
        view = await merged_view()
        source = the_monitor if view is None else view.monitor
        statuses = [evaluate(slo, source).to_dict() for slo in the_slos]
        return _json(statuses, headers=view_headers(view))

    @app.get("/turns/recent")
    async def recent_turns() -> JSONResponse:
        # numbers, ids and model names only: no speech ids, session ids or user text
        view = await merged_view()
        if view is not None:
            return _json(view.recent, headers=view_headers(view))
        return _json([turn_summary(turn) for turn in the_recent.turns()])

    @app.get("/turns/breakdown")
    async def recent_breakdown() -> JSONResponse:
        """Over the recent turns: the mean breakdown of e2e, and p50/p95 of each provider's
        model per component (bounded: the recent turns are)."""
        view = await merged_view()
        recent = view.recent if view is not None else [turn_summary(t) for t in the_recent.turns()]
        body = {"mean": mean_breakdown(recent), "providers": provider_comparison(recent)}
        return _json(body, headers=view_headers(view))

    @app.get("/")
    async def live_page() -> Response:
        return Response(
            page["index.html"],
            media_type="text/html; charset=utf-8",
            headers={"Content-Security-Policy": _PAGE_CSP, "Cache-Control": "no-store"},
        )

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        media_type = _STATIC_FILES.get(name)
        if media_type is None:
            return Response(status_code=404)
        return Response(page[name], media_type=f"{media_type}; charset=utf-8")

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(status_code=204)  # browsers ask; a 404 would be a console error

    return app


class Server:
    """An ops app served by uvicorn on its own thread and event loop, away from the agent's."""

    def __init__(
        self,
        app: FastAPI,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        limit_concurrency: int = DEFAULT_CONNECTION_LIMIT,
        timeout_keep_alive: int = 5,
    ) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be 0-65535 (0: any free port), got {port!r}")
        # Bind here so port=0 has a real port before start() returns, and errors raise here.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError:
            self._socket.close()
            raise
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_config=None,  # a library never reconfigures the app's logging
            access_log=False,
            lifespan="off",
            limit_concurrency=limit_concurrency,  # beyond it: 503, not an unbounded queue
            timeout_keep_alive=timeout_keep_alive,
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="lk-observe-http", daemon=True)
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=[self._socket]))
        except BaseException as exc:  # reported by start(); a daemon thread must not die loud
            self._error = exc
            logger.exception("lk_observe ops server stopped with an error")

    def start(self, timeout_s: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if not self._server.started:
            self.stop()
            raise RuntimeError(f"ops server did not start on {self.url}") from self._error

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop serving; True when the thread ended within timeout_s."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s / 2)
        if self._thread.is_alive():
            self._server.force_exit = True  # drop lingering connections
            self._thread.join(timeout_s / 2)
        self._socket.close()
        return not self._thread.is_alive()


def serve(
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    limit_concurrency: int = DEFAULT_CONNECTION_LIMIT,
    **app_kwargs: Any,
) -> Server:
    """Start the ops app in the background (loopback by default); stop it with server.stop()."""
    server = Server(create_app(**app_kwargs), host, port, limit_concurrency=limit_concurrency)
    server.start()
    return server
