"""Where finished turns go: one sink thread per process, the fan-out to every sink, the SLO
check, and the hand-back of each turn to the user's `on_turn` (and of each budget signal to
`on_budget` and the session's listeners) on the agent's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
import math
import queue
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.trace import SpanContext

from lk_observe.livekit_events import emit_session_event, has_session_listeners
from lk_observe.logs import default_turn_logger
from lk_observe.metrics import LatencyMetrics
from lk_observe.monitor import LatencyMonitor
from lk_observe.multiprocess import snapshot_sinks
from lk_observe.presets import DEFAULT_BUDGET, LatencyBudget, budget_overruns
from lk_observe.recent import default_recent_turns
from lk_observe.sampling import TurnSampler
from lk_observe.signals import (
    BUDGET_EVENT,
    BudgetHook,
    BudgetSignal,
    SLOChange,
    slo_changed,
    turn_over_budget,
)
from lk_observe.slo import SLO, SLOEvaluator, SLOStatus
from lk_observe.tracing import MAX_OPEN_TURNS, TurnTracer
from lk_observe.turns import Turn, with_fields

logger = logging.getLogger(__name__)

SINK_QUEUE_SIZE = 10_000
SLO_CHECK_INTERVAL_S = 1.0

TurnHook = Callable[[Turn], None]
Sink = Callable[[Turn], "Turn | None"]


class SinkWorker:
    """One daemon thread for the whole process: sinks (span export, /metrics bookkeeping,
    logging) never run on an agent's event loop, and a slow sink costs queued turns, not lag.

    `submit` takes no lock: a lock shared with this thread would make the loop wait out the
    thread's whole GIL slice whenever they collide. Periodic work (the SLO check) is scheduled
    with `call_at` from the thread itself and runs when due: right after the job that made it
    due when that is already late enough, otherwise on a timed wake-up. With nothing
    scheduled, the thread sleeps until the next turn.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.dropped = 0
        self._timers: list[tuple[float, int, Callable[[], None]]] = []  # heap, this thread only
        self._timer_ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="lk-observe-sinks", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> bool:
        if self._queue.qsize() >= SINK_QUEUE_SIZE:  # bounded memory if the sinks fall behind
            self.dropped += 1
            return False
        self._queue.put(job)
        return True

    def call_at(self, due: float, job: Callable[[], None]) -> None:
        """Run `job` on this thread once `time.monotonic()` reaches `due`. Only from a job
        running on this thread (the timers are the thread's own, unlocked)."""
        if threading.current_thread() is not self._thread:
            raise RuntimeError("call_at() is for jobs running on the sink thread")
        heapq.heappush(self._timers, (due, next(self._timer_ids), job))

    def drain(self, timeout: float) -> bool:
        """Wait until every job submitted before this call ran; False on timeout.
        Blocking: never call it on the event loop."""
        if threading.current_thread() is self._thread:
            return True  # called from a sink: everything before it has run
        reached = threading.Event()
        self._queue.put(reached.set)  # one FIFO, one thread: when it runs, all before it ran
        return reached.wait(timeout)

    def _run(self) -> None:
        timers = self._timers
        while True:
            job: Callable[[], None] | None = None
            try:
                if timers:
                    job = self._queue.get(timeout=max(0.0, timers[0][0] - time.monotonic()))
                else:
                    job = self._queue.get()
            except queue.Empty:
                pass
            if job is not None:
                self._guarded(job)
                job = None  # don't pin the last session until the next turn
            while timers and timers[0][0] <= time.monotonic():
                self._guarded(heapq.heappop(timers)[2])

    @staticmethod
    def _guarded(job: Callable[[], None]) -> None:
        try:
            job()
        except Exception:  # jobs guard themselves; this is the last line of defence
            logger.exception("lk_observe sink job failed")


_worker: SinkWorker | None = None
_worker_lock = threading.Lock()


def sink_worker() -> SinkWorker:
    """This process's sink thread (started on first use)."""
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = SinkWorker()
        return _worker


def flush(timeout: float = 5.0) -> bool:
    """Block until every finished turn has gone through the sinks (span processors included
    only as far as handing spans over). Call it from a thread, not from the event loop."""
    return sink_worker().drain(timeout)


