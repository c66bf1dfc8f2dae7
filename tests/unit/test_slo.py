"""SLO specs: in-process evaluation over the monitor's window (exact counts, burn rate, breach
hook) and user SLO files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lk_observe.monitor import LatencyMonitor
from lk_observe.slo import (
    DEFAULT_SLOS,
    SLO,
    BurnWindow,
    SLOEvaluator,
    SLOFileError,
    SLOStatus,
    breach_burn_rate,
    evaluate,
    load_slos,
)

E2E_GOOD = DEFAULT_SLOS[0]  # e2e <= 800 ms for 95% of turns, pages


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _monitor_with(values: list[float], clock: FakeClock | None = None) -> LatencyMonitor:
    monitor = LatencyMonitor(window_s=300.0, clock=clock or FakeClock())
    for value in values:
        monitor.record("e2e", value)
    return monitor


def test_turn_at_exactly_the_threshold_counts_as_good() -> None:
    status = evaluate(E2E_GOOD, _monitor_with([799.9, 800.0, 800.1]))
    assert (status.turns, status.good_turns) == (3, 2)
    assert status.compliance == pytest.approx(2 / 3)


def test_evaluation_numbers_on_known_data() -> None:
    status = evaluate(E2E_GOOD, _monitor_with([500.0] * 90 + [900.0] * 10))
    assert status.turns == 100
    assert status.good_turns == 90
    assert status.compliance == pytest.approx(0.90)
    assert status.burn_rate == pytest.approx(2.0)  # 10% errors over a 5% budget
    assert status.error_budget_remaining == pytest.approx(-1.0)  # the window overspends
    assert status.breach_burn_rate == 14.4
    assert status.min_turns == 20  # 30 turns/h over 300 s is 2.5: the 20-turn floor wins
    assert status.breaching is False


def test_within_objective_leaves_budget_and_no_breach() -> None:
    status = evaluate(E2E_GOOD, _monitor_with([500.0] * 98 + [900.0] * 2))
    assert status.burn_rate == pytest.approx(0.4)
    assert status.error_budget_remaining == pytest.approx(0.6)
    assert status.breaching is False


def test_no_turns_reports_no_compliance_and_no_budget() -> None:
    status = evaluate(E2E_GOOD, _monitor_with([]))
    assert (status.turns, status.good_turns, status.compliance) == (0, 0, None)
    assert status.burn_rate == 0.0
    assert status.error_budget_remaining is None
    assert status.breaching is False


def test_fast_burn_with_enough_traffic_is_a_breach() -> None:
    status = evaluate(E2E_GOOD, _monitor_with([500.0] * 4 + [2000.0] * 16))
    assert status.burn_rate == pytest.approx(16.0)
    assert status.breaching is True


def test_too_little_traffic_never_breaches() -> None:
    status = evaluate(E2E_GOOD, _monitor_with([2000.0, 2000.0]))
    assert status.burn_rate == pytest.approx(20.0)
    assert status.breaching is False


@pytest.mark.parametrize("turns", [3, 10, 19])
def test_the_in_process_check_waits_for_the_traffic_the_generated_alerts_wait_for(
    turns: int,
) -> None:
    """Issue 15: the check warned "breaching" after 3 slow turns; the rules wait for 20+."""
    from lk_observe.rules import P95_ALERT, alert_rules

    status = evaluate(E2E_GOOD, _monitor_with([2000.0] * turns))
    assert status.burn_rate == pytest.approx(20.0)
    assert status.breaching is False
    assert status.min_turns == 20
    (p95,) = [a for a in alert_rules(E2E_GOOD) if a["alert"] == P95_ALERT]
    assert p95["expr"].endswith(f">= {status.min_turns:g}")  # one guard, the same number
    assert evaluate(E2E_GOOD, _monitor_with([2000.0] * 20)).breaching is True


def test_evaluation_can_be_scoped_to_one_agent() -> None:
    monitor = LatencyMonitor(clock=FakeClock())
    for _ in range(20):
        monitor.record("e2e", 2000.0, agent="slow")
        monitor.record("e2e", 100.0, agent="fast")
    assert evaluate(E2E_GOOD, monitor, agent="slow").breaching is True
    assert evaluate(E2E_GOOD, monitor, agent="fast").breaching is False
    assert evaluate(E2E_GOOD, monitor).compliance == pytest.approx(0.5)


def test_breach_factor_is_the_fastest_window_of_the_slo_severity() -> None:
    assert breach_burn_rate(E2E_GOOD) == 14.4
    assert breach_burn_rate(DEFAULT_SLOS[1]) == 14.4  # a ticket SLO tickets on every window
    slow_only = SLO(
        name="slow_only",
        component="e2e",
        threshold_s=0.8,
        objective=0.95,
        windows=(BurnWindow("3d", "6h", 1.0, "ticket"), BurnWindow("1d", "2h", 3.0, "ticket")),
    )
    assert breach_burn_rate(slow_only) == 3.0  # no page window: the fastest there is
    no_windows = SLO(name="bare", component="e2e", threshold_s=0.8, objective=0.95, windows=())
    assert breach_burn_rate(no_windows) == 1.0


def test_status_to_dict_is_json_friendly() -> None:
    status = evaluate(E2E_GOOD, _monitor_with([500.0, 900.0]))
    data = status.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["name"] == "e2e_good"
    assert data["threshold_ms"] == 800.0
    assert data["good_turns"] == 1
    assert data["error_budget_remaining"] == pytest.approx(-9.0)


def test_on_breach_fires_once_per_breach_and_rearms_after_recovery(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    monitor = _monitor_with([2000.0] * 20, clock)
    fired: list[SLOStatus] = []
    evaluator = SLOEvaluator([E2E_GOOD], monitor, fired.append)
    with caplog.at_level(logging.WARNING, logger="lk_observe.slo"):
        first = evaluator.check()
        evaluator.check()
    assert [status.breaching for status in first] == [True]
    assert [status.name for status in fired] == ["e2e_good"]
    assert len(caplog.records) == 1

    clock.now = 400.0  # the bad turns leave the window
    monitor.record("e2e", 100.0)
    assert evaluator.check()[0].breaching is False
    for _ in range(20):
        monitor.record("e2e", 2000.0)
    evaluator.check()
    assert len(fired) == 2


def test_raising_on_breach_hook_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def broken(status: SLOStatus) -> None:
        raise RuntimeError("user bug")

    evaluator = SLOEvaluator(DEFAULT_SLOS, _monitor_with([2000.0] * 20), broken)
    with caplog.at_level(logging.WARNING, logger="lk_observe.slo"):
        statuses = evaluator.check()
    assert [status.breaching for status in statuses] == [True, True]
    assert sum("on_breach hook raised" in record.getMessage() for record in caplog.records) == 2


def test_evaluator_without_hook_still_reports_every_slo() -> None:
    evaluator = SLOEvaluator(DEFAULT_SLOS, _monitor_with([400.0, 600.0, 700.0]))
    statuses = evaluator.check()
    assert [(s.name, s.good_turns, s.turns) for s in statuses] == [
        ("e2e_good", 3, 3),
        ("e2e_excellent", 1, 3),
    ]


class CountsOnly:
    """Just the two members of slo.CountingMonitor: evaluation needs no LatencyMonitor."""

    window_s = 3600.0

    def count_at_or_below(
        self, component: str, threshold_ms: float, *, agent: str | None = None
    ) -> tuple[int, int]:
        assert (component, threshold_ms, agent) == ("e2e", 800.0, "support")
        return 80, 100


def test_evaluation_reads_any_monitor_with_the_counting_methods() -> None:
    status = evaluate(E2E_GOOD, CountsOnly(), agent="support")
    assert (status.good_turns, status.turns, status.window_s) == (80, 100, 3600.0)
    assert status.burn_rate == pytest.approx(4.0)  # 20% errors over a 5% budget
    assert status.min_turns == 30  # 30 turns/h over an hour
    assert status.breaching is False  # 4x is under the 14.4x page factor


# --- load_slos ----------------------------------------------------------------------------

YAML_SLOS = """\
slos:
  - name: e2e_good
    component: e2e
    threshold_s: 0.8
    objective: 0.95
  - name: ttft
    component: llm_ttft
    threshold_s: 0.3
    objective: 0.99
    severity: ticket
    period: 28d
    min_turns_per_hour: 60
    windows:
      - {long: 1h, short: 5m, factor: 14.4, severity: page}
