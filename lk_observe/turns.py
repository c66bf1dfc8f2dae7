"""The Turn record and the TurnAssembler that builds it from AgentSession events."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, get_args

Tier = Literal["excellent", "good", "slow"]
TurnKind = Literal["user", "agent"]  # "agent": agent-initiated speech (a greeting), no user turn
# where e2e's two ends come from: "audio" both heard (the caller's last voiced sample -> the
# agent's first audible sample); "livekit" neither (LiveKit's stopped_speaking_at -> first agent
# frame: no audio to read, e.g. typed input or digital silence); "input_audio" / "output_audio":
# only that end was heard, the other is LiveKit's
E2ESource = Literal["audio", "livekit", "input_audio", "output_audio"]

# Every component a turn can measure, in display order, with the title people see for it.
COMPONENT_TITLES: Mapping[str, str] = MappingProxyType(
    {
        "e2e": "End-to-end (perceived)",
        "vad": "VAD",
        "stt": "STT final transcript",
        "eou": "End of turn",
        "llm_ttft": "LLM time to first token",
        "tts_ttfb": "TTS time to first byte",
        "leading_silence": "Agent's leading silence",
    }
)
COMPONENTS: tuple[str, ...] = tuple(COMPONENT_TITLES)
STAGES: tuple[str, ...] = COMPONENTS[1:]  # the pipeline's own stages: everything but e2e
TIERS: tuple[Tier, ...] = get_args(Tier)

# The parts of e2e, in the order they lie on the critical path from the user's real end of
# speech to the first audible sample, with the title people see for each. They add up to e2e
# exactly: "scheduling" is what lies between the measured parts (LiveKit's own steps).
BREAKDOWN_TITLES: Mapping[str, str] = MappingProxyType(
    {
        "vad_silence": "VAD silence",
        "transcription": "Waiting for the final transcript",
        "end_of_turn": "End-of-turn decision",
        "on_user_turn_completed": "on_user_turn_completed hook",
        "llm": "LLM to first token",
        "tool": "Tool calls",
        "tts": "TTS to first byte",
        "playback": "Playback start",
        "leading_silence": "Agent's leading silence",
        "scheduling": "Scheduling (between stages)",
    }
)
BREAKDOWN_PARTS: tuple[str, ...] = tuple(BREAKDOWN_TITLES)
# components whose latency belongs to one provider's model: (provider, model) labels them
MODEL_COMPONENTS: tuple[str, ...] = ("stt", "llm_ttft", "tts_ttfb")

# The guide's tiers for perceived (e2e) latency.
EXCELLENT_BELOW_MS = 500.0
GOOD_BELOW_MS = 800.0


def tier_for(e2e_ms: float | None) -> Tier | None:
    """The guide's tier for an end-to-end latency; None when e2e was not measured."""
    if e2e_ms is None:
        return None
    if e2e_ms < EXCELLENT_BELOW_MS:
        return "excellent"
    if e2e_ms < GOOD_BELOW_MS:
        return "good"
    return "slow"


@dataclass(frozen=True)
class Stage:
    """A measured stage of a turn, in unix seconds: where its span is placed."""

    start: float
    end: float

    @property
    def duration_ms(self) -> float:
        return (self.end - self.start) * 1000.0


@dataclass(frozen=True)
class Turn:
    """One user -> agent exchange (or one agent-initiated utterance when kind == "agent").

    `latency_ms` holds only the components that were measured: a pipeline without STT has no
    "stt" key (never -1 or 0). `stages` holds the same components as time intervals.

    A turn is reported twice: live when the reply's first audio plays and its first audible
    sample is known (`complete=False`: its latency, for metrics, the monitor and SLOs) and
    complete when the reply ends (`complete=True`: the record `on_turn`, spans and logs get).
    `interrupted` means what it means in LiveKit: the user cut the reply short, before or after
    its first audio; on the complete record `played_ms` says how much of it had played by then.
    """

    index: int
    speech_id: str | None
    started_at: float
    ended_at: float
    latency_ms: Mapping[str, float]
    interrupted: bool
    tier: Tier | None
    kind: TurnKind = "user"
    session_id: str = ""
    agent: str = "default"
    stages: Mapping[str, Stage] = field(default_factory=dict)
    tool_calls: int = 0
    tool_ms: float | None = None
    llm_rounds: int = 0
    llm_model: str | None = None
    llm_provider: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    budget_overruns_ms: Mapping[str, float] = field(default_factory=dict)  # vs the guide's budget
    trace_id: int | None = None  # set by the tracing sink before the other sinks run
    span_id: int | None = None
    complete: bool = True  # False: the live report at first audio; the reply goes on
    played_ms: float | None = None  # how long the reply played before it ended or was cut
    active_agent: str | None = None  # the LiveKit Agent (its id) speaking the reply
    error_type: str | None = None  # a LiveKit error during the reply (e.g. "llm_error")
    e2e_source: E2ESource | None = None  # None without e2e
    livekit_e2e_ms: float | None = None  # LiveKit's own figure (e2e_latency), for comparison
    # e2e split into BREAKDOWN_PARTS that add up to it exactly; empty without e2e
    breakdown_ms: Mapping[str, float] = field(default_factory=dict)
    # part -> the session setting that owns its wait ("endpointing.min_delay=0.5s")
    breakdown_settings: Mapping[str, str] = field(default_factory=dict)
    stt_provider: str | None = None
    stt_model: str | None = None
    tts_provider: str | None = None
    tts_model: str | None = None
    # the user's own code timed with measure_latency while this turn was going: (name, stage)
    measured: tuple[tuple[str, Stage], ...] = ()


