"""instrument()/uninstrument() on a real AgentSession: the emit hook, its removal, the user's
on_turn hook and listeners, unknown event shapes, argument checks, trace ids."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import pytest
from livekit.agents import AgentSession
from opentelemetry.sdk.trace import ReadableSpan
from prometheus_client import CollectorRegistry

import lk_observe
from lk_observe.demo import ScriptedPipeline, ScriptedTurn, build_pipeline, run_pipeline
from lk_observe.instrument import _MARKER
from tests.otel import memory_tracing

LISTENED = (
    "user_state_changed",
    "agent_state_changed",
    "conversation_item_added",
    "speech_created",
    "user_input_transcribed",
    "close",
)


@pytest.fixture(autouse=True)
def _event_loop_for_bare_sessions() -> Iterator[None]:
    """AgentSession() needs a current event loop; an earlier asyncio.run() leaves none set."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield
    asyncio.set_event_loop(None)
    loop.close()


def _instrument(session: Any, **kwargs: Any) -> lk_observe.InstrumentHandle:
    kwargs.setdefault("registry", CollectorRegistry())
    kwargs.setdefault("monitor", lk_observe.LatencyMonitor())
    return lk_observe.instrument(session, **kwargs)


def _is_plain(session: AgentSession[None]) -> bool:
    return "emit" not in session.__dict__ and _MARKER not in session.__dict__


# -- lifecycle on a bare session ------------------------------------------------------------


def test_instrument_twice_returns_the_same_handle() -> None:
    session: AgentSession[None] = AgentSession()
    handle = _instrument(session)
    assert _instrument(session, agent_name="other") is handle
    assert lk_observe.instrument(session) is handle
    assert handle.active
    handle.uninstrument()


def test_uninstrument_restores_emit_exactly_and_is_idempotent() -> None:
    session: AgentSession[None] = AgentSession()
    handle = _instrument(session)
    assert session.__dict__["emit"] is not None
    handle.uninstrument()
    assert _is_plain(session)
    assert session.emit.__func__ is AgentSession.emit  # type: ignore[attr-defined]
    assert not handle.active
    handle.uninstrument()  # a second call is a no-op
    lk_observe.uninstrument(session)
    assert _is_plain(session)
    # and the session can be instrumented again, with a fresh handle
    again = _instrument(session)
    assert again is not handle and again.active
    lk_observe.uninstrument(session)
    assert _is_plain(session) and not again.active


def test_uninstrument_of_a_never_instrumented_session_is_a_no_op() -> None:
    session: AgentSession[None] = AgentSession()
    before = dict(session.__dict__)
    lk_observe.uninstrument(session)
    assert session.__dict__ == before
    lk_observe.uninstrument(object())  # not even a session


def test_uninstrumented_session_is_no_longer_observed() -> None:
    session: AgentSession[None] = AgentSession()
    handle = _instrument(session)
    handle.uninstrument()
    cast(Any, session).emit("agent_state_changed", object())
    assert handle.skipped == {}


def test_uninstrument_restores_a_pre_existing_instance_emit() -> None:
    session: AgentSession[None] = AgentSession()
    seen: list[str] = []
    class_emit = session.emit

    def other_tools_emit(event: Any, *args: Any) -> None:
        seen.append(event)
        class_emit(event, *args)

    session.emit = other_tools_emit  # type: ignore[method-assign,assignment]
    handle = _instrument(session)
    cast(Any, session).emit("agent_state_changed", object())
    assert seen == ["agent_state_changed"]  # the chain is kept while instrumented
    handle.uninstrument()
    assert session.__dict__.get("emit") is other_tools_emit


# -- argument checks ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "   ", None, 3])
def test_empty_or_non_string_agent_name_is_a_value_error(name: object) -> None:
    session: AgentSession[None] = AgentSession()
    with pytest.raises(ValueError, match="agent_name"):
        _instrument(session, agent_name=name)
    assert _is_plain(session)


def test_slos_that_are_not_slo_objects_are_a_type_error() -> None:
    session: AgentSession[None] = AgentSession()
    with pytest.raises(TypeError, match="SLO"):
        _instrument(session, slos=[object()])
    assert _is_plain(session)


def test_non_callable_on_turn_is_a_type_error() -> None:
    session: AgentSession[None] = AgentSession()
    with pytest.raises(TypeError, match="on_turn"):
        _instrument(session, on_turn="print")
    assert _is_plain(session)


