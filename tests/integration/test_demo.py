"""The README's first command, as a newcomer runs it: `lk-observe demo` prints live per-turn
numbers and serves a live page that headless Chromium renders with the demo's real data."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import lk_observe
from lk_observe.cli import demo_greeting, demo_models, demo_script, simulated
from lk_observe.demo import build_pipeline, run_pipeline
from lk_observe.presets import speed_profile, vad_preset
from lk_observe.turns import BREAKDOWN_PARTS, component_model
from tests.integration.test_live_page import READ_PAGE, chromium
from tests.otlp_collectors import start_collector

pytestmark = pytest.mark.timeout(180)
TURNS = 5
SCREENSHOT = Path(os.environ.get("LK_OBSERVE_SCREENSHOT", "/tmp/lk_observe_demo_page.png"))


def _read_until(
    process: subprocess.Popen[str], pattern: str, lines: list[str], timeout: float
) -> str:
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                raise AssertionError(
                    f"demo exited early ({process.returncode}):\n" + "".join(lines)
                )
            continue
        lines.append(line)
        if re.search(pattern, line):
            return line
    raise AssertionError(f"no line matching {pattern!r} within {timeout}s:\n" + "".join(lines))


def test_demo_prints_live_turns_and_serves_a_page_chromium_renders(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lk_observe.cli",
            "demo",
            f"--turns={TURNS}",
            "--port=0",
            "--keep-serving",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    try:
        url = re.search(r"http://127\.0\.0\.1:\d+", _read_until(process, r"ops app: ", lines, 60))
        assert url is not None
        first = _read_until(process, r"\[\s*1/5\] turn", lines, 60)
        assert "e2e=" in first and "llm_ttft=" in first  # live, per turn, before the run ends
        assert any("voice.turn" in line for line in lines[-8:]) or _read_until(
            process, r"voice\.turn", lines, 10
        )
        _read_until(process, r"serving .* until Ctrl-C", lines, 90)
        output = "".join(lines)
        assert "summary over the session" in output and "SLO e2e_good" in output
        # each turn with an e2e says why it took that long: its parts, in order, adding up
        why = re.findall(r"^  e2e (\d+) ms = (.+)$", output, flags=re.MULTILINE)
        assert why and all(parts.startswith("vad_silence ") for _, parts in why)
        for total, parts in why:
            named = re.findall(r"(\w+) (\d+)(?: \(([^)]*)\))?", parts)
            assert [n for n, _, _ in named] == [p for p in BREAKDOWN_PARTS if p in parts.split()]
            assert abs(sum(int(ms) for _, ms, _ in named) - int(total)) <= 1
            assert dict((n, s) for n, _, s in named)["vad_silence"] == "min_silence_duration=0.15s"
        # and at the end: the mean breakdown and the simulated providers compared
        assert "why it took that long: mean e2e breakdown" in output
        table = output.split("providers compared")[1].splitlines()[2:]
        names = {line.split()[-4] for line in table if line.startswith("  ")}
        pairs = demo_models("ultra")
        assert {str(simulated(pairs["llm"][0])), str(simulated(pairs["llm"][1]))} <= names
        assert all(name.startswith("sim-") for name in names)
        turn_lines = [line for line in lines if re.match(r"\[\s*\d+/5\] turn", line)]
        assert len([line for line in turn_lines if "greeting" not in line]) == TURNS

        with urllib.request.urlopen(f"{url.group(0)}/metrics/latency", timeout=5) as response:
            stats = json.load(response)
        e2e_turns = sum(1 for line in turn_lines if "e2e=" in line)
        assert stats["e2e"]["count"] == e2e_turns

        async def look() -> tuple[dict[str, object], bytes]:
            async with chromium(tmp_path) as page:
                await page.send("Page.navigate", url=f"{url.group(0)}/")
                await page.wait_until("document.body && document.body.dataset.loaded === 'true'")
                shown: dict[str, object] = await page.evaluate(READ_PAGE)
                shot = await page.send("Page.captureScreenshot", format="png")
                assert page.problems() == []
                return shown, base64.b64decode(shot["data"])

        shown, png = asyncio.run(look())
        SCREENSHOT.write_bytes(png)
        rows = shown["rows"]
        assert isinstance(rows, dict)
        assert rows["e2e"]["count"] == str(e2e_turns)
        assert rows["e2e"]["p95"] == str(round(stats["e2e"]["p95"]))
        assert shown["waterfallRows"] and shown["chips"]
        # the page says why too: the breakdown of the turns, the providers they used
        mean, providers = shown["breakdownMean"], shown["providers"]
        assert isinstance(mean, list) and isinstance(providers, list)
        assert shown["breakdownRows"] and mean[0]["part"] == "vad_silence"
        assert {r["provider"] + "/" + r["model"] for r in providers} == names  # as printed
        assert {r["component"] for r in providers} >= {"llm_ttft", "tts_ttfb"}
        print(f"\ndemo page screenshot: {SCREENSHOT}")

        process.send_signal(signal.SIGINT)  # Ctrl-C ends it cleanly
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_demo_exports_spans_over_otlp_when_the_standard_variable_is_set(protocol: str) -> None:
    collector = start_collector("grpc" if protocol == "grpc" else "http", "healthy")
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "lk_observe.cli",
                "demo",
                "--turns=2",
                "--port=-1",
                "--no-spans",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={
                **os.environ,
                "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
                "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
                "OTEL_SERVICE_NAME": "demo-under-test",
            },
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "exporting spans over OTLP" in result.stdout
        # the greeting and both user turns arrive before the demo exits (bounded shutdown)
        assert sorted(collector.turn_indices) == [1, 2, 3]
    finally:
        collector.close()


async def test_the_demo_routes_each_stage_to_its_simulated_provider_and_the_turn_names_it() -> None:
    """The demo's A/B split, end to end: the scripted STT, LLM and TTS name the simulated
    provider serving each request, LiveKit carries the names into its metrics, and every Turn
    names the provider and model of each stage that served that turn, as the script routed it."""
    profile = speed_profile("ultra")
    vad = vad_preset(profile.vad_preset)
    script = demo_script(4, 7, preset=vad.name, speed=profile.name)
    greeting = demo_greeting(profile.name)
    pipeline = build_pipeline(
        script,
        greeting=greeting,
        min_endpointing_s=vad.min_endpointing_delay,
        min_silence_s=vad.min_silence_duration,
    )
    turns: list[lk_observe.Turn] = []
    lk_observe.instrument(
        pipeline.session,
        agent_name="demo-routing",
        monitor=lk_observe.LatencyMonitor(),
        on_turn=turns.append,
    )
    await run_pipeline(pipeline)

    said, *answers = sorted(turns, key=lambda t: t.index)
    assert said.kind == "agent"
    assert greeting.llm_model is not None and greeting.tts_model is not None
    llm, tts = greeting.llm_model, greeting.tts_model
    assert component_model(said, "llm_ttft") == (llm.provider, llm.model)
    assert component_model(said, "tts_ttfb") == (tts.provider, tts.model)
    assert [t.kind for t in answers] == ["user"] * len(script)
    for turn, scripted in zip(answers, script, strict=True):
        for component, routed in (
            ("stt", scripted.stt_model),
            ("llm_ttft", scripted.llm_model),
            ("tts_ttfb", scripted.tts_model),
        ):
            assert routed is not None
            assert component_model(turn, component) == (routed.provider, routed.model), (
                turn.index,
                component,
            )
        # the setting that owns the VAD's wait is the one the script's VAD stands for
        assert turn.breakdown_settings["vad_silence"] == "min_silence_duration=0.15s"
    # both providers of every stage served turns
    for attribute in ("stt_model", "llm_model", "tts_model"):
        served = {getattr(turn, attribute) for turn in answers}
        assert len(served) == 2, attribute
