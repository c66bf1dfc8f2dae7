"""Attach lk_observe to an AgentSession, detach it, and flush on job exit.

We hook the session's own `emit` (on the instance, restored on uninstrument) rather than
registering one `session.on(...)` callback per event: LiveKit's emitter inspects every
callback's signature on every event and lets a listener's TypeError escape into its own code,
and `on("metrics_collected")` logs a deprecation warning in the user's app. One wrapper costs a
function call per event and can never raise into LiveKit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import TracerProvider
from prometheus_client import CollectorRegistry

from lk_observe.livekit_events import OBSERVED_EVENTS, SessionEvents, add_job_shutdown_callback
from lk_observe.metrics import LatencyMetrics
from lk_observe.monitor import LatencyMonitor, default_monitor
from lk_observe.otlp import flush_tracing
from lk_observe.presets import DEFAULT_BUDGET, LatencyBudget
from lk_observe.sampling import TraceSampling, TurnSampler
from lk_observe.signals import BudgetHook
from lk_observe.sinks import TurnHook, TurnSinks, sink_worker
from lk_observe.slo import DEFAULT_SLOS, SLO
from lk_observe.tracing import TurnTracer
from lk_observe.turns import Turn, TurnAssembler

_MARKER = "_lk_observe_handle"
JOB_EXIT_FLUSH_S = 5.0  # LiveKit gives shutdown callbacks a bounded time too


class InstrumentHandle:
    """What `instrument()` returns: the live link between one AgentSession and the sinks."""

    def __init__(
        self,
        session: Any,
        *,
        agent_name: str,
        tracer_provider: TracerProvider | None,
        metrics: LatencyMetrics,
        monitor: LatencyMonitor,
        slos: tuple[SLO, ...],
        on_turn: TurnHook | None,
        trace_sampling: TraceSampling | None = None,
        hear_audio: bool = True,
        on_budget: BudgetHook | None = None,
        budget: LatencyBudget = DEFAULT_BUDGET,
    ) -> None:
        self.session_id = uuid.uuid4().hex
        self.trace_sampling = trace_sampling
        self.agent_name = agent_name
        self.slos = slos
        self.monitor = monitor
        self.metrics = metrics
        self.turns_emitted = 0
        self._tracer_provider = tracer_provider or trace.get_tracer_provider()
        self.sinks = TurnSinks(
            agent=agent_name,
            tracer=TurnTracer(tracer_provider),
            metrics=metrics,
            monitor=monitor,
            slos=slos,
            on_turn=on_turn,
            sampler=None if trace_sampling is None else TurnSampler(trace_sampling, slos),
            budget=budget,
            on_budget=on_budget,
            session=session,  # budget signals go to its BUDGET_EVENT listeners too
            session_id=self.session_id,
        )
        self.events = SessionEvents(
            session,
            TurnAssembler(session_id=self.session_id, agent=agent_name),
            self._dispatch,
            functools.partial(metrics.error, agent_name),
            hear_audio=hear_audio,
        )
        self._session_ref = weakref.ref(session)
        self._active = True
        # another wrapper may already sit on the instance: uninstrument must put it back
        self._instance_emit = session.__dict__.get("emit")
        self._wrapped_emit = self._make_wrapper(session)

    @property
    def assembler(self) -> TurnAssembler:
        return self.events.assembler

    @property
    def active(self) -> bool:
        return self._active

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self.assembler.skipped)

    @property
    def handler_failures(self) -> int:
        """Events and callbacks lk_observe could not read (each also counted in `skipped`
        or logged)."""
        return self.events.unreadable

    # -- lifecycle ----------------------------------------------------------------------------

    def _attach(self, session: Any) -> None:
        session.emit = self._wrapped_emit  # instance attribute shadows AgentSession.emit
        setattr(session, _MARKER, self)
        self.events.audio.attach(session)  # again at each agent state: RoomIO sets it at start
        with contextlib.suppress(RuntimeError):  # instrumented before the loop runs: set later
            self.events.loop = self.sinks.loop = asyncio.get_running_loop()
        self._flush_on_job_exit()
        self.metrics.session_started(self.agent_name)
        self.metrics.export_components(self.agent_name, {slo.component for slo in self.slos})
        if self.trace_sampling is not None:
            self.metrics.export_sampling(self.agent_name)

    def uninstrument(self) -> None:
        """Stop observing: restore the session's emit and finish what was pending."""
        if not self._active:
            return
        self._active = False
        self.sinks.stop_signals()
        session = self._session_ref()
        if session is not None:
            if session.__dict__.get("emit") is self._wrapped_emit:
                if self._instance_emit is None:
                    del session.emit  # back to AgentSession.emit, exactly as before
                else:
                    session.emit = self._instance_emit
            if session.__dict__.get(_MARKER) is self:
                delattr(session, _MARKER)
        self.events.close(time.time())
        self.metrics.session_ended(self.agent_name)

    def _flush_on_job_exit(self) -> None:
        """Inside a LiveKit job, finish and export this session's turns before the job process
        exits, bounded so a dead collector cannot hold the shutdown."""
        handle_ref = weakref.ref(self)

        async def flush_before_exit() -> None:
            handle = handle_ref()
            if handle is not None:
                await asyncio.to_thread(handle.close_and_flush, JOB_EXIT_FLUSH_S)

        add_job_shutdown_callback(flush_before_exit)

    def close_and_flush(self, timeout_s: float = JOB_EXIT_FLUSH_S) -> bool:
        """Finish pending turns, run them through the sinks and flush the span exporter, within
        `timeout_s` in all. Blocking: call it from a thread (or a shutdown hook), not the loop."""
        deadline = time.monotonic() + timeout_s
        loop = self.events.loop or self.sinks.loop
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
        drained = sink_worker().drain(max(0.0, deadline - time.monotonic()))
        self.sinks.deliver_stranded()  # the job's loop may have closed before on_turn ran
        exported = flush_tracing(self._tracer_provider, max(0.0, deadline - time.monotonic()))
        return drained and exported

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
                if args and isinstance(event, str) and event in OBSERVED_EVENTS:
                    handle = handle_ref()
                    if handle is not None and handle._active:
                        handle.events.read(event, args[0], at)
                        if event == "close":
                            handle.uninstrument()

        return emit

    def _dispatch(self, turns: list[Turn]) -> None:
        self.turns_emitted += sum(turn.complete for turn in turns)
        self.sinks.submit(turns, self.events.livekit_span)

    # -- measure_latency ----------------------------------------------------------------------

    def record_measured(
        self, component: str, start: float, end: float, speech_id: str | None
    ) -> None:
        """One `measure_latency` measurement taken inside this session (unix seconds): into
        the monitor and the latency histogram on the sink thread, and to the turn it belongs
        to on the agent's loop. Never blocks, never raises."""
        monitor, metrics, agent = self.monitor, self.metrics, self.agent_name
        seconds = max(0.0, end - start)

        def record() -> None:
            try:
                monitor.record(component, seconds * 1000.0, agent=agent)
            except Exception:
                metrics.sink_failure("measure")
            try:
                metrics.observe_measured(agent, component, seconds)
            except Exception:
                metrics.sink_failure("measure")

        sink_worker().submit(record)  # a full queue counts it in SinkWorker.dropped
        if not self._active:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # a worker thread (asyncio.to_thread, an executor)
            running = None
        loop = self.events.loop or running  # instrumented before the loop ran: not known yet
        if loop is None:
            return
        at = time.time()
        if running is loop:
            self._measured_to_turn(component, start, end, speech_id, at)
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(
                    self._measured_to_turn, component, start, end, speech_id, at
                )

    def _measured_to_turn(
        self, component: str, start: float, end: float, speech_id: str | None, at: float
    ) -> None:
        if not self._active:
            return
        try:
            self.events.measured(component, start, end, speech_id, at)
        except Exception:
            self.metrics.sink_failure("measure")


