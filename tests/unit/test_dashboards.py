"""Generated Grafana dashboards: stable output, committed copies current, variables, schema."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lk_observe.dashboards import build_dashboards, render_dashboards
from lk_observe.presets import GUIDE_BUDGET
from lk_observe.slo import DEFAULT_SLOS, SLO, BurnWindow
from lk_observe.turns import BREAKDOWN_PARTS, BREAKDOWN_TITLES, COMPONENTS, STAGES
from tests.fleet_queries import assert_sum_across_pods

REPO = Path(__file__).resolve().parents[2]
DASHBOARD_DIR = REPO / "dashboards"
RANGE_SELECTOR = re.compile(r"\[([^\]]+)\]")
RATE_CALL = re.compile(r"\b(rate|increase|irate)\(")

Panel = dict[str, Any]


def _rendered() -> dict[str, dict[str, Any]]:
    return {name: json.loads(text) for name, text in render_dashboards(DEFAULT_SLOS).items()}


def _panels(board: dict[str, Any]) -> Iterator[Panel]:
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def _targets(board: dict[str, Any]) -> Iterator[tuple[Panel, dict[str, Any]]]:
    for panel in _panels(board):
        for target in panel.get("targets", []):
            yield panel, target


def test_rendering_twice_gives_identical_text() -> None:
    assert render_dashboards(DEFAULT_SLOS) == render_dashboards(DEFAULT_SLOS)
    for text in render_dashboards(DEFAULT_SLOS).values():
        assert text.endswith("}\n")


def test_committed_dashboards_match_a_fresh_render() -> None:
    rendered = render_dashboards(DEFAULT_SLOS)
    committed = {p.name: p.read_text(encoding="utf-8") for p in DASHBOARD_DIR.glob("*.json")}
    assert sorted(committed) == sorted(rendered), "run `lk-observe generate` to refresh dashboards/"
    for name, text in rendered.items():
        assert committed[name] == text, f"dashboards/{name} is stale: run `lk-observe generate`"


def test_build_and_render_agree_on_file_names_and_uids_are_stable() -> None:
    built = build_dashboards(DEFAULT_SLOS)
    assert set(built) == set(render_dashboards(DEFAULT_SLOS))
    assert {name: board.uid for name, board in built.items()} == {
        "voice-agent-overview.json": "lk-observe-overview",
        "voice-agent-components.json": "lk-observe-components",
        "voice-agent-slo.json": "lk-observe-slo",
    }


def test_every_dashboard_has_datasource_and_multi_agent_variables() -> None:
    for name, board in _rendered().items():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource", name
        assert variables["datasource"]["query"] == "prometheus", name
        agent = variables["agent"]
        assert agent["type"] == "query", name
        assert agent["query"] == "label_values(voice_agent_latency_seconds_count, agent)", name
        assert agent["multi"] is True and agent["includeAll"] is True, name
        assert agent["datasource"]["uid"] == "${datasource}", name


def test_every_panel_and_target_uses_the_datasource_variable() -> None:
    for name, board in _rendered().items():
        for panel in _panels(board):
            if panel["type"] != "row":
                assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name
                assert panel.get("targets"), f"{name}: panel {panel['title']!r} has no query"
        for panel, target in _targets(board):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (
                f"{name}: {panel['title']!r} {target['refId']}"
            )


def test_panel_ids_and_ref_ids_are_unique() -> None:
    for name, board in _rendered().items():
        ids = [panel["id"] for panel in _panels(board)]
        assert len(ids) == len(set(ids)), name
        for panel in _panels(board):
            refs = [t["refId"] for t in panel.get("targets", [])]
            assert len(refs) == len(set(refs)) and all(refs), f"{name}: {panel['title']!r}"


def _slo_ranges(slos: tuple[SLO, ...]) -> set[str]:
    return {r for s in slos for w in s.windows for r in (w.long, w.short)} | {
        s.period for s in slos
    }


def test_rates_use_rate_interval_except_slo_windows_and_range_stats() -> None:
    slo_ranges = _slo_ranges(DEFAULT_SLOS)
    for name, board in _rendered().items():
        for panel, target in _targets(board):
            expr = target["expr"]
            ranges = RANGE_SELECTOR.findall(expr)
            assert len(ranges) == len(RATE_CALL.findall(expr)), expr  # no bare range vectors
            where = f"{name}: {panel['title']!r} {target['refId']}: {expr}"
            allowed = {"$__rate_interval"}
            if target.get("instant"):
                allowed.add("$__range")  # one number over the dashboard's time range
            if name == "voice-agent-slo.json":
                allowed |= slo_ranges  # burn rates and compliance are defined over fixed windows
            assert set(ranges) <= allowed, where
            if panel["type"] in ("timeseries", "heatmap") and name != "voice-agent-slo.json":
                assert set(ranges) <= {"$__rate_interval"}, where


def test_latency_queries_request_exemplars_and_heatmaps_read_buckets() -> None:
    boards = _rendered()
    latency = [
        (panel, target)
        for board in boards.values()
        for panel, target in _targets(board)
        if panel["type"] in ("timeseries", "heatmap")
        and "voice_agent_latency_seconds_bucket" in target["expr"]
        and "$__rate_interval" in target["expr"]
        and "le=" not in target["expr"]  # SLO ratios are not latencies
        and "clamp_min" not in target["expr"]  # differences of quantiles carry no exemplar
    ]
    assert latency
    for panel, target in latency:
        if panel["title"] != "Pipeline budget: stacked p50 vs the guide":
            assert target.get("exemplar") is True, panel["title"]
    heatmaps = [p for p in _panels(boards["voice-agent-components.json"]) if p["type"] == "heatmap"]
    assert len(heatmaps) == len(COMPONENTS)
    for panel in heatmaps:
        (target,) = panel["targets"]
        assert target["format"] == "heatmap"
        assert target["expr"].startswith(
            "sum by (le) (increase(voice_agent_latency_seconds_bucket{"
        )
        assert panel["options"]["calculate"] is False
    assert "trace_id" in boards["voice-agent-overview.json"]["description"]


def test_e2e_threshold_lines_come_from_the_slos() -> None:
    def e2e_steps(slos: tuple[SLO, ...]) -> list[float]:
        board = json.loads(render_dashboards(slos)["voice-agent-overview.json"])
        panel = next(p for p in _panels(board) if p["title"].startswith("End-to-end latency"))
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        return [s["value"] for s in steps[1:]]

    assert e2e_steps(DEFAULT_SLOS) == [0.5, 0.8]
    tighter = (SLO(name="fast", component="e2e", threshold_s=0.6, objective=0.9),)
    assert e2e_steps(tighter) == [0.6]


def test_budget_panels_read_the_guides_one_budget_table() -> None:
    panels = {p["title"]: p for p in _panels(_rendered()["voice-agent-components.json"])}
    lines = [line for line in GUIDE_BUDGET if line.component in STAGES]  # network: not measured
    bars = panels["p50 per stage vs the guide (dashboard range)"]
    assert [t["legendFormat"] for t in bars["targets"]] == [line.component for line in lines]
    steps = {
        o["matcher"]["options"]: [s["value"] for s in o["properties"][0]["value"]["steps"]]
        for o in bars["fieldConfig"]["overrides"]
    }
    assert steps == {
        line.component: [None, line.range_ms[0] / 1000, line.range_ms[1] / 1000] for line in lines
    }
    stacked = panels["Pipeline budget: stacked p50 vs the guide"]
    guide = {
        t["legendFormat"]: t["expr"] for t in stacked["targets"] if "guide" in t["legendFormat"]
    }
    assert guide == {"guide budget low": "vector(0.54)", "guide budget high": "vector(0.78)"}
    assert "(540-780 ms; network is not visible from the agent)" in stacked["description"]


def test_slo_panels_follow_each_slos_threshold_windows_and_period() -> None:
    slo = SLO(
        name="stt_fast",
        component="stt",
        threshold_s=0.3,
        objective=0.99,
        period="7d",
        windows=(BurnWindow("2h", "10m", 10.0, "page"),),
    )
    board = json.loads(render_dashboards((slo,))["voice-agent-slo.json"])
    everything = [t["expr"] for _, t in _targets(board)]
    raw = [e for e in everything if "voice_agent_latency" in e]
    assert raw and all('component="stt"' in e and 'le="0.3"' in e for e in raw)
    # only the dashboard-range compliance reads raw buckets: period and windows are recorded
    assert {r for e in raw for r in RANGE_SELECTOR.findall(e)} == {"$__range"}
    pattern = r'slo:sli_error:ratio_rate(\w+)\{slo="stt_fast"'
    recorded = {w for e in everything for w in re.findall(pattern, e)}
    assert recorded == {"7d", "2h", "10m"}
    assert any(e.endswith("/ 0.01") for e in everything)  # burn rate divides by the budget


def test_the_slo_dashboard_reads_period_and_windows_from_the_recording_rules() -> None:
    """30-day and 3-day ratios from raw histograms on every refresh are what the rules avoid."""
    from lk_observe.rules import recording_rules

    board = json.loads(render_dashboards(DEFAULT_SLOS)["voice-agent-slo.json"])
    exprs = [t["expr"] for _, t in _targets(board)]
    long_raw = [
        e
        for e in exprs
        if "voice_agent_latency" in e and set(RANGE_SELECTOR.findall(e)) - {"$__range"}
    ]
    assert long_raw == []
    records = {r["record"] for slo in DEFAULT_SLOS for r in recording_rules(slo)}
    used = {name for e in exprs for name in re.findall(r"slo:[a-z_:]+[0-9a-z]+", e)}
    assert used and used <= records  # every series the dashboard reads is recorded
    assert {"slo:sli_error:ratio_rate30d", "slo:sli_error:ratio_rate3d"} <= used


def test_the_overview_shows_the_barge_in_rate_per_agent() -> None:
    board = json.loads(render_dashboards(DEFAULT_SLOS)["voice-agent-overview.json"])
    [panel] = [p for p in _panels(board) if p["title"] == "Barge-in rate"]
    [target] = panel["targets"]
    assert "voice_agent_interruptions_total" in target["expr"]
    assert "voice_agent_turns_total" in target["expr"]
    assert panel["fieldConfig"]["defaults"]["unit"] == "percentunit"


def test_every_query_sums_across_pods() -> None:
    # a panel shows the fleet, not a line per pod; tests/integration/test_fleet.py runs them
    assert_sum_across_pods(
        [t["expr"] for board in _rendered().values() for _, t in _targets(board)], at_least=21
    )


def _components_panels() -> dict[str, Panel]:
    return {p["title"]: p for p in _panels(_rendered()["voice-agent-components.json"])}


def test_where_the_wait_goes_stacks_the_breakdown_up_to_the_mean_e2e() -> None:
    panels = _components_panels()
    panel = panels["Where the wait goes"]
    budget = panels["Pipeline budget: stacked p50 vs the guide"]
    assert panel["gridPos"]["y"] == budget["gridPos"]["y"]  # side by side
    assert panel["type"] == "timeseries"
    assert panel["fieldConfig"]["defaults"]["unit"] == "s"
    assert panel["fieldConfig"]["defaults"]["custom"]["stacking"] == {
        "mode": "normal",
        "group": "A",
    }
    *parts, mean = panel["targets"]
    # one query per part, in pipeline order, so the stack reads bottom-up as the wait went
    assert [p["legendFormat"] for p in parts] == list(BREAKDOWN_TITLES.values())
    for part, query in zip(BREAKDOWN_PARTS, parts, strict=True):
        assert query["expr"] == (
            "sum by (part) (rate(voice_agent_e2e_breakdown_seconds_total"
            f'{{part="{part}",agent=~"$agent"}}'
            "[$__rate_interval])) / scalar(sum(rate(voice_agent_latency_seconds_count"
            '{component="e2e",agent=~"$agent"}[$__rate_interval])))'
        )
    assert mean["expr"] == (
        'sum(rate(voice_agent_latency_seconds_sum{component="e2e",agent=~"$agent"}'
        "[$__rate_interval])) / sum(rate(voice_agent_latency_seconds_count"
        '{component="e2e",agent=~"$agent"}[$__rate_interval]))'
    )
    overrides = {
        o["matcher"]["options"]: {p["id"]: p["value"] for p in o["properties"]}
        for o in panel["fieldConfig"]["overrides"]
    }
    line = overrides[mean["legendFormat"]]
    assert line["custom.stacking"]["mode"] == "none" and line["custom.fillOpacity"] == 0
    assert "means add up, percentiles do not" in panel["description"]


def test_providers_table_compares_each_model_of_a_stage() -> None:
    panel = _components_panels()["Providers per component"]
    assert panel["type"] == "table"
    targets = {t["refId"]: t for t in panel["targets"]}
    assert sorted(targets) == ["A", "B", "C"]
    for target in targets.values():
        assert target["instant"] is True and target["format"] == "table"
        assert 'component=~"stt|llm_ttft|tts_ttfb"' in target["expr"]
        assert 'provider!=""' in target["expr"] and 'agent=~"$agent"' in target["expr"]
        assert "[$__range]" in target["expr"]
    for ref, q in (("A", "0.5"), ("B", "0.95")):
        assert targets[ref]["expr"].startswith(
            f"histogram_quantile({q}, sum by (component, provider, model, le) (rate("
            "voice_agent_latency_seconds_bucket{"
        )
    assert targets["C"]["expr"].startswith(
        "sum by (component, provider, model) (increase(voice_agent_latency_seconds_count{"
    )
    merge, organize = panel["transformations"]
    assert merge["id"] == "merge"
    assert organize["id"] == "organize"
    assert organize["options"]["renameByName"] == {
        "Value #A": "p50",
        "Value #B": "p95",
        "Value #C": "turns",
    }
    assert organize["options"]["excludeByName"] == {"Time": True}


def test_every_latency_quantile_sums_its_buckets_by_le() -> None:
    """provider and model split a component's buckets: a quantile that kept them (no sum, or a
    sum without `le`) would draw a line per model, or none at all."""
    from lk_observe.rules import rule_groups

    exprs = [t["expr"] for board in _rendered().values() for _, t in _targets(board)]
    exprs += [
        rule["expr"] for group in rule_groups(DEFAULT_SLOS)["groups"] for rule in group["rules"]
    ]
    quantiles = [e for e in exprs if "histogram_quantile(" in e]
    assert len(quantiles) >= 10
    pattern = re.compile(
        r"histogram_quantile\([\d.]+,\s*sum by \(([^)]*)\) \("
        r"rate\(voice_agent_latency_seconds_bucket"
    )
    for expr in quantiles:
        found = pattern.findall(expr)
        assert len(found) == expr.count("histogram_quantile("), expr
        for labels in found:
            assert "le" in re.split(r",\s*", labels), expr
