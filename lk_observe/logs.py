"""Structured logs: one "voice.turn" event per finished turn, plus processors for the app's config.

The library configures nothing: `TurnLogger` logs through `structlog.get_logger("lk_observe")`
(or the logger you pass), and `redact_pii` / `add_otel_context` are processors you add to your
own structlog chain (or to `structlog.stdlib.ProcessorFormatter(foreign_pre_chain=[...])` for
stdlib records).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import structlog
from opentelemetry import trace

from lk_observe.presets import DEFAULT_BUDGET, LatencyBudget, budget_overruns
from lk_observe.turns import Turn

TURN_EVENT = "voice.turn"
REDACTED = "[REDACTED]"

# Text a person said or the agent said back: kept out unless the user opts in.
_TEXT_KEYS = frozenset(
    {
        "transcript",
        "user_transcript",
        "text",
        "user_text",
        "agent_text",
        "input_text",
        "response_text",
        "content",
        "user_input",
        "instructions",
        "system_instructions",
        "chat_ctx",
        "prompt",
        "completion",
        "messages",
    }
)
# Credentials by key name. "*_token" but not "*_tokens": token counts are not secrets.
_SECRET_KEYS = frozenset(
    {
        "api_key",
        "apikey",
        "api_secret",
        "authorization",
        "proxy-authorization",
        "token",
        "access_token",
        "refresh_token",
        "secret",
        "password",
        "passwd",
        "cookie",
        "set-cookie",
    }
)
_SECRET_SUFFIXES = ("_key", "_secret", "_token", "_password", "-key", "-token")
_PII_PREFIX = "lk.pii."  # LiveKit's own marker for attributes that carry user data

# Secrets that show up inside free text (an exception message, a URL, a header dump).
_SECRET_VALUE = re.compile(
    r"(?P<query>[?&](?:token|access_token|api_key|apikey|key)=)[^&\s#]+"  # credentials in URLs
    r"|\b(?:Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=-]{8,}"  # Authorization header values
    r"|\beyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*"  # JWTs (LiveKit tokens)
    r"|\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{16,}"  # OpenAI
    r"|\bsk_car_[A-Za-z0-9_-]{16,}"  # Cartesia
    r"|\bsk_[a-f0-9]{40,}"  # ElevenLabs
    r"|\bgsk_[A-Za-z0-9]{20,}"  # Groq
    r"|(?-i:\bAPI[A-Za-z0-9]{10,14}\b)",  # LiveKit API key ids ("API" + 12 characters)
    re.IGNORECASE,
)
_MAX_DEPTH = 6  # nested values deeper than this are masked whole rather than walked


def _key_kind(key: object) -> str | None:
    """ "text" for user text, "secret" for credentials, None for anything else."""
    if not isinstance(key, str):
        return None
    lowered = key.lower()
    if lowered.startswith(_PII_PREFIX):
        return "text"
    last = lowered.rsplit(".", 1)[-1]  # "lk.response.text" -> "text", "gen_ai.prompt" -> "prompt"
    if last in _TEXT_KEYS:
        return "text"
    if last in _SECRET_KEYS or last.endswith(_SECRET_SUFFIXES):
        return "secret"
    return None


def scrub_secrets(text: str) -> str:
    """`text` with anything that looks like an API key, bearer token or JWT masked."""
    return _SECRET_VALUE.sub(_mask, text)


def _mask(match: re.Match[str]) -> str:
    return (match.group("query") or "") + REDACTED  # keep "?token=" so the URL still reads


def _redact_value(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return scrub_secrets(value)
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if depth >= _MAX_DEPTH:
        return REDACTED
    if isinstance(value, Mapping):
        return _redact_mapping(value, depth + 1)
    if isinstance(value, list):
        return [_redact_value(item, depth + 1) for item in value]
    if isinstance(value, tuple):
        return tuple(_redact_value(item, depth + 1) for item in value)
    return value  # other objects are rendered later by the app's renderer; leave them be


def _redact_mapping(mapping: Mapping[Any, Any], depth: int) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for key, value in mapping.items():
        out[key] = REDACTED if _key_kind(key) is not None else _redact_value(value, depth)
    return out


def redact_attributes(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `mapping` (span attributes, log fields) with user text and credentials masked.

    Keys for transcripts and other user text (transcript, text, user_text, content, lk.pii.*,
    gen_ai prompts/completions) and credentials (api_key, authorization, token, secret,
    password, *_KEY, ...) get "[REDACTED]"; other string values have embedded API keys, bearer
    tokens and JWTs masked. Nested mappings and lists are walked.
    """
    return _redact_mapping(mapping, 0)


