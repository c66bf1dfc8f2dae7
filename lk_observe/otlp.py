"""An OTLP tracer provider that a dead or slow collector cannot hurt, and says how it is doing.

`configure_tracing()` returns (never installs globally) an SDK TracerProvider whose
BatchSpanProcessor wraps an OTLP exporter (http/protobuf or grpc) with:
  - a bounded export: the 1.45 exporters put every retry and back-off inside one deadline
    (`timeout`), so one export call, retries included, never outlasts `timeout_s`;
  - counting: exported / failed (incl. raised exceptions, which never propagate) / dropped
    (BatchSpanProcessor queue full) spans; failed + dropped go to
    `voice_agent_sink_failures_total{sink="span_export"}` and to `export_health()`.
`shutdown_tracing()` / `flush_tracing()` run provider.shutdown / force_flush on a daemon
thread and give up waiting after `timeout_s`: with a black-holed collector the SDK calls block
for up to ~30 s, and they must never run on the agent's event loop.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import TracerProvider as ApiTracerProvider
from prometheus_client import CollectorRegistry
from requests.adapters import HTTPAdapter

from lk_observe.metrics import LatencyMetrics

logger = logging.getLogger(__name__)

SINK = "span_export"  # the voice_agent_sink_failures_total{sink} value for lost spans
PROTOCOLS: tuple[str, ...] = ("http/protobuf", "grpc")
_DEFAULT_PROTOCOL = "http/protobuf"  # the OTLP spec's default; http/json has no Python exporter
_HTTP_TRACES_PATH = "/v1/traces"
_DEFAULT_BATCH_SIZE = 512  # the SDK's default max_export_batch_size
_EXIT_SHUTDOWN_S = 5.0  # interpreter exit waits at most this long for every provider together


@dataclass
class _ExportStats:
    """One provider's export outcome counts. Written by the BSP worker (exports) and by
    whatever thread ends spans (drops); read by export_health()."""

    protocol: str
    collector: str  # host:port only: never a path, query or credentials
    exported: int = 0
    failed: int = 0
    dropped: int = 0
    last_error: str | None = None
    last_success_unix: float | None = None
    last_failure_unix: float | None = None
    attempt_error: str | None = None  # what the transport saw during the current export
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def success(self, spans: int) -> None:
        with self.lock:
            self.exported += spans
            self.last_success_unix = time.time()

    def failure(self, spans: int, error: str) -> None:
        with self.lock:
            self.failed += spans
            self.last_error = error
            self.last_failure_unix = time.time()

    def drop(self, spans: int) -> None:
        with self.lock:
            self.dropped += spans
            self.last_error = "QueueFull"
            self.last_failure_unix = time.time()

    def lost(self) -> int:
        with self.lock:
            return self.failed + self.dropped

    def snapshot(self) -> dict[str, object]:
        with self.lock:
            healthy = self.last_failure_unix is None or (
                self.last_success_unix is not None
                and self.last_success_unix >= self.last_failure_unix
            )
            return {
                "protocol": self.protocol,
                "collector": self.collector,
                "exported": self.exported,
                "failed": self.failed,
                "dropped": self.dropped,
                "last_error": self.last_error,
                "last_success_unix": self.last_success_unix,
                "healthy": healthy,
            }


class _FailureCounter:
    """Adds lost spans to voice_agent_sink_failures_total{sink="span_export"}."""

    def __init__(self, metrics: LatencyMetrics) -> None:
        self._metrics = metrics
        # metrics.sink_failure(sink) counts one; a later `amount` parameter is used if present,
        # so a 512-span batch is one call instead of 512.
        method: Callable[..., None] = metrics.sink_failure
        try:
            self._bulk = "amount" in inspect.signature(method).parameters
        except (TypeError, ValueError):
            self._bulk = False
        self._method = method

    def add(self, spans: int) -> None:
        try:
            if self._bulk:
                self._method(SINK, amount=spans)
            else:
                for _ in range(spans):
                    self._method(SINK)
        except Exception:  # metrics must not turn an export failure into a crash
            logger.debug("could not count span export failures", exc_info=True)


class _CountingExporter(SpanExporter):
    """Counts every export outcome; nothing the inner exporter raises gets out."""

    def __init__(self, inner: SpanExporter, stats: _ExportStats, counter: _FailureCounter) -> None:
        self._inner = inner
        self._stats = stats
        self._counter = counter

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        count = len(spans)
        self._stats.attempt_error = None
        try:
            result = self._inner.export(spans)
        except Exception as error:  # the SDK would only log it; we also count it
            self._lost(count, type(error).__name__)
            return SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self._stats.success(count)
        else:
            self._lost(count, self._stats.attempt_error or "ExportFailed")
        return result

    def _lost(self, count: int, error: str) -> None:
        was_healthy = self._stats.snapshot()["healthy"]
        self._stats.failure(count, error)
        self._counter.add(count)
        if was_healthy:  # once per outage, not once per batch: the SDK logs each batch already
            logger.warning(
                "span export failing (%s); spans are dropped and counted in "
                'voice_agent_sink_failures_total{sink="span_export"}',
                error,
            )

    def shutdown(self) -> None:
        try:
            self._inner.shutdown()
        except Exception:
            logger.debug("span exporter shutdown failed", exc_info=True)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        try:
            return self._inner.force_flush(timeout_millis)
        except Exception:
            logger.debug("span exporter force_flush failed", exc_info=True)
            return False


class _DropCountingQueue(deque[Any]):
    """The batch processor's queue, counting the spans a full queue evicts. Appends and pops
    share one lock, so the export thread cannot pop between the "full?" check and the append:
    each eviction is counted exactly once, and nothing that was exported is counted too."""

    def __init__(self, maxlen: int, on_drop: Callable[[], None]) -> None:
        super().__init__(maxlen=maxlen)
        self._lock = threading.Lock()
        self._on_drop = on_drop

    def appendleft(self, item: Any) -> None:
        with self._lock:
            evicts = len(self) == self.maxlen
            super().appendleft(item)  # a full deque drops its oldest (rightmost) item
        if evicts:
            self._on_drop()

    def pop(self) -> Any:  # type: ignore[override]  # deque.pop takes no index
        with self._lock:
            return super().pop()


class _CountingBatchSpanProcessor(BatchSpanProcessor):
    """Counts the spans the SDK drops, silently apart from one log line, on a full queue."""

    def __init__(
        self,
        exporter: SpanExporter,
        stats: _ExportStats,
        counter: _FailureCounter,
        max_queue_size: int,
    ) -> None:
        # the SDK rejects a batch larger than the queue: a small queue gets a smaller batch
        super().__init__(
            exporter,
            max_queue_size=max_queue_size,
            max_export_batch_size=min(max_queue_size, _env_batch_size()),
        )

        def dropped() -> None:
            stats.drop(1)
            counter.add(1)

        # SDK 1.45 internals (emit appends left, the export thread pops right); another
        # version degrades to not counting drops, never to a crash
        batch = getattr(self, "_batch_processor", None)
        if isinstance(getattr(batch, "_queue", None), deque):
            batch._queue = _DropCountingQueue(max_queue_size, dropped)  # type: ignore[union-attr]


def _env_batch_size() -> int:
    try:
        size = int(os.environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "") or _DEFAULT_BATCH_SIZE)
    except ValueError:
        return _DEFAULT_BATCH_SIZE
    return size if size > 0 else _DEFAULT_BATCH_SIZE


class _RecordingAdapter(HTTPAdapter):
    """Notes what the HTTP transport saw (status or exception type) for export_health's
    last_error: the exporter itself only returns FAILURE."""

    def __init__(self, stats: _ExportStats) -> None:
        super().__init__()
        self._lk_stats = stats

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: dict[str, str] | None = None,
    ) -> requests.Response:
        try:
            response = super().send(request, stream, timeout, verify, cert, proxies)
        except Exception as error:
            self._lk_stats.attempt_error = type(error).__name__
            raise
        if response.status_code >= 400:
            self._lk_stats.attempt_error = f"HTTP {response.status_code}"
        return response


# Every provider configure_tracing made and is not shut down yet: export_health() reports them.
_providers: weakref.WeakKeyDictionary[object, _ExportStats] = weakref.WeakKeyDictionary()
_providers_lock = threading.Lock()
_exit_hook_registered = False


def _resolve_protocol(protocol: str | None) -> str:
    if protocol is not None:
        value = protocol.strip().lower()
        if value not in PROTOCOLS:
            raise ValueError(f"unsupported OTLP protocol {protocol!r}; use one of {PROTOCOLS}")
        return value
    for var in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = os.environ.get(var, "").strip().lower()
        if not value:
            continue
        if value in PROTOCOLS:
            return value
        # an environment typo must not stop the agent from starting: say so and carry on
        logger.warning("%s=%r is not supported; using %s", var, value, _DEFAULT_PROTOCOL)
        return _DEFAULT_PROTOCOL
    return _DEFAULT_PROTOCOL


def _http_traces_url(endpoint: str) -> str:
    """A base URL (as in OTEL_EXPORTER_OTLP_ENDPOINT) gets /v1/traces; a full one is kept."""
    parts = urlsplit(endpoint)
    path = parts.path.rstrip("/")
    if path.endswith(_HTTP_TRACES_PATH):
        return endpoint
    return urlunsplit(parts._replace(path=path + _HTTP_TRACES_PATH))


def _collector_label(endpoint: object) -> str:
    """host:port of the exporter's endpoint, dropping credentials, path and query."""
    text = str(endpoint or "")
    try:
        parts = urlsplit(text if "://" in text else f"//{text}")
        host = parts.hostname or "unknown"
        return f"{host}:{parts.port}" if parts.port else host
    except ValueError:
        return "unknown"


