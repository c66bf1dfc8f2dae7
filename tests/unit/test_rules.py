"""SLO specs -> Prometheus rules: pure generator tests plus promtool check/test on the output."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.utils import floatToGoString

from lk_observe.promql import LATENCY_BUCKETS_S, le_label
from lk_observe.rules import (
    BURN_ALERT,
    NO_TURNS_ALERT,
    P95_ALERT,
    RULES_FILE,
    RUNBOOK_BASE_URL,
    RUNBOOKS,
    AlertOptions,
    alert_rules,
    recording_rules,
    render_alerting_files,
    render_rule_file,
    rule_groups,
)
from lk_observe.slo import DEFAULT_SLOS, SLO
from tests import promstack
from tests.fleet_queries import assert_sum_across_pods

REPO = Path(__file__).resolve().parents[2]
ALERTING = REPO / "alerting"
GOOD, EXCELLENT = DEFAULT_SLOS


def all_alerts(groups: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for g in groups["groups"] for r in g["rules"] if "alert" in r]


# --- le strings and thresholds ------------------------------------------------------------


@pytest.mark.parametrize("edge", LATENCY_BUCKETS_S)
def test_le_label_is_what_prometheus_client_writes(edge: float) -> None:
    assert le_label(edge) == floatToGoString(edge)  # type: ignore[no-untyped-call]


def test_le_label_snaps_a_nearly_equal_threshold_to_the_edge() -> None:
    assert le_label(0.1 + 0.7) == "0.8"  # 0.7999999999999999 would never match le="0.8"
    assert le_label(1) == "1.0"


def test_le_label_rejects_a_threshold_between_edges() -> None:
    with pytest.raises(ValueError, match="bucket edge"):
        le_label(0.85)


def test_sli_reads_the_exact_le_string_of_the_threshold() -> None:
    exprs = [
        r["expr"]
        for r in recording_rules(GOOD)
        if r["record"].startswith("slo:sli_error") and "sum_over_time" not in r["expr"]
    ]
    assert exprs and all('le="0.8"' in e for e in exprs)
    one_second = SLO(name="s", component="llm_ttft", threshold_s=1.0, objective=0.9)
    assert 'le="1.0"' in recording_rules(one_second)[0]["expr"]
    assert 'component="llm_ttft"' in recording_rules(one_second)[0]["expr"]


def test_recording_rules_cover_every_burn_window_once() -> None:
    records = [r["record"] for r in recording_rules(GOOD)]
    windows = ["5m", "30m", "1h", "2h", "6h", "1d", "3d", "30d"]  # the alerts', then the period
    assert [r for r in records if r.startswith("slo:sli_error:")] == [
        f"slo:sli_error:ratio_rate{w}" for w in windows
    ]
    assert [r for r in records if r.startswith("slo:sli_turns:")] == [
        f"slo:sli_turns:rate{w}" for w in windows
    ]
    assert all(
        r["labels"] == {"slo": "e2e_good", "component": "e2e"} for r in recording_rules(GOOD)
    )


def test_burn_alerts_use_factor_times_budget_and_a_pro_rata_traffic_guard() -> None:
    burns = [a for a in alert_rules(GOOD) if a["alert"] == BURN_ALERT]
    found = [
        (
            a["labels"]["long_window"],
            a["labels"]["short_window"],
            a["labels"]["severity"],
            re.findall(r"> ([0-9.]+)\n", a["expr"]),
            re.findall(r">= ([0-9.]+)$", a["expr"]),
        )
        for a in burns
    ]
    assert found == [
        ("1h", "5m", "page", ["0.72", "0.72"], ["30"]),
        ("6h", "30m", "page", ["0.3", "0.3"], ["180"]),
        ("1d", "2h", "ticket", ["0.15", "0.15"], ["720"]),
        ("3d", "6h", "ticket", ["0.05", "0.05"], ["2160"]),
    ]


def test_p95_alert_compares_the_95th_percentile_with_the_threshold() -> None:
    (p95,) = [a for a in alert_rules(GOOD) if a["alert"] == P95_ALERT]
    assert "histogram_quantile(0.95," in p95["expr"]
    assert "sum by (le, agent) (rate(voice_agent_latency_seconds_bucket{" in p95["expr"]
    assert ") > 0.8\n" in p95["expr"]
    assert p95["expr"].endswith(">= 20")  # p95 of fewer than 20 turns is just the slowest one
    assert p95["for"] == "5m"
    busy = SLO(
        name="busy", component="e2e", threshold_s=0.8, objective=0.95, min_turns_per_hour=1200
    )
    (busy_p95,) = [a for a in alert_rules(busy) if a["alert"] == P95_ALERT]
    assert busy_p95["expr"].endswith(">= 100")  # 1200/h over 5m


def test_every_rule_sums_across_pods() -> None:
    # a breach only the fleet shows must page; tests/integration/test_fleet.py runs them
    assert_sum_across_pods(
        [r["expr"] for g in rule_groups(DEFAULT_SLOS)["groups"] for r in g["rules"]], at_least=11
    )


def test_ticket_slo_never_pages() -> None:
    assert {a["labels"]["severity"] for a in alert_rules(EXCELLENT)} == {"ticket"}
    assert {a["labels"]["severity"] for a in alert_rules(GOOD)} == {"page", "ticket"}


def test_no_turns_pages_only_when_some_slo_pages() -> None:
    def severity(slos: tuple[SLO, ...]) -> str:
        (rule,) = [a for a in all_alerts(rule_groups(slos)) if a["alert"] == NO_TURNS_ALERT]
        return str(rule["labels"]["severity"])

    assert severity(DEFAULT_SLOS) == "page"
    assert severity((EXCELLENT,)) == "ticket"


def test_every_alert_carries_severity_slo_component_summary_and_runbook() -> None:
    alerts = all_alerts(rule_groups(DEFAULT_SLOS))
    assert {a["alert"] for a in alerts} == {BURN_ALERT, P95_ALERT, NO_TURNS_ALERT}
    for alert in alerts:
        assert alert["labels"]["severity"] in ("page", "ticket")
        assert alert["labels"]["slo"] and alert["labels"]["component"]
        notes = alert["annotations"]
        assert set(notes) == {"summary", "description", "runbook_url"}
        assert "{{ $value" in notes["summary"] + notes["description"]  # the measured value
        assert notes["runbook_url"] == RUNBOOK_BASE_URL + RUNBOOKS[alert["alert"]]
        assert (REPO / "docs" / "runbooks" / RUNBOOKS[alert["alert"]]).is_file()


def test_runbook_base_url_can_be_overridden() -> None:
    options = AlertOptions(runbook_base_url="https://wiki.example/runbooks/")
    urls = {a["annotations"]["runbook_url"] for a in all_alerts(rule_groups(DEFAULT_SLOS, options))}
    assert urls == {f"https://wiki.example/runbooks/{f}" for f in RUNBOOKS.values()}


def test_duplicate_slo_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="unique"):
        rule_groups((GOOD, GOOD))


# --- Rendering ----------------------------------------------------------------------------


def test_rendering_is_byte_stable_and_parses_back_to_the_groups() -> None:
    first = render_alerting_files(DEFAULT_SLOS)
    assert first == render_alerting_files(list(DEFAULT_SLOS))
    text = render_rule_file(DEFAULT_SLOS)
    assert text == first[RULES_FILE]
    assert yaml.safe_load(text) == rule_groups(DEFAULT_SLOS)
    assert "&id" not in text and "*id" not in text  # no YAML anchors from shared dicts


def test_committed_alerting_files_match_the_generator() -> None:
    for rel, text in render_alerting_files().items():
        path = ALERTING / rel
        assert path.is_file(), f"{path} missing: run `lk-observe generate`"
        assert path.read_text() == text, f"{path} is stale: run `lk-observe generate`"


def test_prometheus_rule_manifest_carries_the_same_groups() -> None:
    files = render_alerting_files()
    manifest = yaml.safe_load(files["kubernetes/prometheusrule.yaml"])
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["spec"] == yaml.safe_load(files[RULES_FILE])
    pod_monitor = yaml.safe_load(files["kubernetes/podmonitor.yaml"])
    assert pod_monitor["kind"] == "PodMonitor"
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"


# --- promtool / amtool --------------------------------------------------------------------


def test_promtool_unit_tests_pass() -> None:
    tests = sorted(str(p) for p in (ALERTING / "tests").glob("*.yaml"))
    assert len(tests) >= 3
    ran = promstack.promtool("test", "rules", *tests)
    assert ran.returncode == 0, ran.stdout + ran.stderr
