"""The live page in real headless Chromium: it loads clean, shows the app's numbers, keeps up.

Chromium is Debian's package (scripts/setup-chromium.sh). The test drives it over the DevTools
protocol with aiohttp's websocket client (already here through livekit-agents) to collect console
messages, exceptions and CSP violations, read the rendered DOM and take a screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from lk_observe.metrics import LatencyMetrics
from lk_observe.monitor import LatencyMonitor
from lk_observe.presets import DEFAULT_BUDGET
from lk_observe.recent import (
    RecentTurns,
    mean_breakdown,
    parse_turn_summary,
    percentile,
    provider_comparison,
    turn_summary,
)
from lk_observe.server import Server, serve
from lk_observe.turns import (
    BREAKDOWN_PARTS,
    BREAKDOWN_TITLES,
    EXCELLENT_BELOW_MS,
    GOOD_BELOW_MS,
    Stage,
    Turn,
    tier_for,
)

CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
SCREENSHOT = Path(tempfile.gettempdir()) / "lk_observe_live_page.png"

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK), reason="no chromium: run scripts/setup-chromium.sh"
)

E2E_MS = [380.0, 455.0, 620.0, 710.0, 940.0, 505.0, 1320.0, 470.0, 760.0, 830.0]


def make_turn(index: int, e2e_ms: float) -> Turn:
    t0 = 1_700_000_000.0 + index * 10
    vad, stt, llm, tts = 0.18, 0.16 + index * 0.01, 0.24, 0.06
    return Turn(
        index=index,
        speech_id=f"speech_{index}",
        started_at=t0,
        ended_at=t0 + 3,
        latency_ms={
            "e2e": e2e_ms,
            "vad": vad * 1000,
            "stt": stt * 1000,
            "llm_ttft": llm * 1000,
            "tts_ttfb": tts * 1000,
        },
        interrupted=index == 4,
        tier=tier_for(e2e_ms),
        agent="support",
        stages={
            "vad": Stage(t0, t0 + vad),
            "stt": Stage(t0, t0 + stt),
            "llm_ttft": Stage(t0 + stt, t0 + stt + llm),
            "tts_ttfb": Stage(t0 + stt + llm, t0 + stt + llm + tts),
            "e2e": Stage(t0, t0 + e2e_ms / 1000),
        },
    )


class CDP:
    """The smallest DevTools protocol client: commands by id, events into a list."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._ws:
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                self.events.append(data)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        await self._ws.send_json({"id": ident, "method": method, "params": params})
        reply = await asyncio.wait_for(future, timeout=15.0)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    async def wait_until(self, expression: str, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not await self.evaluate(expression):
            if time.monotonic() > deadline:
                raise AssertionError(f"page never satisfied: {expression}")
            await asyncio.sleep(0.1)

    def problems(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions, CSP and network errors."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in (
                "error",
                "warning",
                "assert",
            ):
                found.append(f"console.{params['type']}: {params.get('args')}")
            elif method == "Runtime.exceptionThrown":
                found.append(f"exception: {params.get('exceptionDetails')}")
            elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                found.append(f"log {params['entry']['source']}: {params['entry']['text']}")
        return found

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._ws.close()


@pytest.fixture
def world() -> Iterator[tuple[Server, LatencyMonitor, RecentTurns]]:
    registry = CollectorRegistry()
    metrics = LatencyMetrics.for_registry(registry)
    monitor = LatencyMonitor(window_s=300)
    recent = RecentTurns(maxlen=50)
    for index, e2e in enumerate(E2E_MS):
        turn = make_turn(index, e2e)
        metrics.observe_turn(turn)
        monitor.record_turn(turn)
        recent.add(turn)

    async def vad_loaded() -> bool:
        return True

    server = serve(
        port=0, monitor=monitor, registry=registry, recent=recent, checks={"vad": vad_loaded}
    )
    yield server, monitor, recent
    assert server.stop()


@contextlib.asynccontextmanager
async def chromium(tmp_path: Path) -> AsyncIterator[CDP]:
    profile = tmp_path / "profile"
    process = await asyncio.create_subprocess_exec(
        *[
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "--window-size=1400,1000",
            "about:blank",
        ],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"  # Chromium writes its chosen port here
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or process.returncode is not None:
                raise RuntimeError("chromium did not start its DevTools endpoint")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            page = next(t for t in targets if t["type"] == "page")
            ws = await session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
            cdp = CDP(ws)
            try:
                for domain in ("Runtime", "Log", "Page"):
                    await cdp.send(f"{domain}.enable")
                yield cdp
            finally:
                await cdp.close()
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=10)
        except asyncio.TimeoutError:
            process.kill()
            await process.wait()


READ_PAGE = """(() => {
  const text = (sel) => document.querySelector(sel)?.textContent ?? null;
  const rows = {};
  for (const tr of document.querySelectorAll('#latency-body tr[data-component]')) {
    rows[tr.dataset.component] = {
      count: tr.querySelector('.count').textContent,
      p50: tr.querySelector('.p50').textContent,
      p95: tr.querySelector('.p95').textContent,
      p99: tr.querySelector('.p99').textContent,
      max: tr.querySelector('.max').textContent,
      budget: tr.querySelector('.budget-ms').textContent,
    };
  }
  return {
    rows,
    tiers: {excellent: text('#tier-excellent'), good: text('#tier-good'), slow: text('#tier-slow')},
    tierLabels: [...document.querySelectorAll('.tier .label')].map((l) => l.textContent),
    chips: document.querySelectorAll('#tier-strip .chip').length,
    waterfallRows: document.querySelectorAll('#waterfall-rows .wf-row').length,
    waterfallBars: document.querySelectorAll('#waterfall-rows .wf-row')[0]
      ?.querySelectorAll('.wf-bar').length ?? 0,
    slos: [...document.querySelectorAll('.slo-card')].map((c) => ({
      name: c.dataset.slo, facts: c.querySelector('.slo-facts').textContent,
    })),
    ready: text('#ready'),
    bargeIn: {...document.querySelector('#barge-in').dataset},
    bargeInText: text('#barge-in'),
    breakdownLegend: [...document.querySelectorAll('#bd-legend [data-part]')]
      .map((n) => n.dataset.part),
    breakdownRows: [...document.querySelectorAll('#bd-rows .bd-row')].map((r) => ({
      label: r.querySelector('.wf-label').textContent,
      parts: [...r.querySelectorAll('.bd-seg')].map((g) => g.dataset.part),
      tips: [...r.querySelectorAll('.bd-seg')].map((g) => g.title),
      widths: [...r.querySelectorAll('.bd-seg')].map((g) => parseFloat(g.style.width)),
    })),
    breakdownMean: [...document.querySelectorAll('#bd-mean-body tr[data-part]')].map((r) => ({
      part: r.dataset.part,
      title: r.querySelector('.bd-title').textContent,
      mean: r.querySelector('.mean').textContent,
      share: r.querySelector('.share').textContent,
      setting: r.querySelector('.setting').textContent,
    })),
    providers: [...document.querySelectorAll('#providers-body tr[data-component]')].map((r) => ({
      component: r.dataset.component,
      provider: r.dataset.provider,
      model: r.dataset.model,
      name: r.querySelector('.model').textContent,
      turns: r.querySelector('.turns').textContent,
      p50: r.querySelector('.p50').textContent,
      p95: r.querySelector('.p95').textContent,
      best: r.querySelector('.p50').classList.contains('best'),
    })),
  };
})()"""


async def test_live_page_shows_the_apps_numbers_without_console_errors(
    world: tuple[Server, LatencyMonitor, RecentTurns], tmp_path: Path
) -> None:
    server, monitor, recent = world
    async with chromium(tmp_path) as page:
        await page.send("Page.navigate", url=f"{server.url}/")
        await page.wait_until("document.body && document.body.dataset.loaded === 'true'")
        shown = await page.evaluate(READ_PAGE)

        stats = monitor.get_all_stats()
        assert set(shown["rows"]) == set(stats)
        for component, s in stats.items():
            row = shown["rows"][component]
            assert row["count"] == str(s["count"])
            assert row["p50"] == str(round(s["median"]))
            assert row["p95"] == str(round(s["p95"]))
            assert row["p99"] == str(round(s["p99"]))
            assert row["max"] == str(round(s["max"]))
            # the guide's budget as lk_observe defines it, not a copy in the page
            bound = DEFAULT_BUDGET.upper_bound(component)
            assert row["budget"] == ("\u2013" if bound is None else f"{bound:g}")
        assert shown["tierLabels"] == [
            f"excellent < {EXCELLENT_BELOW_MS:g} ms",
            f"good < {GOOD_BELOW_MS:g} ms",
            f"slow ≥ {GOOD_BELOW_MS:g} ms",
        ]
        expected_tiers = {
            tier: str(sum(1 for ms in E2E_MS if tier_for(ms) == tier))
            for tier in ("excellent", "good", "slow")
        }
        assert shown["tiers"] == expected_tiers
        assert shown["chips"] == len(E2E_MS)
        assert shown["waterfallRows"] == 10
        assert shown["waterfallBars"] == 5
        assert [s["name"] for s in shown["slos"]] == ["e2e_good", "e2e_excellent"]
        good = sum(1 for ms in E2E_MS if ms <= 800)
        assert f"({good}/{len(E2E_MS)})" in shown["slos"][0]["facts"]
        assert shown["ready"] == "ready"
        # the barge-in rate: replies the caller cut short among the recent ones
        cut = sum(1 for t in recent.turns() if t.kind == "user" and t.interrupted)
        assert cut == 1
        assert shown["bargeIn"] == {"cut": str(cut), "replies": str(len(E2E_MS))}
        assert f"{cut} of {len(E2E_MS)} recent replies cut short" in shown["bargeInText"]

        # live: a new turn shows up within a couple of polls, no reload
        turn = make_turn(len(E2E_MS), 1900.0)
        monitor.record_turn(turn)
        recent.add(turn)
        slow = int(expected_tiers["slow"]) + 1
        await page.wait_until(f"document.querySelector('#tier-slow').textContent === '{slow}'")

        shot = await page.send("Page.captureScreenshot", format="png")
        SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))
        print(f"\nlive page screenshot: {SCREENSHOT}")
        assert SCREENSHOT.stat().st_size > 10_000

        assert page.problems() == []


