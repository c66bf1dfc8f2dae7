"""The LiveKit shapes lk_observe reads still exist: an upgrade that moves one fails here, loudly,
instead of silently costing turns or numbers in production."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from livekit.agents import AgentSession
from livekit.agents.metrics import LLMMetrics, RealtimeModelMetrics
from livekit.agents.voice import agent_activity, events
from livekit.agents.voice.speech_handle import SpeechHandle

from lk_observe.livekit_events import OBSERVED_EVENTS, PRIVATE_ATTRIBUTES

# the public fields livekit_events.py reads from each event it observes
EVENT_FIELDS: dict[str, tuple[type[Any], tuple[str, ...]]] = {
    "user_state_changed": (events.UserStateChangedEvent, ("new_state", "created_at")),
    "agent_state_changed": (events.AgentStateChangedEvent, ("new_state", "created_at")),
    "conversation_item_added": (events.ConversationItemAddedEvent, ("item",)),
    "speech_created": (events.SpeechCreatedEvent, ("speech_handle",)),
    "metrics_collected": (events.MetricsCollectedEvent, ("metrics",)),
    "function_tools_executed": (
        events.FunctionToolsExecutedEvent,
        ("function_calls", "function_call_outputs"),
    ),
    "error": (events.ErrorEvent, ("error",)),
    "close": (events.CloseEvent, ()),
}


def test_every_observed_event_is_one_livekit_emits_with_the_fields_read() -> None:
    assert set(EVENT_FIELDS) == OBSERVED_EVENTS
    for name, (model, fields) in EVENT_FIELDS.items():
        assert model.model_fields["type"].default == name
        missing = [f for f in fields if f not in model.model_fields]
        assert not missing, f"{model.__name__} lost {missing}: update lk_observe/livekit_events.py"


def test_llm_metrics_fields_read_still_exist() -> None:
    for model, fields in (
        (LLMMetrics, ("ttft", "duration", "timestamp", "speech_id", "metadata")),
        (LLMMetrics, ("prompt_tokens", "completion_tokens")),
        (RealtimeModelMetrics, ("ttft", "duration", "timestamp", "input_tokens", "output_tokens")),
    ):
        missing = [f for f in fields if f not in model.model_fields]
        assert not missing, f"{model.__name__} lost {missing}"


@pytest.mark.parametrize(("owner", "attribute"), PRIVATE_ATTRIBUTES)
def test_each_livekit_private_read_still_exists(owner: str, attribute: str) -> None:
    asyncio.set_event_loop(asyncio.new_event_loop())
    try:
        instances: dict[str, Any] = {
            "AgentSession": AgentSession(),
            "SpeechHandle": SpeechHandle.create(),
            "agent_activity": agent_activity,
        }
        assert hasattr(instances[owner], attribute), (
            f"livekit-agents no longer has {owner}.{attribute}: lk_observe/livekit_events.py "
            "reads it (see the list at its top)"
        )
    finally:
        asyncio.get_event_loop().close()
        asyncio.set_event_loop(None)


def test_session_exposes_current_speech_publicly() -> None:
    assert isinstance(AgentSession.__dict__.get("current_speech"), property)


def test_session_listeners_are_seen_so_no_listener_means_no_wake_up() -> None:
    from lk_observe.livekit_events import has_session_listeners
    from lk_observe.signals import BUDGET_EVENT

    asyncio.set_event_loop(asyncio.new_event_loop())
    try:
        session: Any = AgentSession()
        assert not has_session_listeners(session, BUDGET_EVENT)
        session.on(BUDGET_EVENT, lambda signal: None)
        assert has_session_listeners(session, BUDGET_EVENT)
        assert has_session_listeners(object(), BUDGET_EVENT)  # cannot tell: signal anyway
    finally:
        asyncio.get_event_loop().close()
        asyncio.set_event_loop(None)