def instrument(
    session: Any,
    *,
    agent_name: str = "default",
    tracer_provider: TracerProvider | None = None,
    registry: CollectorRegistry | None = None,
    monitor: LatencyMonitor | None = None,
    slos: Iterable[SLO] | None = None,
    on_turn: TurnHook | None = None,
    trace_sampling: TraceSampling | None = None,
    hear_audio: bool = True,
    on_budget: BudgetHook | None = None,
    budget: LatencyBudget | None = None,
) -> InstrumentHandle:
    """Observe `session` (a livekit.agents.AgentSession, before or after start()).

    `trace_sampling`: keep only the traces worth reading (slow, interrupted, failed and
    tool-calling turns, and a fraction of the rest); default: from LK_OBSERVE_TRACE_KEEP_FRACTION
    / LK_OBSERVE_TRACE_SLOWER_THAN_MS, else every trace. `hear_audio=False`: do not listen to
    the session's audio (about 3 us per 10 ms input frame on the loop); e2e then starts at
    LiveKit's end-of-speech estimate (`Turn.e2e_source == "livekit"`). `on_budget`: called
    with a `BudgetSignal` on the agent's loop when a turn overruns `budget` (default: the
    guide's, DEFAULT_BUDGET) at its first audio, and when one of `slos` starts or stops burning;
    the same signal is emitted as the session event BUDGET_EVENT ("lk_observe_budget").
    Instrumenting the same session twice returns the first handle unchanged.
    """
    if isinstance(session, type) or not callable(getattr(session, "emit", None)):
        raise TypeError(f"instrument() needs a livekit AgentSession, got {session!r}")
    if not isinstance(agent_name, str) or not agent_name.strip():
        raise ValueError("agent_name must be a non-empty string")
    if on_turn is not None and not callable(on_turn):
        raise TypeError("on_turn must be callable")
    if on_budget is not None and not callable(on_budget):
        raise TypeError("on_budget must be callable")
    if budget is not None and not isinstance(budget, LatencyBudget):
        raise TypeError(f"budget must be a lk_observe.LatencyBudget, got {type(budget).__name__}")
    if not isinstance(hear_audio, bool):
        raise TypeError(f"hear_audio must be True or False, got {hear_audio!r}")
    if trace_sampling is not None and not isinstance(trace_sampling, TraceSampling):
        raise TypeError(
            "trace_sampling must be a lk_observe.TraceSampling, "
            f"got {type(trace_sampling).__name__}"
        )
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
        tracer_provider=tracer_provider,
        metrics=LatencyMetrics.for_registry(registry),
        monitor=monitor if monitor is not None else default_monitor(),
        slos=slo_specs,
        on_turn=on_turn,
        trace_sampling=trace_sampling if trace_sampling is not None else TraceSampling.from_env(),
        hear_audio=hear_audio,
        on_budget=on_budget,
        budget=DEFAULT_BUDGET if budget is None else budget,
    )
    handle._attach(session)
    return handle


def handle_for(session: Any) -> InstrumentHandle | None:
    """The active handle `instrument()` attached to `session`; None when it is not observed."""
    try:
        handle = getattr(session, _MARKER, None)
    except Exception:  # an object whose attribute lookup raises: not ours
        return None
    return handle if isinstance(handle, InstrumentHandle) and handle.active else None


def uninstrument(session: Any) -> None:
    """Undo `instrument(session)`; a no-op for a session that is not instrumented."""
    handle = getattr(session, _MARKER, None)
    if isinstance(handle, InstrumentHandle):
        handle.uninstrument()
