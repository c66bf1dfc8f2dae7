"""Inside a LiveKit job, instrument() registers a bounded flush as a job shutdown callback, so
the last turns reach the collector before the job process exits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

from livekit.agents.job import _JobContextVar
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import lk_observe
from lk_observe.demo import ScriptedTurn, build_pipeline


class _JobStandIn:
    """What instrument() uses of livekit.agents.JobContext: add_shutdown_callback."""

    def __init__(self) -> None:
        self.callbacks: list[Callable[[], Coroutine[Any, Any, None]]] = []

    def add_shutdown_callback(self, callback: Callable[[], Coroutine[Any, Any, None]]) -> None:
        self.callbacks.append(callback)


def test_job_shutdown_flushes_pending_turns_and_spans() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    # a long schedule delay: without the flush nothing would be exported before exit
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=60_000))
    job = _JobStandIn()

    async def play() -> float:
        token = _JobContextVar.set(job)  # type: ignore[arg-type]
        try:
            pipeline = build_pipeline([ScriptedTurn(), ScriptedTurn()])
            handle = lk_observe.instrument(
                pipeline.session,
                tracer_provider=provider,
                registry=CollectorRegistry(),
                monitor=lk_observe.LatencyMonitor(),
            )
        finally:
            _JobContextVar.reset(token)
        assert len(job.callbacks) == 1
        await pipeline.session.start(pipeline.agent)
        pipeline.audio_input.push_silence()
        await asyncio.sleep(pipeline.duration_s)
        assert handle.active  # the job ends before the session is closed: turns may be pending
        started = time.monotonic()
        for callback in job.callbacks:  # what LiveKit does when the job shuts down
            await callback()
        elapsed = time.monotonic() - started
        await pipeline.session.aclose()
        return elapsed

    elapsed = asyncio.run(play())
    roots = [s for s in exporter.get_finished_spans() if s.name == "voice.turn"]
    assert len(roots) == 2  # both turns exported by the shutdown flush, not by the timer
    assert elapsed < lk_observe.instrument.__globals__["JOB_EXIT_FLUSH_S"] + 1.0
    provider.shutdown()


def test_close_and_flush_is_bounded_with_no_job() -> None:
    async def play() -> bool:
        pipeline = build_pipeline([ScriptedTurn()])
        handle = lk_observe.instrument(
            pipeline.session, registry=CollectorRegistry(), monitor=lk_observe.LatencyMonitor()
        )
        ok = await asyncio.to_thread(handle.close_and_flush, 2.0)
        assert not handle.active
        return ok

    assert asyncio.run(play())
