"""`lk-observe` as an operator runs it: exit codes, messages, defaults in --help, what generate
writes where, and serve's start-up warnings."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import lk_observe
from lk_observe.cli import (
    _format_breakdown,
    _provider_table,
    _whole_ms,
    build_parser,
    demo_greeting,
    demo_models,
    demo_script,
    main,
    simulated,
)
from lk_observe.presets import DEFAULT_BUDGET, SPEED_PROFILES
from lk_observe.turns import Turn

GOOD_SLO = "  - {name: e2e_good, component: e2e, threshold_s: 0.8, objective: 0.95}\n"


def _generate(tmp_path: Path, text: str, *extra: str) -> int:
    slo_file = tmp_path / "slos.yaml"
    slo_file.write_text(text)
    return main(["generate", "--out", str(tmp_path / "out"), "--slo", str(slo_file), *extra])


# -- ports, --version, --help -------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--port", "99999"],
        ["serve", "--port", "-5"],
        ["serve", "--port", "http"],
        ["demo", "--port", "-2"],
        ["demo", "--port", "70000"],
        ["demo", "--turns", "0"],
    ],
)
def test_a_bad_port_or_count_exits_2_with_a_message_not_a_traceback(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "OverflowError" not in err
    assert re.search(r"not a port|must be at least 1|not a whole number", err), err


def test_the_library_rejects_a_port_out_of_range_with_a_value_error() -> None:
    with pytest.raises(ValueError, match="0-65535"):
        lk_observe.serve(port=99999)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"lk-observe {lk_observe.__version__}"


@pytest.mark.parametrize("command", ["demo", "generate", "serve"])
def test_every_option_with_a_default_shows_it_in_help(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    for action in sub._actions:
        if action.default in (None, False, True, "==SUPPRESS==") or not action.option_strings:
            continue
        assert f"{action.option_strings[-1]}" in text
        assert f"(default: {action.default})" in text, (command, action.dest)


def test_top_level_help_lists_every_command_and_points_at_their_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in ("demo", "generate", "serve", "--version"))
    assert "COMMAND --help" in out


# -- the demo's defaults ------------------------------------------------------------------------


def test_the_demo_defaults_play_a_well_tuned_agent_with_occasional_slow_turns() -> None:
    args = build_parser().parse_args(["demo"])
    profile = lk_observe.speed_profile(args.speed)
    preset = lk_observe.vad_preset(args.preset or profile.vad_preset)
    script = demo_script(args.turns, args.seed, preset=preset.name, speed=profile.name)
    vad_budget = DEFAULT_BUDGET.upper_bound("vad")
    assert vad_budget is not None
    assert all(turn.vad_s * 1000 <= vad_budget for turn in script)  # VAD never over budget
    # the first provider of each stage is the speed profile's own: the well-tuned stack
    models = demo_models(profile.name)
    assert [models[kind][0].name for kind in ("stt", "llm", "tts")] == [
        profile.stt,
        profile.llm,
        profile.tts,
    ]
    llm_budget = DEFAULT_BUDGET.upper_bound("llm_ttft")
    assert llm_budget is not None
    assert models["llm"][0].typical_ms[1] <= llm_budget
    # slow: more than twice its provider's typical worst (the provider having a bad moment)
    worst = {str(simulated(m)): m.typical_ms[1] for pair in models.values() for m in pair}
    slow = [t for t in script if t.llm_ttft_s * 1000 > 2 * worst[str(t.llm_model)]]
    assert 1 <= len(slow) <= len(script) // 5  # occasional, not every other turn


@pytest.mark.parametrize("speed", sorted(SPEED_PROFILES))
def test_the_demo_splits_each_stage_between_two_simulated_providers(speed: str) -> None:
    profile = lk_observe.speed_profile(speed)
    script = demo_script(12, 7, preset=profile.vad_preset, speed=speed)
    assert script == demo_script(12, 7, preset=profile.vad_preset, speed=speed)  # seeded
    for kind, (a, b) in demo_models(speed).items():
        assert a.name != b.name and a.typical_ms != b.typical_ms  # two latency profiles
        routed = [getattr(turn, f"{kind}_model") for turn in script]
        assert {str(m) for m in routed} == {str(simulated(a)), str(simulated(b))}
        assert all(m.provider.startswith("sim-") for m in routed)  # they say they are simulated
        assert routed.count(simulated(a)) == routed.count(simulated(b)) == 6  # an even split
        # each turn's delay is its own provider's: within its typical range (+ the jitter)
        delay = {"stt": "stt_s", "llm": "llm_ttft_s", "tts": "tts_ttfb_s"}[kind]
        for turn, model in zip(script, routed, strict=True):
            low, high = (a if model == simulated(a) else b).typical_ms
            ms = getattr(turn, delay) * 1000
            assert low <= ms <= high + (high - low) * 0.3 or (kind == "llm" and ms >= 900)
    greeting = demo_greeting(speed)
    assert greeting.llm_model == simulated(demo_models(speed)["llm"][0])


def _turn(index: int, parts: dict[str, float], **names: str) -> Turn:
    e2e = sum(parts.values())
    return Turn(
        index=index,
        speech_id=None,
        started_at=0.0,
        ended_at=1.0,
        latency_ms={"e2e": e2e, "stt": 150.0 + index, "llm_ttft": 100.0 * index},
        interrupted=False,
        tier=None,
        breakdown_ms=parts,
        breakdown_settings={"vad_silence": "min_silence_duration=0.15s"},
        **names,  # type: ignore[arg-type]
    )


def test_a_turns_breakdown_line_adds_up_in_whole_milliseconds_and_names_its_settings() -> None:
    parts = {
        "vad_silence": 171.6,
        "transcription": 0.0,
        "end_of_turn": 0.45,
        "on_user_turn_completed": 0.09,
        "llm": 131.86,
        "tts": 54.43,
        "playback": 0.11,
        "scheduling": 1.43,
    }
    line = _format_breakdown(_turn(2, parts))
    assert line == (
        "  e2e 360 ms = vad_silence 172 (min_silence_duration=0.15s) + end_of_turn 1 + llm 132"
        " + tts 54 + scheduling 1"
    )
    assert sum(ms for _, ms in _whole_ms(list(parts.items()))) == round(sum(parts.values()))
    assert _format_breakdown(dataclasses.replace(_turn(3, parts), breakdown_ms={})) is None


def test_the_provider_table_compares_each_components_providers() -> None:
    parts = {"vad_silence": 150.0, "llm": 100.0}
    fast = {"llm_provider": "sim-groq", "llm_model": "llama", "stt_provider": "sim-deepgram"}
    slow = {"llm_provider": "sim-openai", "llm_model": "gpt-4.1-mini"}
    turns = [_turn(i, parts, **(fast if i % 2 else slow)) for i in range(1, 7)]
    lines = _provider_table(turns)
    assert lines[1].split() == ["component", "provider/model", "turns", "p50", "p95"]
    assert [line.split()[:2] for line in lines[2:]] == [
        ["stt", "sim-deepgram/unknown"],
        ["llm_ttft", "sim-groq/llama"],
        ["sim-openai/gpt-4.1-mini", "3"],
    ]
    assert lines[3].split()[2:] == ["3", "300.0", "480.0"]  # turns 1, 3, 5: 100, 300, 500 ms
    assert max(len(line) for line in lines) <= 100


# -- generate: SLO files ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"the file is empty; it needs at least a `slos:` list"),
        ("{}", r"the file is empty"),
        (
            "slos:\n  - {name: a, component: e2e, threshold_s: 0.8, objective: 95}\n",
            r"did you mean 0\.95",
        ),
        (
            "slos:\n  - {name: a, component: e2e, threshold_s: 0, objective: 0.95}\n",
            r"threshold_s must be > 0",
        ),
        (
            "slos:\n  - {name: a, component: e2e, threshold_s: 800, objective: 0.95}\n",
            r"threshold_s is in seconds: did you mean 0\.8\?",
        ),
        (
            "slos:\n  - {name: a, component: e2e, threshold_s: 0.8, objective: 0.95,\n"
            "      windows: [{long: 1d, short: 2h, factor: -3, severity: ticket}]}\n",
            r"windows\[0\]: factor must be > 0",
        ),
        (
            "slos:\n  - {name: a, component: e2e, threshold_s: 0.8, objective: 0.95,\n"
            "      windows: [{long: 5m, short: 1h, factor: 14.4, severity: page}]}\n",
            r"long \(5m\) must be longer than short \(1h\)",
        ),
        (
            "slos:\n  - {name: a, component: e2e, threshold_s: 0.8, objective: 0.95,\n"
            "      windows: [{long: 1h, short: 0m, factor: 14.4, severity: page}]}\n",
            r"short must be longer than 0",
        ),
        ("kubernetes: {labels: {release: 'not ok!'}}\n", r"not a Kubernetes label value"),
        ("kubernetes: {namespace: Voice_Agents}\n", r"namespace must be a Kubernetes namespace"),
        ("runbook_base_url: wiki/runbooks\n", r"runbook_base_url must be an http\(s\) URL"),
    ],
)
def test_a_bad_slo_file_exits_2_saying_what_to_write_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    assert _generate(tmp_path, text) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "NoneType" not in err
    assert not (tmp_path / "out").exists()


def test_a_window_that_can_never_fire_is_generated_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = "slos:\n  - {name: coin, component: e2e, threshold_s: 0.8, objective: 0.5}\n"
    assert _generate(tmp_path, text) == 0
    err = capsys.readouterr().err
    assert "warning: SLO coin, window 1h/5m can never fire" in err
    assert "window 3d/6h" not in err  # 1x of a 50% budget can fire
    rules = (tmp_path / "out" / "alerting" / "lk-observe.rules.yml").read_text()
    assert "> -" not in rules  # no negative limit that fires on any traffic


def test_the_runbook_base_url_comes_from_the_file_or_the_command_line(tmp_path: Path) -> None:
    text = "runbook_base_url: https://wiki.example.com/rb\nslos:\n" + GOOD_SLO
    assert _generate(tmp_path, text) == 0
    rules = (tmp_path / "out" / "alerting" / "lk-observe.rules.yml").read_text()
    assert "runbook_url: https://wiki.example.com/rb/voice-agent-latency-budget-burn.md" in rules
    assert _generate(tmp_path, text, "--runbook-url", "https://ops.example.com/runbooks/") == 0
    rules = (tmp_path / "out" / "alerting" / "lk-observe.rules.yml").read_text()
    assert "https://ops.example.com/runbooks/voice-agent-no-turns.md" in rules
    assert "wiki.example.com" not in rules


def test_kubernetes_labels_and_namespace_come_from_the_file(tmp_path: Path) -> None:
    # no `slos:`: the default SLOs, with options for the generated objects
    text = "kubernetes:\n  namespace: voice\n  labels: {release: prometheus, team: voice}\n"
    assert _generate(tmp_path, text) == 0
    for name in ("prometheusrule.yaml", "podmonitor.yaml"):
        path = tmp_path / "out" / "alerting" / "kubernetes" / name
        manifest = yaml.safe_load(path.read_text())
        assert manifest["metadata"]["namespace"] == "voice"
        assert manifest["metadata"]["labels"]["release"] == "prometheus"
        assert manifest["metadata"]["labels"]["team"] == "voice"
        assert "No metadata.namespace" not in path.read_text()
    rule = yaml.safe_load((tmp_path / "out/alerting/kubernetes/prometheusrule.yaml").read_text())
    assert [g["name"] for g in rule["spec"]["groups"]][:2] == [
        "lk-observe-slo-e2e_good",
        "lk-observe-slo-e2e_excellent",
    ]


def test_the_default_kubernetes_objects_match_kube_prometheus_stacks_default_selectors(
    tmp_path: Path,
) -> None:
    assert main(["generate", "--out", str(tmp_path)]) == 0
    for name in ("prometheusrule.yaml", "podmonitor.yaml"):
        text = (tmp_path / "alerting" / "kubernetes" / name).read_text()
        manifest = yaml.safe_load(text)
        # the chart's ruleSelector / podMonitorSelector: {matchLabels: {release: <release>}}
        assert manifest["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        assert "namespace" not in manifest["metadata"]
        assert "No metadata.namespace" in text  # said, not silent


def test_the_prometheus_example_says_exemplar_storage_is_needed(tmp_path: Path) -> None:
    assert main(["generate", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "alerting" / "prometheus.example.yml").read_text()
    assert "--enable-feature=exemplar-storage" in text


def test_generate_in_a_users_project_writes_no_deploy_examples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tmp_path / "my-agent"
    project.mkdir()
    (project / "pyproject.toml").write_text('[project]\nname = "my-agent"\n')
    (project / "slos.yaml").write_text("slos:\n" + GOOD_SLO)
    monkeypatch.chdir(project)
    assert main(["generate", "--slo", "slos.yaml"]) == 0  # the default --out .
    written = sorted(str(p.relative_to(project)) for p in project.rglob("*") if p.is_file())
    assert not any(p.startswith("examples") for p in written), written
    assert "alerting/lk-observe.rules.yml" in written
    assert "dashboards/voice-agent-slo.json" in written
    assert main(["generate", "--slo", "slos.yaml", "--check"]) == 0
    assert "examples" not in capsys.readouterr().out


# -- serve --------------------------------------------------------------------------------------


def _serve_stderr(env: dict[str, str]) -> str:
    process = subprocess.Popen(
        [sys.executable, "-m", "lk_observe.cli", "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 30
        line = ""
        while "serving the ops app" not in line and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line and process.poll() is not None:
                break
        assert "serving the ops app" in line, "serve did not start"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=15)
        assert process.returncode == 0
        return err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_warns_at_start_when_the_multiproc_dir_is_missing(tmp_path: Path) -> None:
    missing = tmp_path / "not-there"
    err = _serve_stderr({"PROMETHEUS_MULTIPROC_DIR": str(missing)})
    assert f"warning: PROMETHEUS_MULTIPROC_DIR={missing} does not exist" in err


def test_serve_warns_at_start_when_the_multiproc_dir_is_not_a_writable_directory(
    tmp_path: Path,
) -> None:
    a_file = tmp_path / "metrics"
    a_file.write_text("")
    err = _serve_stderr({"PROMETHEUS_MULTIPROC_DIR": str(a_file)})
    assert "is not a directory" in err
    if os.geteuid() == 0:
        return  # root writes through any mode bits: a read-only directory is not one for root
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)
    err = _serve_stderr({"PROMETHEUS_MULTIPROC_DIR": str(read_only)})
    assert "is not writable" in err
