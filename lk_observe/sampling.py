"""Which turns keep their trace: every slow, interrupted, failed or tool-calling turn, and a fixed
fraction of the rest.

Head sampling decides before the turn happens and the Collector's tail sampler judges a whole
trace (for LiveKit's own telemetry, the whole call); lk_observe writes each turn's trace after
the turn is known, so it can keep exactly the turns worth reading and never create the spans of
the others. Metrics, the monitor and SLOs see every turn either way.

The decision is made twice, with what is known each time: when the turn goes live (its first
audio: slow or not, tools so far, and the fixed fraction) and, for a turn not kept then, when its
reply ends (interrupted, failed, tools after the first audio). A turn kept live gets its trace at
once and Prometheus exemplars point at it; a turn kept at its end gets its trace then, without an
exemplar (its latency was observed before the trace existed), so exemplars only ever point at
kept traces.

The fraction is decided by a hash of the session id and the turn's index, not by the trace id:
a turn that is not kept never gets a trace id, which is what makes dropping it cheap. A replay
of the same session decides the same.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lk_observe.slo import SLO
from lk_observe.turns import Turn

logger = logging.getLogger(__name__)

KEEP_FRACTION_ENV = "LK_OBSERVE_TRACE_KEEP_FRACTION"
SLOWER_THAN_ENV = "LK_OBSERVE_TRACE_SLOWER_THAN_MS"
_ANY_SLO = "slo"
_HASH_SPACE = 1 << 64


@dataclass(frozen=True)
class TraceSampling:
    """Keep the traces of slow, interrupted, failed and tool-calling turns, and `keep_fraction`
    of the others.

    `slower_than_ms`: a turn whose e2e is above it is slow; None (the default): a turn is slow
    when any component is above the threshold of any of the session's SLOs.
    """

    keep_fraction: float = 1.0
    slower_than_ms: float | None = None

    def __post_init__(self) -> None:
        fraction = self.keep_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise TypeError(f"keep_fraction must be a number, got {fraction!r}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"keep_fraction must be within [0, 1], got {fraction!r}")
        slower = self.slower_than_ms
        if slower is not None and (
            isinstance(slower, bool)
            or not isinstance(slower, (int, float))
            or not math.isfinite(slower)
            or slower < 0
        ):
            raise ValueError(
                f"slower_than_ms must be a non-negative number or None, got {slower!r}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TraceSampling | None:
        """From LK_OBSERVE_TRACE_KEEP_FRACTION (0-1) and LK_OBSERVE_TRACE_SLOWER_THAN_MS (a
        number of ms, or "slo": any SLO's threshold); None when neither is set. A value that
        does not parse is logged and every trace is kept: a typo must cost storage, not traces.
        """
        env = os.environ if environ is None else environ
        fraction_text = env.get(KEEP_FRACTION_ENV, "").strip()
        slower_text = env.get(SLOWER_THAN_ENV, "").strip()
        if not fraction_text and not slower_text:
            return None
        try:
            fraction = float(fraction_text) if fraction_text else 1.0
            slower = None if slower_text in ("", _ANY_SLO) else float(slower_text)
            return cls(keep_fraction=fraction, slower_than_ms=slower)
        except (TypeError, ValueError) as error:
            logger.warning(
                "lk_observe: ignoring trace sampling from the environment (%s=%r, %s=%r): %s; "
                "keeping every trace",
                KEEP_FRACTION_ENV,
                fraction_text,
                SLOWER_THAN_ENV,
                slower_text,
                error,
            )
            return None


class TurnSampler:
    """The decision for one session's turns under `policy` and the session's SLOs."""

    def __init__(self, policy: TraceSampling, slos: Iterable[SLO]) -> None:
        self.policy = policy
        self._cutoff = min(_HASH_SPACE, math.floor(policy.keep_fraction * _HASH_SPACE))
        if policy.slower_than_ms is not None:
            self._slow_above: dict[str, float] = {"e2e": policy.slower_than_ms}
        else:
            self._slow_above = {}
            for slo in slos:
                known = self._slow_above.get(slo.component, math.inf)
                self._slow_above[slo.component] = min(known, slo.threshold_ms)

    def slow(self, turn: Turn) -> bool:
        latency = turn.latency_ms
        return any(latency.get(c, -math.inf) > limit for c, limit in self._slow_above.items())

    def in_fraction(self, turn: Turn) -> bool:
        """The deterministic `keep_fraction` share, by session id and turn index."""
        if self._cutoff >= _HASH_SPACE:
            return True
        if self._cutoff <= 0:
            return False
        key = f"{turn.session_id}/{turn.index}".encode()
        value = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")
        return value < self._cutoff

    def keep_live(self, turn: Turn) -> bool:
        """At the live report: what is known at the first audio."""
        return (
            bool(turn.tool_calls)
            or turn.error_type is not None
            or self.slow(turn)
            or self.in_fraction(turn)
        )

    def keep_complete(self, turn: Turn) -> bool:
        """At the reply's end, for a turn not kept live."""
        return (
            turn.interrupted
            or bool(turn.tool_calls)
            or turn.error_type is not None
            or self.slow(turn)
        )
