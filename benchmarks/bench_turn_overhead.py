"""CPU cost per turn of lk_observe (assembler + spans + Prometheus + monitor), with baselines.

Replays one recorded turn's real LiveKit event objects through a session's `emit`:
  baseline  - the same session with no instrumentation (LiveKit's emitter, no listeners)
  listeners - the naive alternative: one `session.on(...)` callback per event type
  ours      - lk_observe.instrument() with a TracerProvider + BatchSpanProcessor
CPU time (process_time: all threads, so the sink thread's work counts) over N turns.

    uv run python benchmarks/bench_turn_overhead.py [--turns 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

from livekit.agents import AgentSession
from livekit.agents.llm import ChatMessage
from livekit.agents.metrics import LLMMetrics
from livekit.agents.voice.events import (
    AgentStateChangedEvent,
    ConversationItemAddedEvent,
    MetricsCollectedEvent,
    SpeechCreatedEvent,
    UserStateChangedEvent,
)
from livekit.agents.voice.speech_handle import SpeechHandle
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry

import lk_observe


class _DiscardExporter(SpanExporter):
    """Stands in for a healthy collector: serialisation-free, so we time the SDK and us."""

    def export(self, spans: Any) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _turn_events(t0: float) -> list[tuple[str, Any, Callable[[], Any] | None]]:
    handle = SpeechHandle.create()
    metrics = {
        "stopped_speaking_at": t0 + 0.0,
        "transcription_delay": 0.151,
        "end_of_turn_delay": 0.251,
    }
    item = ChatMessage(role="user", content=["(text)"], metrics=metrics)  # type: ignore[typeddict-item]
    early = {"llm_node_ttft": 0.251, "tts_node_ttfb": 0.061, "playback_latency": 0.00001}
    llm = LLMMetrics(
        label="bench",
        request_id="r",
        timestamp=t0 + 0.7,
        duration=0.45,
        ttft=0.251,
        cancelled=False,
        completion_tokens=12,
        prompt_tokens=48,
        prompt_cached_tokens=0,
        total_tokens=60,
        tokens_per_second=30.0,
        speech_id=handle.id,
    )
    return [
        (
            "user_state_changed",
            UserStateChangedEvent(old_state="listening", new_state="speaking"),
            None,
        ),
        (
            "speech_created",
            SpeechCreatedEvent(user_initiated=False, source="generate_reply", speech_handle=handle),
            None,
        ),
        (
            "user_state_changed",
            UserStateChangedEvent(old_state="speaking", new_state="listening", created_at=t0),
            None,
        ),
        ("conversation_item_added", ConversationItemAddedEvent(item=item), lambda: handle),
        (
            "agent_state_changed",
            AgentStateChangedEvent(old_state="listening", new_state="thinking"),
            None,
        ),
        (
            "agent_state_changed",
            AgentStateChangedEvent(
                old_state="thinking", new_state="speaking", created_at=t0 + 0.47
            ),
            lambda: (handle, early),
        ),
        ("metrics_collected", MetricsCollectedEvent(metrics=llm), None),
        (
            "agent_state_changed",
            AgentStateChangedEvent(old_state="speaking", new_state="listening"),
            None,
        ),
    ]


def _replay(
    session: AgentSession, turns: list[list[tuple[str, Any, Any]]], *, paced: bool
) -> float:
    """CPU seconds (all threads) to play `turns`. Paced: each turn's sink work finishes before
    the next turn starts, as in a real call (turns are seconds apart); unpaced: back to back,
    the sink thread and the loop contending for the GIL the whole time (a worst case)."""
    start = time.process_time()
    for events in turns:
        if paced:
            lk_observe.flush(30.0)
        for name, ev, current in events:
            if current is not None:
                value = current()
                handle = value[0] if isinstance(value, tuple) else value
                session._activity = type("A", (), {"current_speech": handle})()  # type: ignore[assignment]
                if isinstance(value, tuple):
                    session._early_assistant_metrics = value[1]  # type: ignore[attr-defined]
            session.emit(name, ev)
    lk_observe.flush(30.0)
    return time.process_time() - start


def _listening_session() -> AgentSession:
    session = AgentSession()
    for name in (
        "user_state_changed",
        "speech_created",
        "conversation_item_added",
        "agent_state_changed",
        "function_tools_executed",
        "error",
        "close",
    ):
        session.on(name, lambda ev: None)  # the cost is LiveKit's dispatch
    return session


def run(turns: int) -> dict[str, float]:
    """CPU seconds per variant and pacing, e.g. results["lk_observe, paced"]."""
    results: dict[str, float] = {}
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(_DiscardExporter(), max_queue_size=65536))
    for paced in (True, False):
        mode = "paced" if paced else "back to back"
        now = time.time()  # each pass is new to the assembler: fresh handles, current clock
        results[f"baseline, {mode}"] = _replay(
            AgentSession(), [_turn_events(now + i * 0.001) for i in range(turns)], paced=paced
        )
        results[f"naive listeners (no work), {mode}"] = _replay(
            _listening_session(),
            [_turn_events(now + i * 0.001) for i in range(turns)],
            paced=paced,
        )
        session = AgentSession()
        handle = lk_observe.instrument(
            session,
            tracer_provider=provider,
            registry=CollectorRegistry(),
            monitor=lk_observe.LatencyMonitor(),
        )
        results[f"lk_observe, {mode}"] = _replay(
            session, [_turn_events(now + i * 0.001) for i in range(turns)], paced=paced
        )
        assert handle.turns_emitted == turns, (handle.turns_emitted, turns, handle.skipped)
        handle.uninstrument()
    provider.shutdown()
    return results


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=2000)
    args = parser.parse_args(argv)
    asyncio.set_event_loop(asyncio.new_event_loop())
    results = run(args.turns)
    print(f"{'variant':<40} {'CPU ms/turn':>12} {'added ms/turn':>14} {'x baseline':>11}")
    for name, seconds in results.items():
        base = results["baseline, " + name.rsplit(", ", 1)[1]]
        per_turn = seconds / args.turns * 1000
        added = (seconds - base) / args.turns * 1000
        print(f"{name:<40} {per_turn:>12.4f} {added:>14.4f} {seconds / base:>10.1f}x")
    return results


if __name__ == "__main__":
    main()