def _make_exporter(
    protocol: str, endpoint: str | None, timeout_s: float, stats: _ExportStats
) -> SpanExporter:
    if protocol == "grpc":
        return _grpc_exporter(endpoint, timeout_s, stats)

    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    session: requests.Session | None = None
    # a credential-provider session from the environment wins over our recording one
    if not os.environ.get("OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER"):
        session = requests.Session()
        adapter = _RecordingAdapter(stats)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
    url = _http_traces_url(endpoint) if endpoint else None
    return HttpExporter(endpoint=url, timeout=timeout_s, session=session)


def _grpc_exporter(endpoint: str | None, timeout_s: float, stats: _ExportStats) -> SpanExporter:
    """The gRPC exporter, its stub routed through an interceptor that notes the status code
    for export_health's last_error (the exporter itself only returns FAILURE). Imported here:
    HTTP users should not pay for loading grpc."""
    import grpc  # type: ignore[import-untyped]
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    class Recorder(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
        def intercept_unary_unary(
            self, continuation: Callable[[Any, Any], Any], details: Any, request: Any
        ) -> Any:
            outcome = continuation(details, request)
            try:
                code = outcome.code()
            except Exception:
                code = None
            if code is not None and code != grpc.StatusCode.OK:
                stats.attempt_error = f"grpc {getattr(code, 'name', code)}"
            return outcome

    recorder = Recorder()

    class RecordingExporter(OTLPSpanExporter):
        # SDK 1.45 builds (and on UNAVAILABLE rebuilds) channel and stub here; a version
        # without this hook simply never calls it and last_error stays "ExportFailed".
        def _initialize_channel_and_stub(self) -> None:
            super()._initialize_channel_and_stub()  # type: ignore[no-untyped-call]
            channel = getattr(self, "_channel", None)
            stub = getattr(self, "_stub", None)
            if channel is not None and stub is not None:
                self._client = stub(grpc.intercept_channel(channel, recorder))

    return RecordingExporter(endpoint=endpoint, timeout=timeout_s)


def configure_tracing(
    *,
    endpoint: str | None = None,
    protocol: str | None = None,
    timeout_s: float = 2.0,
    service_name: str | None = None,
    max_queue_size: int = 2048,
    registry: CollectorRegistry | None = None,
) -> TracerProvider:
    """A TracerProvider exporting over OTLP, for `instrument(session, tracer_provider=...)`.

    endpoint: http/protobuf: a base URL (`/v1/traces` is appended unless present);
        grpc: `http://host:port`. Default: OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT.
    protocol: "http/protobuf" | "grpc"; default OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL.
    timeout_s: bound on one export call, retries and back-off included (SDK >= 1.34).
    service_name: default OTEL_SERVICE_NAME.
    It is returned, never set as the global provider. Stop it with `shutdown_tracing()`.
    """
    if not (timeout_s > 0 and math.isfinite(timeout_s)):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if max_queue_size < 1:
        raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size!r}")
    chosen = _resolve_protocol(protocol)
    stats = _ExportStats(protocol=chosen, collector="unknown")
    exporter = _make_exporter(chosen, endpoint, timeout_s, stats)
    stats.collector = _collector_label(getattr(exporter, "_endpoint", endpoint))
    counter = _FailureCounter(LatencyMetrics.for_registry(registry))
    processor = _CountingBatchSpanProcessor(
        _CountingExporter(exporter, stats, counter), stats, counter, max_queue_size
    )
    # Resource.create reads OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES; an argument wins.
    resource = Resource.create({SERVICE_NAME: service_name} if service_name else None)
    # No SDK atexit hook: it would call the unbounded shutdown; ours below is bounded.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(processor)
    with _providers_lock:
        _providers[provider] = stats
    _register_exit_hook()
    return provider