async def test_live_page_reports_not_ready_checks(tmp_path: Path) -> None:
    async def stt_down() -> bool:
        return False

    server = serve(
        port=0, monitor=LatencyMonitor(), registry=CollectorRegistry(), checks={"stt": stt_down}
    )
    try:
        async with chromium(tmp_path) as page:
            await page.send("Page.navigate", url=f"{server.url}/")
            await page.wait_until("document.body && document.body.dataset.loaded === 'true'")
            assert await page.evaluate("document.querySelector('#ready').textContent") == (
                "not ready: stt"
            )
            assert (
                await page.evaluate("document.querySelector('#latency-body').textContent")
                == "no turns yet"
            )
            assert page.problems() == []  # the page asks /ready?report=1: no 503 in its console
    finally:
        assert server.stop()


async def test_live_page_works_mounted_under_a_prefix(tmp_path: Path) -> None:
    """create_app() mounted in the user's own app (the documented use): the page must load its
    script and data from under the prefix, not from the host's root."""
    from fastapi import FastAPI

    from lk_observe.server import create_app

    monitor, recent = LatencyMonitor(window_s=300), RecentTurns(maxlen=50)
    for index, e2e in enumerate(E2E_MS):
        turn = make_turn(index, e2e)
        monitor.record_turn(turn)
        recent.add(turn)
    host = FastAPI()

    @host.get("/metrics/latency")
    async def not_ours() -> dict[str, str]:  # the host's own routes must not be what it reads
        return {"wrong": "app"}

    host.mount("/ops", create_app(monitor=monitor, registry=CollectorRegistry(), recent=recent))
    server = Server(host, "127.0.0.1", 0)
    server.start()
    try:
        async with chromium(tmp_path) as page:
            await page.send("Page.navigate", url=f"{server.url}/ops")  # redirected to /ops/
            await page.wait_until("document.body && document.body.dataset.loaded === 'true'")
            shown = await page.evaluate(READ_PAGE)
            assert set(shown["rows"]) == set(monitor.get_all_stats())
            assert shown["waterfallRows"] == 10
            assert await page.evaluate("location.pathname") == "/ops/"
            assert page.problems() == []
    finally:
        assert server.stop()


