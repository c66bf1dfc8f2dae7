"""An OTLP tracer provider that a dead or slow collector cannot hurt, and says how it is doing.

`configure_tracing()` returns (never installs globally) an SDK TracerProvider whose
BatchSpanProcessor wraps an OTLP exporter (http/protobuf or grpc) with:
  - a bounded export: the 1.45 exporters put every retry and back-off inside one deadline
    (`timeout`), so one export call, retries included, never outlasts `timeout_s`;
  - counting: exported / failed (incl. raised exceptions, which never propagate) / dropped
    (evicted from the full BatchSpanProcessor queue; seen when the next batch is exported)
    spans; failed + dropped go to `voice_agent_sink_failures_total{sink="span_export"}` and to
    `export_health()`. Once the queue is drained, exported + failed + dropped == spans ended.
Public SDK / exporter / requests API only: drops are found by numbering spans as they enter
the queue (a first-in first-out queue that evicts its oldest span), not by replacing it.
`shutdown_tracing()` / `flush_tracing()` run provider.shutdown / force_flush on a daemon
thread and give up waiting after `timeout_s`: with a black-holed collector the SDK calls block
for up to ~30 s, and they must never run on the agent's event loop.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import TracerProvider as ApiTracerProvider
from prometheus_client import CollectorRegistry

from lk_observe.metrics import LatencyMetrics

if TYPE_CHECKING:
    import requests

logger = logging.getLogger(__name__)

SINK = "span_export"  # the voice_agent_sink_failures_total{sink} value for lost spans
PROTOCOLS: tuple[str, ...] = ("http/protobuf", "grpc")
_DEFAULT_PROTOCOL = "http/protobuf"  # the OTLP spec's default; http/json has no Python exporter
_HTTP_TRACES_PATH = "/v1/traces"
# where each exporter sends when neither an endpoint nor the environment names one
_DEFAULT_ENDPOINTS = {"http/protobuf": "http://localhost:4318", "grpc": "http://localhost:4317"}
_DEFAULT_BATCH_SIZE = 512  # the SDK's default max_export_batch_size
_DEFAULT_TIMEOUT_S = 2.0  # one export, retries included: short, a dead collector costs spans
_DEFAULT_QUEUE_SIZE = 2048  # the SDK's default max_queue_size
_EXIT_SHUTDOWN_S = 5.0  # interpreter exit waits at most this long for every provider together
# a failed export that used this much of its deadline timed out (the exporters give up early
# only when the next back-off would not fit)
_TIMED_OUT_FRACTION = 0.95


@dataclass
class _ExportStats:
    """One provider's export outcome counts. Written by the BSP worker (exports, drops) and
    by shutdown (spans it abandoned); read by export_health()."""

    protocol: str
    collector: str  # host:port only: never a path, query or credentials
    exported: int = 0
    failed: int = 0
    dropped: int = 0
    last_error: str | None = None
    last_success_unix: float | None = None
    last_failure_unix: float | None = None
    attempt_error: str | None = None  # what the HTTP transport saw during the current export
    lost_at_last_flush: int = 0  # flush_tracing reports spans lost since the previous flush
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

    def lost_since_last_flush(self) -> int:
        """Spans failed or dropped since the previous call (or since the provider was made)."""
        with self.lock:
            lost = self.failed + self.dropped
            new, self.lost_at_last_flush = lost - self.lost_at_last_flush, lost
            return new

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

    def add(self, spans: int) -> None:
        try:
            self._metrics.sink_failure(SINK, amount=spans)
        except Exception:  # metrics must not turn an export failure into a crash
            logger.debug("could not count span export failures", exc_info=True)


class _QueueLedger:
    """Which spans the BatchSpanProcessor's full queue evicted, from its public behaviour only.

    Spans are numbered in the order they enter the queue (`enter`, called under the
    processor's lock together with the append). The queue is first-in first-out and a full
    one evicts its oldest span, so when a batch reaches the exporter every lower number that
    was never exported has been evicted: each span is counted once, as exported or dropped.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # weak: an evicted span is never seen again, and must not be kept alive for its number
        self._numbers: weakref.WeakKeyDictionary[ReadableSpan, int] = weakref.WeakKeyDictionary()
        self._entered = 0
        self._settled = 0  # every span numbered up to here was exported, evicted or written off
        self._closed = False

    def enter(self, span: ReadableSpan) -> None:
        self._entered += 1
        self._numbers[span] = self._entered

    def batch(self, spans: Sequence[ReadableSpan]) -> int | None:
        """Spans evicted before `spans` left the queue; None: already written off by close()."""
        with self._lock:
            if self._closed:
                return None
            numbers = [n for n in (self._numbers.pop(s, None) for s in spans) if n is not None]
            newest = max(numbers, default=0)
            if newest <= self._settled:
                return 0
            evicted = newest - self._settled - sum(1 for n in numbers if n > self._settled)
            self._settled = newest
            return evicted

    def close(self) -> int:
        """After shutdown: spans still unaccounted for (evicted, or abandoned in the queue when
        shutdown ran out of time) are lost; batches exported from now on are not counted."""
        with self._lock:
            self._closed = True
            left = self._entered - self._settled
            self._settled = self._entered
            return left

    def forked(self) -> None:
        # the child's queue starts empty (what the parent queued is the parent's) and any lock
        # another thread held at fork time stays held in the child: start afresh
        self._lock = threading.Lock()
        self._settled = self._entered
        self._numbers.clear()


class _CountingExporter(SpanExporter):
    """Counts every export outcome and the evictions the batch reveals; nothing the inner
    exporter raises gets out."""

    def __init__(
        self,
        inner: SpanExporter,
        stats: _ExportStats,
        counter: _FailureCounter,
        ledger: _QueueLedger,
        timeout_s: float,
    ) -> None:
        self._inner = inner
        self._stats = stats
        self._counter = counter
        self._ledger = ledger
        self._timeout_s = timeout_s

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        evicted = self._ledger.batch(spans)
        if evicted is None:  # after shutdown wrote these spans off: counted once already
            return self._export_uncounted(spans)
        if evicted:
            self._stats.drop(evicted)
            self._counter.add(evicted)
        count = len(spans)
        self._stats.attempt_error = None
        start = time.monotonic()
        try:
            result = self._inner.export(spans)
        except Exception as error:  # the SDK would only log it; we also count it
            self._lost(count, type(error).__name__)
            return SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self._stats.success(count)
        else:
            self._lost(count, self._stats.attempt_error or self._failure_kind(start))
        return result

    def _failure_kind(self, start: float) -> str:
        # the gRPC exporter reports no status code on public API; the time spent still tells
        # a collector that never answered from one that refused
        spent = time.monotonic() - start
        return "Timeout" if spent >= _TIMED_OUT_FRACTION * self._timeout_s else "ExportFailed"

    def _export_uncounted(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            return self._inner.export(spans)
        except Exception:
            logger.debug("span export after shutdown failed", exc_info=True)
            return SpanExportResult.FAILURE

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


class _CountingProcessor(SpanProcessor):
    """A BatchSpanProcessor whose spans are numbered, under one lock, as they are queued."""

    def __init__(
        self,
        exporter: _CountingExporter,
        stats: _ExportStats,
        counter: _FailureCounter,
        ledger: _QueueLedger,
        max_queue_size: int,
    ) -> None:
        # the SDK rejects a batch larger than the queue: a small queue gets a smaller batch
        self._batch = BatchSpanProcessor(
            exporter,
            max_queue_size=max_queue_size,
            max_export_batch_size=min(max_queue_size, _env_batch_size()),
        )
        self._stats = stats
        self._counter = counter
        self._ledger = ledger
        self._lock = threading.Lock()
        self._closed = False
        if hasattr(os, "register_at_fork"):
            forked = weakref.WeakMethod(self._forked)  # weak: the hook outlives the provider

            def after_in_child() -> None:
                if (method := forked()) is not None:
                    method()

            os.register_at_fork(after_in_child=after_in_child)

    def _forked(self) -> None:
        # a lock held by another thread at fork time would stay held forever in the child
        self._lock = threading.Lock()
        self._stats.lock = threading.Lock()
        self._ledger.forked()

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._batch.on_start(span, parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        if not (span.context and span.context.trace_flags.sampled):
            return  # the BatchSpanProcessor never queues these: they must not get a number
        with self._lock:
            if self._closed:  # a shut-down processor queues nothing
                return
            self._ledger.enter(span)
            self._batch.on_end(span)

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
        try:
            self._batch.shutdown()  # type: ignore[no-untyped-call]  # unannotated in the SDK
        finally:
            lost = self._ledger.close()
            if lost:
                self._stats.drop(lost)
                self._counter.add(lost)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._batch.force_flush(timeout_millis)


def _env_batch_size() -> int:
    try:
        size = int(os.environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "") or _DEFAULT_BATCH_SIZE)
    except ValueError:
        return _DEFAULT_BATCH_SIZE
    return size if size > 0 else _DEFAULT_BATCH_SIZE


def _recording_session(stats: _ExportStats) -> requests.Session:
    """A requests session (the HTTP exporter's public `session=`) whose transport adapter
    notes what it saw (status or exception type) for export_health's last_error: the
    exporter itself only returns FAILURE. Imported here: gRPC users never load requests."""
    import requests
    from requests.adapters import HTTPAdapter

    class RecordingAdapter(HTTPAdapter):
        def send(
            self,
            request: requests.PreparedRequest,
            stream: bool = False,
            timeout: Any = None,
            verify: Any = True,
            cert: Any = None,
            proxies: Any = None,
        ) -> requests.Response:
            try:
                response = super().send(request, stream, timeout, verify, cert, proxies)
            except Exception as error:
                stats.attempt_error = type(error).__name__
                raise
            if response.status_code >= 400:
                stats.attempt_error = f"HTTP {response.status_code}"
            return response

    session = requests.Session()
    adapter = RecordingAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


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
    return urlunsplit((parts.scheme, parts.netloc, path + _HTTP_TRACES_PATH, parts.query, ""))


def _target(protocol: str, endpoint: str | None) -> str:
    """The endpoint the exporter will use, as both exporters resolve it (host:port only
    matters here): the argument, then the traces variable, then the generic one."""
    for candidate in (
        endpoint,
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
    ):
        if candidate:
            return candidate
    return _DEFAULT_ENDPOINTS[protocol]


def _collector_label(endpoint: str) -> str:
    """host:port of an endpoint, dropping scheme, credentials, path and query."""
    try:
        parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
        host = parts.hostname or "unknown"
        return f"{host}:{parts.port}" if parts.port else host
    except ValueError:
        return "unknown"


def _make_exporter(
    protocol: str, endpoint: str | None, timeout_s: float, stats: _ExportStats
) -> SpanExporter:
    # imported here: each protocol's users load only their own exporter (and grpc or requests)
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint, timeout=timeout_s)

    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    session: requests.Session | None = None
    # a credential-provider session from the environment wins over our recording one
    if not os.environ.get("OTEL_PYTHON_EXPORTER_OTLP_HTTP_TRACES_CREDENTIAL_PROVIDER"):
        session = _recording_session(stats)
    url = _http_traces_url(endpoint) if endpoint else None
    return HttpExporter(endpoint=url, timeout=timeout_s, session=session)


def _env_number(names: Sequence[str], default: float, *, millis: bool = False) -> float:
    """The first of `names` set to a positive number, else `default`. A bad value is logged
    and skipped: an environment typo must not stop the agent."""
    for name in names:
        raw = os.environ.get(name, "").strip()
        if not raw:
            continue
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            logger.warning("%s=%r is not a positive number; ignoring it", name, raw)
            continue
        return value / 1000.0 if millis else value
    return default


def _env_timeout_s() -> float:
    """OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT as Python's OTLP exporters read it (seconds; the
    OTel spec says milliseconds, so 1000 or more is taken as milliseconds), then
    OTEL_BSP_EXPORT_TIMEOUT (milliseconds), then the default."""
    seconds = _env_number(
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"), math.nan
    )
    if math.isfinite(seconds):
        return seconds / 1000.0 if seconds >= 1000 else seconds
    return _env_number(("OTEL_BSP_EXPORT_TIMEOUT",), _DEFAULT_TIMEOUT_S, millis=True)


def _check_endpoint(protocol: str, endpoint: str, source: str) -> str | None:
    """Why `endpoint` cannot be an OTLP collector address, or None."""
    text = endpoint.strip()
    bare = protocol == "grpc" and "://" not in text  # grpc also takes host:port
    try:
        parts = urlsplit(f"//{text}" if bare else text)
        port = parts.port  # ValueError when out of range or not a number
    except ValueError as exc:
        return f"{source} {endpoint!r} is not a URL: {exc}"
    if not bare and parts.scheme not in ("http", "https"):
        example = _DEFAULT_ENDPOINTS[protocol]
        return f"{source} {endpoint!r} is not an http(s) URL like {example}"
    if not parts.hostname or (bare and port is None):
        return (
            f"{source} {endpoint!r} names no host (and port), e.g. {_DEFAULT_ENDPOINTS[protocol]}"
        )
    return None


def configure_tracing(
    *,
    endpoint: str | None = None,
    protocol: str | None = None,
    timeout_s: float | None = None,
    service_name: str | None = None,
    max_queue_size: int | None = None,
    registry: CollectorRegistry | None = None,
) -> TracerProvider:
    """A TracerProvider exporting over OTLP, for `instrument(session, tracer_provider=...)`.

    Each setting: the argument, else the standard OTel variable, else the default.
    endpoint: http/protobuf: a base URL (`/v1/traces` is appended unless present);
        grpc: `http://host:port`. Default: OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, else
        localhost:4318 (http/protobuf) or :4317 (grpc).
    protocol: "http/protobuf" | "grpc"; default OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL, else
        http/protobuf.
    timeout_s: bound on one export call, retries and back-off included (SDK >= 1.34); default
        OTEL_EXPORTER_OTLP_[TRACES_]TIMEOUT, OTEL_BSP_EXPORT_TIMEOUT, else 2 s.
    service_name: default OTEL_SERVICE_NAME.
    max_queue_size: spans beyond it are dropped and counted; default OTEL_BSP_MAX_QUEUE_SIZE,
        else 2048. (OTEL_BSP_SCHEDULE_DELAY and OTEL_BSP_MAX_EXPORT_BATCH_SIZE apply too.)
    It is returned, never set as the global provider. Stop it with `shutdown_tracing()`.
    A bad argument raises ValueError; a bad variable is logged and its default used.
    """
    if timeout_s is None:
        timeout_s = _env_timeout_s()
    elif isinstance(timeout_s, bool) or not (
        isinstance(timeout_s, (int, float)) and timeout_s > 0 and math.isfinite(timeout_s)
    ):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if max_queue_size is None:
        max_queue_size = int(_env_number(("OTEL_BSP_MAX_QUEUE_SIZE",), _DEFAULT_QUEUE_SIZE))
    elif max_queue_size < 1:
        raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size!r}")
    chosen = _resolve_protocol(protocol)
    if endpoint is not None:
        problem = _check_endpoint(chosen, endpoint, "endpoint")
        if problem:
            raise ValueError(problem)
    stats = _ExportStats(protocol=chosen, collector=_collector_label(_target(chosen, endpoint)))
    if endpoint is None:
        for var in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
            value = os.environ.get(var)
            if not value:
                continue
            if problem := _check_endpoint(chosen, value, var):
                # the agent still starts, and export_health() says it is not exporting
                logger.warning("%s; spans will not be exported", problem)
                stats.last_error, stats.last_failure_unix = "InvalidEndpoint", time.time()
            break
    counter = _FailureCounter(LatencyMetrics.for_registry(registry))
    ledger = _QueueLedger()
    exporter = _CountingExporter(
        _make_exporter(chosen, endpoint, timeout_s, stats), stats, counter, ledger, timeout_s
    )
    processor = _CountingProcessor(exporter, stats, counter, ledger, max_queue_size)
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
    finished in time and, for a configure_tracing provider, no span was lost (failed or
    dropped) since the previous flush_tracing of it, or since it was made: the SDK's
    force_flush returns True even when the export failed. Blocks: call it off the loop."""
    force_flush = getattr(provider, "force_flush", None)
    if not callable(force_flush):
        return True
    with _providers_lock:
        stats = _providers.get(provider)
    millis = max(int(timeout_s * 1000), 1)
    finished = _run_bounded(lambda: force_flush(millis), timeout_s, "otel-flush")
    lost = stats.lost_since_last_flush() if stats is not None else 0
    return finished and lost == 0


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
