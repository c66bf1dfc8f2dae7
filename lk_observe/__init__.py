"""lk_observe: latency observability for LiveKit voice agents.

handle = lk_observe.instrument(session)   # one trace per turn, metrics, rolling percentiles

Every name a user imports is here; the submodules are internal.
"""

__version__ = "0.1.0"

from lk_observe.instrument import InstrumentHandle, instrument, uninstrument
from lk_observe.logs import TurnLogger, add_otel_context, redact_pii
from lk_observe.monitor import LatencyMonitor, default_monitor
from lk_observe.otlp import configure_tracing, export_health, flush_tracing, shutdown_tracing
from lk_observe.server import Server, add_readiness_check, create_app, serve
from lk_observe.sinks import flush
from lk_observe.slo import DEFAULT_SLOS, SLO, BurnWindow, SLOEvaluator, SLOStatus, evaluate
from lk_observe.turns import Stage, Turn

__all__ = [
    "DEFAULT_SLOS",
    "SLO",
    "BurnWindow",
    "InstrumentHandle",
    "LatencyMonitor",
    "SLOEvaluator",
    "SLOStatus",
    "Server",
    "Stage",
    "Turn",
    "TurnLogger",
    "__version__",
    "add_otel_context",
    "add_readiness_check",
    "configure_tracing",
    "create_app",
    "default_monitor",
    "evaluate",
    "export_health",
    "flush",
    "flush_tracing",
    "instrument",
    "redact_pii",
    "serve",
    "shutdown_tracing",
    "uninstrument",
]