READ_WATERFALL = """(() => ({
  legend: [...document.querySelectorAll('#legend [data-stage]')].map((n) => n.dataset.stage),
  colours: Object.fromEntries([...document.querySelectorAll('#waterfall-rows .wf-bar')]
    .map((n) => [n.dataset.stage, getComputedStyle(n).backgroundColor])),
  labels: [...document.querySelectorAll('#waterfall-rows .wf-label')].map((n) => n.textContent),
  facts: [...document.querySelectorAll('.slo-facts')].map((n) => n.textContent),
}))()"""


async def test_tool_time_has_its_own_colour_and_legend_and_interrupted_turns_say_so(
    tmp_path: Path,
) -> None:
    monitor, recent = LatencyMonitor(window_s=300), RecentTurns(maxlen=50)
    t0 = 1_700_000_000.0
    tool_turn = Turn(
        index=3,
        speech_id="speech_tool",
        started_at=t0,
        ended_at=t0 + 3,
        latency_ms={"e2e": 2400.0, "vad": 180.0, "stt": 170.0, "llm_ttft": 200.0},
        interrupted=False,
        tier=tier_for(2400.0),
        agent="support",
        stages={
            "vad": Stage(t0, t0 + 0.18),
            "stt": Stage(t0, t0 + 0.17),
            "llm_ttft": Stage(t0 + 0.17, t0 + 0.37),
            "tool": Stage(t0 + 0.4, t0 + 1.9),
            "e2e": Stage(t0, t0 + 2.4),
        },
        tool_calls=1,
    )
    cut = Turn(
        index=8,
        speech_id="speech_cut",
        started_at=t0 + 10,
        ended_at=t0 + 12,
        latency_ms={"vad": 180.0, "stt": 170.0},
        interrupted=True,
        tier=None,
        agent="support",
        stages={"vad": Stage(t0 + 10, t0 + 10.18), "stt": Stage(t0 + 10, t0 + 10.17)},
    )
    for turn in (*(make_turn(20 + i, 1900.0) for i in range(20)), tool_turn, cut):
        monitor.record_turn(turn)
        recent.add(turn)
    server = serve(port=0, monitor=monitor, registry=CollectorRegistry(), recent=recent)
    try:
        async with chromium(tmp_path) as page:
            await page.send("Page.navigate", url=f"{server.url}/")
            await page.wait_until("document.body && document.body.dataset.loaded === 'true'")
            shown = await page.evaluate(READ_WATERFALL)
            assert "tool" in shown["legend"]
            colours = shown["colours"]
            assert colours["tool"] not in (colours["vad"], colours["stt"], colours["llm_ttft"])
            assert "#8 interrupted" in shown["labels"]
            assert not any(mark in label for label in shown["labels"] for mark in "\u00d7\u2a2f")
            # 21 of 22 turns slow: the budget is spent many times over, and the page says so
            assert shown["facts"] and all("budget exhausted" in f for f in shown["facts"])
            assert not any(re.search(r"-\d+(\.\d+)?%", f) for f in shown["facts"])
            assert page.problems() == []
    finally:
        assert server.stop()


