"""TurnAssembler under random event streams: any method, any order, any value. It never raises
and never reports a number that cannot be a latency."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lk_observe.turns import MAX_LATENCY_S, Turn, TurnAssembler

SPEECH_IDS = st.sampled_from(["s1", "s2", "s3", "s4", "s5"])
ITEM_IDS = st.sampled_from(["i1", "i2", "i3", "i4", "i5", "i6"])
BAD = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -1e9, 0.0, 1e9, 1e300])
# times near the session's clock, where real events land, or anything at all
CLOCK = st.floats(min_value=995.0, max_value=1015.0)
ANY_TIME = st.one_of(CLOCK, CLOCK, BAD, st.floats())
DELAY = st.one_of(st.floats(min_value=0.0, max_value=3.0), BAD, st.floats())
ANY_VALUE = st.one_of(DELAY, st.none(), st.text(max_size=3), st.booleans())
AT = st.floats(min_value=1000.0, max_value=1400.0)  # arrival: any order, sometimes far later
TOKENS = st.one_of(st.none(), st.integers(min_value=0, max_value=10_000), BAD)
USER_METRICS = st.dictionaries(
    st.sampled_from(["stopped_speaking_at", "transcription_delay", "end_of_turn_delay"]),
    st.one_of(ANY_TIME, ANY_VALUE),
)
EARLY = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(["llm_node_ttft", "tts_node_ttfb", "playback_latency"]), DELAY),
)

Op = tuple[str, dict[str, Any]]


def _op(name: str, **kwargs: st.SearchStrategy[Any]) -> st.SearchStrategy[Op]:
    return st.tuples(st.just(name), st.fixed_dictionaries(kwargs))


OPS = st.one_of(
    _op("speech_created", speech_id=SPEECH_IDS, at=AT),
    _op(
        "user_state",
        new_state=st.sampled_from(["listening", "speaking", "away"]),
        created_at=ANY_TIME,
        at=AT,
    ),
    _op(
        "user_turn",
        item_id=ITEM_IDS,
        metrics=USER_METRICS,
        speech_id=st.one_of(st.none(), SPEECH_IDS),
        at=AT,
    ),
    _op(
        "agent_speaking",
        speech_id=st.one_of(st.none(), SPEECH_IDS),
        started_at=ANY_TIME,
        early=EARLY,
        at=AT,
    ),
    _op(
        "llm_metrics",
        speech_id=st.one_of(st.none(), SPEECH_IDS),
        ended_at=ANY_TIME,
        duration_s=DELAY,
        ttft_s=DELAY,
        model=st.one_of(st.none(), st.just("m")),
        provider=st.one_of(st.none(), st.just("p")),
        input_tokens=TOKENS,
        output_tokens=TOKENS,
        at=AT,
    ),
    # call counts are ints here: a non-int count is a known bug (see test_turns.py)
    _op(
        "tools_executed",
        speech_id=st.one_of(st.none(), SPEECH_IDS),
        started_at=ANY_TIME,
        ended_at=ANY_TIME,
        calls=st.integers(min_value=-3, max_value=5),
        at=AT,
    ),
    _op("speech_done", speech_id=SPEECH_IDS, interrupted=st.booleans(), at=AT),
    _op("user_barge_in", at=AT),
    _op("expire", now=AT),
)


def _check_turn(turn: Turn) -> None:
    for component, value in turn.latency_ms.items():
        assert math.isfinite(value), (component, value)
        assert 0.0 <= value <= MAX_LATENCY_S * 1000.0, (component, value)
    for name, stage in turn.stages.items():
        assert math.isfinite(stage.duration_ms), (name, stage)
        assert 0.0 <= stage.duration_ms <= MAX_LATENCY_S * 1000.0, (name, stage)
    if turn.tool_ms is not None:
        assert 0.0 <= turn.tool_ms <= MAX_LATENCY_S * 1000.0
    assert isinstance(turn.tool_calls, int) and turn.tool_calls >= 0
    assert turn.llm_rounds >= 0
    for tokens in (turn.input_tokens, turn.output_tokens):
        assert tokens is None or (isinstance(tokens, int) and tokens > 0)
    if turn.kind == "agent":
        assert "e2e" not in turn.latency_ms
    e2e = turn.latency_ms.get("e2e")
    assert (turn.tier is None) == (e2e is None)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(ops=st.lists(OPS, max_size=40), close_at=st.one_of(st.none(), AT))
def test_random_event_streams_never_raise_and_yield_only_plausible_turns(
    ops: list[Op], close_at: float | None
) -> None:
    a = TurnAssembler(max_wait_s=5.0)
    turns: list[Turn] = []
    user_items: set[str] = set()
    for name, kwargs in ops:
        if name == "user_turn":
            user_items.add(kwargs["item_id"])
        turns += getattr(a, name)(**kwargs) or []
    if close_at is not None:
        turns += a.close(close_at)
        assert a.pending == 0 and a.open == 0
    for turn in turns:
        _check_turn(turn)
        if turn.played_ms is not None:
            assert turn.complete and 0.0 <= turn.played_ms <= 3600_000.0
    live = [t for t in turns if not t.complete]
    done = [t for t in turns if t.complete]
    # each turn is reported live once, then complete once, in that order, with one index
    assert {(t.index, t.speech_id) for t in done} <= {(t.index, t.speech_id) for t in live}
    if close_at is not None:
        assert len(done) == len(live)
    for reports in (live, done):
        assert sum(1 for t in reports if t.kind == "user") <= len(user_items)
        indices = [t.index for t in reports]
        assert len(indices) == len(set(indices))
        speech_ids = [t.speech_id for t in reports if t.speech_id is not None]
        assert len(speech_ids) == len(set(speech_ids))
    position = {(t.index, t.complete): i for i, t in enumerate(turns)}
    for t in done:
        assert position[(t.index, False)] < position[(t.index, True)]
    assert all(count >= 0 for count in a.skipped.values())
