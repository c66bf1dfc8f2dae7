"""lk_observe: latency observability for LiveKit voice agents.

handle = lk_observe.instrument(session)   # one trace per turn, metrics, rolling percentiles

Every name a user imports is here; the submodules are internal.
"""

__version__ = "0.1.0"

from lk_observe.instrument import InstrumentHandle, instrument, uninstrument
from lk_observe.logs import TurnLogger, add_otel_context, redact_pii
from lk_observe.measure import measure_latency
from lk_observe.monitor import LatencyMonitor, default_monitor
from lk_observe.otlp import configure_tracing, export_health, flush_tracing, shutdown_tracing
from lk_observe.presets import (
    DEFAULT_BUDGET,
    DEFAULT_SPEED_PROFILE,
    DEFAULT_VAD_PRESET,
    GUIDE_BUDGET,
    MODEL_LATENCY,
    SPEED_PROFILES,
    VAD_PRESETS,
    BudgetLine,
    LatencyBudget,
    ModelLatency,
    SpeedProfile,
    VADPreset,
    budget_overruns,
    expected_latency,
    known_models,
    model_latency,
    speed_profile,
    vad_preset,
)
from lk_observe.sampling import TraceSampling
from lk_observe.server import Server, add_readiness_check, create_app, serve
from lk_observe.signals import BUDGET_EVENT, BudgetSignal
from lk_observe.sinks import flush
from lk_observe.slo import (
    DEFAULT_SLOS,
    SLO,
    BurnWindow,
    SLOEvaluator,
    SLOFileError,
    SLOStatus,
    evaluate,
    load_slos,
)
from lk_observe.turns import BREAKDOWN_PARTS, BREAKDOWN_TITLES, COMPONENTS, TIERS, Stage, Turn

__all__ = [
    "BREAKDOWN_PARTS",
    "BREAKDOWN_TITLES",
    "BUDGET_EVENT",
    "COMPONENTS",
    "DEFAULT_BUDGET",
    "DEFAULT_SLOS",
    "DEFAULT_SPEED_PROFILE",
    "DEFAULT_VAD_PRESET",
    "GUIDE_BUDGET",
    "MODEL_LATENCY",
    "SLO",
    "SPEED_PROFILES",
    "TIERS",
    "VAD_PRESETS",
    "BudgetLine",
    "BudgetSignal",
    "BurnWindow",
    "InstrumentHandle",
    "LatencyBudget",
    "LatencyMonitor",
    "ModelLatency",
    "SLOEvaluator",
    "SLOFileError",
    "SLOStatus",
    "Server",
    "SpeedProfile",
    "Stage",
    "TraceSampling",
    "Turn",
    "TurnLogger",
    "VADPreset",
    "__version__",
    "add_otel_context",
    "add_readiness_check",
    "budget_overruns",
    "configure_tracing",
    "create_app",
    "default_monitor",
    "evaluate",
    "expected_latency",
    "export_health",
    "flush",
    "flush_tracing",
    "instrument",
    "known_models",
    "load_slos",
    "measure_latency",
    "model_latency",
    "redact_pii",
    "serve",
    "shutdown_tracing",
    "speed_profile",
    "uninstrument",
    "vad_preset",
]
