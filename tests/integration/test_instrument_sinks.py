"""The default sinks instrument() installs, seen from a real scripted session: the per-turn log
event (trace ids, no user text), budget overruns (counter, span attribute), zero-exported series."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import structlog
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import lk_observe
from lk_observe.demo import ScriptedTurn, build_pipeline, run_pipeline
from lk_observe.recent import default_recent_turns
from tests.otel import memory_tracing

SLOW_LLM = ScriptedTurn(llm_ttft_s=0.55)  # 550 ms TTFT: over the guide's 300 ms LLM budget


@pytest.fixture(scope="module")
def played() -> tuple[list[lk_observe.Turn], CollectorRegistry, InMemorySpanExporter, list[str]]:
    registry = CollectorRegistry()
    provider, exporter = memory_tracing()
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    # an app without structlog configuration (structlog.testing.capture_logs, used by other
    # modules, leaves structlog marked configured)
    structlog.reset_defaults()
    turns_logger = logging.getLogger("lk_observe.turns")
    handler = Collect(level=logging.INFO)
    turns_logger.addHandler(handler)
    turns_logger.setLevel(logging.INFO)
    turns: list[lk_observe.Turn] = []
    zero_before_first_turn: list[float | None] = []

    async def play() -> None:
        pipeline = build_pipeline([ScriptedTurn(), SLOW_LLM])
        lk_observe.instrument(
            pipeline.session,
            agent_name="sinks",
            tracer_provider=provider,
            registry=registry,
            monitor=lk_observe.LatencyMonitor(),
            on_turn=turns.append,
        )
        zero_before_first_turn.append(
            registry.get_sample_value(
                "voice_agent_latency_seconds_count",
                {"component": "e2e", "agent": "sinks", "provider": "", "model": ""},
            )
        )
        await run_pipeline(pipeline)
        assert await asyncio.to_thread(lk_observe.flush, 10.0)
        await asyncio.sleep(0.05)

    try:
        asyncio.run(play())
    finally:
        turns_logger.removeHandler(handler)
    assert zero_before_first_turn == [0.0]  # exported before any turn, so rate() sees turn 1
    return turns, registry, exporter, records


def test_one_json_log_event_per_turn_with_trace_ids_and_no_user_text(played) -> None:  # type: ignore[no-untyped-def]
    turns, _, _, records = played
    events = [json.loads(r) for r in records]
    assert [e["event"] for e in events] == ["voice.turn"] * len(turns)
    for event, turn in zip(events, turns, strict=True):
        assert event["trace_id"] == f"{turn.trace_id:032x}"
        assert event["span_id"] == f"{turn.span_id:016x}"
        assert event["e2e_ms"] == pytest.approx(turn.latency_ms["e2e"], abs=0.06)
        assert event["level"] == "info"
    text = "\n".join(records)
    assert "user utterance" not in text and "here is the answer" not in text


def test_budget_overrun_is_counted_and_on_the_span(played) -> None:  # type: ignore[no-untyped-def]
    turns, registry, exporter, _ = played
    slow = turns[1]
    assert slow.budget_overruns_ms["llm_ttft"] == pytest.approx(
        slow.latency_ms["llm_ttft"] - 300.0, abs=0.01
    )
    assert "llm_ttft" not in turns[0].budget_overruns_ms
    assert (
        registry.get_sample_value(
            "voice_agent_budget_overruns_total", {"agent": "sinks", "component": "llm_ttft"}
        )
        == 1.0
    )
    root = next(
        s
        for s in exporter.get_finished_spans()
        if s.name == "voice.turn" and s.context.trace_id == slow.trace_id
    )
    assert (root.attributes or {})["voice.budget.overrun.llm_ttft_ms"] == pytest.approx(
        slow.budget_overruns_ms["llm_ttft"], abs=0.01
    )


def test_recent_turns_ring_sees_every_turn(played) -> None:  # type: ignore[no-untyped-def]
    turns, _, _, _ = played
    recent = {(t.session_id, t.index) for t in default_recent_turns().turns()}
    assert {(t.session_id, t.index) for t in turns} <= recent


def test_no_id_like_label_anywhere(played) -> None:  # type: ignore[no-untyped-def]
    import re

    from prometheus_client.parser import text_string_to_metric_families

    from lk_observe.server import render_metrics

    turns, registry, _, _ = played
    body, _ = render_metrics(registry)
    allowed = {"component", "agent", "tier", "error_type", "sink", "label", "le"}
    allowed |= {"provider", "model", "part"}  # bounded: at most 20 pairs, the fixed parts
    id_like = re.compile(r"(speech_|item_|[0-9a-f]{16,}|[0-9a-f]{8}-[0-9a-f]{4}-)")
    ids = {t.session_id for t in turns} | {t.speech_id for t in turns if t.speech_id}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            assert set(sample.labels) <= allowed, (sample.name, sample.labels)
            for value in sample.labels.values():
                assert not id_like.search(value) and value not in ids, (sample.name, value)


def test_default_turn_log_goes_through_the_apps_structlog_once_configured(played) -> None:  # type: ignore[no-untyped-def]
    from structlog.testing import capture_logs

    from lk_observe.logs import default_turn_logger

    turns = played[0]
    with capture_logs() as logs:  # configures structlog, as an app would (even after instrument)
        default_turn_logger()(turns[0])
    assert [entry["event"] for entry in logs] == ["voice.turn"]
    assert logs[0]["trace_id"] == f"{turns[0].trace_id:032x}"
    structlog.reset_defaults()
