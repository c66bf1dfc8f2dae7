"""Trace sampling's decisions: what is always kept, the fraction, configuration."""

from __future__ import annotations

import logging
import math

import pytest

from lk_observe import DEFAULT_SLOS, SLO, Turn
from lk_observe.sampling import KEEP_FRACTION_ENV, SLOWER_THAN_ENV, TraceSampling, TurnSampler


def turn(index: int = 1, session: str = "s", **fields: object) -> Turn:
    values: dict[str, object] = {
        "index": index,
        "speech_id": f"sp{index}",
        "started_at": 0.0,
        "ended_at": 1.0,
        "latency_ms": {"e2e": 300.0},
        "interrupted": False,
        "tier": "excellent",
        "session_id": session,
    }
    values.update(fields)
    return Turn(**values)  # type: ignore[arg-type]


def test_none_kept_but_the_turns_worth_reading() -> None:
    sampler = TurnSampler(TraceSampling(keep_fraction=0.0), DEFAULT_SLOS)
    assert not sampler.keep_live(turn()) and not sampler.keep_complete(turn())
    assert sampler.keep_live(turn(latency_ms={"e2e": 501.0}))  # over the 500 ms SLO
    assert not sampler.keep_live(turn(latency_ms={"e2e": 500.0}))  # at it: good
    assert sampler.keep_live(turn(tool_calls=1))
    assert sampler.keep_live(turn(error_type="llm_error"))
    assert not sampler.keep_live(turn(interrupted=True, complete=False))  # not known yet live
    assert sampler.keep_complete(turn(interrupted=True))
    assert sampler.keep_complete(turn(tool_calls=2))  # a tool that finished after the audio
    assert sampler.keep_complete(turn(error_type="tts_error"))


def test_slow_means_any_slo_threshold_of_its_component_or_the_given_e2e() -> None:
    slos = (*DEFAULT_SLOS, SLO(name="ttft", component="llm_ttft", threshold_s=0.4, objective=0.95))
    by_slo = TurnSampler(TraceSampling(keep_fraction=0.0), slos)
    assert by_slo.slow(turn(latency_ms={"e2e": 300.0, "llm_ttft": 450.0}))
    assert not by_slo.slow(turn(latency_ms={"e2e": 300.0, "llm_ttft": 350.0}))
    given = TurnSampler(TraceSampling(keep_fraction=0.0, slower_than_ms=1000.0), slos)
    assert not given.slow(turn(latency_ms={"e2e": 900.0, "llm_ttft": 450.0}))
    assert given.slow(turn(latency_ms={"e2e": 1000.5}))
    assert not given.slow(turn(latency_ms={}))  # an agent turn has no e2e


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 0.9])
def test_fraction_is_kept_within_a_binomial_bound_and_decided_the_same_twice(
    fraction: float,
) -> None:
    sampler = TurnSampler(TraceSampling(keep_fraction=fraction), ())
    n = 20_000
    kept = [sampler.in_fraction(turn(i, session=f"call-{i % 37}")) for i in range(n)]
    sigma = math.sqrt(n * fraction * (1 - fraction))
    assert abs(sum(kept) - n * fraction) <= 4.5 * sigma
    again = TurnSampler(TraceSampling(keep_fraction=fraction), ())
    assert kept == [again.in_fraction(turn(i, session=f"call-{i % 37}")) for i in range(n)]


def test_fraction_edges_keep_all_or_none() -> None:
    assert all(TurnSampler(TraceSampling(1.0), ()).in_fraction(turn(i)) for i in range(500))
    assert not any(TurnSampler(TraceSampling(0.0), ()).in_fraction(turn(i)) for i in range(500))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"keep_fraction": -0.1}, ValueError),
        ({"keep_fraction": 1.5}, ValueError),
        ({"keep_fraction": math.nan}, ValueError),
        ({"keep_fraction": "0.1"}, TypeError),
        ({"keep_fraction": True}, TypeError),
        ({"slower_than_ms": -1.0}, ValueError),
        ({"slower_than_ms": math.inf}, ValueError),
        ({"slower_than_ms": "800"}, ValueError),
    ],
)
def test_bad_settings_are_refused_clearly(kwargs: dict[str, object], error: type) -> None:
    with pytest.raises(error):
        TraceSampling(**kwargs)  # type: ignore[arg-type]


def test_from_env() -> None:
    assert TraceSampling.from_env({}) is None
    assert TraceSampling.from_env({KEEP_FRACTION_ENV: "0.1"}) == TraceSampling(0.1)
    assert TraceSampling.from_env(
        {KEEP_FRACTION_ENV: "0.25", SLOWER_THAN_ENV: "800"}
    ) == TraceSampling(0.25, 800.0)
    assert TraceSampling.from_env({SLOWER_THAN_ENV: "slo"}) == TraceSampling(1.0, None)


@pytest.mark.parametrize(
    "environ",
    [{KEEP_FRACTION_ENV: "ten percent"}, {KEEP_FRACTION_ENV: "2"}, {SLOWER_THAN_ENV: "-5"}],
)
def test_a_bad_environment_keeps_every_trace_and_says_so(
    environ: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="lk_observe.sampling"):
        assert TraceSampling.from_env(environ) is None
    assert "keeping every trace" in caplog.text