def export_health(provider: ApiTracerProvider | None = None) -> dict[str, object]:
    """JSON-friendly export status: totals over every live provider configure_tracing made
    (or only `provider`), plus one entry per provider. `healthy` means no failure since the
    last success; a dead collector is a detail to show, not a reason to be unready."""
    with _providers_lock:
        if provider is not None:
            found = _providers.get(provider)
            entries = [found] if found is not None else []
        else:
            entries = list(_providers.values())
    providers = [stats.snapshot() for stats in entries]
    failing = [s for s in entries if s.last_failure_unix is not None]
    latest = max(failing, key=lambda s: s.last_failure_unix or 0.0) if failing else None
    successes = [s.last_success_unix for s in entries if s.last_success_unix is not None]
    return {
        "healthy": all(p["healthy"] is True for p in providers),
        "exported": sum(s.exported for s in entries),
        "failed": sum(s.failed for s in entries),
        "dropped": sum(s.dropped for s in entries),
        "last_error": latest.last_error if latest is not None else None,
        "last_success_unix": max(successes, default=None),
        "providers": providers,
    }


def _run_bounded(call: Callable[[], object], timeout_s: float, name: str) -> bool:
    """Run `call` on a daemon thread; True if it returned (not False) within timeout_s.
    A call still blocked after that is left to finish on its own thread."""
    done = threading.Event()
    ok: list[bool] = []

    def run() -> None:
        try:
            ok.append(call() is not False)
        except Exception:
            logger.warning("%s failed", name, exc_info=True)
            ok.append(False)
        finally:
            done.set()

    try:
        threading.Thread(target=run, name=f"lk-observe-{name}", daemon=True).start()
    except RuntimeError:  # no new threads (interpreter shutting down): skip, never block
        logger.debug("could not start a thread for %s", name)
        return False
    return done.wait(max(timeout_s, 0.0)) and all(ok)


