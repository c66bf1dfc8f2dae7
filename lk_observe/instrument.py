"""Subscribe to an AgentSession, feed the TurnAssembler, fan finished turns out to the sinks.

We hook the session's own `emit` (on the instance, restored on uninstrument) rather than
registering one `session.on(...)` callback per event: LiveKit's emitter inspects every
callback's signature on every event and lets a listener's TypeError escape into its own code,
and `on("metrics_collected")` logs a deprecation warning in the user's app. One wrapper costs a
function call per event and can never raise into LiveKit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import queue
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanContext, TracerProvider
from prometheus_client import CollectorRegistry

from lk_observe.logs import default_turn_logger
from lk_observe.metrics import LatencyMetrics
from lk_observe.monitor import (
    LatencyMonitor,
    default_monitor,
    default_recent_turns,
    snapshot_sinks,
)
from lk_observe.otlp import flush_tracing
from lk_observe.presets import budget_overruns
from lk_observe.slo import DEFAULT_SLOS, SLO, SLOEvaluator
from lk_observe.tracing import TurnTracer
from lk_observe.turns import Turn, TurnAssembler

logger = logging.getLogger(__name__)

_MARKER = "_lk_observe_handle"
_SINK_QUEUE_SIZE = 10_000
_MAX_TRACKED_HANDLES = 64
_SLO_CHECK_INTERVAL_S = 1.0
JOB_EXIT_FLUSH_S = 5.0  # LiveKit gives shutdown callbacks a bounded time too

TurnHook = Callable[[Turn], None]
Sink = Callable[[Turn], "Turn | None"]


def _with_fields(turn: Turn, **changes: Any) -> Turn:
    """`dataclasses.replace(turn, **changes)` in a tenth of the time (0.4 us, not 3.7 us, per
    turn): Turn is a frozen dataclass with a plain __dict__, no __post_init__ and no derived
    fields, so copying its fields is all replace() does. Unknown field names raise TypeError."""
    unknown = changes.keys() - _TURN_FIELDS
    if unknown:
        raise TypeError(f"Turn has no field(s) {sorted(unknown)}")
    copy = object.__new__(Turn)
    fields = copy.__dict__
    fields.update(turn.__dict__)
    fields.update(changes)
    return copy


_TURN_FIELDS = frozenset(f.name for f in dataclasses.fields(Turn))


class _SinkWorker:
    """One daemon thread for the whole process: sinks (span export, /metrics bookkeeping,
    logging) never run on an agent's event loop, and a slow sink costs queued turns, not lag.

    `submit` takes no Python-level lock: a lock shared with this thread would make the loop
    wait out the thread's whole GIL slice (up to 5 ms) whenever they collide.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="lk-observe-sinks", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> bool:
        if self._queue.qsize() >= _SINK_QUEUE_SIZE:  # bounded memory if the sinks fall behind
            self.dropped += 1
            return False
        self._queue.put(job)
        return True

    def drain(self, timeout: float) -> bool:
        """Wait until every job submitted before this call ran; False on timeout.
        Blocking: never call it on the event loop."""
        if threading.current_thread() is self._thread:
            return True  # called from a sink: everything before it has run
        reached = threading.Event()
        self._queue.put(reached.set)  # one FIFO, one thread: when it runs, all before it ran
        return reached.wait(timeout)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                job()
            except Exception:  # jobs guard themselves; this is the last line of defence
                logger.exception("lk_observe sink job failed")
            finally:
                job = None  # type: ignore[assignment]  # don't pin the last session until the next turn


_worker: _SinkWorker | None = None
_worker_lock = threading.Lock()


def _sink_worker() -> _SinkWorker:
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = _SinkWorker()
        return _worker


# One evaluator per (monitor, agent, SLO set): many sessions of one agent share one breach state.
# Values are weak: an evaluator lives as long as a session of that agent holds it, so ever-new
# agent names cannot grow this.
_evaluators: weakref.WeakKeyDictionary[
    LatencyMonitor, weakref.WeakValueDictionary[tuple[str, tuple[SLO, ...]], _ThrottledSLOs]
] = weakref.WeakKeyDictionary()
_evaluators_lock = threading.Lock()


