"""The latency guide's low-latency voice agent, instrumented with lk_observe.

Prewarmed Silero VAD, streaming STT (Deepgram nova-3), a fast LLM (gpt-4.1-mini; Groq in the
"ultra" profile), fast TTS (Cartesia sonic), VAD turn detection tuned by a preset, preemptive
generation on. lk_observe adds a trace and metrics per turn, rolling percentiles, and the ops app
(/health, /ready, /metrics, /metrics/latency, /slo) on port 8080.

Running it needs a LiveKit server and API keys in the environment: LIVEKIT_URL,
LIVEKIT_API_KEY, LIVEKIT_API_SECRET, DEEPGRAM_API_KEY, OPENAI_API_KEY, CARTESIA_API_KEY
(GROQ_API_KEY / ELEVEN_API_KEY for the other profiles; see deploy/.env.example).

    pip install "/path/to/lk_observe[example]"      # the repository (not on PyPI) + plugins
    python -m livekit.agents download-files          # model files, once (the image does it)
    python -m livekit.agents start examples/agent.py  # or: python examples/agent.py dev

Every plugin is optional: the module imports, and builds its session, with any subset. The
installed ones are imported at start-up on the main thread (where LiveKit registers plugins);
a provider whose plugin is missing is reached through LiveKit Inference by the same
"provider/model" name (with the LiveKit credentials), and without livekit-plugins-silero the
Silero VAD bundled with livekit-agents is used. Traces go to OTLP through
lk_observe.configure_tracing() when OTEL_EXPORTER_OTLP_ENDPOINT is set (http/protobuf, port 4318,
unless OTEL_EXPORTER_OTLP_PROTOCOL=grpc).

Budget signals: when turns keep overrunning the LLM's share of the latency budget, or an SLO of
this agent starts burning, lk_observe tells the session (`on_budget`, on the agent's loop) and
`SwitchToFasterLLM` swaps the running agent's LLM for the next faster profile's (fast -> ultra,
balanced -> fast) with LiveKit's `Agent.update_options(llm=...)`, mid-call.

Settings (environment): AGENT_NAME (metrics label, default "voice-agent"), AGENT_SPEED
(ultra | fast | balanced, default fast), AGENT_VAD_PRESET (fast_qa | conversation | noisy |
thoughtful; unset or empty: the profile's), LK_OBSERVE_HOST (default 127.0.0.1; 0.0.0.0 in a pod so
the kubelet can probe), LK_OBSERVE_PORT (default 8080).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
from collections.abc import Callable
from typing import Any, Literal

from livekit.agents import (
    Agent,
    AgentServer,
    AgentSession,
    JobContext,
    JobProcess,
    cli,
    telemetry,
    vad,
)
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import lk_observe
from lk_observe import (
    DEFAULT_SPEED_PROFILE,
    BudgetSignal,
    Server,
    SpeedProfile,
    VADPreset,
    speed_profile,
    vad_preset,
)

logger = logging.getLogger("voice-agent")

AGENT_NAME = os.environ.get("AGENT_NAME", "voice-agent")
INSTRUCTIONS = (
    "You are a helpful voice assistant. Answer in one or two short sentences: "
    "every extra sentence is more audio to synthesise before the user hears the end."
)

Kind = Literal["stt", "llm", "tts"]
_EXPORT_TIMEOUT_S = 2

# provider -> (plugin module, class) per component; anything else goes through LiveKit Inference
_PLUGINS: dict[tuple[Kind, str], tuple[str, str]] = {
    ("stt", "deepgram"): ("livekit.plugins.deepgram", "STT"),
    ("llm", "openai"): ("livekit.plugins.openai", "LLM"),
    ("llm", "groq"): ("livekit.plugins.groq", "LLM"),
    ("tts", "cartesia"): ("livekit.plugins.cartesia", "TTS"),
    ("tts", "elevenlabs"): ("livekit.plugins.elevenlabs", "TTS"),
}


_SILERO = "livekit.plugins.silero"


async def _flush(provider: TracerProvider | None) -> None:
    """Export the call's last turns before the process goes: off the loop, and bounded, so a
    dead collector costs spans, not a stuck shutdown."""
    await asyncio.to_thread(lk_observe.flush, _EXPORT_TIMEOUT_S)
    if provider is not None:
        await asyncio.to_thread(lk_observe.flush_tracing, provider, _EXPORT_TIMEOUT_S)


def import_installed_plugins() -> list[str]:
    """Import the installed plugins this agent can use, now, on the main thread.

    LiveKit registers a plugin when it is imported and only on the main thread; registered
    plugins are preloaded into the job processes and seen by `download-files`. Missing ones are
    skipped: the agent falls back to LiveKit Inference for them.
    """
    imported = []
    for name in dict.fromkeys([_SILERO, *(module for module, _ in _PLUGINS.values())]):
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        imported.append(name)
    return imported


def _setting(name: str) -> str | None:
    # an empty value (`AGENT_VAD_PRESET=` in .env.example) means "the default", as unset does
    return os.environ.get(name, "").strip() or None


def selected_profile() -> SpeedProfile:
    return speed_profile(_setting("AGENT_SPEED") or DEFAULT_SPEED_PROFILE)


def selected_preset(profile: SpeedProfile | None = None) -> VADPreset:
    profile = profile or selected_profile()
    return vad_preset(_setting("AGENT_VAD_PRESET") or profile.vad_preset)


def plugin_class(kind: Kind, model: str) -> Any | None:
    """The installed plugin class serving `model` ("provider/model"), or None."""
    provider = model.partition("/")[0]
    where = _PLUGINS.get((kind, provider))
    if where is None:
        return None
    try:
        module = importlib.import_module(where[0])
    except ImportError:
        return None
    return getattr(module, where[1])


def make_component(kind: Kind, model: str) -> Any:
    """The provider's plugin instance when installed, else the LiveKit Inference model name."""
    cls = plugin_class(kind, model)
    if cls is None:
        logger.info("%s: no plugin installed for %s, using LiveKit Inference", kind, model)
        return model  # AgentSession resolves "provider/model" strings through LiveKit Inference
    return cls(model=model.partition("/")[2])