# -- why it took that long: the breakdown, the providers compared --------------------------------

# (provider, model) per component, A and B, and how fast each is (ms)
MODELS = {
    "stt": ((("sim-deepgram", "nova-3"), 160.0), (("sim-assemblyai", "universal"), 320.0)),
    "llm_ttft": ((("sim-groq", "llama-3.3-70b"), 150.0), (("sim-openai", "gpt-4.1-mini"), 380.0)),
    "tts_ttfb": ((("sim-cartesia", "sonic-2"), 50.0), (("sim-elevenlabs", "flash-v2.5"), 110.0)),
}
SETTINGS = {
    "vad_silence": "min_silence_duration=0.55s",
    "end_of_turn": "endpointing.min_delay=0.5s",
}


def js_round(value: float) -> int:
    """The page's Math.round: halves up (Python's round() takes them to even)."""
    return math.floor(value + 0.5)


def breakdown_turn(index: int) -> Turn:
    """A turn whose STT, LLM and TTS each come from provider A or B (by index), with e2e split
    into parts that add up to it; LLM turns hide behind the end of turn now and then (0 ms)."""
    t0 = 1_700_000_000.0 + index * 10
    picks = {c: MODELS[c][(index >> n) % 2] for n, c in enumerate(MODELS)}
    jitter = (index % 5) * 3.0
    latency = {c: speed + jitter for c, ((_, _), speed) in picks.items()}
    parts = {
        "vad_silence": 550.0 + jitter,
        "transcription": 0.0 if latency["stt"] < 200 else latency["stt"] - 150.0,
        "end_of_turn": 12.0,
        "on_user_turn_completed": 0.4,
        "llm": 0.0 if index % 7 == 3 else latency["llm_ttft"],  # preemptive: hidden
        "tts": latency["tts_ttfb"],
        "playback": 1.5,
        "scheduling": 4.25,
    }
    e2e = sum(parts.values())
    names = {c: pick[0] for c, pick in picks.items()}
    return Turn(
        index=index,
        speech_id=f"speech_{index}",
        started_at=t0,
        ended_at=t0 + 3,
        latency_ms={"e2e": e2e, "vad": parts["vad_silence"], **latency},
        interrupted=False,
        tier=tier_for(e2e),
        agent="support",
        stages={"e2e": Stage(t0, t0 + e2e / 1000)},
        breakdown_ms=parts,
        breakdown_settings=SETTINGS,
        stt_provider=names["stt"][0],
        stt_model=names["stt"][1],
        llm_provider=names["llm_ttft"][0],
        llm_model=names["llm_ttft"][1],
        tts_provider=names["tts_ttfb"][0],
        tts_model=names["tts_ttfb"][1],
    )