def shutdown_tracing(provider: ApiTracerProvider, timeout_s: float = 5.0) -> bool:
    """Shut `provider` down (exporting what is queued) without waiting more than timeout_s.
    True if it finished in time. Blocks the caller: call it off the event loop
    (`await asyncio.to_thread(shutdown_tracing, provider)`). No-op for non-SDK providers."""
    shutdown = getattr(provider, "shutdown", None)
    if not callable(shutdown):
        return True
    with _providers_lock:
        _providers.pop(provider, None)
    return _run_bounded(shutdown, timeout_s, "otel-shutdown")


def flush_tracing(provider: ApiTracerProvider, timeout_s: float) -> bool:
    """Export every span the provider holds, waiting at most timeout_s. True only if it
    finished in time and, for a configure_tracing provider, no span was lost meanwhile
    (the SDK's force_flush returns True even when the export failed). Blocks: off the loop."""
    force_flush = getattr(provider, "force_flush", None)
    if not callable(force_flush):
        return True
    with _providers_lock:
        stats = _providers.get(provider)
    lost_before = stats.lost() if stats is not None else 0
    millis = max(int(timeout_s * 1000), 1)
    finished = _run_bounded(lambda: force_flush(millis), timeout_s, "otel-flush")
    return finished and (stats is None or stats.lost() == lost_before)


def _register_exit_hook() -> None:
    global _exit_hook_registered
    with _providers_lock:
        if _exit_hook_registered:
            return
        _exit_hook_registered = True
    atexit.register(_shutdown_all_at_exit)


def _shutdown_all_at_exit() -> None:
    # In parallel, under one deadline: a dead collector must not hold the process's exit.
    with _providers_lock:
        live = [p for p in _providers if isinstance(p, ApiTracerProvider)]
    deadline = time.monotonic() + _EXIT_SHUTDOWN_S
    for provider in live:
        shutdown_tracing(provider, timeout_s=0.0)
    for thread in threading.enumerate():
        if thread.name == "lk-observe-otel-shutdown":
            thread.join(max(deadline - time.monotonic(), 0.0))