def load_vad(preset: VADPreset) -> vad.VAD:
    """Silero VAD tuned by `preset`: the plugin when installed, else livekit-agents' bundled one."""
    try:
        silero = importlib.import_module(_SILERO)
    except ImportError:
        from livekit.agents.inference import VAD

        return VAD(**preset.silero_kwargs())
    loaded: vad.VAD = silero.VAD.load(**preset.silero_kwargs())
    return loaded


def build_session(
    vad_model: vad.VAD | None = None,
    *,
    profile: SpeedProfile | None = None,
    preset: VADPreset | None = None,
) -> AgentSession[Any]:
    """The guide's low-latency AgentSession (nothing connects until start())."""
    profile = profile or selected_profile()
    preset = preset or selected_preset(profile)
    return AgentSession(
        stt=make_component("stt", profile.stt),
        llm=make_component("llm", profile.llm),
        tts=make_component("tts", profile.tts),
        vad=vad_model if vad_model is not None else load_vad(preset),
        turn_handling={
            # VAD turn detection: no turn-detector model to download, decisions in ~preset time
            "turn_detection": "vad",
            "endpointing": {
                "min_delay": preset.min_endpointing_delay,
                "max_delay": preset.max_endpointing_delay,
            },
            # start the LLM at the final transcript, before the end-of-turn decision
            "preemptive_generation": {"enabled": True},
        },
    )


class Assistant(Agent):
    def __init__(self) -> None:
        super().__init__(instructions=INSTRUCTIONS)


# the profile to fall back to when the LLM is too slow; "ultra" has nothing faster
FASTER_PROFILE = {"balanced": "fast", "fast": "ultra"}
SLOW_LLM_TURNS_BEFORE_SWITCH = 2


