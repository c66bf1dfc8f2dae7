"""The live page in real headless Chromium: it loads clean, shows the app's numbers, keeps up.

Chromium is Debian's package (scripts/setup-chromium.sh). The test drives it over the DevTools
protocol with aiohttp's websocket client (already here through livekit-agents) to collect console
messages, exceptions and CSP violations, read the rendered DOM and take a screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
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
from lk_observe.recent import RecentTurns
from lk_observe.server import Server, serve
from lk_observe.turns import EXCELLENT_BELOW_MS, GOOD_BELOW_MS, Stage, Turn, tier_for

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