@pytest.mark.parametrize("thing", [object(), None, 42, "session", SimpleNamespace(emit=None)])
def test_something_that_is_not_a_session_is_a_type_error(thing: object) -> None:
    with pytest.raises(TypeError, match="AgentSession"):
        _instrument(thing)


@contextlib.contextmanager
def _restore_class_attributes(cls: type, *names: str) -> Iterator[None]:
    saved = {n: cls.__dict__[n] for n in names if n in cls.__dict__}
    try:
        yield
    finally:
        for n in names:
            if n in cls.__dict__ and cls.__dict__[n] is not saved.get(n):
                delattr(cls, n)
            if n in saved and cls.__dict__.get(n) is not saved[n]:
                setattr(cls, n, saved[n])


def test_the_agent_session_class_itself_is_a_type_error() -> None:
    with _restore_class_attributes(AgentSession, "emit", _MARKER):
        with pytest.raises(TypeError):
            handle = _instrument(AgentSession)
            handle.uninstrument()
        assert "emit" in AgentSession.__dict__


# -- unknown event shapes -------------------------------------------------------------------

UNKNOWN_SHAPES: list[tuple[str, object]] = [
    ("agent_state_changed", object()),
    ("user_state_changed", SimpleNamespace(new_state="listening")),
    ("speech_created", SimpleNamespace(speech_handle=None)),
    (
        "metrics_collected",
        SimpleNamespace(
            metrics=SimpleNamespace(
                type="llm_metrics", ttft=math.nan, duration=0.3, timestamp=1.0, speech_id="x"
            )
        ),
    ),
    ("metrics_collected", SimpleNamespace(metrics=SimpleNamespace(type="llm_metrics", ttft="x"))),
    ("function_tools_executed", SimpleNamespace(function_calls=None)),
    ("conversation_item_added", SimpleNamespace(item=SimpleNamespace(type="message"))),
    ("error", SimpleNamespace()),
]


@pytest.mark.parametrize(
    ("event", "payload"),
    UNKNOWN_SHAPES,
    ids=[f"{e}-{i}" for i, (e, _) in enumerate(UNKNOWN_SHAPES)],
)
def test_unknown_event_shape_never_raises_and_is_counted(event: str, payload: object) -> None:
    session: AgentSession[None] = AgentSession()
    received: list[object] = []
    session.on(event, received.append)  # type: ignore[arg-type]
    handle = _instrument(session)
    session.emit(event, payload)  # type: ignore[arg-type]
    assert received == [payload]  # LiveKit's own listeners still ran
    assert sum(handle.skipped.values()) == 1, handle.skipped
    assert handle.active
    handle.uninstrument()


@pytest.mark.parametrize("event", ["user_input_transcribed", "a_newer_event", ["unhashable"], 7])
def test_events_it_does_not_read_pass_through_untouched(event: Any) -> None:
    """Whatever LiveKit's emit does with an event lk_observe does not read, it still does."""

    def outcome(session: AgentSession[None]) -> tuple[list[object], str | None]:
        received: list[object] = []
        with contextlib.suppress(TypeError):
            session.on(event, received.append)
        try:
            session.emit(event, "payload")
        except Exception as error:  # LiveKit's own reaction, e.g. to an unhashable name
            return received, type(error).__name__
        return received, None

    plain = outcome(AgentSession())
    session: AgentSession[None] = AgentSession()
    handle = _instrument(session)
    assert outcome(session) == plain
    assert handle.skipped == {} and handle.handler_failures == 0
    handle.uninstrument()


def test_conversation_item_of_unknown_shape_is_counted() -> None:
    session: AgentSession[None] = AgentSession()
    handle = _instrument(session)
    session.emit("conversation_item_added", SimpleNamespace(item=42))  # type: ignore[arg-type]
    assert sum(handle.skipped.values()) == 1, handle.skipped
    handle.uninstrument()


# -- real scripted runs ---------------------------------------------------------------------


@dataclass
class Run:
    pipeline: ScriptedPipeline
    handle: lk_observe.InstrumentHandle
    registry: CollectorRegistry
    turns: list[lk_observe.Turn]
    spans: list[ReadableSpan]
    hook_threads: set[int]
    hook_loops: set[int]
    loop_thread: int
    listener_before: list[Any] = field(default_factory=list)
    listener_after: list[Any] = field(default_factory=list)
    recorded: list[Any] = field(default_factory=list)
    hook_calls: int = 0
    attached_at_event: int = 0  # how many events the session had recorded at instrument()