def component_model(turn: Turn, component: str) -> tuple[str, str] | None:
    """(provider, model) of the stage that measured `component`, when known."""
    if component == "stt":
        provider, model = turn.stt_provider, turn.stt_model
    elif component == "llm_ttft":
        provider, model = turn.llm_provider, turn.llm_model
    elif component == "tts_ttfb":
        provider, model = turn.tts_provider, turn.tts_model
    else:
        return None
    if provider is None and model is None:
        return None
    return (provider or "unknown", model or "unknown")


_TURN_FIELDS = frozenset(f.name for f in dataclasses.fields(Turn))


def with_fields(turn: Turn, **changes: Any) -> Turn:
    """`dataclasses.replace(turn, **changes)` at a tenth of its cost (Turn has no
    __post_init__ or derived fields, so a field copy is all replace() does)."""
    unknown = changes.keys() - _TURN_FIELDS
    if unknown:
        raise TypeError(f"Turn has no field(s) {sorted(unknown)}")
    copy = object.__new__(Turn)
    fields = copy.__dict__
    fields.update(turn.__dict__)
    fields.update(changes)
    return copy


# Bounds that keep the assembler's memory fixed whatever the event stream does.
MAX_TRACKED_SPEECHES = 64
MAX_LATENCY_S = 120.0  # a stage longer than this is a broken clock, not a slow agent
MAX_CLOCK_SKEW_S = 600.0  # an event timestamp further than this from its arrival is broken
MAX_REPLY_S = 3600.0  # a reply playing longer than this has lost its end
PLAYED_SLACK_S = 0.05  # LiveKit's playout figure may end this much after the reply's done
MIN_VAD_BACKDATE_S = 0.001  # a local VAD back-dates its end of speech by its silence window
MAX_ERROR_TYPE_LENGTH = 64
MAX_HEARD_SHIFT_S = 2.0  # the heard speech end is this close to LiveKit's, or it is not used
MAX_COUNT = 10_000  # tool calls or tokens beyond this in one reply: a broken counter
MAX_MEASURED = 32  # measure_latency stages kept per turn
MAX_MODEL_NAME = 128  # characters of a provider or model name kept on a turn
_EARLY_KEYS = ("llm_node_ttft", "tts_node_ttfb", "playback_latency", "e2e_latency")
# (speech end heard, first audible sample heard) -> Turn.e2e_source
_E2E_SOURCES: Mapping[tuple[bool, bool], E2ESource] = MappingProxyType(
    {
        (True, True): "audio",
        (True, False): "input_audio",
        (False, True): "output_audio",
        (False, False): "livekit",
    }
)


def _finite(value: object) -> float | None:
    """A usable float, or None for missing, non-numeric, NaN or infinite values."""
    if type(value) is float:  # the usual case, first
        return value if math.isfinite(value) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        f = float(value)
    except OverflowError:  # an int beyond float range
        return None
    return f if math.isfinite(f) else None


@dataclass(slots=True)
class _Speech:
    """What is known so far about one SpeechHandle (one agent reply)."""

    speech_id: str
    created_at: float | None = None
    said: bool = False  # session.say(): speaks given text, never answers a user turn
    played_s: float | None = None  # audio played, from LiveKit's assistant messages
    active_agent: str | None = None
    turn: _PendingTurn | None = None
    first_audio_at: float | None = None
    leading_silence_s: float | None = None  # first frame -> first audible sample, when heard
    audible_pending: bool = False  # the output is being listened to; its verdict is not in yet
    early: dict[str, float] = field(default_factory=dict)
    # (start, first token, end) of each LLM request made for the reply
    llm_rounds: list[tuple[float, float, float]] = field(default_factory=list)
    llm_model: str | None = None
    llm_provider: str | None = None
    tts_provider: str | None = None
    tts_model: str | None = None
    measured: list[tuple[str, Stage]] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    tts_stage: Stage | None = None
    tool: Stage | None = None
    tool_calls: int = 0
    interrupted: bool = False
    error_type: str | None = None
    done: bool = False
    emitted: bool = False  # reported live
    completed: bool = False  # reported complete: nothing of it changes any more
    estimated: bool = False  # its breakdown estimated an LLM round that had not ended
    live: Turn | None = None  # the live report, completed when the reply ends


@dataclass(slots=True)
class _PendingTurn:
    index: int
    speech_end: float
    stages: dict[str, Stage]
    committed_at: float
    spoken: bool = True  # False for typed input: nothing is measured from a speech end
    livekit_end: float | None = None  # LiveKit's speech end (stopped_speaking_at)
    heard: bool = False  # speech_end is where the voice stopped in the audio, not LiveKit's
    hook_s: float | None = None  # on_user_turn_completed's run time, from LiveKit
    stt_provider: str | None = None
    stt_model: str | None = None
    settings: Mapping[str, str] = field(default_factory=dict)  # part -> the setting owning it
    measured: list[tuple[str, Stage]] = field(default_factory=list)