"""

TOML_SLOS = """\
[[slos]]
name = "e2e_good"
component = "e2e"
threshold_s = 0.8
objective = 0.95

[[slos]]
name = "ttft"
component = "llm_ttft"
threshold_s = 0.3
objective = 0.99
severity = "ticket"
period = "28d"
min_turns_per_hour = 60
windows = [{ long = "1h", short = "5m", factor = 14.4, severity = "page" }]
"""


@pytest.mark.parametrize(("name", "text"), [("slos.yaml", YAML_SLOS), ("slos.toml", TOML_SLOS)])
def test_load_slos_reads_yaml_and_toml(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    good, ttft = load_slos(path)
    assert good == E2E_GOOD
    assert ttft == SLO(
        name="ttft",
        component="llm_ttft",
        threshold_s=0.3,
        objective=0.99,
        severity="ticket",
        period="28d",
        min_turns_per_hour=60,
        windows=(BurnWindow("1h", "5m", 14.4, "page"),),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("slos: []", "slos is empty"),
        ("slo: []", r"unknown key\(s\) \['slo'\]"),
        ("- name: x", "expected a mapping with a `slos:` list at the top, got a list"),
        ("slos:\n  - {name: a, component: e2e, threshold_s: 0.8}", r"missing required.*objective"),
        (
            "slos:\n  - {name: a, component: e2e, threshold_s: 0.8, objective: 0.9, colour: red}",
            r"unknown key\(s\) \['colour'\]",
        ),
        (
            "slos:\n  - {name: a, component: e2e, threshold_s: '0.8', objective: 0.9}",
            "threshold_s must be int or float, got '0.8'",
        ),
        (
            "slos:\n  - {name: a, component: e2e, threshold_s: 0.8, objective: true}",
            "objective must be int or float, got True",
        ),
        (
            "slos:\n  - {name: a, component: e2e, threshold_s: 0.85, objective: 0.9}",
            r"slos\[0\]: SLO a: threshold 0.85s is not a histogram bucket edge",
        ),
        (
            "slos:\n  - {name: a, component: mouth, threshold_s: 0.8, objective: 0.9}",
            "component must be one of",
        ),
        (
            "slos:\n  - {name: a, component: e2e, threshold_s: 0.8, objective: 0.9,"
            " windows: [{long: 1h, short: 5m, factor: 2, severity: urgent}]}",
            r"windows\[0\]: severity must be 'page' or 'ticket'",
        ),
        (
            "slos:\n  - {name: a, component: e2e, threshold_s: 0.8, objective: 0.9,"
            " windows: [{long: 1h, factor: 2, severity: page}]}",
            r"windows\[0\]: missing required key\(s\) \['short'\]",
        ),
        (
            "slos:\n  - {name: a, component: e2e, threshold_s: 0.8, objective: 0.9}\n"
            "  - {name: a, component: e2e, threshold_s: 0.5, objective: 0.9}",
            r"duplicate SLO name\(s\) \['a'\]",
        ),
        ("slos: [\n", "invalid YAML"),
    ],
)
def test_load_slos_explains_malformed_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "slos.yaml"
    path.write_text(text)
    with pytest.raises(SLOFileError, match=message) as info:
        load_slos(path)
    assert str(path) in str(info.value)


def test_load_slos_explains_bad_toml_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "slos.toml"
    bad.write_text("[[slos]\n")
    with pytest.raises(SLOFileError, match="invalid TOML"):
        load_slos(bad)
    with pytest.raises(SLOFileError, match="cannot read SLO file"):
        load_slos(tmp_path / "nope.yaml")
