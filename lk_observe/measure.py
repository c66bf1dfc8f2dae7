"""Time your own code: `measure_latency(component)` as a decorator or (async) context manager.

    @lk_observe.measure_latency("retrieval")
    async def retrieve(query: str) -> list[str]: ...

    with lk_observe.measure_latency("db"):
        rows = cursor.fetchall()

Each measurement goes into the latency monitor and the `voice_agent_latency_seconds` histogram
under `component=<name>`. Inside an instrumented AgentSession (a tool, `on_user_turn_completed`,
any code LiveKit runs for a reply) it goes to that session's monitor, registry and agent name,
and to the turn it happened in (a `voice.<name>` child span of the turn's trace). The recording
path never raises into the code it times.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, ParamSpec, TypeVar, cast, overload

from prometheus_client import CollectorRegistry

from lk_observe.instrument import InstrumentHandle, handle_for
from lk_observe.livekit_events import current_speech_context
from lk_observe.metrics import LatencyMetrics
from lk_observe.monitor import LatencyMonitor, default_monitor
from lk_observe.tracing import CHILD_SPANS, ROOT_SPAN
from lk_observe.turns import COMPONENTS

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

MAX_USER_COMPONENTS = 32  # distinct measure_latency names per process; later ones are skipped
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_SPAN_PREFIX = "voice."
_RESERVED_PREFIXES = ("llm_round_",)  # the spans of an LLM's later rounds
# lk_observe's own components and span names: a user measurement must not mix with them
RESERVED_NAMES: frozenset[str] = frozenset(
    {
        *COMPONENTS,
        *CHILD_SPANS,
        *(name.removeprefix(_SPAN_PREFIX) for name in (ROOT_SPAN, *CHILD_SPANS.values())),
        "turn",
        "llm",
        "tts",
        "tool",
        "eou",
        "measured",
        "breakdown",
    }
)

_admitted: set[str] = set()
_admitted_lock = threading.Lock()
_skipped: Counter[str] = Counter()  # reason -> measurements not recorded
_warned: set[str] = set()

# the open `with` blocks of this task / thread: (measure_latency, perf_counter start, wall start).
# Immutable tuples in a context variable: concurrent tasks and threads each see their own.
_open: contextvars.ContextVar[tuple[tuple[measure_latency, float, float], ...]] = (
    contextvars.ContextVar("lk_observe_measure_open", default=())
)


def skipped_measurements() -> dict[str, int]:
    """Measurements not recorded since the process started, by reason
    ("too_many_components": past the cap of distinct names; "record_failed": a sink raised)."""
    return dict(_skipped)


def _validate(component: object) -> str:
    if not isinstance(component, str):
        raise TypeError(f"measure_latency() needs a component name (str), got {component!r}")
    if not _NAME.fullmatch(component):
        raise ValueError(
            f"measure_latency component {component!r} must be 1-40 characters of lowercase "
            "letters, digits and '_', starting with a letter (it becomes a metric label and the "
            "span name voice.<component>)"
        )
    if component in RESERVED_NAMES or component.startswith(_RESERVED_PREFIXES):
        raise ValueError(
            f"measure_latency component {component!r} is one of lk_observe's own components or "
            f"span names ({', '.join(sorted(RESERVED_NAMES))}); pick another name, "
            "e.g. 'retrieval' or 'db_lookup'"
        )
    return component


def _skip(reason: str, component: str, detail: str = "") -> None:
    with _admitted_lock:
        _skipped[reason] += 1
        if reason in _warned:
            return
        _warned.add(reason)
    logger.warning(
        "lk_observe: measure_latency(%r) not recorded (%s)%s; further ones are counted in "
        "lk_observe.measure.skipped_measurements() without a log line",
        component,
        reason,
        detail,
    )


def _admit(component: str) -> bool:
    """True when `component` is among the first MAX_USER_COMPONENTS names measured."""
    if component in _admitted:  # set membership is atomic; the lock only guards admission
        return True
    with _admitted_lock:
        if component in _admitted or len(_admitted) < MAX_USER_COMPONENTS:
            _admitted.add(component)
            return True
    return False


class measure_latency:  # lowercase: the guide's name, used like a function
    """Time a function or a block into the latency monitor, the latency histogram and, inside
    a turn, that turn's trace.

    `@measure_latency("retrieval")` on a function or coroutine function, or
    `with measure_latency("db"):` / `async with measure_latency("db"):`. One object can be
    reused, nested and shared by concurrent calls. Outside an instrumented session the
    measurement goes to `monitor` (default: `lk_observe.default_monitor()`) and the histogram
    of `registry` (default: prometheus_client's) under `agent` (default "default").

    `component`: 1-40 characters of `[a-z0-9_]`, starting with a letter, and not one of
    lk_observe's own components or span names (ValueError). At most 32 distinct names per
    process: measurements under later names are counted (`skipped_measurements()`), logged
    once and otherwise ignored.
    """

    __slots__ = ("_agent", "_monitor", "_registry", "component")

    def __init__(
        self,
        component: str,
        *,
        monitor: LatencyMonitor | None = None,
        registry: CollectorRegistry | None = None,
        agent: str | None = None,
    ) -> None:
        self.component = _validate(component)
        if monitor is not None and not isinstance(monitor, LatencyMonitor):
            raise TypeError(f"monitor must be a lk_observe.LatencyMonitor, got {monitor!r}")
        if registry is not None and not isinstance(registry, CollectorRegistry):
            raise TypeError(
                f"registry must be a prometheus_client.CollectorRegistry, got {registry!r}"
            )
        if agent is not None and (not isinstance(agent, str) or not agent.strip()):
            raise ValueError("agent must be a non-empty string")
        self._monitor = monitor
        self._registry = registry
        self._agent = agent

    def __repr__(self) -> str:
        return f"measure_latency({self.component!r})"

    # -- decorator ----------------------------------------------------------------------------

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R]]: ...

    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        if not callable(fn):
            raise TypeError(f"measure_latency decorates a function, got {fn!r}")
        if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
            raise TypeError(
                "measure_latency cannot time a generator function; use it as a context "
                "manager around the part to time"
            )
        if inspect.iscoroutinefunction(fn):
            coroutine_fn = cast(Callable[P, Coroutine[Any, Any, Any]], fn)

            @functools.wraps(fn)
            async def timed_coroutine(*args: P.args, **kwargs: P.kwargs) -> Any:
                wall, started = time.time(), time.perf_counter()
                try:
                    return await coroutine_fn(*args, **kwargs)
                finally:
                    self._record(wall, time.perf_counter() - started)

            return timed_coroutine

        @functools.wraps(fn)
        def timed(*args: P.args, **kwargs: P.kwargs) -> Any:
            wall, started = time.time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._record(wall, time.perf_counter() - started)

        return timed

    # -- context managers ---------------------------------------------------------------------

    def __enter__(self) -> measure_latency:
        _open.set((*_open.get(), (self, time.perf_counter(), time.time())))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        ended = time.perf_counter()
        entries = _open.get()
        for i in range(len(entries) - 1, -1, -1):  # the innermost open block of this object
            entry = entries[i]
            if entry[0] is self:
                _open.set(entries[:i] + entries[i + 1 :])
                self._record(entry[2], ended - entry[1])
                return
        _skip("unmatched_exit", self.component, ": __exit__ without __enter__ in this context")

    async def __aenter__(self) -> measure_latency:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    # -- recording ----------------------------------------------------------------------------

    def _record(self, wall_start: float, seconds: float) -> None:
        """Hand one measurement over; never raises into the timed code."""
        component = self.component
        try:
            handle, speech_id = _session_handle()
            if not _admit(component):
                _skip(
                    "too_many_components",
                    component,
                    f": more than {MAX_USER_COMPONENTS} distinct measure_latency names",
                )
                metrics = handle.metrics if handle is not None else self._metrics()
                metrics.label_overflow.labels(label="component").inc()
                return
            seconds = max(0.0, seconds)
            if handle is not None:
                handle.record_measured(component, wall_start, wall_start + seconds, speech_id)
                return
            agent = self._agent or "default"
            (self._monitor or default_monitor()).record(component, seconds * 1000.0, agent=agent)
            self._metrics().observe_measured(agent, component, seconds)
        except Exception as error:
            _skip("record_failed", component, f": {type(error).__name__}")

    def _metrics(self) -> LatencyMetrics:
        return LatencyMetrics.for_registry(self._registry)


def _session_handle() -> tuple[InstrumentHandle | None, str | None]:
    """The handle of the instrumented session running this code, and LiveKit's current speech
    id there; (None, None) outside one."""
    session, speech_id = current_speech_context()
    if session is None:
        return None, None
    handle = handle_for(session)
    return (handle, speech_id) if handle is not None else (None, None)


def _reset_for_tests() -> None:
    """Forget admitted names, skip counts and warnings (tests only)."""
    with _admitted_lock:
        _admitted.clear()
    _skipped.clear()
    _warned.clear()


__all__ = ["MAX_USER_COMPONENTS", "RESERVED_NAMES", "measure_latency", "skipped_measurements"]