class TurnAssembler:
    """Builds one `Turn` per user -> agent exchange from normalised AgentSession events.

    Pure: no I/O, no clock reads; every call passes the time the event arrived (`at`, unix
    seconds). Each call returns the turns it finished (usually none). A user turn is finished
    once the agent's first audio has played and the LLM's timing for the reply is known, or
    when the reply ends without audio (interrupted), or on close. Bad values are skipped and
    counted in `skipped`, never raised.
    """

    def __init__(
        self, *, session_id: str = "", agent: str = "default", max_wait_s: float = 5.0
    ) -> None:
        self.session_id = session_id
        self.agent = agent
        self.max_wait_s = max_wait_s
        self.skipped: Counter[str] = Counter()
        self._next_index = 1
        self._speeches: OrderedDict[str, _Speech] = OrderedDict()
        self._seen_items: OrderedDict[str, None] = OrderedDict()
        self._vad: tuple[float, float] | None = None  # (back-dated speech end, decision time)
        self._agent_turns: set[str] = set()  # speeches that answer no user turn (greetings)
        # replies with a turn not yet reported live (usually 0 or 1): what expire() looks at
        self._pending: dict[str, _Speech] = {}
        # replies reported live and still going: completed when their SpeechHandle is done
        self._open: OrderedDict[str, _Speech] = OrderedDict()
        self._evicted: list[Turn] = []  # completed early to keep memory bounded; returned next
        self._unclaimed: _PendingTurn | None = None  # a user turn whose reply is not created yet
        self._entered = False  # a handoff happened and the new agent has not spoken yet
        self._closed = False
        # measure_latency stages timed outside any reply (on_user_turn_completed runs before
        # the reply exists): they go to the next user turn committed
        self._loose_measured: list[tuple[str, Stage]] = []

    # -- inputs -------------------------------------------------------------------------------

    def speech_created(self, speech_id: str, at: float, *, said: bool = False) -> list[Turn]:
        """A SpeechHandle was created: `said` for `session.say()` (fillers, scripted lines)."""
        speech = self._speech(speech_id)
        speech.created_at = at
        speech.said = said
        entered, self._entered = self._entered, False
        unclaimed = self._unclaimed
        if unclaimed is not None and self._can_answer(speech):  # committed before its reply
            self._unclaimed = None
            self._answer(speech, unclaimed)
        elif entered and speech.turn is None and not speech.emitted:
            self._claim_waiting_turn(speech)
        return self.expire(at)

    def agent_entered(self, at: float) -> list[Turn]:
        """A new Agent or AgentTask took over (a handoff). As in LiveKit, the first speech it
        makes (its on_enter's say or reply) answers the user turn still waiting for audio: a
        task's question is what the caller hears next, not the parent's reply after the task."""
        self._entered = True
        return self.expire(at)

    def user_state(self, new_state: str, created_at: float, at: float) -> list[Turn]:
        """user_state_changed: "listening" carries the VAD's back-dated speech end."""
        if new_state == "listening":
            end = self._timestamp("vad_speech_end", created_at, at, optional=False)
            if end is not None and self._duration("vad", at - end) is not None:
                self._vad = (end, at)
        return self.expire(at)

    def vad_decision(self) -> tuple[float, float] | None:
        """The VAD's last end of speech not yet used by a user turn: (its back-dated estimate,
        when it was decided), for finding the speech end in the audio."""
        return self._vad

    def user_turn(
        self,
        item_id: str,
        metrics: Mapping[str, Any],
        speech_id: str | None,
        at: float,
        *,
        heard_end: float | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> list[Turn]:
        """A user ChatMessage was committed (conversation_item_added, role "user"). `heard_end`:
        where the user's voice really stopped in the audio the session received, when found;
        `settings`: breakdown part -> the session setting that owns its wait."""
        if self._closed or not self._first_sighting(item_id):
            return []
        speech_end = self._timestamp("stopped_speaking_at", metrics.get("stopped_speaking_at"), at)
        if speech_end is not None and speech_end > at + 5.0:
            self.skipped["stopped_speaking_at_in_future"] += 1
            speech_end = None
        if speech_end is None and self._vad is not None:
            speech_end = self._vad[0]  # no metrics (e.g. a newer event shape): VAD's estimate
        spoken = speech_end is not None
        if speech_end is None:
            speech_end = at  # typed input: nothing is measured from a speech end
        livekit_end = speech_end
        heard = self._heard_end(heard_end, livekit_end, at) if spoken else None
        if heard is not None:
            speech_end = heard
        stages: dict[str, Stage] = {}
        vad = self._vad
        # a decision stamped when it arrived (a realtime model's server VAD) measures nothing
        # from its own estimate; from the heard speech end, it measures the VAD's whole wait
        backdated = vad is not None and vad[1] - vad[0] >= MIN_VAD_BACKDATE_S
        if (
            spoken
            and vad is not None
            and (backdated or heard is not None)
            and speech_end - 0.05 <= vad[1] <= at
        ):
            self._add_stage(stages, "vad", speech_end, vad[1])
        self._vad = None
        for component, key in (("stt", "transcription_delay"), ("eou", "end_of_turn_delay")):
            delay = self._duration(key, metrics.get(key)) if spoken else None
            if delay is not None:
                self._add_stage(stages, component, speech_end, livekit_end + delay)
        finished = self._abandon_unanswered(at)
        stt_provider, stt_model = _model_names(metrics.get("stt_metadata"))
        turn = _PendingTurn(
            self._take_index(),
            speech_end,
            stages,
            at,
            spoken,
            livekit_end=livekit_end if spoken else None,
            heard=heard is not None,
            hook_s=self._duration(
                "on_user_turn_completed_delay", metrics.get("on_user_turn_completed_delay")
            ),
            stt_provider=stt_provider if spoken else None,
            stt_model=stt_model if spoken else None,
            settings=dict(settings) if settings and spoken else {},
            measured=self._claim_loose_measured(speech_end if spoken else at - 10.0, at),
        )
        # the current speech is the reply, unless it is a say() or already answers a turn (a
        # filler said from on_user_turn_completed, typed input while the agent speaks): then the
        # newest reply created and not yet answering one, or the next one created
        speech = self._speeches.get(speech_id) if speech_id else None
        if speech is None or not self._can_answer(speech):
            speech = next(
                (s for s in reversed(self._speeches.values()) if self._can_answer(s)), None
            )
        if speech is not None:
            self._answer(speech, turn)
        else:
            finished += self._unanswered(at)  # the user spoke again before any reply came
            self._unclaimed = turn
        return finished + self.expire(at)

    def agent_speaking(
        self,
        speech_id: str | None,
        started_at: float,
        early: Mapping[str, Any] | None,
        at: float,
        *,
        active_agent: str | None = None,
        leading_silence_s: float | None = None,
        audible_pending: bool = False,
        tts_model: tuple[object, object] | None = None,
    ) -> list[Turn]:
        """agent_state_changed -> "speaking": the reply's first audio frame reached the output;
        `active_agent` names the agent speaking it (handoffs and tasks change it). When the output
        is listened to: `leading_silence_s`, the reply's silence before its first audible sample,
        or `audible_pending` while it is not known yet (`agent_audible` brings it)."""
        start = self._timestamp("first_audio_at", started_at, at, optional=False)
        if not speech_id or start is None:
            self.skipped["speaking_without_speech"] += 1
            return self.expire(at)
        speech = self._speech(speech_id)
        if speech.first_audio_at is not None or speech.emitted:
            return self.expire(at)  # resumed after a pause: the first frame already counted
        speech.first_audio_at = start
        speech.leading_silence_s = self._leading_silence(leading_silence_s)
        speech.audible_pending = audible_pending and speech.leading_silence_s is None
        speech.active_agent = active_agent if isinstance(active_agent, str) else None
        if tts_model is not None:
            speech.tts_provider, speech.tts_model = _model_names(
                {"model_provider": tts_model[0], "model_name": tts_model[1]}
            )
        speech.interrupted = False  # it played: a noise before it was no barge-in after all
        for key in _EARLY_KEYS:
            value = self._duration(key, (early or {}).get(key))
            if value is not None:
                speech.early[key] = value
        ttfb, playback = speech.early.get("tts_node_ttfb"), speech.early.get("playback_latency")
        if ttfb is not None:
            end = start - (playback or 0.0)
            speech.tts_stage = self._checked_stage("tts_ttfb", end - ttfb, end)
        if speech.turn is None:
            speech.turn = _PendingTurn(self._take_index(), start, {}, at, spoken=False)
            self._pending[speech_id] = speech
            self._agent_turns.add(speech_id)
        return self._try_finish(speech, at) + self.expire(at)

    def agent_audible(
        self, speech_id: str | None, leading_silence_s: float | None, at: float
    ) -> list[Turn]:
        """The reply's first audible sample was found `leading_silence_s` after its first frame
        (None: no audible start within the output's limit; LiveKit's first frame stands)."""
        speech = self._speeches.get(speech_id) if speech_id else None
        if speech is None or speech.emitted or not speech.audible_pending:
            return self.expire(at)
        speech.audible_pending = False
        speech.leading_silence_s = self._leading_silence(leading_silence_s)
        return self._try_finish(speech, at) + self.expire(at)

    def llm_metrics(
        self,
        speech_id: str | None,
        *,
        ended_at: float,
        duration_s: float,
        ttft_s: float,
        model: str | None = None,
        provider: str | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        at: float,
    ) -> list[Turn]:
        """One LLM request finished (LLMMetrics); realtime models report ttft -1: not measured."""
        if not speech_id:
            self.skipped["llm_metrics_without_speech"] += 1
            return self.expire(at)
        end, duration, ttft = _finite(ended_at), _finite(duration_s), _finite(ttft_s)
        if (
            end is None
            or duration is None
            or ttft is None
            or abs(at - end) > MAX_CLOCK_SKEW_S
            or not 0.0 <= ttft <= duration <= MAX_LATENCY_S
        ):
            self.skipped["llm_metrics_unusable"] += 1  # one event, one count
            return self.expire(at)
        speech = self._speech(speech_id)
        if speech.completed:
            self.skipped["llm_metrics_after_reply"] += 1
            return self.expire(at)
        start = end - duration
        if self._checked_stage("llm_ttft", start, start + ttft) is not None:
            speech.llm_rounds.append((start, start + ttft, end))
        if speech.llm_model is None and speech.llm_provider is None:
            speech.llm_provider, speech.llm_model = _model_names(
                {"model_provider": provider, "model_name": model}
            )
        speech.input_tokens += self._count("input_tokens", input_tokens) or 0
        speech.output_tokens += self._count("output_tokens", output_tokens) or 0
        return self._try_finish(speech, at) + self.expire(at)

    def tools_executed(
        self, speech_id: str | None, started_at: float, ended_at: float, calls: int, at: float
    ) -> list[Turn]:
        # LiveKit runs tools outside the current-speech slot: default to the reply in flight
        speech = self._speeches.get(speech_id) if speech_id else None
        if speech is None or speech.completed:
            speech = self._reply_in_flight()
        if speech is None or speech.completed:
            self.skipped["tools_without_reply"] += 1
            return self.expire(at)
        start = self._timestamp("tool_started_at", started_at, at, optional=False)
        end = self._timestamp("tool_ended_at", ended_at, at, optional=False)
        stage = None if start is None or end is None else self._checked_stage("tool", start, end)
        if stage is not None:
            old = speech.tool
            speech.tool = stage if old is None else Stage(old.start, max(old.end, stage.end))
        speech.tool_calls += self._count("tool_calls", calls, optional=False) or 0
        return self.expire(at)

    def assistant_message(
        self, speech_id: str | None, metrics: Mapping[str, Any], at: float
    ) -> list[Turn]:
        """The reply's text was committed (role "assistant"), with LiveKit's figures for it:
        the TTS time to first byte of a say(), which is known only now."""
        speech = self._speeches.get(speech_id) if speech_id else None
        if speech is None or speech.completed:
            return self.expire(at)
        started = self._timestamp("started_speaking_at", metrics.get("started_speaking_at"), at)
        stopped = self._timestamp("stopped_speaking_at", metrics.get("stopped_speaking_at"), at)
        if started is not None and stopped is not None and started <= stopped:
            # a reply can be several messages (words, a tool call, more words): add them up
            speech.played_s = (speech.played_s or 0.0) + (stopped - started)
        if speech.tts_provider is None and speech.tts_model is None:
            speech.tts_provider, speech.tts_model = _model_names(metrics.get("tts_metadata"))
        if speech.llm_provider is None and speech.llm_model is None:
            speech.llm_provider, speech.llm_model = _model_names(metrics.get("llm_metadata"))
        ttfb = self._duration("tts_node_ttfb", metrics.get("tts_node_ttfb"))
        playback = self._duration("playback_latency", metrics.get("playback_latency")) or 0.0
        if speech.tts_stage is None and ttfb is not None and started is not None:
            end = started - playback
            speech.tts_stage = self._checked_stage("tts_ttfb", end - ttfb, end)
        return self.expire(at)

    def speech_done(self, speech_id: str, interrupted: bool, at: float) -> list[Turn]:
        """The SpeechHandle finished: played out, interrupted or cancelled."""
        speech = self._speeches.get(speech_id)
        if speech is None or speech.completed:
            return self.expire(at)
        speech.done = True
        speech.interrupted = speech.interrupted or interrupted
        if speech.emitted:
            return self._complete(speech, at) + self.expire(at)
        return self._try_finish(speech, at) + self.expire(at)

    def measured(
        self, name: str, start: float, end: float, speech_id: str | None, at: float
    ) -> list[Turn]:
        """The user's code timed with measure_latency (`name`, from `start` to `end`, unix s):
        kept on the reply it ran for (`speech_id`: LiveKit's current speech where it ran), or,
        timed outside any reply (on_user_turn_completed runs before the reply exists), on the
        user turn committed next if it ran between that turn's speech end and its commit."""
        stage = self._checked_stage("measured", start, end)
        if stage is None:
            return self.expire(at)
        speech = self._speeches.get(speech_id) if speech_id else None
        if speech is None:
            if speech_id:
                self.skipped["measured_unknown_reply"] += 1
                return self.expire(at)
            if len(self._loose_measured) < MAX_MEASURED:
                self._loose_measured.append((name, stage))
            return self.expire(at)
        if speech.completed:  # its trace is written: the metrics and the monitor still have it
            self.skipped["measured_after_reply"] += 1
        elif len(speech.measured) < MAX_MEASURED:
            speech.measured.append((name, stage))
        else:
            self.skipped["measured_over_limit"] += 1
        return self.expire(at)

    def user_barge_in(self, at: float) -> None:
        """The user started speaking: a reply that has not started playing is being talked over."""
        for speech in self._pending.values():
            if speech.first_audio_at is None:
                speech.interrupted = True

    def error(self, error_type: str, at: float) -> list[Turn]:
        """A LiveKit error event: every reply still going carries its type (the first one)."""
        name = error_type[:MAX_ERROR_TYPE_LENGTH] if isinstance(error_type, str) else None
        if not name:
            self.skipped["error_without_type"] += 1
            return self.expire(at)
        for speech in self._speeches.values():
            if not (speech.completed or speech.done) and speech.error_type is None:
                speech.error_type = name
        return self.expire(at)

    def expire(self, now: float) -> list[Turn]:
        """Report replies that waited too long for a late figure; callers tick this on a timer."""
        out, self._evicted = self._evicted, []
        if not self._pending:
            return out
        for speech in list(self._pending.values()):
            assert speech.turn is not None  # pending means a turn waits for this reply
            since = speech.first_audio_at
            if since is not None and now - since >= self.max_wait_s:
                out += self._report_live(speech)
            elif since is None and now - speech.turn.committed_at >= MAX_LATENCY_S:
                self.skipped["reply_never_started"] += 1
                out += self._report_live(speech) + self._complete(speech, now)
        return out

    def close(self, at: float) -> list[Turn]:
        """Session closed: finish everything pending with what was measured."""
        out, self._evicted = self._evicted, []
        for speech in list(self._pending.values()):
            out += self._report_live(speech)
        for speech in list(self._open.values()):
            out += self._complete(speech, at)
        out += self._unanswered(at)
        self._closed = True
        return out

    @property
    def pending(self) -> int:
        """Replies waiting to be reported live (the expiry timer's business)."""
        return len(self._pending)

    @property
    def open(self) -> int:
        """Replies reported live and still going."""
        return len(self._open)

    # -- internals ----------------------------------------------------------------------------

    @staticmethod
    def _can_answer(speech: _Speech) -> bool:
        return not (speech.said or speech.turn is not None or speech.emitted or speech.done)

    def _claim_loose_measured(self, since: float, until: float) -> list[tuple[str, Stage]]:
        """The loose measure_latency stages that ran within this user turn's commit."""
        loose, self._loose_measured = self._loose_measured, []
        return [(name, st) for name, st in loose if since - 0.05 <= st.start <= until]

    def _claim_waiting_turn(self, speech: _Speech) -> None:
        waiting = next(
            (s for s in reversed(self._pending.values()) if s.first_audio_at is None),
            None,
        )
        if waiting is None or waiting is speech or waiting.turn is None:
            return
        turn, waiting.turn = waiting.turn, None
        del self._pending[waiting.speech_id]
        self._answer(speech, turn)

    def _answer(self, speech: _Speech, turn: _PendingTurn) -> None:
        speech.turn = turn
        self._pending[speech.speech_id] = speech

    def _unanswered(self, at: float) -> list[Turn]:
        """The waiting user turn, reported with no reply: none was ever created for it."""
        turn, self._unclaimed = self._unclaimed, None
        if turn is None:
            return []
        self.skipped["user_turn_without_reply"] += 1
        speech = _Speech("", turn=turn)
        return [
            dataclasses.replace(t, speech_id=None)
            for t in self._report_live(speech) + self._complete(speech, at)
        ]

    def _reply_in_flight(self) -> _Speech | None:
        """The newest reply still going: the one a tool run outside the speech slot serves."""
        return next((s for s in reversed(self._speeches.values()) if not s.done), None)

    def _take_index(self) -> int:
        index, self._next_index = self._next_index, self._next_index + 1
        return index

    def _first_sighting(self, item_id: str) -> bool:
        if item_id in self._seen_items:
            self.skipped["duplicate_item"] += 1
            return False
        self._seen_items[item_id] = None
        if len(self._seen_items) > MAX_TRACKED_SPEECHES:
            self._seen_items.popitem(last=False)
        return True

    def _speech(self, speech_id: str) -> _Speech:
        speech = self._speeches.get(speech_id)
        if speech is None:
            speech = self._speeches[speech_id] = _Speech(speech_id)
            while len(self._speeches) > MAX_TRACKED_SPEECHES:
                old_id, old = self._speeches.popitem(last=False)
                self._agent_turns.discard(old_id)
                if self._pending.pop(old_id, None) is not None:
                    self.skipped["evicted_unfinished_reply"] += 1
                if old_id in self._open:  # reported live: complete it with what is known
                    self.skipped["evicted_unfinished_reply"] += 1
                    self._evicted += self._complete(old, math.nan)  # its end is unknown
        return speech

    def _timestamp(
        self, field_name: str, raw: object, at: float, *, optional: bool = True
    ) -> float | None:
        """A unix time near the event's arrival, or None (counted unless absent and optional)."""
        if raw is None and optional:
            return None
        value = _finite(raw)
        if value is None or abs(at - value) > MAX_CLOCK_SKEW_S:
            self.skipped[f"{field_name}_unusable"] += 1
            return None
        return value

    def _leading_silence(self, raw: float | None) -> float | None:
        return None if raw is None else self._duration("leading_silence", raw)

    def _heard_end(self, raw: float | None, livekit_end: float, at: float) -> float | None:
        """The audio's speech end, if usable: near LiveKit's and not after the turn's commit."""
        if raw is None:
            return None
        value = _finite(raw)
        if value is None or abs(value - livekit_end) > MAX_HEARD_SHIFT_S or value > at:
            self.skipped["heard_speech_end_unusable"] += 1
            return None
        return value

    def _duration(self, field_name: str, raw: object, *, optional: bool = True) -> float | None:
        """A delay in seconds within [0, MAX_LATENCY_S], or None (counted unless absent)."""
        if raw is None and optional:
            return None
        value = _finite(raw)
        if value is None or not 0.0 <= value <= MAX_LATENCY_S:
            self.skipped[f"{field_name}_unusable"] += 1
            return None
        return value

    def _count(self, field_name: str, raw: object, *, optional: bool = True) -> int | None:
        if raw is None and optional:
            return None
        if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= MAX_COUNT:
            self.skipped[f"{field_name}_unusable"] += 1
            return None
        return raw

    def _checked_stage(self, component: str, start: float, end: float) -> Stage | None:
        s, e = _finite(start), _finite(end)
        if s is None or e is None:
            self.skipped[f"{component}_not_a_number"] += 1
            return None
        if e < s:
            self.skipped[f"{component}_negative"] += 1
            return None
        if e - s > MAX_LATENCY_S:
            self.skipped[f"{component}_absurd"] += 1
            return None
        return Stage(s, e)

    def _add_stage(
        self, stages: dict[str, Stage], component: str, start: float, end: float
    ) -> None:
        stage = self._checked_stage(component, start, end)
        if stage is not None:
            stages[component] = stage

    def _abandon_unanswered(self, at: float) -> list[Turn]:
        """A new user turn while an older one never got audio: the user moved on."""
        out: list[Turn] = []
        for speech in list(self._pending.values()):
            if speech.first_audio_at is None:
                if speech.speech_id not in self._agent_turns:
                    speech.interrupted = True
                out += self._report_live(speech) + self._complete(speech, at)
        return out

    def _try_finish(self, speech: _Speech, at: float) -> list[Turn]:
        if speech.emitted or speech.turn is None:
            return []
        if speech.done:
            return self._report_live(speech) + self._complete(speech, at)
        if speech.first_audio_at is None or speech.audible_pending:
            return []
        # wait for the LLM's own timing (it places the llm span) when the reply had an LLM
        if "llm_node_ttft" in speech.early and not speech.llm_rounds:
            return []
        return self._report_live(speech)

    def _report_live(self, speech: _Speech) -> list[Turn]:
        """The turn as its first audio left it: latency for metrics, the monitor and SLOs."""
        if speech.emitted or speech.turn is None:
            return []
        speech.emitted = True
        self._pending.pop(speech.speech_id, None)
        speech.live = self._build(speech)
        self._open[speech.speech_id] = speech
        return [speech.live]

    def _complete(self, speech: _Speech, at: float) -> list[Turn]:
        """The turn's record once its reply ended: interrupted or not, what played, every tool
        call and LLM round of the reply."""
        live = speech.live
        if speech.completed or live is None:
            return []
        speech.completed = True
        self._open.pop(speech.speech_id, None)
        # the breakdown is the live one unless that one had to estimate a round still running
        full = self._build(speech, None if speech.estimated else live.breakdown_ms)
        first_audio, ended, played = speech.first_audio_at, live.ended_at, None
        if first_audio is not None:
            end = _finite(at)
            if (
                end is None
                or not first_audio - MAX_CLOCK_SKEW_S <= end <= first_audio + MAX_REPLY_S
            ):
                self.skipped["reply_end_unusable"] += 1
            else:
                ended = max(end, first_audio)  # the done callback cannot precede the audio
                played = (ended - first_audio) * 1000.0
            if speech.played_s is not None:  # LiveKit's own playout times: the audio itself
                livekit_ms = speech.played_s * 1000.0
                # LiveKit stamps the playout's stop a moment after the handle is done; more than
                # PLAYED_SLACK_S beyond it means messages that were not this reply's
                if played is None or livekit_ms <= played + PLAYED_SLACK_S * 1000.0:
                    played = livekit_ms
        # an emitted reply is kept (64 at most) only to recognise its late events: drop what
        # the turn needed, so long-lived objects don't pile up for the garbage collector
        speech.turn = speech.tts_stage = speech.tool = speech.live = None
        speech.llm_rounds.clear()
        speech.measured.clear()
        speech.early.clear()
        self._agent_turns.discard(speech.speech_id)
        return [
            with_fields(
                full,
                # what went live stays; figures that came later (a late LLM timing) are added
                latency_ms={**full.latency_ms, **live.latency_ms},
                stages={**full.stages, **live.stages},
                tier=live.tier,
                interrupted=speech.interrupted,
                ended_at=ended,
                played_ms=played,
                complete=True,
            )
        ]

    def _build(self, speech: _Speech, breakdown: Mapping[str, float] | None = None) -> Turn:
        pending = speech.turn
        assert pending is not None
        is_agent_turn = speech.speech_id in self._agent_turns
        stages = dict(pending.stages)
        first_audio = speech.first_audio_at
        heard_from = first_audio  # what the caller hears first: the first audible sample
        if first_audio is not None and speech.leading_silence_s is not None:
            heard_from = first_audio + speech.leading_silence_s
            self._add_stage(stages, "leading_silence", first_audio, heard_from)
        e2e_source: E2ESource | None = None
        livekit_e2e: float | None = None
        if (
            first_audio is not None
            and heard_from is not None
            and not is_agent_turn
            and pending.spoken
        ):
            self._add_stage(stages, "e2e", pending.speech_end, heard_from)
            if "e2e" in stages:
                e2e_source = _E2E_SOURCES[(pending.heard, speech.leading_silence_s is not None)]
            livekit_s = speech.early.get("e2e_latency")  # LiveKit's own, from its first frame
            if livekit_s is not None:
                livekit_e2e = livekit_s * 1000.0
            elif pending.livekit_end is not None:
                livekit_e2e = (first_audio - pending.livekit_end) * 1000.0
        if speech.llm_rounds:
            start, first_token, _ = speech.llm_rounds[0]
            node_ttft = speech.early.get("llm_node_ttft")
            if node_ttft is not None and speech.tool_calls == 0 and node_ttft <= MAX_LATENCY_S:
                # the first audio came from this round: LiveKit's llm_node figure is what the
                # reply waited (from the node's start, before the plugin's request began)
                start = first_token - node_ttft
            stages["llm_ttft"] = Stage(start, first_token)
        if speech.tts_stage is not None:
            stages["tts_ttfb"] = speech.tts_stage
        latency = {name: stage.duration_ms for name, stage in stages.items()}
        ttft = speech.early.get("llm_node_ttft")
        if "llm_ttft" not in latency and ttft is not None and ttft <= MAX_LATENCY_S:
            latency["llm_ttft"] = ttft * 1000.0  # measured, but LiveKit gave no start time
        e2e = latency.get("e2e")
        if is_agent_turn:
            started = speech.created_at if speech.created_at is not None else pending.speech_end
            ended = speech.first_audio_at if speech.first_audio_at is not None else started
        else:
            started = pending.speech_end
            ended = heard_from if heard_from is not None else pending.committed_at
        extra_rounds = {
            f"llm_round_{n}": Stage(s, f) for n, (s, f, _) in enumerate(speech.llm_rounds[1:], 2)
        }
        if breakdown is None and "e2e" in stages and first_audio is not None:
            breakdown, speech.estimated = _breakdown(
                stages,
                hook_s=pending.hook_s,
                llm_rounds=speech.llm_rounds,
                node_ttft=speech.early.get("llm_node_ttft"),
                tool=speech.tool,
                first_audio=first_audio,
            )
        tool = speech.tool
        if tool is not None:
            extra_rounds["tool"] = tool
        return Turn(
            index=pending.index,
            speech_id=speech.speech_id,
            started_at=min(started, ended),
            ended_at=ended,
            latency_ms=latency,
            # live: cut before any audio; the complete record says whether it was cut at all
            interrupted=speech.interrupted and speech.first_audio_at is None,
            tier=tier_for(e2e),
            kind="agent" if is_agent_turn else "user",
            session_id=self.session_id,
            agent=self.agent,
            stages={**stages, **extra_rounds},
            tool_calls=speech.tool_calls,
            tool_ms=None if tool is None else tool.duration_ms,
            llm_rounds=len(speech.llm_rounds),
            llm_model=speech.llm_model,
            llm_provider=speech.llm_provider,
            input_tokens=speech.input_tokens or None,
            output_tokens=speech.output_tokens or None,
            complete=False,
            active_agent=speech.active_agent,
            error_type=speech.error_type,
            e2e_source=e2e_source,
            livekit_e2e_ms=livekit_e2e,
            breakdown_ms=breakdown or {},
            breakdown_settings=(
                {p: v for p, v in pending.settings.items() if p in breakdown} if breakdown else {}
            ),
            stt_provider=pending.stt_provider,
            stt_model=pending.stt_model,
            tts_provider=speech.tts_provider,
            tts_model=speech.tts_model,
            measured=(*pending.measured, *speech.measured),
        )


def _model_names(metadata: object) -> tuple[str | None, str | None]:
    """(provider, model) from LiveKit's metrics metadata ({"model_provider", "model_name"});
    LiveKit's "unknown" placeholder and anything that is not a name count as not known."""
    if not isinstance(metadata, Mapping):
        return None, None
    names: list[str | None] = []
    for key in ("model_provider", "model_name"):
        value = metadata.get(key)
        known = isinstance(value, str) and value.strip() and value != "unknown"
        names.append(value.strip()[:MAX_MODEL_NAME] if known else None)  # type: ignore[union-attr]
    return names[0], names[1]


def _breakdown(
    stages: Mapping[str, Stage],
    *,
    hook_s: float | None,
    llm_rounds: list[tuple[float, float, float]],
    node_ttft: float | None,
    tool: Stage | None,
    first_audio: float,
) -> tuple[dict[str, float], bool]:
    """e2e split into BREAKDOWN_PARTS (ms) that add up to it exactly, and whether an LLM round
    still running had to be estimated from LiveKit's node figure.

    Each part is an interval on the way from the user's speech end to the first audible sample;
    walked in pipeline order, a part counts only the time after the parts before it ended (a
    preemptive LLM that finished before the end of turn counts 0: it was not on the critical
    path), and the time between parts goes to "scheduling". The LLM part is the provider's own
    time (its request to its first token): LiveKit's steps before the request are scheduling."""
    e2e = stages["e2e"]
    spans: list[tuple[str, float, float]] = []
    for part, component in (
        ("vad_silence", "vad"),
        ("transcription", "stt"),
        ("end_of_turn", "eou"),
    ):
        stage = stages.get(component)
        if stage is not None:
            spans.append((part, stage.start, stage.end))
    if hook_s is not None:
        eou = stages.get("eou")
        hook_start = eou.end if eou is not None else (spans[-1][2] if spans else e2e.start)
        spans.append(("on_user_turn_completed", hook_start, hook_start + hook_s))
    tts = stages.get("tts_ttfb")
    audio_from = tts.start if tts is not None else first_audio
    # tools the first audio waited for; the rounds that called them ran to their end, and the
    # round the audio came from counts to its first token
    waited = tool if tool is not None and tool.end <= audio_from + 0.001 else None
    generation: list[tuple[str, float, float]] = []
    if waited is not None:
        generation.append(("tool", waited.start, waited.end))
    after_tools = estimated = False
    for start, first_token, end in llm_rounds:
        if first_token > audio_from + 0.001:
            continue  # a later round: the audio did not wait for it
        if waited is not None and end <= waited.start + 0.001:
            generation.append(("llm", start, end))
            continue
        after_tools = after_tools or waited is not None
        generation.append(("llm", start, first_token))
    if waited is not None and not after_tools and node_ttft is not None:
        # the round after the tools reports its timing only when it ends, after the first
        # audio; LiveKit's node figure for the reply is that round's: it ends where the text
        # reached the TTS
        generation.append(("llm", audio_from - node_ttft, audio_from))
        estimated = True
    spans += sorted(generation, key=lambda span: span[1]) if len(generation) > 1 else generation
    if tts is not None:
        spans.append(("tts", tts.start, tts.end))
        spans.append(("playback", tts.end, first_audio))
    silence = stages.get("leading_silence")
    if silence is not None:
        spans.append(("leading_silence", silence.start, silence.end))
    parts: dict[str, float] = {}
    cursor, end_at = e2e.start, e2e.end
    for part, start, end in spans:
        begin = min(max(start, cursor), end_at)
        stop = min(end, end_at)
        parts[part] = parts.get(part, 0.0)
        if stop > begin:
            parts[part] += (stop - begin) * 1000.0
            cursor = stop
    parts["scheduling"] = max(0.0, e2e.duration_ms - math.fsum(parts.values()))
    if "tool" in parts:  # the only part that can come before another (the llm) in time
        parts = {part: parts[part] for part in BREAKDOWN_PARTS if part in parts}
    return parts, estimated
