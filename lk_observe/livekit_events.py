"""The only module that reads LiveKit's event shapes: AgentSession events -> TurnAssembler calls.

Everything version-sensitive about livekit-agents lives here. Event fields are public; these
private attributes are still needed (checked on livekit-agents 1.8.9; tests/unit/
test_livekit_events.py fails loudly when an upgrade removes one):

- `AgentSession._early_assistant_metrics`: the reply's llm_node_ttft / tts_node_ttfb, which
  LiveKit sets just before the agent starts speaking (for its console) and emits nowhere else.
- `SpeechHandle._agent_turn_context`: the OTel context of LiveKit's own `agent_turn` span,
  so a turn's trace can link to it when LiveKit's telemetry is on.
- `agent_activity._AgentActivityContextVar` / `agent_activity._SpeechHandleContextVar`: the
  session and reply the calling code runs for, so `measure_latency` puts a measurement on its
  turn (LiveKit sets both for every task an agent starts: replies, tools, hooks).
- `AgentSession._events` (livekit.rtc's `EventEmitter`): whether anyone listens to the budget
  signal's session event, so a session without listeners is not woken for one.

The session's audio is listened to through public hooks only: a pass-through `AudioInput` at the
head of `session.input.audio`'s chain (LiveKit's own recorder wraps inputs the same way) and the
head `session.output.audio`'s `capture_frame` / `flush` / `clear_buffer`, wrapped on the instance
(as `emit` is). Neither changes a frame or the order of calls; both are put back on close.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from livekit.agents.voice.io import AudioInput
from opentelemetry import trace
from opentelemetry.trace import SpanContext

from lk_observe.audio import AudibleOnset, SpeechEndFinder
from lk_observe.turns import Turn, TurnAssembler

logger = logging.getLogger(__name__)

# (owner, attribute): the LiveKit privates read below
PRIVATE_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("AgentSession", "_early_assistant_metrics"),
    ("SpeechHandle", "_agent_turn_context"),
    ("agent_activity", "_AgentActivityContextVar"),
    ("agent_activity", "_SpeechHandleContextVar"),
    ("AgentSession", "_events"),
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
        *,
        hear_audio: bool = True,
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
        self.audio = SessionAudio(self._self_ref, enabled=hear_audio)

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
        session = self._session_ref()
        if session is not None:
            self.audio.detach(session)
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
        session = self._session_ref()
        if ev.new_state != "speaking":
            if session is not None:  # outputs and inputs are set or swapped while not speaking
                self.audio.attach(session)
            return self.assembler.expire(at)
        speech = getattr(session, "current_speech", None)
        early = getattr(session, "_early_assistant_metrics", None)
        if early is self._early_read:
            early = None  # already read for an earlier reply: not this speech's
        else:
            self._early_read = early
        speech_id = getattr(speech, "id", None)
        leading_silence, pending = self.audio.output_verdict(speech_id)
        turns = self.assembler.agent_speaking(
            speech_id,
            ev.created_at,
            early if isinstance(early, Mapping) else None,
            at,
            active_agent=_agent_id(session),
            leading_silence_s=leading_silence,
            audible_pending=pending,
            tts_model=_plugin_model(session, "tts"),
        )
        self._arm_expiry()
        return turns

    def _on_item_added(self, ev: Any, at: float) -> list[Turn]:
        item = ev.item
        kind = getattr(item, "type", None)
        if kind is None:
            self.assembler.skipped["unreadable_conversation_item_added"] += 1
        elif kind == "message" and item.role == "user":
            metrics = item.metrics or {}
            return self.assembler.user_turn(
                item.id,
                metrics,
                self._current_speech_id(),
                at,
                heard_end=self.audio.speech_end(
                    metrics.get("stopped_speaking_at"), self.assembler.vad_decision()
                ),
                settings=breakdown_settings(self._session_ref()),
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

    def measured(
        self, component: str, start: float, end: float, speech_id: str | None, at: float
    ) -> None:
        """The user's code timed with measure_latency (on the loop). Never raises."""
        if not self._active:
            return
        try:
            self._deliver_turns(self.assembler.measured(component, start, end, speech_id, at))
        except Exception:
            self.unreadable += 1
            logger.warning("lk_observe could not record a measurement", exc_info=True)

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

    def _audible(self, speech_id: str, leading_silence_s: float | None) -> None:
        """The output tap settled the reply's first audible sample after its first frame."""
        if self._active:
            self._deliver_turns(
                self.assembler.agent_audible(speech_id, leading_silence_s, time.time())
            )

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