class SLOWatch:
    """The in-process SLO check of one agent on one monitor (its log line and `on_breach`):
    once a second at most, and only when there is something to look at: after a turn was
    recorded, and every second while an SLO is breaching (so its end re-arms the next breach).
    Runs on the sink thread's timer, not in the turn's own sink work; a quiet agent costs
    nothing. Each check counts turns per SLO, whatever the monitor's window holds. The agent's
    sessions that hear budget signals subscribe: each check tells them which SLOs burn."""

    def __init__(self, evaluator: SLOEvaluator) -> None:
        self._evaluator = evaluator
        self._last = -math.inf
        self._scheduled = False
        self.checks = 0
        # weak: a session that ends leaves by itself; a lock, as sessions join from their loop
        self._subscribers: weakref.WeakSet[TurnSinks] = weakref.WeakSet()
        self._subscribers_lock = threading.Lock()

    def subscribe(self, sinks: TurnSinks) -> None:
        with self._subscribers_lock:
            self._subscribers.add(sinks)

    def unsubscribe(self, sinks: TurnSinks) -> None:
        with self._subscribers_lock:
            self._subscribers.discard(sinks)

    def turn_recorded(self, turn: Turn | None = None) -> None:
        """A live sink (sink thread): schedule a check if none is due yet."""
        del turn
        if not self._scheduled:
            self._scheduled = True
            due = max(time.monotonic(), self._last + SLO_CHECK_INTERVAL_S)
            sink_worker().call_at(due, self._check)

    def _check(self) -> None:
        self._scheduled = False
        self._last = time.monotonic()
        self.checks += 1
        breaching = self._evaluator.watch()
        if self._subscribers:
            self._tell_subscribers()
        if breaching:
            self._scheduled = True
            sink_worker().call_at(self._last + SLO_CHECK_INTERVAL_S, self._check)

    def _tell_subscribers(self) -> None:
        with self._subscribers_lock:
            subscribers = list(self._subscribers)
        burning = self._evaluator.breaching
        statuses: dict[str, SLOStatus] = {}  # built once per check, only for an SLO that changed

        def status(name: str) -> SLOStatus:
            if name not in statuses:
                statuses[name] = self._evaluator.status(name)
            return statuses[name]

        for subscriber in subscribers:
            subscriber.slos_burning(burning, status)


# One evaluator per (monitor, agent, SLO set): many sessions of one agent share one breach
# state. Values are weak, so ever-new agent names cannot grow this.
_evaluators: weakref.WeakKeyDictionary[
    LatencyMonitor, weakref.WeakValueDictionary[tuple[str, tuple[SLO, ...]], SLOWatch]
] = weakref.WeakKeyDictionary()
_evaluators_lock = threading.Lock()


def slo_check(monitor: LatencyMonitor, agent: str, slos: tuple[SLO, ...]) -> SLOWatch:
    """The shared SLO check of `agent`'s sessions on `monitor`."""
    with _evaluators_lock:
        per_monitor = _evaluators.setdefault(monitor, weakref.WeakValueDictionary())
        key = (agent, slos)
        evaluator = per_monitor.get(key)
        if evaluator is None:
            evaluator = per_monitor[key] = SLOWatch(SLOEvaluator(slos, monitor, agent=agent))
        return evaluator


