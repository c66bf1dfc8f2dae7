"""LatencyMetrics: ground-truth values, one set of families per registry, bounded labels."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from lk_observe.metrics import LatencyMetrics, sanitize_label
from lk_observe.promql import LATENCY_BUCKETS_S
from lk_observe.server import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, render_metrics
from lk_observe.turns import Turn, tier_for


def make_turn(
    index: int,
    latency_ms: dict[str, float],
    *,
    agent: str = "default",
    kind: str = "user",
    trace_id: int | None = None,
) -> Turn:
    e2e = latency_ms.get("e2e")
    return Turn(
        index=index,
        speech_id=f"speech_{index}",
        started_at=1000.0 + index,
        ended_at=1001.0 + index,
        latency_ms=latency_ms,
        interrupted=False,
        tier=tier_for(e2e) if kind == "user" else None,
        kind=kind,  # type: ignore[arg-type]
        agent=agent,
        trace_id=trace_id,
    )


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    if name.startswith("voice_agent_latency_seconds"):  # no provider/model unless given
        labels = {"provider": "", "model": "", **labels}
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_latency_buckets_keep_the_slo_edges() -> None:
    for edge in (0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0):
        assert edge in LATENCY_BUCKETS_S


def test_observed_turns_equal_ground_truth(registry: CollectorRegistry) -> None:
    metrics = LatencyMetrics.for_registry(registry)
    turns = [
        make_turn(0, {"e2e": 420.0, "stt": 150.0, "llm_ttft": 210.0, "tts_ttfb": 60.0}),
        make_turn(1, {"e2e": 650.0, "stt": 180.0, "eou": 90.0}),
        make_turn(2, {"e2e": 1200.0, "vad": 190.0}),
        make_turn(3, {"e2e": 800.0}),  # exactly on the 0.8 s edge: le="0.8" counts it
        make_turn(4, {"tts_ttfb": 70.0}, kind="agent"),  # a greeting: latency yes, tier no
    ]
    for turn in turns:
        metrics.observe_turn(turn)

    e2e = [t.latency_ms["e2e"] / 1000 for t in turns if "e2e" in t.latency_ms]
    labels = {"component": "e2e", "agent": "default"}
    assert value(registry, "voice_agent_latency_seconds_count", **labels) == len(e2e)
    assert math.isclose(
        value(registry, "voice_agent_latency_seconds_sum", **labels), sum(e2e), rel_tol=1e-9
    )
    for edge in LATENCY_BUCKETS_S:
        expected = sum(1 for x in e2e if x <= edge)
        got = value(registry, "voice_agent_latency_seconds_bucket", **labels, le=str(edge))
        assert got == expected, edge
    assert (
        value(registry, "voice_agent_latency_seconds_count", component="tts_ttfb", agent="default")
        == 2
    )
    assert (
        value(registry, "voice_agent_latency_seconds_count", component="stt", agent="default") == 2
    )

    assert value(registry, "voice_agent_turns_total", agent="default", tier="excellent") == 1
    assert value(registry, "voice_agent_turns_total", agent="default", tier="good") == 1
    assert value(registry, "voice_agent_turns_total", agent="default", tier="slow") == 2


def test_invalid_latencies_are_skipped_not_exported(registry: CollectorRegistry) -> None:
    metrics = LatencyMetrics.for_registry(registry)
    metrics.observe_turn(make_turn(0, {"e2e": float("nan"), "stt": -5.0, "llm_ttft": 200.0}))
    assert (
        value(registry, "voice_agent_latency_seconds_count", component="e2e", agent="default") == 0
    )
    assert (
        value(registry, "voice_agent_latency_seconds_count", component="stt", agent="default") == 0
    )
    assert (
        value(registry, "voice_agent_latency_seconds_count", component="llm_ttft", agent="default")
        == 1
    )
    assert metrics.skipped_observations == 2


def test_families_are_created_once_per_registry(registry: CollectorRegistry) -> None:
    first = LatencyMetrics.for_registry(registry)
    second = LatencyMetrics.for_registry(registry)  # a second instrument(): no Duplicated series
    assert first is second
    other = LatencyMetrics.for_registry(CollectorRegistry())
    assert other is not first
    first.observe_turn(make_turn(0, {"e2e": 300.0}))
    second.observe_turn(make_turn(1, {"e2e": 300.0}))
    assert (
        value(registry, "voice_agent_latency_seconds_count", component="e2e", agent="default") == 2
    )


def test_sessions_gauge_never_goes_below_zero(registry: CollectorRegistry) -> None:
    metrics = LatencyMetrics.for_registry(registry)
    metrics.session_started("support")
    metrics.session_started("support")
    metrics.session_ended("support")
    assert value(registry, "voice_agent_active_sessions", agent="support") == 1
    metrics.session_ended("support")
    metrics.session_ended("support")  # unmatched: ignored
    assert value(registry, "voice_agent_active_sessions", agent="support") == 0
    assert value(registry, "voice_agent_sessions_total", agent="support") == 2


def test_errors_sink_failures_and_budget_overruns_are_counted(
    registry: CollectorRegistry,
) -> None:
    metrics = LatencyMetrics.for_registry(registry)
    metrics.error("support", "stt_timeout")
    metrics.error("support", "stt_timeout")
    metrics.sink_failure("tracing")
    metrics.budget_overrun("support", "llm_ttft")
    metrics.budget_overrun("support", "made_up")  # not a component: counted as overflow only
    assert (
        value(registry, "voice_agent_errors_total", agent="support", error_type="stt_timeout") == 2
    )
    assert value(registry, "voice_agent_sink_failures_total", sink="tracing") == 1
    assert (
        value(registry, "voice_agent_budget_overruns_total", agent="support", component="llm_ttft")
        == 1
    )
    assert value(registry, "voice_agent_label_overflow_total", label="component") == 1


def test_cardinality_guard_folds_extra_agents_into_other(registry: CollectorRegistry) -> None:
    metrics = LatencyMetrics.for_registry(registry)
    for i in range(25):
        metrics.observe_turn(make_turn(i, {"e2e": 400.0}, agent=f"agent-{i}"))
    for i in range(20):
        assert (
            value(
                registry, "voice_agent_latency_seconds_count", component="e2e", agent=f"agent-{i}"
            )
            == 1
        )
    assert value(registry, "voice_agent_latency_seconds_count", component="e2e", agent="other") == 5
    assert value(registry, "voice_agent_label_overflow_total", label="agent") == 5
    # an admitted name keeps working after the limit is reached
    metrics.observe_turn(make_turn(99, {"e2e": 400.0}, agent="agent-3"))
    assert (
        value(registry, "voice_agent_latency_seconds_count", component="e2e", agent="agent-3") == 2
    )
    agents = {
        s.labels["agent"]
        for family in registry.collect()
        if family.name == "voice_agent_latency_seconds"
        for s in family.samples
    }
    assert len(agents) == 21


def test_cardinality_guard_bounds_error_types(registry: CollectorRegistry) -> None:
    metrics = LatencyMetrics.for_registry(registry)
    for i in range(40):
        metrics.error("default", f"Error{i}")
    assert value(registry, "voice_agent_errors_total", agent="default", error_type="other") == 10
    assert value(registry, "voice_agent_label_overflow_total", label="error_type") == 10


def test_unknown_component_is_dropped_and_counted(registry: CollectorRegistry) -> None:
    metrics = LatencyMetrics.for_registry(registry)
    metrics.observe_turn(make_turn(0, {"e2e": 500.0, "room_abc123": 5.0}))
    assert value(registry, "voice_agent_label_overflow_total", label="component") == 1
    names = {s.labels.get("component") for f in registry.collect() for s in f.samples}
    assert "room_abc123" not in names


def test_label_values_are_sanitized_and_capped() -> None:
    assert sanitize_label("support\nbot") == "support_bot"
    assert len(sanitize_label("x" * 500)) == 64
    assert sanitize_label("   ") == "unknown"


def test_long_agent_name_is_capped_in_the_exposition(registry: CollectorRegistry) -> None:
    metrics = LatencyMetrics.for_registry(registry)
    metrics.observe_turn(make_turn(0, {"e2e": 500.0}, agent="a" * 300))
    assert (
        value(registry, "voice_agent_latency_seconds_count", component="e2e", agent="a" * 64) == 1
    )


def test_exemplar_carries_the_trace_id_in_openmetrics(registry: CollectorRegistry) -> None:
    metrics = LatencyMetrics.for_registry(registry)
    trace_id = 0x0AF7651916CD43DD8448EB211C80319C
    metrics.observe_turn(make_turn(0, {"e2e": 420.0}, trace_id=trace_id))

    body, content_type = render_metrics(registry, openmetrics=True)
    assert content_type == OPENMETRICS_CONTENT_TYPE
    text = body.decode()
    assert f'# {{trace_id="{trace_id:032x}"}} 0.42' in text
    exemplars = [
        s.exemplar
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.exemplar is not None
    ]
    assert {e.labels["trace_id"] for e in exemplars} == {f"{trace_id:032x}"}
    assert any(
        s.name == "voice_agent_turns_total" and s.exemplar
        for f in text_string_to_metric_families(text)
        for s in f.samples
    )

    plain, plain_type = render_metrics(registry, openmetrics=False)
    assert plain_type == TEXT_CONTENT_TYPE
    assert b"trace_id" not in plain  # the classic text format has no exemplars
    assert (
        b'voice_agent_latency_seconds_bucket{agent="default",component="e2e",le="0.5",'
        b'model="",provider=""} 1.0' in plain
    )


def test_unmeasured_components_export_no_series(registry: CollectorRegistry) -> None:
    metrics = LatencyMetrics.for_registry(registry)
    metrics.observe_turn(make_turn(0, {"e2e": 500.0, "llm_ttft": 200.0}))  # a realtime model
    components = {
        s.labels["component"]
        for family in registry.collect()
        if family.name == "voice_agent_latency_seconds"
        for s in family.samples
    }
    assert components == {"e2e", "llm_ttft"}
    # tiers are bound up front so rate() sees every tier from the first scrape
    assert (
        registry.get_sample_value("voice_agent_turns_total", {"agent": "default", "tier": "slow"})
        == 0.0
    )


def test_overflowing_agents_share_the_other_sessions(registry: CollectorRegistry) -> None:
    metrics = LatencyMetrics.for_registry(registry)
    for i in range(22):
        metrics.session_started(f"agent-{i}")
    metrics.session_ended("agent-21")  # folded into "other" like its start
    assert registry.get_sample_value("voice_agent_active_sessions", {"agent": "other"}) == 1
    assert registry.get_sample_value("voice_agent_sessions_total", {"agent": "other"}) == 2
    assert registry.get_sample_value("voice_agent_label_overflow_total", {"label": "agent"}) == 3