class _HeardInput(AudioInput):
    """A pass-through at the head of the session's audio input chain: every frame the session
    reads goes by `listener` (with its arrival time) unchanged."""

    def __init__(self, source: AudioInput, listener: Callable[[Any, float], None]) -> None:
        super().__init__(label=source.label, source=source)
        self.listener: Callable[[Any, float], None] | None = listener
        # the source is fixed for this input's life: awaiting its own __anext__ spares every
        # frame AudioInput.__anext__'s extra coroutine (about a third of the tap's cost)
        self._source_next = source.__anext__

    async def __anext__(self) -> Any:
        frame = await self._source_next()
        listener = self.listener
        if listener is not None:
            listener(frame, time.time())
        return frame


class SessionAudio:
    """What the caller hears, read from the session's audio: the user's real end of speech
    (`SpeechEndFinder` over the input frames) and each reply's first audible sample
    (`AudibleOnset` over the output frames). Every hook is a pass-through that never raises
    into LiveKit; anything unreadable is counted in `unreadable` and the turn falls back to
    LiveKit's timestamps."""

    def __init__(self, events_ref: weakref.ref[SessionEvents], *, enabled: bool = True) -> None:
        self._events_ref = events_ref
        self.enabled = enabled  # False: no hooks; every turn times from LiveKit's timestamps
        self.finder = SpeechEndFinder()
        self.onset = AudibleOnset()
        self.unreadable = 0
        self.frames_heard = 0  # input frames read
        self._input_tap: _HeardInput | None = None
        self._output: Any = None  # the output whose methods are wrapped
        self._output_saved: dict[str, Any] = {}  # its instance attributes before wrapping
        self._segment_open = False
        self._awaiting: str | None = None  # the speech whose first audible sample is pending

    # -- attaching ------------------------------------------------------------------------------

    def attach(self, session: Any) -> None:
        """Listen to the session's current input and output (idempotent; call when the agent is
        not speaking: a hook moved mid-reply would miss the reply's first frames)."""
        if not self.enabled:
            return
        try:
            self._attach_input(session)
            self._attach_output(session)
        except Exception:  # a newer livekit-agents with other I/O shapes: no audio, no harm
            self.unreadable += 1
            logger.warning("lk_observe could not listen to the session's audio", exc_info=True)

    def _attach_input(self, session: Any) -> None:
        head = getattr(getattr(session, "input", None), "audio", None)  # None: no audio input
        if head is None or _in_chain(head, self._input_tap, "source"):
            return
        if self._input_tap is not None:
            self._input_tap.listener = None  # replaced by the app: the old one goes quiet
        self.finder = SpeechEndFinder()
        self._input_tap = _HeardInput(head, self._heard_input)
        session.input.audio = self._input_tap

    def _attach_output(self, session: Any) -> None:
        head = getattr(getattr(session, "output", None), "audio", None)  # None: text only
        if head is None or _in_chain(head, self._output, "next_in_chain"):
            return
        self._release_output()
        saved = {n: head.__dict__[n] for n in _OUTPUT_HOOKS if n in head.__dict__}
        capture, flush, clear = head.capture_frame, head.flush, head.clear_buffer
        heard, ended = self._heard_output, self._segment_ended

        async def capture_frame(frame: Any) -> None:
            heard(frame)
            await capture(frame)

        def flush_segment() -> None:
            flush()  # LiveKit's own bookkeeping first: it timestamps the playout
            ended()

        def clear_segment() -> None:
            clear()
            ended()

        head.capture_frame, head.flush, head.clear_buffer = (
            capture_frame,
            flush_segment,
            clear_segment,
        )
        self._output, self._output_saved = head, saved
        self._segment_open = False

    def detach(self, session: Any) -> None:
        """Put the session's audio back as it was (a tap another wrapper now holds goes quiet)."""
        tap, self._input_tap = self._input_tap, None
        if tap is not None:
            tap.listener = None
            source = tap.source
            try:
                if getattr(getattr(session, "input", None), "audio", None) is tap:
                    session.input.audio = source
            except Exception:
                self.unreadable += 1
                logger.warning("lk_observe could not restore the audio input", exc_info=True)
        self._release_output()

    def _release_output(self) -> None:
        output, saved = self._output, self._output_saved
        self._output, self._output_saved = None, {}
        if output is None:
            return
        for name in _OUTPUT_HOOKS:
            if name in saved:
                setattr(output, name, saved[name])
            else:
                output.__dict__.pop(name, None)

    # -- frames (on the session's loop: a few microseconds each, see docs/performance.md) -------

    def _heard_input(self, frame: Any, at: float) -> None:
        try:
            self.finder.push(frame.data, frame.sample_rate, frame.num_channels, at)
            self.frames_heard += 1
        except Exception:
            self.unreadable += 1
            if self.unreadable == 1:
                logger.warning("lk_observe could not read an input audio frame", exc_info=True)

    def _heard_output(self, frame: Any) -> None:
        try:
            if not self._segment_open:
                self._segment_open = True
                self.onset.reset()
            if self.onset.settled:
                return
            if self.onset.push(frame.data, frame.sample_rate, frame.num_channels):
                waiting, self._awaiting = self._awaiting, None
                if waiting is not None:
                    self._settle_later(waiting, self.onset.leading_s)
        except Exception:
            self.unreadable += 1
            if self.unreadable == 1:
                logger.warning("lk_observe could not read an output audio frame", exc_info=True)

    def _segment_ended(self) -> None:
        self._segment_open = False
        waiting, self._awaiting = self._awaiting, None
        if waiting is not None:  # the reply ended before a sound: LiveKit's first frame stands
            self._settle_later(waiting, None)

    def _settle_later(self, speech_id: str, leading_silence_s: float | None) -> None:
        """Hand the verdict to the turn after LiveKit's own call returns: the turn it finishes
        goes to the sinks, which must not delay the audio path."""
        try:
            asyncio.get_running_loop().call_soon(self._settle, speech_id, leading_silence_s)
        except RuntimeError:  # no running loop (a test driving the output by hand)
            self._settle(speech_id, leading_silence_s)

    def _settle(self, speech_id: str, leading_silence_s: float | None) -> None:
        me = self._events_ref()
        if me is None:
            return
        try:
            me._audible(speech_id, leading_silence_s)
        except Exception:
            self.unreadable += 1
            logger.warning("lk_observe could not finish a reply's audio", exc_info=True)

    # -- what the turns get -----------------------------------------------------------------------

    def output_verdict(self, speech_id: str | None) -> tuple[float | None, bool]:
        """For a reply whose first frame just played: (its leading silence if already known,
        whether it is still pending). Nothing listened to: (None, False), LiveKit's frame."""
        if self._output is None or not self._segment_open or not speech_id:
            return None, False
        if self.onset.settled:
            return self.onset.leading_s, False
        self._awaiting = speech_id
        return None, True

    def speech_end(
        self, stopped_speaking_at: object, vad: tuple[float, float] | None
    ) -> float | None:
        """Where the user's voice really stopped, near the VAD's estimate; None when the audio
        cannot say (no input heard, digital silence, typed input, no VAD decision)."""
        if self._input_tap is None or vad is None or not self.frames_heard:
            return None
        estimate = stopped_speaking_at if isinstance(stopped_speaking_at, float) else vad[0]
        try:
            heard = self.finder.speech_end(estimate, vad[1])
        except Exception:
            self.unreadable += 1
            logger.warning("lk_observe could not find the speech end", exc_info=True)
            return None
        return None if heard is None else heard.at


