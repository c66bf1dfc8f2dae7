"""The only module that reads LiveKit's event shapes: AgentSession events -> TurnAssembler calls.

Everything version-sensitive about livekit-agents lives here. Event fields are public; these
private attributes are still needed (checked on livekit-agents 1.8.9; tests/unit/
test_livekit_events.py fails loudly when an upgrade removes one):

- `AgentSession._early_assistant_metrics`: the reply's llm_node_ttft / tts_node_ttfb, which
  LiveKit sets just before the agent starts speaking (for its console) and emits nowhere else.
- `SpeechHandle._agent_turn_context`: the OTel context of LiveKit's own `agent_turn` span,
  so a turn's trace can link to it when LiveKit's telemetry is on.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanContext

from lk_observe.turns import Turn, TurnAssembler

logger = logging.getLogger(__name__)

# (owner, attribute): the LiveKit privates read below
PRIVATE_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("AgentSession", "_early_assistant_metrics"),
    ("SpeechHandle", "_agent_turn_context"),
)
_MAX_TRACKED_HANDLES = 64
MAX_AGENT_ID = 64  # characters of an Agent id kept on a turn

Deliver = Callable[[list[Turn]], None]


class SessionEvents:
    """Feeds one session's events to its TurnAssembler and hands finished turns to `deliver`.

    Runs on the session's event loop. Besides events, a reply finishes when its SpeechHandle is
    done (a done callback) or, when LiveKit's LLM timing never comes, on an expiry timer.
    """

    def __init__(
        self,
        session: Any,
        assembler: TurnAssembler,
        deliver: Deliver,
        on_error: Callable[[str], None],
    ) -> None:
        self.assembler = assembler
        self.unreadable = 0  # events whose shape could not be read (skipped and counted)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._session_ref = weakref.ref(session)
        self._deliver = deliver
        self._count_error = on_error
        self._active = True
        # weak: only read for LiveKit's agent_turn span context; LiveKit owns the handles
        self._speech_handles: OrderedDict[str, weakref.ref[Any]] = OrderedDict()
        self._self_ref = weakref.ref(self)  # for LiveKit's callbacks: they must not pin us
        self._timer: asyncio.TimerHandle | None = None
        # LiveKit sets the early metrics for LLM replies only and never clears them: a say()
        # or filler after a reply would read that reply's figures again
        self._early_read: object = None

    def read(self, event: str, ev: Any, at: float) -> None:
        """One emitted event (`at`: its arrival, unix seconds). Never raises."""
        try:
            self._deliver_turns(_ROUTES[event](self, ev, at))
        except Exception:  # an unknown event shape from a newer livekit-agents: skip, count
            self.unreadable += 1
            self.assembler.skipped[f"unreadable_{event}"] += 1
            logger.warning("lk_observe skipped an unreadable %s event", event, exc_info=True)

    def close(self, at: float) -> None:
        """Finish every pending turn; later events and callbacks are ignored."""
        if not self._active:
            return
        self._active = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deliver(self.assembler.close(at))

    def livekit_span(self, speech_id: str | None) -> SpanContext | None:
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

    # -- events -------------------------------------------------------------------------------

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
        early = getattr(session, "_early_assistant_metrics", None)
        if early is self._early_read:
            early = None  # already read for an earlier reply: not this speech's
        else:
            self._early_read = early
        turns = self.assembler.agent_speaking(
            getattr(speech, "id", None),
            ev.created_at,
            early if isinstance(early, Mapping) else None,
            at,
            active_agent=_agent_id(session),
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
        elif kind == "message" and item.role == "assistant":
            return self.assembler.assistant_message(
                self._current_speech_id(), item.metrics or {}, at
            )
        elif kind == "agent_handoff":
            return self.assembler.agent_entered(at)
        return self.assembler.expire(at)

    def _on_speech_created(self, ev: Any, at: float) -> list[Turn]:
        handle = ev.speech_handle
        self._track_speech(handle)
        return self.assembler.speech_created(handle.id, at, said=ev.source == "say")

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
        error_type = str(getattr(error, "type", None) or type(error).__name__)
        self._count_error(error_type)
        return self.assembler.error(error_type, at)

    def _on_close(self, ev: Any, at: float) -> list[Turn]:
        self.close(at)
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
        # LLMMetrics says prompt/completion_tokens, RealtimeModelMetrics input/output_tokens
        speech_id = getattr(m, "speech_id", None)
        ended_at = m.timestamp
        if kind == "llm_metrics":
            input_tokens = getattr(m, "prompt_tokens", None)
            output_tokens = getattr(m, "completion_tokens", None)
        else:
            input_tokens = getattr(m, "input_tokens", None)
            output_tokens = getattr(m, "output_tokens", None)
            # LiveKit stamps no speech on realtime metrics: they arrive as the reply's response
            # ends, while its speech is current; their timestamp is the response's creation
            speech_id = speech_id or self._current_speech_id()
            ended_at = m.timestamp + m.duration
        return self.assembler.llm_metrics(
            speech_id,
            ended_at=ended_at,
            duration_s=m.duration,
            ttft_s=m.ttft,
            model=getattr(metadata, "model_name", None),
            provider=getattr(metadata, "model_provider", None),
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            at=at,
        )

    # -- replies that finish without an event ---------------------------------------------------

    def _track_speech(self, handle: Any) -> None:
        try:  # noqa: SIM105  # contextlib.suppress costs the loop a context manager per reply
            self._speech_handles[handle.id] = weakref.ref(handle)
        except TypeError:  # not weak-referenceable: no link to LiveKit's span, nothing else lost
            pass
        if len(self._speech_handles) > _MAX_TRACKED_HANDLES:
            self._speech_handles.popitem(last=False)
        self_ref = self._self_ref

        def done(speech: Any) -> None:
            me = self_ref()
            if me is None or not me._active:
                return
            try:
                me._deliver_turns(
                    me.assembler.speech_done(speech.id, bool(speech.interrupted), time.time())
                )
            except Exception:
                me.unreadable += 1
                logger.warning("lk_observe could not read a finished speech", exc_info=True)

        handle.add_done_callback(done)

    def _deliver_turns(self, turns: list[Turn]) -> None:
        if turns:
            self._deliver(turns)
        if self._timer is not None and not self.assembler.pending:
            self._timer.cancel()  # nothing left to expire: spare the loop a timer callback
            self._timer = None

    def _arm_expiry(self) -> None:
        """Finish a reply whose LLM timing never arrives, even if no other event comes."""
        if self._timer is not None:
            return
        try:
            self.loop = self.loop or asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = self.loop.call_later(self.assembler.max_wait_s + 0.05, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if not self._active:
            return
        try:
            self._deliver_turns(self.assembler.expire(time.time()))
        except Exception:
            self.unreadable += 1
            logger.warning("lk_observe expiry failed", exc_info=True)
        if self.assembler.pending:
            self._arm_expiry()


# the AgentSession events a turn is assembled from -> their reader (plain functions, so the
# reader holds no reference cycle through them); every other event passes straight through
_ROUTES: dict[str, Callable[[SessionEvents, Any, float], list[Turn]]] = {
    "user_state_changed": SessionEvents._on_user_state,
    "agent_state_changed": SessionEvents._on_agent_state,
    "conversation_item_added": SessionEvents._on_item_added,
    "speech_created": SessionEvents._on_speech_created,
    "metrics_collected": SessionEvents._on_metrics,
    "function_tools_executed": SessionEvents._on_tools,
    "error": SessionEvents._on_error,
    "close": SessionEvents._on_close,
}
OBSERVED_EVENTS: frozenset[str] = frozenset(_ROUTES)


def _agent_id(session: Any) -> str | None:
    """The id of the Agent the session runs now (a handoff or task changes it)."""
    try:
        agent_id = getattr(session.current_agent, "id", None)
    except Exception:  # not running (RuntimeError), or an older livekit-agents
        return None
    return agent_id[:MAX_AGENT_ID] if isinstance(agent_id, str) and agent_id else None


def add_job_shutdown_callback(callback: Callable[[], Any]) -> bool:
    """Run `callback` (a coroutine function) when the LiveKit job this process runs shuts
    down; False outside a job."""
    try:
        from livekit.agents import get_job_context

        ctx = get_job_context(required=False)
    except Exception:  # a livekit-agents without job contexts: nothing to hook
        return False
    if ctx is None:
        return False
    ctx.add_shutdown_callback(callback)
    return True