def _slo_evaluator(monitor: LatencyMonitor, agent: str, slos: tuple[SLO, ...]) -> _ThrottledSLOs:
    with _evaluators_lock:
        per_monitor = _evaluators.setdefault(monitor, weakref.WeakValueDictionary())
        key = (agent, slos)
        evaluator = per_monitor.get(key)
        if evaluator is None:
            evaluator = per_monitor[key] = _ThrottledSLOs(SLOEvaluator(slos, monitor, agent=agent))
        return evaluator


class _ThrottledSLOs:
    """Evaluates the SLOs from the monitor at most once a second (logs a breach once)."""

    def __init__(self, evaluator: SLOEvaluator) -> None:
        self._evaluator = evaluator
        self._next = 0.0

    def maybe_check(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + _SLO_CHECK_INTERVAL_S
        self._evaluator.check()


def flush(timeout: float = 5.0) -> bool:
    """Block until every finished turn has gone through the sinks (span processors included
    only as far as handing spans over). Call it from a thread, not from the event loop."""
    return _sink_worker().drain(timeout)


class InstrumentHandle:
    """What `instrument()` returns: the live link between one AgentSession and the sinks."""

    def __init__(
        self,
        session: Any,
        *,
        agent_name: str,
        tracer: TurnTracer,
        tracer_provider: TracerProvider,
        metrics: LatencyMetrics,
        monitor: LatencyMonitor,
        slos: tuple[SLO, ...],
        on_turn: TurnHook | None,
        sinks: Iterable[tuple[str, Sink]] = (),
    ) -> None:
        self.session_id = uuid.uuid4().hex
        self.agent_name = agent_name
        self.slos = slos
        self.monitor = monitor
        self.metrics = metrics
        self.assembler = TurnAssembler(session_id=self.session_id, agent=agent_name)
        self.turns_emitted = 0
        self.handler_failures = 0
        self._session_ref = weakref.ref(session)
        self._tracer = tracer
        self._tracer_provider = tracer_provider
        self._on_turn = on_turn
        self._slo_check = _slo_evaluator(monitor, agent_name, slos)
        self._sinks: list[tuple[str, Sink]] = [
            ("metrics", self._metrics_sink),
            ("monitor", self._monitor_sink),
            ("slo", self._slo_sink),
            ("recent", default_recent_turns().add),
            ("logs", default_turn_logger()),
            # multiprocess mode: share the monitor with the ops app in the worker process
            *snapshot_sinks(monitor),
            *sinks,
        ]
        # weak: only read for LiveKit's agent_turn span context; LiveKit owns the handles
        self._speech_handles: OrderedDict[str, weakref.ref[Any]] = OrderedDict()
        self._active = True
        self._self_ref = weakref.ref(self)  # for LiveKit's callbacks: they must not pin us
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        # another wrapper may already sit on the instance: uninstrument must put it back
        self._instance_emit = session.__dict__.get("emit")
        self._wrapped_emit = self._make_wrapper(session)

    # -- lifecycle ----------------------------------------------------------------------------

    def _attach(self, session: Any) -> None:
        session.emit = self._wrapped_emit  # instance attribute shadows AgentSession.emit
        setattr(session, _MARKER, self)
        with contextlib.suppress(RuntimeError):  # instrumented before the loop runs: set later
            self._loop = asyncio.get_running_loop()
        self._flush_on_job_exit()
        self.metrics.session_started(self.agent_name)
        self.metrics.export_components(self.agent_name, {slo.component for slo in self.slos})

    def uninstrument(self) -> None:
        """Stop observing: restore the session's emit and finish what was pending."""
        if not self._active:
            return
        self._active = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        session = self._session_ref()
        if session is not None:
            if session.__dict__.get("emit") is self._wrapped_emit:
                if self._instance_emit is None:
                    del session.emit  # back to AgentSession.emit, exactly as before
                else:
                    session.emit = self._instance_emit
            if session.__dict__.get(_MARKER) is self:
                delattr(session, _MARKER)
        self._dispatch(self.assembler.close(time.time()))
        self.metrics.session_ended(self.agent_name)

    def _flush_on_job_exit(self) -> None:
        """Inside a LiveKit job, finish and export this session's turns before the job process
        exits, bounded so a dead collector cannot hold the shutdown."""
        try:
            from livekit.agents import get_job_context

            ctx = get_job_context(required=False)
        except Exception:  # a livekit-agents without job contexts: nothing to hook
            return
        if ctx is None:
            return
        handle_ref = weakref.ref(self)

        async def flush_before_exit() -> None:
            handle = handle_ref()
            if handle is not None:
                await asyncio.to_thread(handle.close_and_flush, JOB_EXIT_FLUSH_S)

        ctx.add_shutdown_callback(flush_before_exit)

    def close_and_flush(self, timeout_s: float = JOB_EXIT_FLUSH_S) -> bool:
        """Finish pending turns, run them through the sinks and flush the span exporter, within
        `timeout_s` in all. Blocking: call it from a thread (or a shutdown hook), not the loop."""
        deadline = time.monotonic() + timeout_s
        loop = self._loop
        if self._active:
            if loop is not None and loop.is_running() and not loop.is_closed():
                done = threading.Event()

                def close_on_loop() -> None:
                    try:
                        self.uninstrument()
                    finally:
                        done.set()

                loop.call_soon_threadsafe(close_on_loop)
                done.wait(max(0.0, deadline - time.monotonic()))
            else:
                self.uninstrument()
        drained = _sink_worker().drain(max(0.0, deadline - time.monotonic()))
        exported = flush_tracing(self._tracer_provider, max(0.0, deadline - time.monotonic()))
        return drained and exported

    @property
    def active(self) -> bool:
        return self._active

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self.assembler.skipped)

    # -- event intake -------------------------------------------------------------------------

    def _make_wrapper(self, session: Any) -> Callable[..., None]:
        handle_ref = weakref.ref(self)
        session_ref = weakref.ref(session)  # the wrapper must not keep a closed session alive
        instance_emit = self._instance_emit
        class_emit = type(session).emit
        clock = time.time

        def emit(event: Any, *args: Any) -> None:
            at = clock()  # before LiveKit's listeners run: arrival, not their run time
            try:
                if instance_emit is not None:
                    instance_emit(event, *args)
                elif (owner := session_ref()) is not None:
                    class_emit(owner, event, *args)
            finally:
                # events a turn is not built from (interim transcripts...) cost one lookup
                if args and isinstance(event, str) and event in _ROUTES:
                    handle = handle_ref()
                    if handle is not None and handle._active:
                        handle._observe(event, args[0], at)

        return emit

    def _observe(self, event: str, ev: Any, at: float) -> None:
        try:
            turns = _ROUTES[event](self, ev, at)
            if turns:
                self._dispatch(turns)
        except Exception:  # an unknown event shape from a newer livekit-agents: skip, count
            self.handler_failures += 1
            self.assembler.skipped[f"unreadable_{event}"] += 1
            logger.warning("lk_observe skipped an unreadable %s event", event, exc_info=True)

    def _current_speech_id(self) -> str | None:
        speech = getattr(self._session_ref(), "current_speech", None)
        return getattr(speech, "id", None)

    def _on_user_state(self, ev: Any, at: float) -> list[Turn]:
        if ev.new_state == "speaking":
            self.assembler.user_barge_in(at)
        return self.assembler.user_state(ev.new_state, ev.created_at, at)

    def _on_agent_state(self, ev: Any, at: float) -> list[Turn]:
        if ev.new_state != "speaking":
            return self.assembler.expire(at)
        session = self._session_ref()
        speech = getattr(session, "current_speech", None)
        # LiveKit sets these just before "speaking" for its console (llm/tts timings)
        early = getattr(session, "_early_assistant_metrics", None)
        turns = self.assembler.agent_speaking(
            getattr(speech, "id", None),
            ev.created_at,
            early if isinstance(early, Mapping) else None,
            at,
        )
        self._arm_expiry()
        return turns

    def _on_item_added(self, ev: Any, at: float) -> list[Turn]:
        item = ev.item
        kind = getattr(item, "type", None)
        if kind is None:
            self.assembler.skipped["unreadable_conversation_item_added"] += 1
        elif kind == "message" and item.role == "user":
            return self.assembler.user_turn(
                item.id, item.metrics or {}, self._current_speech_id(), at
            )
        return self.assembler.expire(at)

    def _on_speech_created(self, ev: Any, at: float) -> list[Turn]:
        handle = ev.speech_handle
        self._track_speech(handle)
        return self.assembler.speech_created(handle.id, at)

    def _on_tools(self, ev: Any, at: float) -> list[Turn]:
        starts = [c.created_at for c in ev.function_calls]
        ends = [o.created_at for o in ev.function_call_outputs]
        if not starts or not ends:
            return self.assembler.expire(at)
        return self.assembler.tools_executed(
            self._current_speech_id(), min(starts), max(ends), len(starts), at
        )

    def _on_error(self, ev: Any, at: float) -> list[Turn]:
        error = ev.error
        kind = getattr(error, "type", None) or type(error).__name__
        self.metrics.error(self.agent_name, str(kind))
        return self.assembler.expire(at)

    def _on_close(self, ev: Any, at: float) -> list[Turn]:
        self._dispatch(self.assembler.close(at))
        self.uninstrument()
        return []

    def _on_metrics(self, ev: Any, at: float) -> list[Turn]:
        m = ev.metrics
        kind = getattr(m, "type", None)
        if kind not in ("llm_metrics", "realtime_model_metrics"):
            return []
        if m.ttft is None or m.ttft < 0:  # realtime models report -1: not measured
            self.assembler.skipped["llm_ttft_not_reported"] += 1
            return []
        metadata = getattr(m, "metadata", None)
        # LLMMetrics names them prompt/completion_tokens, RealtimeModelMetrics input/output_
        # tokens; ask pydantic for a missing one only when needed (a miss costs it ~1.5 us)
        if kind == "llm_metrics":
            input_tokens = getattr(m, "prompt_tokens", None)
            output_tokens = getattr(m, "completion_tokens", None)
        else:
            input_tokens = getattr(m, "input_tokens", None)
            output_tokens = getattr(m, "output_tokens", None)
        return self.assembler.llm_metrics(
            getattr(m, "speech_id", None),
            ended_at=m.timestamp,
            duration_s=m.duration,
            ttft_s=m.ttft,
            model=getattr(metadata, "model_name", None),
            provider=getattr(metadata, "model_provider", None),
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            at=at,
        )

    def _track_speech(self, handle: Any) -> None:
        try:  # noqa: SIM105  # contextlib.suppress costs the loop ~0.7 us per reply
            self._speech_handles[handle.id] = weakref.ref(handle)
        except TypeError:  # not weak-referenceable: no link to LiveKit's span, nothing else lost
            pass
        if len(self._speech_handles) > _MAX_TRACKED_HANDLES:
            self._speech_handles.popitem(last=False)
        handle_ref = self._self_ref

        def done(speech: Any) -> None:
            me = handle_ref()
            if me is None or not me._active:
                return
            try:
                me._dispatch(
                    me.assembler.speech_done(speech.id, bool(speech.interrupted), time.time())
                )
            except Exception:
                me.handler_failures += 1
                logger.warning("lk_observe could not read a finished speech", exc_info=True)

        handle.add_done_callback(done)

    def _arm_expiry(self) -> None:
        """Finish a reply whose LLM timing never arrives, even if no other event comes."""
        if self._timer is not None:
            return
        try:
            self._loop = self._loop or asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = self._loop.call_later(self.assembler.max_wait_s + 0.05, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if not self._active:
            return
        try:
            self._dispatch(self.assembler.expire(time.time()))
        except Exception:
            self.handler_failures += 1
            logger.warning("lk_observe expiry failed", exc_info=True)
        if self.assembler.pending:
            self._arm_expiry()

    # -- fan-out ------------------------------------------------------------------------------

    def _dispatch(self, turns: list[Turn]) -> None:
        if not turns:
            return
        if self._on_turn is not None and self._loop is None:
            with contextlib.suppress(RuntimeError):
                self._loop = asyncio.get_running_loop()
        for turn in turns:
            self.turns_emitted += 1
            job = functools.partial(self._run_sinks, turn, self._livekit_span(turn.speech_id))
            if not _sink_worker().submit(job):
                self.metrics.sink_failure("queue_full")
                logger.warning("lk_observe sink queue full: dropped turn %d", turn.index)
        if self._timer is not None and not self.assembler.pending:
            self._timer.cancel()  # nothing left to expire: spare the loop a timer callback
            self._timer = None

    def _livekit_span(self, speech_id: str | None) -> SpanContext | None:
        """LiveKit's own `agent_turn` span for this reply, when its telemetry is on."""
        handle_ref = self._speech_handles.get(speech_id) if speech_id else None
        ctx = getattr(handle_ref() if handle_ref is not None else None, "_agent_turn_context", None)
        if ctx is None:
            return None
        try:
            span_context = trace.get_current_span(ctx).get_span_context()
        except Exception:
            return None
        return span_context if span_context.is_valid else None

    def _run_sinks(self, turn: Turn, link: SpanContext | None) -> None:
        """Runs on the sink thread. The tracer goes first so the others see the trace id."""
        overruns: dict[str, float] = {}
        try:
            overruns = budget_overruns(turn)
        except Exception:
            self._sink_failed("budget")
        root: SpanContext | None = None
        try:
            root = self._tracer.record(turn, link, overruns)
        except Exception:
            self._sink_failed("tracing")
        if root is not None:
            turn = _with_fields(
                turn, budget_overruns_ms=overruns, trace_id=root.trace_id, span_id=root.span_id
            )
        elif overruns:
            turn = _with_fields(turn, budget_overruns_ms=overruns)
        for name, sink in self._sinks:
            try:
                turn = sink(turn) or turn
            except Exception:
                self._sink_failed(name)
        if self._on_turn is not None:
            loop = self._loop
            if loop is not None and not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(self._call_on_turn, turn)
                    return
                except RuntimeError:  # the loop closed meanwhile
                    pass
            self._call_on_turn(turn)

    def _sink_failed(self, name: str) -> None:
        logger.warning("lk_observe sink %r failed", name, exc_info=True)
        try:
            self.metrics.sink_failure(name)
        except Exception:
            logger.exception("lk_observe could not count a sink failure")

    def _call_on_turn(self, turn: Turn) -> None:
        assert self._on_turn is not None
        try:
            self._on_turn(turn)
        except Exception:  # the user's hook must never break the agent
            self._sink_failed("on_turn")

    def _metrics_sink(self, turn: Turn) -> None:
        self.metrics.observe_turn(turn)

    def _monitor_sink(self, turn: Turn) -> None:
        self.monitor.record_turn(turn)

    def _slo_sink(self, turn: Turn) -> None:
        if self.slos:
            self._slo_check.maybe_check()


# the AgentSession events a turn is assembled from -> their handler (plain functions, so a
# handle holds no reference cycle through them); every other event passes straight through
_ROUTES: dict[str, Callable[[InstrumentHandle, Any, float], list[Turn]]] = {
    "user_state_changed": InstrumentHandle._on_user_state,
    "agent_state_changed": InstrumentHandle._on_agent_state,
    "conversation_item_added": InstrumentHandle._on_item_added,
    "speech_created": InstrumentHandle._on_speech_created,
    "metrics_collected": InstrumentHandle._on_metrics,
    "function_tools_executed": InstrumentHandle._on_tools,
    "error": InstrumentHandle._on_error,
    "close": InstrumentHandle._on_close,
}


def instrument(
    session: Any,
    *,
    agent_name: str = "default",
    tracer_provider: TracerProvider | None = None,
    registry: CollectorRegistry | None = None,
    monitor: LatencyMonitor | None = None,
    slos: Iterable[SLO] | None = None,
    on_turn: TurnHook | None = None,
) -> InstrumentHandle:
    """Observe `session` (a livekit.agents.AgentSession, before or after start()).

    Instrumenting the same session twice returns the first handle unchanged.
    """
    if isinstance(session, type) or not callable(getattr(session, "emit", None)):
        raise TypeError(f"instrument() needs a livekit AgentSession, got {session!r}")
    if not isinstance(agent_name, str) or not agent_name.strip():
        raise ValueError("agent_name must be a non-empty string")
    if on_turn is not None and not callable(on_turn):
        raise TypeError("on_turn must be callable")
    slo_specs = tuple(DEFAULT_SLOS if slos is None else slos)
    for spec in slo_specs:
        if not isinstance(spec, SLO):
            raise TypeError(f"slos must contain lk_observe.SLO objects, got {type(spec).__name__}")
    existing = getattr(session, _MARKER, None)
    if isinstance(existing, InstrumentHandle) and existing.active:
        return existing
    handle = InstrumentHandle(
        session,
        agent_name=agent_name,
        tracer=TurnTracer(tracer_provider),
        tracer_provider=tracer_provider or trace.get_tracer_provider(),
        metrics=LatencyMetrics.for_registry(registry),
        monitor=monitor if monitor is not None else default_monitor(),
        slos=slo_specs,
        on_turn=on_turn,
    )
    handle._attach(session)
    return handle


def uninstrument(session: Any) -> None:
    """Undo `instrument(session)`; a no-op for a session that is not instrumented."""
    handle = getattr(session, _MARKER, None)
    if isinstance(handle, InstrumentHandle):
        handle.uninstrument()
