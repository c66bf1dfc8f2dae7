"""Per-turn structured logs, PII/credential redaction and OTel log correlation."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from structlog.testing import capture_logs

from lk_observe.logs import (
    REDACTED,
    TurnLogger,
    add_otel_context,
    redact_attributes,
    redact_pii,
    scrub_secrets,
)
from lk_observe.presets import LatencyBudget
from lk_observe.turns import Turn

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN_ID = 0x00F067AA0BA902B7


def make_turn(**overrides: Any) -> Turn:
    fields: dict[str, Any] = {
        "index": 3,
        "speech_id": "speech_abc",
        "started_at": 1_700_000_000.0,
        "ended_at": 1_700_000_001.2,
        "latency_ms": {
            "e2e": 1012.345,
            "vad": 180.04,
            "stt": 260.06,
            "eou": 300.0,
            "llm_ttft": 450.55,
            "tts_ttfb": 61.0,
        },
        "interrupted": False,
        "tier": "slow",
        "kind": "user",
        "session_id": "sess-1",
        "agent": "support",
        "tool_calls": 1,
        "trace_id": TRACE_ID,
        "span_id": SPAN_ID,
    }
    fields.update(overrides)
    return Turn(**fields)


@dataclass(frozen=True)
class TextTurn(Turn):
    """What a future Turn carrying the user's words might look like."""

    user_text: str = ""
    agent_text: str = ""


def log_one(turn: Turn, **kwargs: Any) -> dict[str, Any]:
    with capture_logs() as logs:
        TurnLogger(**kwargs)(turn)
    assert len(logs) == 1
    return dict(logs[0])


def test_one_voice_turn_event_per_turn_with_every_field() -> None:
    event = log_one(make_turn())
    assert event == {
        "event": "voice.turn",
        "log_level": "info",
        "turn_index": 3,
        "kind": "user",
        "agent": "support",
        "session_id": "sess-1",
        "speech_id": "speech_abc",
        "tier": "slow",
        "interrupted": False,
        "e2e_ms": 1012.3,
        "vad_ms": 180.0,
        "stt_ms": 260.1,
        "eou_ms": 300.0,
        "llm_ttft_ms": 450.6,
        "tts_ttfb_ms": 61.0,
        "over_budget_ms": {"e2e": 112.3, "stt": 60.1, "llm_ttft": 150.6},
        "tool_calls": 1,
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "span_id": "00f067aa0ba902b7",
    }


def test_trace_ids_are_zero_padded_otel_hex() -> None:
    event = log_one(make_turn(trace_id=1, span_id=2))
    assert event["trace_id"] == "0" * 31 + "1" and len(event["span_id"]) == 16


def test_only_measured_components_are_logged() -> None:
    event = log_one(make_turn(latency_ms={"llm_ttft": 120.0}, tier=None, trace_id=None))
    assert event["llm_ttft_ms"] == 120.0
    assert "e2e_ms" not in event and "stt_ms" not in event
    assert event["over_budget_ms"] == {}
    assert "trace_id" not in event and event["tier"] is None


def test_agent_turns_and_llm_details_are_logged() -> None:
    turn = make_turn(
        kind="agent",
        llm_model="gpt-4.1-mini",
        llm_provider="openai",
        input_tokens=12,
        output_tokens=30,
        tool_ms=80.04,
    )
    event = log_one(turn)
    assert event["kind"] == "agent"
    assert (event["llm_model"], event["llm_provider"]) == ("gpt-4.1-mini", "openai")
    assert (event["input_tokens"], event["output_tokens"], event["tool_ms"]) == (12, 30, 80.0)


def test_a_custom_budget_drives_the_overruns() -> None:
    budget = LatencyBudget(components={"eou": (0.0, 250.0)}, total=(0.0, 2000.0))
    assert log_one(make_turn(), budget=budget)["over_budget_ms"] == {"eou": 50.0}


def test_user_text_is_not_logged_by_default() -> None:
    turn = TextTurn(**vars(make_turn()), user_text="my card is 4111", agent_text="thanks")
    event = log_one(turn)
    assert "user_text" not in event and "agent_text" not in event
    assert "4111" not in json.dumps(event)


def test_user_text_is_logged_only_when_opted_in() -> None:
    turn = TextTurn(**vars(make_turn()), user_text="hello", agent_text="hi there")
    event = log_one(turn, include_text=True)
    assert (event["user_text"], event["agent_text"]) == ("hello", "hi there")


def test_an_injected_logger_is_used_and_nothing_is_configured_globally() -> None:
    before = structlog.get_config()

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, dict[str, Any]]] = []

        def info(self, event: str, **fields: Any) -> None:
            self.calls.append((event, fields))

    recorder = Recorder()
    TurnLogger(recorder)(make_turn())
    assert recorder.calls[0][0] == "voice.turn"
    assert recorder.calls[0][1]["turn_index"] == 3
    assert structlog.get_config() == before


def test_redact_pii_masks_text_and_credentials_by_key() -> None:
    event = {
        "event": "turn",
        "transcript": "my address is ...",
        "text": "hi",
        "user_text": "hi",
        "content": "hi",
        "lk.pii.user_input": "hi",
        "lk.pii.room_name": "room-of-alice",
        "gen_ai.prompt": "hi",
        "api_key": "abc",
        "Authorization": "Bearer abcdefghijkl",
        "token": "t",
        "client_secret": "s",
        "password": "p",
        "DEEPGRAM_API_KEY": "dg",
        "LIVEKIT_API_SECRET": "lk",
        "e2e_ms": 612.4,
        "input_tokens": 12,
        "gen_ai.usage.output_tokens": 30,
        "tier": "good",
    }
    out = redact_pii(None, "info", dict(event))
    for key in event:
        if key in {"event", "e2e_ms", "input_tokens", "gen_ai.usage.output_tokens", "tier"}:
            assert out[key] == event[key], key
        else:
            assert out[key] == REDACTED, key


