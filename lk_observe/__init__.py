"""lk_observe: latency observability for LiveKit voice agents."""

__version__ = "0.1.0"
