"""Budget signals: what a running agent is told when a turn overruns its latency budget or an
SLO starts (or stops) burning, so it can react while the call goes on (a faster model, a
shorter prompt). Pure data; the delivery (the sink thread -> the agent's loop) is in sinks.py.

Two ways to hear them, with the same `BudgetSignal`:

    lk_observe.instrument(session, on_budget=react)       # a hook, on the agent's loop

    @session.on(lk_observe.BUDGET_EVENT)                   # a session event, "lk_observe_budget"
    def react(signal: lk_observe.BudgetSignal) -> None: ...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, get_args

from lk_observe.slo import SLOStatus
from lk_observe.turns import Turn

BUDGET_EVENT = "lk_observe_budget"  # the AgentSession event name: session.on(BUDGET_EVENT)

SignalKind = Literal["turn_over_budget", "slo_burning", "slo_recovered"]
SIGNAL_KINDS: tuple[SignalKind, ...] = get_args(SignalKind)
SLOChange = Literal["slo_burning", "slo_recovered"]


@dataclass(frozen=True)
class BudgetSignal:
    """A turn over its latency budget, or an SLO of this agent starting or stopping to burn.

    - `turn_over_budget`: at the turn's first audio (its live report: the earliest moment, so
      the agent can act before its next reply). `turn` is that report; `overruns_ms` maps each
      component over its budget to the ms over the upper bound (e2e: over the budget's total),
      as `budget_overruns(turn, budget)` gives them. Only user turns; at most one per turn.
    - `slo_burning`: an SLO of the agent started breaching (its burn rate over the monitor's
      window reached `breach_burn_rate`, the same condition as the SLO log line and
      `SLOEvaluator`'s `on_breach`), told to every instrumented session of the agent.
      `slo_recovered`: it stopped. Both carry the SLO's name, component and burn rate, and its
      whole `slo_status`.
    """

    kind: SignalKind
    agent: str
    session_id: str
    at: float  # unix seconds: when lk_observe noticed
    turn: Turn | None = None
    overruns_ms: Mapping[str, float] = field(default_factory=dict)
    slo: str | None = None
    component: str | None = None  # the SLO's component ("e2e", "llm_ttft", ...)
    burn_rate: float | None = None
    breach_burn_rate: float | None = None
    slo_status: SLOStatus | None = None

    def __post_init__(self) -> None:
        if self.kind not in SIGNAL_KINDS:
            raise ValueError(f"kind must be one of {SIGNAL_KINDS}, got {self.kind!r}")
        if self.kind == "turn_over_budget":
            if self.turn is None or not self.overruns_ms:
                raise ValueError("a turn_over_budget signal needs its turn and its overruns")
        elif self.slo is None:
            raise ValueError(f"a {self.kind} signal needs the SLO's name")
        # a hook must not change what other listeners get
        object.__setattr__(self, "overruns_ms", MappingProxyType(dict(self.overruns_ms)))

    def over(self, component: str) -> float:
        """ms `component` was over its budget in this turn (0.0: within it, or an SLO signal)."""
        return self.overruns_ms.get(component, 0.0)


BudgetHook = Callable[[BudgetSignal], None]


def turn_over_budget(turn: Turn, overruns_ms: Mapping[str, float], at: float) -> BudgetSignal:
    """The signal for a live report that overran its budget."""
    return BudgetSignal(
        kind="turn_over_budget",
        agent=turn.agent,
        session_id=turn.session_id,
        at=at,
        turn=turn,
        overruns_ms=overruns_ms,
    )


def slo_changed(
    kind: SLOChange,
    status: SLOStatus,
    *,
    agent: str,
    session_id: str,
    at: float,
) -> BudgetSignal:
    """The signal for an SLO that started (`slo_burning`) or stopped (`slo_recovered`)
    breaching, from its status at that check."""
    return BudgetSignal(
        kind=kind,
        agent=agent,
        session_id=session_id,
        at=at,
        slo=status.name,
        component=status.component,
        burn_rate=status.burn_rate if math.isfinite(status.burn_rate) else None,
        breach_burn_rate=status.breach_burn_rate,
        slo_status=status,
    )
