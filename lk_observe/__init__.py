"""lk_observe: latency observability for LiveKit voice agents.

handle = lk_observe.instrument(session)   # one trace per turn, metrics, rolling percentiles
"""

__version__ = "0.1.0"

from lk_observe.instrument import InstrumentHandle, flush, instrument, uninstrument
from lk_observe.monitor import LatencyMonitor, RecentTurns, default_monitor, default_recent_turns
from lk_observe.otlp import configure_tracing, export_health, flush_tracing, shutdown_tracing
from lk_observe.server import add_readiness_check, create_app, serve
from lk_observe.slo import DEFAULT_SLOS, SLO, BurnWindow, SLOEvaluator, SLOStatus, evaluate
from lk_observe.turns import Stage, Turn

__all__ = [
    "DEFAULT_SLOS",
    "SLO",
    "BurnWindow",
    "InstrumentHandle",
    "LatencyMonitor",
    "RecentTurns",
    "SLOEvaluator",
    "SLOStatus",
    "Stage",
    "Turn",
    "__version__",
    "add_readiness_check",
    "configure_tracing",
    "create_app",
    "default_monitor",
    "default_recent_turns",
    "evaluate",
    "export_health",
    "flush",
    "flush_tracing",
    "instrument",
    "serve",
    "shutdown_tracing",
    "uninstrument",
]