class TurnSinks:
    """One session's sinks, run on the sink thread. A turn's live report (first audio) opens
    its trace and feeds metrics, the monitor, the SLO check and the snapshot files; its complete
    record (the reply ended) ends the trace and goes to the recent turns, the logs and finally
    `on_turn`, back on the agent's loop. The tracer goes first each time, so the others see the
    trace id. A failing sink is counted and logged."""

    def __init__(
        self,
        *,
        agent: str,
        tracer: TurnTracer,
        metrics: LatencyMetrics,
        monitor: LatencyMonitor,
        slos: tuple[SLO, ...],
        on_turn: TurnHook | None,
        sampler: TurnSampler | None = None,
        budget: LatencyBudget = DEFAULT_BUDGET,
        on_budget: BudgetHook | None = None,
        session: Any = None,
        session_id: str = "",
    ) -> None:
        self.metrics = metrics
        self._agent = agent
        self._budget = budget
        # budget signals: to on_budget and the session's BUDGET_EVENT listeners, on the loop
        self._on_budget = on_budget
        self._session = None if session is None else weakref.ref(session)
        self._session_id = session_id
        self.signalling = on_budget is not None or session is not None
        self._burning: frozenset[str] = frozenset()  # the SLOs this session was told burn
        self._tracer = tracer
        self._sampler = sampler
        # turns whose trace sampling did not keep live: decided again when their reply ends
        self._undecided: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._on_turn = on_turn
        self.loop: asyncio.AbstractEventLoop | None = None  # where on_turn runs
        # handed to the loop and not run yet: (job, whether to run it here if the loop closes)
        self._handed: dict[int, tuple[Callable[[], None], bool]] = {}
        self._handed_ids = itertools.count()
        slo_checker = slo_check(monitor, agent, slos) if slos else None
        self._slo_checker = slo_checker
        if slo_checker is not None and self.signalling:
            slo_checker.subscribe(self)
        # multiprocess mode: share the monitor and recent turns with the ops app
        snapshot = snapshot_sinks(monitor)
        self._live_sinks: list[tuple[str, Sink]] = [
            ("metrics", metrics.observe_turn),
            ("monitor", monitor.record_turn),
            ("slo", slo_checker.turn_recorded if slo_checker else _no_sink),
            *snapshot,
        ]
        self._complete_sinks: list[tuple[str, Sink]] = [
            ("metrics", metrics.observe_completed_turn),
            ("recent", default_recent_turns().add),
            ("logs", default_turn_logger()),
            *snapshot,
        ]

    @property
    def names(self) -> list[str]:
        return sorted({name for name, _ in (*self._live_sinks, *self._complete_sinks)})

    def submit(
        self, turns: Iterable[Turn], links: Callable[[str | None], SpanContext | None]
    ) -> int:
        """Queue finished turns for the sink thread (from the loop); how many were queued."""
        if self.loop is None and (self._on_turn is not None or self.signalling):
            with contextlib.suppress(RuntimeError):
                self.loop = asyncio.get_running_loop()
        worker = sink_worker()
        queued = 0
        for turn in turns:
            if worker.submit(functools.partial(self._run, turn, links(turn.speech_id))):
                queued += 1
            else:
                self.metrics.sink_failure("queue_full")
                logger.warning("lk_observe sink queue full: dropped turn %d", turn.index)
        return queued

    def _run(self, turn: Turn, link: SpanContext | None) -> None:
        overruns: dict[str, float] = {}
        try:
            overruns = budget_overruns(turn, self._budget)
        except Exception:
            self._failed("budget")
        root: SpanContext | None = None
        try:
            if turn.complete:
                root = self._finish_trace(turn, link, overruns)
            else:
                root = self._start_trace(turn, link)
        except Exception:
            self._failed("tracing")
        if root is not None:
            turn = with_fields(
                turn, budget_overruns_ms=overruns, trace_id=root.trace_id, span_id=root.span_id
            )
        elif overruns:
            turn = with_fields(turn, budget_overruns_ms=overruns)
        for name, sink in self._complete_sinks if turn.complete else self._live_sinks:
            try:
                turn = sink(turn) or turn
            except Exception:
                self._failed(name)
        if turn.complete:
            if self._on_turn is not None:
                self._hand_back(functools.partial(self._call_on_turn, turn))
        elif overruns and self.signalling and turn.kind == "user" and self._heard():
            try:
                self._signal(turn_over_budget(turn, overruns, time.time()))
            except Exception:
                self._failed("on_budget")

    def _start_trace(self, turn: Turn, link: SpanContext | None) -> SpanContext | None:
        sampler = self._sampler
        if sampler is not None and not sampler.keep_live(turn):
            self._undecided[(turn.session_id, turn.index)] = None
            if len(self._undecided) > MAX_OPEN_TURNS:  # replies that never end
                self._undecided.popitem(last=False)
            return None
        return self._tracer.start(turn, link)

    def _finish_trace(
        self, turn: Turn, link: SpanContext | None, overruns: dict[str, float]
    ) -> SpanContext | None:
        sampler = self._sampler
        if sampler is not None and (turn.session_id, turn.index) in self._undecided:
            del self._undecided[(turn.session_id, turn.index)]
            if not sampler.keep_complete(turn):
                self.metrics.trace_sampled_out(turn.agent)
                return None
        # kept live (its root span is open), or kept now: written whole
        return self._tracer.finish(turn, link, overruns)

    def _hand_back(self, job: Callable[[], None], *, if_stranded: bool = True) -> None:
        """`job` (a user hook's call) on the agent's loop. When the loop is gone: straight from
        here (`on_turn`: every finished turn reaches it), or dropped (`if_stranded=False`:
        budget signals, which only mean something to a running session)."""
        self.deliver_stranded()
        loop = self.loop
        if loop is not None and not loop.is_closed():
            key = next(self._handed_ids)
            self._handed[key] = (job, if_stranded)
            try:
                loop.call_soon_threadsafe(self._run_handed, key)
                return
            except RuntimeError:  # the loop closed meanwhile
                self._handed.pop(key, None)
        if if_stranded:
            job()

    def _run_handed(self, key: int) -> None:
        handed = self._handed.pop(key, None)
        if handed is not None:
            handed[0]()

    def deliver_stranded(self) -> int:
        """Run `on_turn` here for turns handed to a loop that closed before running them (a
        job that ended); how many. Every finished turn reaches `on_turn` once; budget signals
        handed to that loop are dropped."""
        loop = self.loop
        if not self._handed or (loop is not None and not loop.is_closed()):
            return 0
        stranded = 0
        for key in sorted(self._handed):
            handed = self._handed.pop(key, None)
            if handed is not None and handed[1]:
                stranded += 1
                handed[0]()
        return stranded

    # -- budget signals -----------------------------------------------------------------------

    def _heard(self) -> bool:
        """Whether a budget signal has anyone to go to: the hook or the session's listeners
        (without either, a turn over budget does not wake the agent's loop)."""
        if self._on_budget is not None:
            return True
        session = None if self._session is None else self._session()
        return session is not None and has_session_listeners(session, BUDGET_EVENT)

    def _signal(self, signal: BudgetSignal) -> None:
        """Hand a budget signal to the agent's loop (sink thread)."""
        self._hand_back(functools.partial(self._deliver_signal, signal), if_stranded=False)

    def slos_burning(self, burning: frozenset[str], status: Callable[[str], SLOStatus]) -> None:
        """The SLO check's news (sink thread): which SLOs burn now; `status` gives one's
        figures. Signals what changed since this session was last told."""
        loop = self.loop
        if not self.signalling or loop is None or loop.is_closed():
            return  # told what burns once it runs on a loop (it may join mid-burn)
        known, self._burning = self._burning, burning
        if known == burning:
            return
        at = time.time()
        changes: list[tuple[SLOChange, str]] = [
            *(("slo_burning", name) for name in sorted(burning - known)),
            *(("slo_recovered", name) for name in sorted(known - burning)),
        ]
        for kind, name in changes:
            try:
                self._signal(
                    slo_changed(
                        kind, status(name), agent=self._agent, session_id=self._session_id, at=at
                    )
                )
            except Exception:
                self._failed("on_budget")

    def stop_signals(self) -> None:
        """No more budget signals for this session (it ended): handed ones are dropped too."""
        self.signalling = False
        if self._slo_checker is not None:
            self._slo_checker.unsubscribe(self)

    def _deliver_signal(self, signal: BudgetSignal) -> None:
        """On the agent's loop: `on_budget`, then the session's BUDGET_EVENT listeners."""
        if not self.signalling:
            return
        if self._on_budget is not None:
            try:
                self._on_budget(signal)
            except Exception:  # the user's hook must never break the agent
                self._failed("on_budget")
        session = None if self._session is None else self._session()
        if session is not None:
            try:
                emit_session_event(session, BUDGET_EVENT, signal)
            except Exception:  # a listener's TypeError (LiveKit's emitter lets it escape)
                self._failed("on_budget")

    def _failed(self, name: str) -> None:
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
            self._failed("on_turn")


def _no_sink(turn: Turn) -> None:
    del turn
