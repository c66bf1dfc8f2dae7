"""Multiprocess exemplars: lk_observe places them itself (prometheus_client drops them when
values are file-backed), on exactly the samples prometheus_client's own exemplars go to, and
reads back only what it would write (the file round trip is in the integration tests)."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from lk_observe import multiprocess
from lk_observe.metrics import LatencyMetrics
from lk_observe.monitor import SnapshotError
from lk_observe.multiprocess import Labels, parse_exemplars
from lk_observe.promql import LATENCY_BUCKETS_S
from lk_observe.turns import Turn, tier_for


class Recorder:
    """Stands in for this process's ExemplarStore (which would write a file)."""

    def __init__(self) -> None:
        self.kept: dict[tuple[str, Labels], tuple[str, float]] = {}

    def add(
        self,
        samples: list[tuple[str, Labels, float]],
        trace_id: str,
        timestamp: float | None = None,
    ) -> None:
        for name, labels, value in samples:
            self.kept[(name, labels)] = (trace_id, value)


def latencies_ms() -> list[float]:
    edges = [edge * 1000 for edge in LATENCY_BUCKETS_S]
    near = [ms + d for ms in edges for d in (-0.001, 0.001)]
    return [0.0, 1.0, *edges, *near, 12_345.0, 119_000.0]


def test_multiprocess_exemplars_land_where_prometheus_client_puts_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = CollectorRegistry()
    reference = LatencyMetrics.for_registry(registry)  # in-process values: native exemplars
    recorder = Recorder()
    monkeypatch.setattr(multiprocess, "exemplar_store", lambda: recorder)
    file_backed = LatencyMetrics(CollectorRegistry())
    file_backed._exemplars = False  # as in a job process: prometheus_client would drop them
    for index, ms in enumerate(latencies_ms(), start=1):
        turn = Turn(
            index=index,
            speech_id=None,
            started_at=time.time() - 1.0,
            ended_at=time.time(),
            latency_ms={"e2e": ms, "stt": ms / 3},
            interrupted=False,
            tier=tier_for(ms),
            agent="support",
            trace_id=(0xFEED << 80) + index,
        )
        reference.observe_turn(turn)
        file_backed.observe_turn(turn)
    native = {
        (s.name, tuple(sorted(s.labels.items()))): (s.exemplar.labels["trace_id"], s.exemplar.value)
        for family in registry.collect()
        for s in family.samples
        if s.exemplar is not None
    }
    assert len(native) > len(LATENCY_BUCKETS_S)  # every bucket, +Inf and each tier
    assert recorder.kept == native


def test_turns_without_a_trace_keep_no_exemplar(monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder()
    monkeypatch.setattr(multiprocess, "exemplar_store", lambda: recorder)
    metrics = LatencyMetrics(CollectorRegistry())
    metrics._exemplars = False
    metrics.observe_turn(
        Turn(
            index=1,
            speech_id=None,
            started_at=0.0,
            ended_at=1.0,
            latency_ms={"e2e": 400.0},
            interrupted=False,
            tier=tier_for(400.0),
        )
    )
    assert recorder.kept == {}


ROW = [
    "voice_agent_latency_seconds_bucket",
    {"le": "0.5", "agent": "support", "component": "e2e"},
    "0123456789abcdef0123456789abcdef",
    0.45,
    1_700_000_000.5,
]


def test_a_valid_file_is_read_with_sorted_labels() -> None:
    found = parse_exemplars({"v": 1, "pid": 7, "exemplars": [ROW]})
    labels = (("agent", "support"), ("component", "e2e"), ("le", "0.5"))
    assert found == {
        ("voice_agent_latency_seconds_bucket", labels): (ROW[2], 0.45, 1_700_000_000.5)
    }


def with_row(index: int, value: Any) -> dict[str, Any]:
    row = list(ROW)
    row[index] = value
    return {"v": 1, "exemplars": [row]}


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        ([], "corrupt"),
        ({"v": 2, "exemplars": []}, "incompatible"),
        ({"v": 1}, "corrupt"),
        ({"v": 1, "exemplars": [ROW[:4]]}, "corrupt"),
        ({"v": 1, "exemplars": [ROW] * (2 * multiprocess.MAX_EXEMPLARS + 1)}, "corrupt"),
        (with_row(0, 5), "corrupt"),
        (with_row(0, "x" * 1000), "corrupt"),
        (with_row(1, {"le": 0.5}), "corrupt"),
        (with_row(1, {f"l{n}": "v" for n in range(20)}), "corrupt"),
        (with_row(2, "user said: cancel my order"), "corrupt"),  # only trace ids, never text
        (with_row(2, "0123456789ABCDEF0123456789ABCDEF"), "corrupt"),
        (with_row(2, "0123456789abcdef"), "corrupt"),
        (with_row(3, math.nan), "corrupt"),
        (with_row(3, True), "corrupt"),
        (with_row(3, "0.45"), "corrupt"),
        (with_row(4, math.inf), "corrupt"),
        (with_row(4, -1.0), "corrupt"),
        (with_row(4, 1e20), "corrupt"),
    ],
)
def test_anything_else_is_refused(state: Any, reason: str) -> None:
    # what a JSON parser can hand over from a damaged or foreign file
    state = json.loads(json.dumps(state))
    with pytest.raises(SnapshotError) as refused:
        parse_exemplars(state)
    assert refused.value.reason == reason