def _play(script: list[ScriptedTurn], *, before_start: bool, raise_first: bool) -> Run:
    async def play() -> Run:
        provider, exporter = memory_tracing()
        registry = CollectorRegistry()
        pipeline = build_pipeline(script)
        session = pipeline.session
        turns: list[lk_observe.Turn] = []
        threads: set[int] = set()
        loops: set[int] = set()
        calls = [0]
        attached_at = [0]

        def on_turn(turn: lk_observe.Turn) -> None:
            threads.add(threading.get_ident())
            with contextlib.suppress(RuntimeError):
                loops.add(id(asyncio.get_running_loop()))
            calls[0] += 1
            if raise_first and calls[0] == 1:
                raise RuntimeError("user hook bug")
            turns.append(turn)

        before: list[Any] = []
        after: list[Any] = []
        for name in LISTENED:
            cast(Any, session).on(name, before.append)

        def attach() -> lk_observe.InstrumentHandle:
            handle = lk_observe.instrument(
                session,
                tracer_provider=provider,
                registry=registry,
                monitor=lk_observe.LatencyMonitor(),
                on_turn=on_turn,
            )
            for name in LISTENED:
                cast(Any, session).on(name, after.append)
            attached_at[0] = len(session._recorded_events)
            return handle

        if before_start:
            handle = attach()
            await run_pipeline(pipeline)
        else:
            await session.start(pipeline.agent)
            handle = attach()
            pipeline.audio_input.push_silence()
            await asyncio.sleep(pipeline.duration_s + 0.5)
            with contextlib.suppress(RuntimeError):
                await session.drain()
            await session.aclose()
        recorded = list(session._recorded_events)
        assert await asyncio.to_thread(lk_observe.flush, 10.0)
        await asyncio.sleep(0.05)  # on_turn is delivered on the loop
        return Run(
            pipeline,
            handle,
            registry,
            turns,
            list(exporter.get_finished_spans()),
            threads,
            loops,
            threading.get_ident(),
            before,
            after,
            recorded,
            calls[0],
            attached_at[0],
        )

    return asyncio.run(play())


@pytest.fixture(scope="module")
def before_start() -> Run:
    """Instrumented before start(); the user's on_turn hook raises on its first call."""
    return _play(
        [ScriptedTurn(), ScriptedTurn(llm_ttft_s=0.3)], before_start=True, raise_first=True
    )


@pytest.fixture(scope="module")
def after_start() -> Run:
    return _play([ScriptedTurn(tts_ttfb_s=0.08)], before_start=False, raise_first=False)


def test_instrument_before_start_produces_turns(before_start: Run) -> None:
    assert before_start.hook_calls == 2
    user_turns = [t for t in before_start.turns if t.kind == "user"]
    assert len(user_turns) == 1  # the first was swallowed by the raising hook
    assert {"e2e", "vad", "stt", "eou", "llm_ttft", "tts_ttfb"} <= set(user_turns[0].latency_ms)
    assert before_start.handle.handler_failures == 0


def test_instrument_after_start_produces_turns(after_start: Run) -> None:
    [turn] = after_start.turns
    assert turn.kind == "user" and not turn.interrupted
    assert {"e2e", "vad", "stt", "eou", "llm_ttft", "tts_ttfb"} <= set(turn.latency_ms)
    assert turn.latency_ms["tts_ttfb"] == pytest.approx(80.0, abs=5.0)
    assert after_start.handle.handler_failures == 0


def test_raising_on_turn_hook_is_counted_and_never_reaches_the_session(before_start: Run) -> None:
    failures = before_start.registry.get_sample_value(
        "voice_agent_sink_failures_total", {"sink": "on_turn"}
    )
    assert failures == 1.0
    # the run completed (close was observed) and the later turn was still delivered
    assert before_start.turns and before_start.turns[-1].index == 2
    assert any(getattr(ev, "type", None) == "close" for ev in before_start.listener_before)


def test_on_turn_runs_on_the_event_loop_thread(before_start: Run, after_start: Run) -> None:
    for run in (before_start, after_start):
        assert run.hook_threads == {run.loop_thread}
        assert len(run.hook_loops) == 1  # inside the running loop, not merely the same thread


def test_user_listeners_still_receive_every_event(before_start: Run, after_start: Run) -> None:
    for run in (before_start, after_start):
        expected = [ev for ev in run.recorded if getattr(ev, "type", None) in LISTENED]
        assert run.listener_before == expected
        since_attach = [
            ev
            for ev in run.recorded[run.attached_at_event :]
            if getattr(ev, "type", None) in LISTENED
        ]
        assert run.listener_after == since_attach
        assert since_attach
        kinds = {ev.type for ev in expected}
        assert {"conversation_item_added", "speech_created", "agent_state_changed"} <= kinds