def redact_pii(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask user text and credentials (see `redact_attributes`).

    Put it last before the renderer so it sees every field the other processors added.
    """
    redacted = redact_attributes(event_dict)
    event_dict.clear()
    event_dict.update(redacted)
    return event_dict


def add_otel_context(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: `trace_id` / `span_id` (hex) of the current OTel span, if any.

    Fields already set (a turn's own trace) win: the current span is the caller's, not the turn's.
    """
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event_dict.setdefault("trace_id", format(context.trace_id, "032x"))
        event_dict.setdefault("span_id", format(context.span_id, "016x"))
    return event_dict


def _round(value: float) -> float:
    return round(value, 1)


def turn_fields(
    turn: Turn, *, include_text: bool = False, budget: LatencyBudget = DEFAULT_BUDGET
) -> dict[str, Any]:
    """The "voice.turn" event's fields for `turn` (numbers, ids and labels; no user text
    unless `include_text`)."""
    fields: dict[str, Any] = {
        "turn_index": turn.index,
        "kind": turn.kind,
        "agent": turn.agent,
        "session_id": turn.session_id,
        "speech_id": turn.speech_id,
        "tier": turn.tier,
        "interrupted": turn.interrupted,
    }
    for component, value in turn.latency_ms.items():
        fields[f"{component}_ms"] = _round(value)
    fields["over_budget_ms"] = {
        component: _round(over) for component, over in budget_overruns(turn, budget).items()
    }
    if turn.e2e_source is not None:
        fields["e2e_source"] = turn.e2e_source
    if turn.livekit_e2e_ms is not None:
        fields["livekit_e2e_ms"] = _round(turn.livekit_e2e_ms)
    if turn.played_ms is not None:
        fields["played_ms"] = _round(turn.played_ms)
    if turn.active_agent is not None:
        fields["active_agent"] = turn.active_agent
    if turn.error_type is not None:
        fields["error_type"] = turn.error_type
    fields["tool_calls"] = turn.tool_calls
    if turn.tool_ms is not None:
        fields["tool_ms"] = _round(turn.tool_ms)
    if turn.breakdown_ms:
        fields["breakdown_ms"] = {part: _round(ms) for part, ms in turn.breakdown_ms.items()}
    if turn.breakdown_settings:
        fields["breakdown_settings"] = dict(turn.breakdown_settings)
    for name in ("stt_provider", "stt_model", "llm_provider", "llm_model"):
        value = getattr(turn, name)
        if value is not None:
            fields[name] = value
    for name in ("tts_provider", "tts_model"):
        value = getattr(turn, name)
        if value is not None:
            fields[name] = value
    if turn.measured:
        fields["measured_ms"] = [[name, _round(stage.duration_ms)] for name, stage in turn.measured]
    if turn.input_tokens is not None:
        fields["input_tokens"] = turn.input_tokens
    if turn.output_tokens is not None:
        fields["output_tokens"] = turn.output_tokens
    # OTel log-correlation names, so a log backend links the line to the turn's trace
    if turn.trace_id is not None:
        fields["trace_id"] = format(turn.trace_id, "032x")
    if turn.span_id is not None:
        fields["span_id"] = format(turn.span_id, "016x")
    if include_text:
        # Turn carries no text today; a future Turn (or a subclass) may, and only opt-in shows it
        for name in ("user_text", "agent_text"):
            text = getattr(turn, name, None)
            if isinstance(text, str):
                fields[name] = text
    return fields


class TurnLogger:
    """A turn sink: one structured "voice.turn" event per finished turn, at info level.

    `TurnLogger()(turn)` logs through `structlog.get_logger("lk_observe")`; whatever the app
    configured (JSON, console, stdlib) renders it. User text is left out unless
    `include_text=True`.
    """

    def __init__(
        self,
        logger: Any = None,
        *,
        include_text: bool = False,
        budget: LatencyBudget = DEFAULT_BUDGET,
    ) -> None:
        self._logger: Any = logger if logger is not None else structlog.get_logger("lk_observe")
        self.include_text = include_text
        self.budget = budget

    def __call__(self, turn: Turn) -> None:
        self._logger.info(
            TURN_EVENT, **turn_fields(turn, include_text=self.include_text, budget=self.budget)
        )


class _DefaultTurnLogger:
    """The turn sink instrument() installs, deciding per event where it goes: through the app's
    structlog configuration when there is one (also if the app configures it later), otherwise
    as JSON to the stdlib logger "lk_observe.turns", so the app's levels and handlers decide
    (nothing is printed by default, and nothing is built when INFO is off there)."""

    def __init__(self) -> None:
        self._stdlib = logging.getLogger("lk_observe.turns")
        self._via_structlog = TurnLogger()
        self._via_stdlib = TurnLogger(
            logger=structlog.wrap_logger(
                self._stdlib,
                processors=[
                    structlog.stdlib.filter_by_level,
                    structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    redact_pii,
                    structlog.processors.JSONRenderer(),
                ],
                wrapper_class=structlog.stdlib.BoundLogger,
            ),
        )

    def __call__(self, turn: Turn) -> None:
        if structlog.is_configured():
            self._via_structlog(turn)
        elif self._stdlib.isEnabledFor(logging.INFO):
            self._via_stdlib(turn)


_default_logger: _DefaultTurnLogger | None = None
_default_logger_lock = threading.Lock()


def default_turn_logger() -> Callable[[Turn], None]:
    """The process-wide turn log sink that instrument() installs (see _DefaultTurnLogger)."""
    global _default_logger
    with _default_logger_lock:
        if _default_logger is None:
            _default_logger = _DefaultTurnLogger()
        return _default_logger