_OUTPUT_HOOKS = ("capture_frame", "flush", "clear_buffer")


def _in_chain(head: Any, wanted: Any, link: str) -> bool:
    """Whether `wanted` is `head` or further down its chain (inputs: `source`; outputs:
    `next_in_chain`)."""
    node, depth = head, 0
    while node is not None and depth < 16:
        if node is wanted:
            return True
        node, depth = getattr(node, link, None), depth + 1
    return False


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


def _given(value: Any) -> bool:
    return value is not None and type(value).__name__ != "NotGiven"


def _active_plugin(session: Any, kind: str) -> Any:
    """The agent's own STT/TTS/VAD when it has one, else the session's (as LiveKit picks)."""
    try:
        own = getattr(session.current_agent, kind, None)
    except Exception:  # not running (RuntimeError)
        own = None
    return own if _given(own) else getattr(session, kind, None)


def _plugin_model(session: Any, kind: str) -> tuple[object, object] | None:
    """(provider, model) of the session's active STT/TTS plugin, as LiveKit labels its own
    turn metrics; None without one."""
    plugin = _active_plugin(session, kind)
    if plugin is None:
        return None
    try:
        return plugin.provider, plugin.model
    except Exception:
        return None


def _seconds(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        return None
    return f"{value:g}s"


def breakdown_settings(session: Any) -> dict[str, str]:
    """Breakdown part -> the session setting that owns its wait, read from the session's (and
    the current agent's) real options: the VAD's min_silence_duration and the endpointing
    delays. Public options only; a setting that cannot be read is left out."""
    settings: dict[str, str] = {}
    if session is None:
        return settings
    try:
        silence = _seconds(getattr(_active_plugin(session, "vad"), "min_silence_duration", None))
        if silence is not None:
            settings["vad_silence"] = f"min_silence_duration={silence}"
        try:
            agent: Any = session.current_agent
        except Exception:
            agent = None
        endpointing = session.options.endpointing
        min_delay = getattr(agent, "min_endpointing_delay", None)
        max_delay = getattr(agent, "max_endpointing_delay", None)
        detection = getattr(agent, "turn_detection", None)
        if not _given(min_delay):
            min_delay = endpointing.get("min_delay")
        if not _given(max_delay):
            max_delay = endpointing.get("max_delay")
        if not _given(detection):
            detection = session.options.turn_handling.get("turn_detection")
        text = _seconds(min_delay)
        if text is not None:
            owner = f"endpointing.min_delay={text}"
            model = detection is not None and not isinstance(detection, str)
            if model and (longest := _seconds(max_delay)) is not None:
                owner += f", max_delay={longest} (turn detector)"
            if endpointing.get("mode") == "dynamic":
                owner += " (dynamic)"
            settings["end_of_turn"] = owner
    except Exception:  # an options shape from another livekit-agents: no settings named
        logger.debug("lk_observe could not read the session's turn settings", exc_info=True)
    return settings


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


def current_speech_context() -> tuple[Any | None, str | None]:
    """The AgentSession whose activity runs the calling code and the id of the SpeechHandle it
    runs for (None outside a reply, e.g. in `on_user_turn_completed`), read from LiveKit's
    private context variables `agent_activity._AgentActivityContextVar` /
    `_SpeechHandleContextVar` (set for every task an AgentActivity starts; a tool's task and
    `asyncio.to_thread` inherit them). (None, None) outside a session, or when a livekit-agents
    version lacks them."""
    try:
        from livekit.agents.voice import agent_activity

        activity_var = getattr(agent_activity, "_AgentActivityContextVar", None)
        speech_var = getattr(agent_activity, "_SpeechHandleContextVar", None)
        activity = None if activity_var is None else activity_var.get(None)
        if activity is None:
            return None, None
        speech = None if speech_var is None else speech_var.get(None)
        session, speech_id = activity.session, None if speech is None else speech.id
    except Exception:  # a livekit-agents without them: measurements go to the defaults
        return None, None
    return session, speech_id if isinstance(speech_id, str) else None


def emit_session_event(session: Any, event: str, arg: Any) -> None:
    """Call `session.on(event)` listeners with `arg`, and nothing else: AgentSession.emit
    records every event it emits in the session report (`_recorded_events`, checked on 1.8.9)
    and the instance's `emit` is lk_observe's own intake, so both are bypassed for the base
    emitter's. A listener's TypeError escapes it (as LiveKit's emitter does): callers guard."""
    from livekit.rtc import EventEmitter

    EventEmitter.emit(session, event, arg)


def has_session_listeners(session: Any, event: str) -> bool:
    """Whether `session.on(event)` has listeners now (from any thread: a racy read of a dict is
    fine for a hint). True when it cannot tell: a signal too many beats one lost."""
    try:
        return bool(getattr(session, "_events").get(event))  # noqa: B009
    except Exception:
        return True
