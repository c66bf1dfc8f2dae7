"""One recorded user turn, replayed through `session.emit` as livekit-agents 1.8 emits it.

For the benchmarks, soak and fault tests: it writes two LiveKit privates (`session._activity`,
`_early_assistant_metrics`) to put the session in the state LiveKit had, so it lives here, not
in the package.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from livekit.agents import llm

RecordedEvent = tuple[str, Any, Any, "dict[str, float] | None"]


class _Activity:
    """What `AgentSession.current_speech` reads (`session._activity.current_speech`)."""

    __slots__ = ("current_speech",)

    def __init__(self, speech: Any) -> None:
        self.current_speech = speech


def recorded_turn(e2e_s: float = 0.47, *, label: str = "recorded") -> list[RecordedEvent]:
    """One user turn's events as livekit-agents 1.8 emits them, as real event objects:
    (name, event, the session's current speech at that moment, early assistant metrics)."""
    from livekit.agents.metrics import LLMMetrics
    from livekit.agents.voice.events import (
        AgentStateChangedEvent,
        ConversationItemAddedEvent,
        MetricsCollectedEvent,
        SpeechCreatedEvent,
        UserStateChangedEvent,
    )
    from livekit.agents.voice.speech_handle import SpeechHandle

    t0 = time.time() - 0.2  # the user stopped speaking a moment ago
    handle = SpeechHandle.create()
    metrics: llm.MetricsReport = {
        "stopped_speaking_at": t0,
        "transcription_delay": 0.151,
        "end_of_turn_delay": 0.251,
    }
    item = llm.ChatMessage(role="user", content=["(text)"], metrics=metrics)
    early = {"llm_node_ttft": 0.251, "tts_node_ttfb": 0.061, "playback_latency": 0.00001}
    llm_metrics = LLMMetrics(
        label=label,
        request_id="r",
        timestamp=t0 + e2e_s + 0.2,
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
    speaking = AgentStateChangedEvent(
        old_state="thinking", new_state="speaking", created_at=t0 + e2e_s
    )
    listening: Literal["listening"] = "listening"
    speaking_user: Literal["speaking"] = "speaking"
    return [
        ("user_state_changed", UserStateChangedEvent(old_state=listening, new_state=speaking_user),
         None, None),
        ("speech_created",
         SpeechCreatedEvent(user_initiated=False, source="generate_reply", speech_handle=handle),
         None, None),
        ("user_state_changed",
         UserStateChangedEvent(old_state=speaking_user, new_state=listening, created_at=t0),
         None, None),
        ("conversation_item_added", ConversationItemAddedEvent(item=item), handle, None),
        ("agent_state_changed", AgentStateChangedEvent(old_state=listening, new_state="thinking"),
         None, None),
        ("agent_state_changed", speaking, handle, early),
        ("metrics_collected", MetricsCollectedEvent(metrics=llm_metrics), None, None),
        ("agent_state_changed",
         AgentStateChangedEvent(old_state="speaking", new_state=listening), None, None),
    ]  # fmt: skip


def emit_recorded(session: Any, event: RecordedEvent) -> None:
    """Emit one recorded event, first putting the session in the state LiveKit had then."""
    name, ev, current, early = event
    if current is not None:
        session._activity = _Activity(current)
        if early is not None:
            session._early_assistant_metrics = early
    session.emit(name, ev)


def speech_of(events: list[RecordedEvent]) -> Any:
    """The SpeechHandle of a recorded turn: mark it done (`_mark_done()`) when it played out."""
    created = next(ev for name, ev, _, _ in events if name == "speech_created")
    return created.speech_handle