class SwitchToFasterLLM:
    """lk_observe's `on_budget` hook: swap the running agent's LLM for a faster one after
    `after` turns whose LLM time to first token overran its budget, or at once when an SLO of
    this agent starts burning (every session of the agent hears it). Once per session; it runs
    on the agent's loop, so it may touch the session directly."""

    def __init__(
        self,
        session: AgentSession[Any],
        faster_llm: Callable[[], Any],
        *,
        after: int = SLOW_LLM_TURNS_BEFORE_SWITCH,
    ) -> None:
        self._session = session
        self._faster_llm = faster_llm  # built only when needed
        self.after = after
        self.slow_llm_turns = 0
        self.switched = False

    def __call__(self, signal: BudgetSignal) -> None:
        if signal.kind == "slo_recovered":
            logger.info("SLO %s recovered: burn rate %.2f", signal.slo, signal.burn_rate or 0.0)
            return
        if signal.kind == "turn_over_budget":
            if signal.over("llm_ttft") <= 0:
                return  # another stage was slow: a faster LLM would not help
            self.slow_llm_turns += 1
            if self.slow_llm_turns < self.after:
                return
            reason = f"{self.slow_llm_turns} turns over the LLM budget"
        else:
            reason = f"SLO {signal.slo} burning at {signal.burn_rate or 0.0:.1f}x"
        if self.switched:
            return
        self.switched = True
        # the agent running now (a handoff changes it); the next LLM request uses the new model
        self._session.current_agent.update_options(llm=self._faster_llm())
        logger.warning("switched to a faster LLM: %s", reason)


def budget_reaction(
    session: AgentSession[Any], profile: SpeedProfile | None = None
) -> SwitchToFasterLLM | None:
    """The `on_budget` hook for `profile`'s session; None when no profile is faster."""
    faster = FASTER_PROFILE.get((profile or selected_profile()).name)
    if faster is None:
        return None
    faster_llm = speed_profile(faster).llm
    return SwitchToFasterLLM(session, lambda: make_component("llm", faster_llm))


def make_tracer_provider() -> TracerProvider | None:
    """lk_observe's OTLP provider (bounded, counted exports) when the standard OTEL_* variables
    name a collector; protocol, timeout and queue come from the same variables."""
    if not (
        _setting("OTEL_EXPORTER_OTLP_ENDPOINT") or _setting("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        return None
    return lk_observe.configure_tracing()


def setup_tracing() -> TracerProvider | None:
    """The app (not the library) picks the global provider, once per job process."""
    provider = make_tracer_provider()
    if provider is not None:
        trace.set_tracer_provider(provider)
        # LiveKit's own spans (agent_turn, ...) go to the same place, so voice.turn links to
        # them; without transcripts unless LIVEKIT_TELEMETRY_ALLOW_PII says otherwise
        allow_pii = None if "LIVEKIT_TELEMETRY_ALLOW_PII" in os.environ else False
        telemetry.set_tracer_provider(provider, allow_pii=allow_pii)
    return provider


def prewarm(proc: JobProcess) -> None:
    """Once per job process, before any call: nothing here lands on the first turn's clock."""
    proc.userdata["tracer_provider"] = setup_tracing()
    proc.userdata["vad"] = load_vad(selected_preset())


INSTALLED_PLUGINS = import_installed_plugins()
server = AgentServer(setup_fnc=prewarm)
_registered = False
_ops: Server | None = None


async def livekit_registered() -> bool:
    """Readiness: the worker is registered with LiveKit and can take jobs."""
    return _registered


def _on_registered(*_: Any) -> None:
    global _registered
    _registered = True


def start_ops_server(host: str | None = None, port: int | None = None) -> Server:
    """The ops app (health, readiness, metrics, SLOs) for the whole worker, on its own thread."""
    global _ops
    if _ops is None:
        _ops = lk_observe.serve(
            host=host or os.environ.get("LK_OBSERVE_HOST", "127.0.0.1"),
            port=int(os.environ.get("LK_OBSERVE_PORT", "8080")) if port is None else port,
            checks={"livekit_registered": livekit_registered},
        )
        logger.info("lk_observe ops app on %s", _ops.url)
    return _ops


# The main worker process serves the ops app and aggregates every job process's metrics
# (PROMETHEUS_MULTIPROC_DIR); job processes only record.
server.on("worker_started", lambda *_: start_ops_server())
server.on("worker_registered", _on_registered)


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    session = build_session(ctx.proc.userdata.get("vad"))
    # the same signals are the session event lk_observe.BUDGET_EVENT ("lk_observe_budget")
    lk_observe.instrument(session, agent_name=AGENT_NAME, on_budget=budget_reaction(session))
    ctx.add_shutdown_callback(lambda: _flush(ctx.proc.userdata.get("tracer_provider")))
    await session.start(agent=Assistant(), room=ctx.room)
    session.generate_reply(instructions="Greet the user in one short sentence.")


if __name__ == "__main__":
    cli.run_app(server)