async def test_live_page_shows_why_turns_took_that_long_and_compares_providers(
    tmp_path: Path,
) -> None:
    monitor, recent = LatencyMonitor(window_s=300), RecentTurns(maxlen=50)
    turns = [breakdown_turn(i) for i in range(16)]
    greeting = Turn(  # an agent turn: no breakdown, its LLM and TTS are still compared
        index=99,
        speech_id="greeting",
        started_at=1_700_000_500.0,
        ended_at=1_700_000_501.0,
        latency_ms={"llm_ttft": 140.0, "tts_ttfb": 48.0},
        interrupted=False,
        tier=None,
        kind="agent",
        agent="support",
        llm_provider="sim-groq",
        llm_model="llama-3.3-70b",
        tts_provider="sim-cartesia",
        tts_model="sonic-2",
    )
    for turn in (*turns, greeting):
        monitor.record_turn(turn)
        recent.add(turn)
    summaries = [turn_summary(t) for t in recent.turns()]
    server = serve(port=0, monitor=monitor, registry=CollectorRegistry(), recent=recent)
    try:
        async with aiohttp.ClientSession() as client:
            async with client.get(f"{server.url}/turns/recent") as response:
                listed = await response.json()
            async with client.get(f"{server.url}/turns/breakdown") as response:
                served = await response.json()
        # the recent turns carry the breakdown, its settings and the model names
        assert listed[0]["breakdown_ms"] == dict(turns[0].breakdown_ms)
        used = [p for p in BREAKDOWN_PARTS if p in turns[0].breakdown_ms]  # no tool, no silence
        assert list(listed[0]["breakdown_ms"]) == used
        assert listed[0]["breakdown_settings"] == SETTINGS
        assert (listed[0]["stt_provider"], listed[0]["stt_model"]) == ("sim-deepgram", "nova-3")
        assert listed[-1]["breakdown_ms"] == {} and listed[-1]["llm_provider"] == "sim-groq"
        # computed on the server, from the same recent turns
        assert served["providers"] == provider_comparison(summaries)
        assert served["mean"] == mean_breakdown(summaries)
        assert served["mean"]["turns"] == len(turns)
        mean_e2e = sum(t.latency_ms["e2e"] for t in turns) / len(turns)
        assert served["mean"]["e2e_ms"] == pytest.approx(mean_e2e)
        assert sum(p["mean_ms"] for p in served["mean"]["parts"]) == pytest.approx(mean_e2e)
        # two providers per component, each with its own turns and percentiles
        rows = served["providers"]
        assert [(r["component"], r["provider"]) for r in rows] == [
            ("stt", "sim-assemblyai"),
            ("stt", "sim-deepgram"),
            ("llm_ttft", "sim-groq"),
            ("llm_ttft", "sim-openai"),
            ("tts_ttfb", "sim-cartesia"),
            ("tts_ttfb", "sim-elevenlabs"),
        ]
        groq = [t.latency_ms["llm_ttft"] for t in turns if t.llm_provider == "sim-groq"]
        assert rows[2]["turns"] == len(groq) + 1  # the greeting's LLM too
        assert rows[2]["p50_ms"] == pytest.approx(percentile([*groq, 140.0], 0.5))
        assert rows[2]["p95_ms"] == pytest.approx(percentile([*groq, 140.0], 0.95))

        async with chromium(tmp_path) as page:
            await page.send("Page.navigate", url=f"{server.url}/")
            await page.wait_until("document.body && document.body.dataset.loaded === 'true'")
            shown = await page.evaluate(READ_PAGE)

            # the legend: every part, in order
            assert shown["breakdownLegend"] == list(BREAKDOWN_PARTS)
            # the mean over the recent turns first, then the 12 newest turns, newest first
            bars = shown["breakdownRows"]
            assert len(bars) == 1 + 12
            assert bars[0]["label"] == f"mean of {len(turns)} · {js_round(mean_e2e)} ms"
            assert bars[1]["label"].startswith(f"#{turns[-1].index} ")
            # a stacked bar: the parts that took time, in order (0 ms and absent: no segment)
            newest = turns[-1]
            assert bars[1]["parts"] == [p for p in BREAKDOWN_PARTS if newest.breakdown_ms.get(p)]
            hidden = next(i for i, row in enumerate(bars[1:]) if "llm" not in row["parts"])
            assert turns[-1 - hidden].breakdown_ms["llm"] == 0.0
            assert bars[1]["tips"][0] == (
                f"VAD silence: {js_round(newest.breakdown_ms['vad_silence'])} ms "
                "(min_silence_duration=0.55s)"
            )
            longest = max(mean_e2e, *(sum(t.breakdown_ms.values()) for t in turns[-12:]))
            assert sum(bars[1]["widths"]) == pytest.approx(
                100 * sum(newest.breakdown_ms.values()) / longest, abs=0.01
            )
            # the mean's table: parts in order, with their titles, means, shares and settings
            table = shown["breakdownMean"]
            assert [r["part"] for r in table] == used
            for row, part in zip(table, served["mean"]["parts"], strict=True):
                assert row["title"] == BREAKDOWN_TITLES[part["part"]]
                assert row["mean"] == str(js_round(part["mean_ms"]))
                assert row["share"] == f"{js_round(100 * part['mean_ms'] / mean_e2e)}%"
                assert row["setting"] == SETTINGS.get(part["part"], "")

            # the providers compared: as the server computed them, the faster p50 marked
            assert [(r["component"], r["provider"], r["model"]) for r in shown["providers"]] == [
                (r["component"], r["provider"], r["model"]) for r in rows
            ]
            for on_page, row in zip(shown["providers"], rows, strict=True):
                assert on_page["name"] == f"{row['provider']} / {row['model']}"
                assert on_page["turns"] == str(row["turns"])
                assert on_page["p50"] == str(js_round(row["p50_ms"]))
                assert on_page["p95"] == str(js_round(row["p95_ms"]))
            assert [r["provider"] for r in shown["providers"] if r["best"]] == [
                "sim-deepgram",
                "sim-groq",
                "sim-cartesia",
            ]

            shot = await page.send("Page.captureScreenshot", format="png")
            (tmp_path / "breakdown.png").write_bytes(base64.b64decode(shot["data"]))
            assert page.problems() == []
    finally:
        assert server.stop()


