"""configure_tracing() settings against capture collectors on 127.0.0.1: an argument wins, then
the standard OTel variable, then lk_observe's default; a bad endpoint is refused or reported;
flush_tracing says False after spans were lost."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from lk_observe.otlp import configure_tracing, export_health, flush_tracing, shutdown_tracing
from tests.otlp_collectors import SLOW_S, Collector, start_collector

PROTOCOLS = ("http/protobuf", "grpc")
OTEL_VARS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TIMEOUT",
    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
    "OTEL_BSP_EXPORT_TIMEOUT",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(params=PROTOCOLS)
def slow(request: pytest.FixtureRequest) -> Iterator[tuple[str, Collector]]:
    collector = start_collector(request.param, "slow")  # answers after SLOW_S
    yield request.param, collector
    collector.close()


def _one_span_export_time(provider: object) -> float:
    """Seconds one export of one span took, as flush_tracing waited for it."""
    tracer = provider.get_tracer("settings")  # type: ignore[attr-defined]
    tracer.start_span("voice.turn").end()
    start = time.perf_counter()
    flush_tracing(provider, SLOW_S * 3)  # type: ignore[arg-type]
    return time.perf_counter() - start


def test_the_timeout_variable_applies_when_no_argument_is_given(
    slow: tuple[str, Collector], monkeypatch: pytest.MonkeyPatch
) -> None:
    protocol, collector = slow
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "0.3")  # seconds, as Python's exporters
    provider = configure_tracing(
        endpoint=collector.endpoint, protocol=protocol, registry=CollectorRegistry()
    )
    try:
        took = _one_span_export_time(provider)
        assert took < 1.0 < SLOW_S, took  # the variable's 0.3 s, not the 2 s default
        assert export_health(provider)["last_error"] in ("Timeout", "ReadTimeout")
        assert export_health(provider)["failed"] == 1
    finally:
        shutdown_tracing(provider, 2.0)


def test_an_argument_wins_over_the_variable(
    slow: tuple[str, Collector], monkeypatch: pytest.MonkeyPatch
) -> None:
    protocol, collector = slow
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "0.2")
    provider = configure_tracing(
        endpoint=collector.endpoint,
        protocol=protocol,
        timeout_s=SLOW_S + 2.0,  # long enough for the slow collector's answer
        registry=CollectorRegistry(),
    )
    try:
        took = _one_span_export_time(provider)
        assert took >= SLOW_S * 0.9, took
        assert export_health(provider)["exported"] == 1
    finally:
        shutdown_tracing(provider, 2.0)


def test_the_spec_millisecond_form_of_the_timeout_variable_is_understood(
    slow: tuple[str, Collector], monkeypatch: pytest.MonkeyPatch
) -> None:
    protocol, collector = slow
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1000")  # 1000 ms per the OTel spec
    provider = configure_tracing(
        endpoint=collector.endpoint, protocol=protocol, registry=CollectorRegistry()
    )
    try:
        took = _one_span_export_time(provider)
        assert took < SLOW_S, took  # 1 s, not 1000 s
    finally:
        shutdown_tracing(provider, 2.0)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_queue_size_variable_applies_and_an_argument_wins(
    protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    collector = start_collector(protocol, "healthy")
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "5")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")  # nothing leaves before the flush
    try:
        # the export thread may take a full queue's 5 spans out while the rest arrive, so with
        # the variable's queue of 5 spans some (not exactly 45) are dropped; with the argument none
        for argument in (None, 2048):
            provider = configure_tracing(
                endpoint=collector.endpoint,
                protocol=protocol,
                max_queue_size=argument,
                registry=CollectorRegistry(),
            )
            try:
                tracer = provider.get_tracer("settings")
                for i in range(50):
                    tracer.start_span(f"s{i}").end()
                health_ok = flush_tracing(provider, 5.0)
                health = export_health(provider)
                assert health["exported"] + health["dropped"] == 50, argument
                if argument is None:
                    assert health["dropped"] >= 25 and not health_ok  # a queue of 5, not 2048
                else:
                    assert (health["exported"], health["dropped"]) == (50, 0) and health_ok
            finally:
                shutdown_tracing(provider, 2.0)
    finally:
        collector.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    "endpoint", ["not a url", "http://", "ftp://collector:4318", "http://h:99999"]
)
def test_a_malformed_endpoint_argument_is_refused(protocol: str, endpoint: str) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        configure_tracing(endpoint=endpoint, protocol=protocol, registry=CollectorRegistry())


def test_a_malformed_endpoint_variable_starts_but_reports_unhealthy(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "collector.internal")  # no scheme
    caplog.set_level(logging.WARNING, logger="lk_observe.otlp")  # whatever earlier tests set
    provider = configure_tracing(registry=CollectorRegistry())  # the agent must still start
    try:
        health = export_health(provider)
        assert health["healthy"] is False and health["last_error"] == "InvalidEndpoint"
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" in caplog.text
    finally:
        shutdown_tracing(provider, 1.0)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_flush_tracing_is_false_after_spans_were_lost_before_it(
    protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spans failed in a scheduled export before the flush: the flush itself loses
    nothing, and used to say True."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    collector = start_collector(protocol, "unavailable")
    provider = configure_tracing(
        endpoint=collector.endpoint, protocol=protocol, timeout_s=0.3, registry=CollectorRegistry()
    )
    try:
        provider.get_tracer("settings").start_span("voice.turn").end()
        deadline = time.monotonic() + 15
        while export_health(provider)["failed"] == 0:  # the batch processor's own export
            assert time.monotonic() < deadline, "the export never failed"
            time.sleep(0.05)
        assert flush_tracing(provider, 2.0) is False
        assert flush_tracing(provider, 2.0) is True  # nothing lost since the previous flush
    finally:
        shutdown_tracing(provider, 2.0)
        collector.close()