@pytest.mark.parametrize(
    "secret",
    [
        "sk-proj-Abcdefghijklmnopqrstuvwxyz012345",
        "sk-Abcdefghijklmnopqrstuv",
        "sk_car_Abcdefghijklmnopqrstuv",
        "gsk_Abcdefghijklmnopqrstuvwxyz",
        "APIq5VrnRtE9pKe",
        "eyJhbGciOiJIUzI1NiJ9.eyJ2aWRlbyI6eyJyb29tIjoieCJ9fQ.c2lnbmF0dXJl",
    ],
)
def test_secret_looking_values_are_scrubbed_inside_free_text(secret: str) -> None:
    out = redact_pii(None, "error", {"event": f"connect failed with {secret} (retrying)"})
    assert secret not in out["event"]
    assert out["event"] == f"connect failed with {REDACTED} (retrying)"


def test_bearer_tokens_and_url_credentials_are_scrubbed() -> None:
    assert scrub_secrets("Authorization: Bearer abc.def-ghi_jkl") == f"Authorization: {REDACTED}"
    assert (
        scrub_secrets("GET wss://lk.example/rtc?access_token=abc123&auto=1")
        == f"GET wss://lk.example/rtc?access_token={REDACTED}&auto=1"
    )


def test_ordinary_values_are_left_alone() -> None:
    text = "stt took 260 ms with deepgram nova-3; API ok; skipped 2 tokens; Application"
    assert scrub_secrets(text) == text


def test_nested_values_are_walked() -> None:
    out = redact_attributes(
        {
            "request": {"headers": {"authorization": "x"}, "url": "/v1?key=abc"},
            "items": [{"content": "secret words"}, "sk-Abcdefghijklmnopqrstuv"],
            "pair": ("ok", "Bearer abcdefghijkl"),
        }
    )
    assert out == {
        "request": {"headers": {"authorization": REDACTED}, "url": f"/v1?key={REDACTED}"},
        "items": [{"content": REDACTED}, REDACTED],
        "pair": ("ok", REDACTED),
    }


def test_redact_attributes_returns_a_copy_for_span_attributes() -> None:
    attributes = {"lk.pii.user_transcript": "hello", "voice.latency.e2e_ms": 612.4}
    out = redact_attributes(attributes)
    assert out == {"lk.pii.user_transcript": REDACTED, "voice.latency.e2e_ms": 612.4}
    assert attributes["lk.pii.user_transcript"] == "hello"


def test_add_otel_context_adds_the_current_span() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("work") as span:
        out = add_otel_context(None, "info", {"event": "x"})
        context = span.get_span_context()
    assert out["trace_id"] == format(context.trace_id, "032x")
    assert out["span_id"] == format(context.span_id, "016x")


def test_add_otel_context_without_a_span_adds_nothing() -> None:
    assert add_otel_context(None, "info", {"event": "x"}) == {"event": "x"}


def test_add_otel_context_keeps_a_turns_own_trace() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("caller"):
        out = add_otel_context(None, "info", {"trace_id": "turn-trace", "span_id": "turn-span"})
    assert out == {"trace_id": "turn-trace", "span_id": "turn-span"}


def test_processors_work_in_a_users_structlog_chain() -> None:
    stream = io.StringIO()
    logger = structlog.wrap_logger(
        structlog.PrintLogger(stream),
        processors=[
            structlog.processors.add_log_level,
            add_otel_context,
            redact_pii,
            structlog.processors.JSONRenderer(),
        ],
    )
    TurnLogger(logger)(make_turn())
    logger.info("provider error", authorization="Bearer abcdefghijkl", text="user words")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["event"] == "voice.turn" and first["e2e_ms"] == 1012.3
    assert first["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert second["authorization"] == REDACTED and second["text"] == REDACTED


def test_processors_work_for_stdlib_records_through_processor_formatter() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[add_otel_context, redact_pii],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    std = logging.getLogger("test_logs.stdlib")
    std.propagate = False
    std.addHandler(handler)
    try:
        std.warning("retrying with key sk-Abcdefghijklmnopqrstuv")
    finally:
        std.removeHandler(handler)
    record = json.loads(stream.getvalue())
    assert record["event"] == f"retrying with key {REDACTED}"


def test_an_interrupted_reply_logs_what_played_and_who_spoke() -> None:
    event = log_one(make_turn(interrupted=True, played_ms=1234.56, active_agent="specialist"))
    assert event["interrupted"] is True
    assert event["played_ms"] == 1234.6
    assert event["active_agent"] == "specialist"


def test_a_reply_that_never_played_logs_no_played_time() -> None:
    event = log_one(make_turn(interrupted=True, played_ms=None))
    assert "played_ms" not in event and "active_agent" not in event


def test_a_reply_a_livekit_error_hit_logs_its_type() -> None:
    assert log_one(make_turn(error_type="llm_error"))["error_type"] == "llm_error"
    assert "error_type" not in log_one(make_turn())