def test_session_close_removes_the_hook(before_start: Run, after_start: Run) -> None:
    for run in (before_start, after_start):
        assert not run.handle.active
        assert _is_plain(run.pipeline.session)


def test_trace_ids_on_delivered_turns_match_exported_root_spans(
    before_start: Run, after_start: Run
) -> None:
    for run in (before_start, after_start):
        roots = {s.context.trace_id: s for s in run.spans if s.name == "voice.turn"}
        assert len(roots) == run.handle.turns_emitted
        for turn in run.turns:
            assert turn.trace_id is not None and turn.trace_id in roots
            root = roots[turn.trace_id]
            assert root.context.span_id == turn.span_id
            attrs = root.attributes or {}
            assert attrs["voice.turn.index"] == turn.index
            assert attrs["voice.session.id"] == run.handle.session_id


def test_close_flushes_pending_turns_through_on_turn() -> None:
    """A reply still waiting for LLM metrics at close is delivered, not lost."""

    async def play() -> tuple[list[lk_observe.Turn], lk_observe.InstrumentHandle]:
        session: AgentSession[None] = AgentSession()
        turns: list[lk_observe.Turn] = []
        handle = _instrument(session, on_turn=turns.append)
        a = handle.assembler
        a.speech_created("s1", at=100.0)
        a.user_turn("i1", {"stopped_speaking_at": 99.7}, "s1", at=100.0)
        a.agent_speaking("s1", 100.4, {"llm_node_ttft": 0.2}, at=100.4)
        session.emit("close", SimpleNamespace(type="close"))  # type: ignore[arg-type]
        await asyncio.to_thread(lk_observe.flush, 5.0)
        await asyncio.sleep(0.02)
        return turns, handle

    turns, handle = asyncio.run(play())
    assert [t.speech_id for t in turns] == ["s1"]
    assert turns[0].latency_ms["e2e"] == pytest.approx(700.0)
    assert not handle.active


def test_with_fields_is_dataclasses_replace_for_every_field() -> None:
    import dataclasses

    from lk_observe.turns import with_fields

    turn = lk_observe.Turn(
        index=3,
        speech_id="speech_1",
        started_at=10.0,
        ended_at=10.5,
        latency_ms={"e2e": 500.0},
        interrupted=False,
        tier="good",
        stages={"e2e": lk_observe.Stage(10.0, 10.5)},
    )
    changes = {"budget_overruns_ms": {"e2e": 1.0}, "trace_id": 7, "span_id": 9}
    assert with_fields(turn, **changes) == dataclasses.replace(turn, **changes)
    for f in dataclasses.fields(lk_observe.Turn):  # any one field, as replace() would
        value = getattr(dataclasses.replace(turn, index=4), f.name)
        assert with_fields(turn, **{f.name: value}) == dataclasses.replace(turn, **{f.name: value})
    assert turn.trace_id is None  # the original is untouched
    assert not hasattr(lk_observe.Turn, "__post_init__")  # what would make the shortcut wrong
    with pytest.raises(TypeError, match="no field"):
        with_fields(turn, trace=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        with_fields(turn).index = 5  # type: ignore[misc]


def test_a_turn_handed_to_a_loop_that_closed_first_still_reaches_on_turn() -> None:
    """A job's loop can stop and close between the hand-back and its run: the turn is then
    delivered from the sink thread, never lost."""
    got: list[lk_observe.Turn] = []
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        session: AgentSession[None] = AgentSession()
        handle = lk_observe.instrument(
            session,
            registry=CollectorRegistry(),
            monitor=lk_observe.LatencyMonitor(),
            on_turn=got.append,
        )
        handle.sinks.loop = loop  # the agent's loop, not running now: the hand-back waits
        turn = lk_observe.Turn(
            index=1,
            speech_id="s",
            started_at=1.0,
            ended_at=2.0,
            latency_ms={},
            interrupted=False,
            tier=None,
        )
        handle.sinks.submit([turn], lambda _speech_id: None)
        assert lk_observe.flush(10.0)
        assert got == []  # queued on the loop, which never runs it
        loop.close()
        assert handle.close_and_flush(5.0)
        assert [t.index for t in got] == [1]
    finally:
        asyncio.set_event_loop(None)
        if not loop.is_closed():
            loop.close()