def test_a_recent_turn_travels_between_processes_with_its_breakdown_and_models() -> None:
    turn = breakdown_turn(5)
    summary = turn_summary(turn)
    assert parse_turn_summary(json.loads(json.dumps(summary))) == summary
    # a summary written by an older lk_observe (no breakdown, no names) still reads
    old = {k: v for k, v in summary.items() if "breakdown" not in k and "_provider" not in k}
    old = {k: v for k, v in old.items() if not k.endswith("_model")}
    parsed = parse_turn_summary(old)
    assert parsed["breakdown_ms"] == {} and parsed["llm_provider"] is None
    for bad in (
        {"breakdown_ms": {"nap": 1.0}},
        {"breakdown_ms": {"llm": float("nan")}},
        {"breakdown_ms": {"llm": True}},
        {"breakdown_settings": {"llm": "x" * 200}},
        {"breakdown_settings": {"vad_silence": 0.5}},
        {"stt_provider": "x" * 200},
        {"tts_model": 7},
    ):
        with pytest.raises(ValueError):
            parse_turn_summary({**summary, **bad})


def test_provider_names_and_settings_on_the_page_are_bounded() -> None:
    long = "p" * 1000
    turn = dataclasses.replace(
        breakdown_turn(1),
        llm_provider=long,
        breakdown_settings={"end_of_turn": "s" * 1000},
    )
    summary = turn_summary(turn)
    assert len(summary["llm_provider"]) <= 128
    assert len(summary["breakdown_settings"]["end_of_turn"]) <= 128
    assert parse_turn_summary(summary) == summary


def test_percentile_interpolates_between_the_nearest_values() -> None:
    assert percentile([], 0.5) == 0.0
    assert percentile([7.0], 0.95) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([10.0, 0.0, 20.0], 0.95) == pytest.approx(19.0)
