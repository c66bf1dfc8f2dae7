"""lk-observe: latency observability for LiveKit voice agents (demo | generate | serve)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import math
import os
import random
import signal
import sys
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from lk_observe import __version__
from lk_observe.slo import DEFAULT_SLOS, SLO, SLOFile, read_slo_file, slo_warnings
from lk_observe.turns import (
    BREAKDOWN_PARTS,
    BREAKDOWN_TITLES,
    COMPONENTS,
    TIERS,
    Turn,
    component_model,
)

if TYPE_CHECKING:
    from lk_observe.demo import ScriptedTurn, SimulatedModel
    from lk_observe.monitor import LatencyMonitor
    from lk_observe.presets import ModelKind, ModelLatency
    from lk_observe.rules import AlertOptions


# -- generate ----------------------------------------------------------------------------------


def generated_files(
    slos: Sequence[SLO], options: AlertOptions | None = None, *, examples: bool = True
) -> dict[str, str]:
    """Every generated artifact, by path relative to the project root; `examples`: also the
    deploy example's copies of the operator manifests (lk_observe's own repository only)."""
    from lk_observe.dashboards import render_dashboards
    from lk_observe.rules import DEFAULT_ALERT_OPTIONS, OPERATOR_MANIFESTS, render_alerting_files

    files = {f"dashboards/{name}": text for name, text in render_dashboards(slos).items()}
    alerting = render_alerting_files(slos, options or DEFAULT_ALERT_OPTIONS)
    files.update({f"alerting/{name}": text for name, text in alerting.items()})
    if examples:  # the deploy example ships the same operator manifests: both stay in step
        for manifest in OPERATOR_MANIFESTS:
            files[f"examples/deploy/k8s/{PurePosixPath(manifest).name}"] = alerting[manifest]
    return files


def is_lk_observe_repository(root: Path) -> bool:
    """True for lk_observe's own source tree, the one place that ships examples/deploy/."""
    import tomllib

    try:
        project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    name = project.get("project", {}).get("name")
    return name == "lk-observe" and (root / "examples" / "deploy" / "k8s").is_dir()


def cmd_generate(args: argparse.Namespace) -> int:
    from lk_observe.rules import RUNBOOK_BASE_URL, AlertOptions

    try:
        spec = read_slo_file(args.slo) if args.slo else SLOFile()
        url = args.runbook_url or spec.runbook_base_url or RUNBOOK_BASE_URL
        if not url.startswith(("https://", "http://")):
            raise ValueError(f"--runbook-url must be an http(s) URL, got {url!r}")
        options = AlertOptions(
            runbook_base_url=url,
            kubernetes_labels=spec.kubernetes_labels,
            kubernetes_namespace=spec.kubernetes_namespace,
        )
    except (OSError, ValueError) as exc:
        print(f"lk-observe generate: {exc}", file=sys.stderr)
        return 2
    for slo in spec.slos:
        for warning in slo_warnings(slo):
            print(f"lk-observe generate: warning: {warning}", file=sys.stderr)
    out = Path(args.out)
    files = generated_files(spec.slos, options, examples=is_lk_observe_repository(out))
    drifted: list[str] = []
    for relative, text in sorted(files.items()):
        path = out / relative
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if args.check:
            drifted.append(relative)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    if drifted:
        print("generated files differ from the code; run `lk-observe generate`:", file=sys.stderr)
        for relative in drifted:
            print(f"  {relative}", file=sys.stderr)
        return 1
    if args.check:
        print("dashboards/ and alerting/ match the generator")
    return 0


# -- serve -------------------------------------------------------------------------------------


def multiproc_dir_problem() -> str | None:
    """Why PROMETHEUS_MULTIPROC_DIR cannot work for the ops app, or None (unset is no problem:
    serve says so as a note)."""
    from lk_observe.multiprocess import MULTIPROC_ENV

    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return None
    if not os.path.isdir(path):
        what = "does not exist (yet)" if not os.path.exists(path) else "is not a directory"
    elif not os.access(path, os.W_OK | os.X_OK):
        what = "is not writable by this process"
    else:
        return None
    return (
        f"{MULTIPROC_ENV}={path} {what}: until it is a writable directory, job processes "
        "cannot share their metrics, /metrics shows only this process and /ready fails its "
        "metrics_multiproc_dir check. Create it, writable by the agent, before the worker starts."
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from lk_observe.multiprocess import MULTIPROC_ENV
    from lk_observe.server import serve

    problem = multiproc_dir_problem()
    if problem is not None:
        print(f"warning: {problem}", file=sys.stderr)
    elif not os.environ.get(MULTIPROC_ENV):
        note = f"note: {MULTIPROC_ENV} is not set: /metrics shows only this process"
        print(note, file=sys.stderr)
    try:
        server = serve(host=args.host, port=args.port)
    except OSError as exc:
        print(f"cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before saying so: a Ctrl-C must stop cleanly
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving the ops app on {server.url} (Ctrl-C stops)", flush=True)
    stop.wait()
    server.stop()
    return 0


# -- demo --------------------------------------------------------------------------------------

# a well-tuned agent (the guide's fastest stack): within budget but for the script's slow turns
DEMO_SPEED_PROFILE = "ultra"
# The provider each stage is compared with (A/B) in the demo: the first of these that is not
# the speed profile's own model, so both sides are in the guide's latency map.
DEMO_CHALLENGERS: dict[ModelKind, tuple[str, ...]] = {
    "stt": ("assemblyai/universal-streaming", "deepgram/nova-3"),
    "llm": ("openai/gpt-4.1-mini", "groq/llama-3.1-8b-instant"),
    "tts": ("elevenlabs/eleven_flash_v2_5", "cartesia/sonic-2"),
}


def demo_models(speed: str) -> dict[ModelKind, tuple[ModelLatency, ModelLatency]]:
    """The two models each stage's requests are split between in the demo: the speed
    profile's own (A) and a challenger with another latency profile (B)."""
    from lk_observe.presets import model_latency, speed_profile

    profile = speed_profile(speed)
    pairs: dict[ModelKind, tuple[ModelLatency, ModelLatency]] = {}
    chosen: tuple[tuple[ModelKind, str], ...] = (
        ("stt", profile.stt),
        ("llm", profile.llm),
        ("tts", profile.tts),
    )
    for kind, own in chosen:
        mine = model_latency(own, kind)
        other = next(name for name in DEMO_CHALLENGERS[kind] if name != mine.name)
        pairs[kind] = (mine, model_latency(other, kind))
    return pairs


def simulated(model: ModelLatency) -> SimulatedModel:
    """The demo's stand-in for a model of the latency map: "sim-<provider>", same model name."""
    from lk_observe.demo import SimulatedModel

    return SimulatedModel(f"sim-{model.provider}", model.model)


def demo_greeting(speed: str) -> ScriptedTurn:
    """The agent's greeting, by each stage's first provider at its typical latency."""
    from lk_observe.demo import ScriptedTurn

    pairs = demo_models(speed)
    llm, tts = pairs["llm"][0], pairs["tts"][0]
    llm_ttft = round(sum(llm.typical_ms) / 2000, 3)
    return ScriptedTurn(
        reply_audio_s=0.8,
        llm_ttft_s=llm_ttft,
        llm_total_s=llm_ttft + 0.2,
        tts_ttfb_s=round(sum(tts.typical_ms) / 2000, 3),
        llm_model=simulated(llm),
        tts_model=simulated(tts),
    )


def demo_script(turns: int, seed: int, *, preset: str, speed: str) -> list[ScriptedTurn]:
    """Scripted turns whose delays come from the guide: the VAD preset's silence window and the
    typical latency of the model serving each stage, with jitter, an occasional slow LLM turn,
    a tool call and a caller who talks over a reply that takes too long. Each stage (STT, LLM,
    TTS) splits the turns evenly, at random, between two simulated providers (`demo_models`),
    as an A/B test does."""
    from lk_observe.demo import ScriptedTurn
    from lk_observe.presets import vad_preset

    vad = vad_preset(preset)
    pairs = demo_models(speed)
    rng = random.Random(seed)
    split: dict[ModelKind, list[int]] = {}
    for kind in pairs:  # which of the two serves each turn: half each, shuffled
        split[kind] = [i % 2 for i in range(turns)]
        rng.shuffle(split[kind])

    def within(low_ms: float, high_ms: float, spread: float = 1.0) -> float:
        # mostly inside the typical range, now and then a little past it
        return round(rng.uniform(low_ms, high_ms + (high_ms - low_ms) * (spread - 1.0)) / 1000, 3)

    script: list[ScriptedTurn] = []
    for i in range(turns):
        stt, llm, tts = (pairs[kind][split[kind][i]] for kind in ("stt", "llm", "tts"))
        llm_ttft = within(*llm.typical_ms, spread=1.3)
        extra: dict[str, Any] = {}  # ScriptedTurn keyword arguments
        if i % 10 == 7:  # an occasional slow turn: the LLM provider has a bad moment
            llm_ttft = round(rng.uniform(0.9, 1.3), 3)
        if i % 9 == 2:
            extra["tool_s"] = within(60, 150)  # a quick lookup: a slow tool is its own problem
        if i % 11 == 5:  # the caller talks over a reply that is taking too long
            llm_ttft, extra["barge_in_after_s"] = 1.4, 1.0
        script.append(
            ScriptedTurn(
                speech_s=within(600, 1600),
                vad_s=round(vad.min_silence_duration + rng.uniform(0.0, 0.03), 3),
                stt_s=within(*stt.typical_ms, spread=1.2),
                llm_ttft_s=llm_ttft,
                llm_total_s=llm_ttft + 0.4,
                tts_ttfb_s=within(*tts.typical_ms, spread=1.2),
                reply_audio_s=within(700, 1500),
                stt_model=simulated(stt),
                llm_model=simulated(llm),
                tts_model=simulated(tts),
                **extra,
            )
        )
    return script


def _live_table(monitor: LatencyMonitor, agent: str) -> list[str]:
    stats = monitor.get_all_stats(agent=agent)
    lines = [f"  {'component':<15} {'count':>5} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}"]
    for component in COMPONENTS:
        s = stats.get(component)
        if s and s["count"]:
            lines.append(
                f"  {component:<15} {s['count']:>5} {s['median']:>7.1f} {s['p95']:>7.1f} "
                f"{s['p99']:>7.1f} {s['max']:>7.1f}"
            )
    return lines


# the stage spans whose latency belongs to a provider's model: span name -> component
_MODEL_SPANS = {"voice.stt": "stt", "voice.llm": "llm_ttft", "voice.tts": "tts_ttfb"}


def _span_line(span: object, origin: int, depth: int, note: str = "") -> str:
    from opentelemetry.sdk.trace import ReadableSpan

    assert isinstance(span, ReadableSpan)
    assert span.start_time is not None and span.end_time is not None
    offset = (span.start_time - origin) / 1e6
    length = (span.end_time - span.start_time) / 1e6
    line = f"{'  ' * depth}{span.name:<{25 - 2 * depth}} +{offset:7.1f} ms  {length:7.1f} ms"
    return f"{line}  {note}" if note else line


def _span_tree(spans: Sequence[object], turn: Turn) -> list[str]:
    """The turn's spans as an indented waterfall, offsets from the root's start; the STT, LLM
    and TTS spans say which provider's model served them."""
    from opentelemetry.sdk.trace import ReadableSpan

    trace_id = turn.trace_id
    mine = [s for s in spans if isinstance(s, ReadableSpan) and s.context.trace_id == trace_id]
    lines: list[str] = []
    for root in (s for s in mine if s.parent is None):
        assert root.start_time is not None
        lines.append(_span_line(root, root.start_time, 1))
        children = [s for s in mine if s.parent and s.parent.span_id == root.context.span_id]
        for child in sorted(children, key=lambda s: s.start_time or 0):
            names = component_model(turn, _MODEL_SPANS.get(child.name, ""))
            lines.append(_span_line(child, root.start_time, 2, "/".join(names or ())))
    return lines


def _whole_ms(parts: Sequence[tuple[str, float]]) -> list[tuple[str, int]]:
    """The parts in whole milliseconds that still add up to their rounded total (largest
    remainder); parts that round to nothing are left out."""
    total = round(sum(value for _, value in parts))
    floors = [math.floor(value) for _, value in parts]
    order = sorted(range(len(parts)), key=lambda i: floors[i] - parts[i][1])  # largest remainder
    for i in order[: max(total - sum(floors), 0)]:
        floors[i] += 1
    return [(name, ms) for (name, _), ms in zip(parts, floors, strict=True) if ms]


def _format_breakdown(turn: Turn) -> str | None:
    """Why the turn took what it took: e2e's parts in order (ms), with the setting that owns
    a part's wait where there is one."""
    parts = [(p, turn.breakdown_ms[p]) for p in BREAKDOWN_PARTS if p in turn.breakdown_ms]
    if not parts:
        return None
    shown = []
    for part, ms in _whole_ms(parts):
        setting = turn.breakdown_settings.get(part)
        shown.append(f"{part} {ms}" + (f" ({setting})" if setting else ""))
    return f"  e2e {round(sum(v for _, v in parts))} ms = " + " + ".join(shown)


def _summaries(turns: Sequence[Turn]) -> list[dict[str, Any]]:
    from lk_observe.recent import turn_summary

    return [turn_summary(turn) for turn in turns]


def _breakdown_table(turns: Sequence[Turn]) -> list[str]:
    """The mean breakdown of e2e over the turns: each part's mean, its share, its setting."""
    from lk_observe.recent import mean_breakdown

    mean = mean_breakdown(_summaries(turns))
    if not mean["turns"]:
        return []
    e2e: float = mean["e2e_ms"]
    lines = [f"\nwhy it took that long: mean e2e breakdown over {mean['turns']} turns (ms):"]
    for row in mean["parts"]:
        share = row["mean_ms"] / e2e if e2e > 0 else 0.0
        title = BREAKDOWN_TITLES[row["part"]]
        setting = row["setting"] or ""
        lines.append(
            f"  {row['part']:<23} {title:<33} {row['mean_ms']:7.1f} {share:5.0%}  {setting}"
        )
    lines.append(f"  {'e2e':<23} {'End-to-end (the parts add up)':<33} {e2e:7.1f}  100%")
    return [line.rstrip() for line in lines]


def _provider_table(turns: Sequence[Turn]) -> list[str]:
    """p50/p95 of each component per simulated provider's model, as the demo split them."""
    from lk_observe.recent import provider_comparison

    rows = provider_comparison(_summaries(turns))
    if not rows:
        return []
    width = max(len(f"{r['provider']}/{r['model']}") for r in rows)
    lines = [
        "\nproviders compared (each stage split between two simulated providers; ms):",
        f"  {'component':<9} {'provider/model':<{width}} {'turns':>5} {'p50':>7} {'p95':>7}",
    ]
    previous = None
    for r in rows:
        component = r["component"] if r["component"] != previous else ""
        previous = r["component"]
        name = f"{r['provider']}/{r['model']}"
        lines.append(
            f"  {component:<9} {name:<{width}} {r['turns']:>5} {r['p50_ms']:7.1f} "
            f"{r['p95_ms']:7.1f}"
        )
    return lines


def _configure_tracing(console: bool) -> tuple[object, object]:
    """A tracer provider for the demo: OTLP when the standard OTel variables say so, the
    console only when asked (--console-spans), and always a copy for the printed span trees."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    service = os.environ.get("OTEL_SERVICE_NAME", "lk-observe-demo")
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    ):
        from lk_observe.otlp import configure_tracing

        provider = configure_tracing(service_name=service)
        print("exporting spans over OTLP (standard OTEL_EXPORTER_OTLP_* settings)")
    else:
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    if console:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    return provider, memory


def _format_turn(turn: object) -> str:
    assert isinstance(turn, Turn)
    parts = [f"{c}={turn.latency_ms[c]:6.1f}" for c in COMPONENTS if c in turn.latency_ms]
    label = "greeting" if turn.kind == "agent" else (turn.tier or "interrupted")
    flags = " tool" if turn.tool_calls else ""
    flags += " interrupted" if turn.interrupted else ""
    return f"turn {turn.index:3d} [{label:>11}]{flags}  " + "  ".join(parts)


def cmd_demo(args: argparse.Namespace) -> int:
    return asyncio.run(_demo(args))


def silero_installed() -> bool:
    """Whether livekit-plugins-silero (the `silero` extra) can be imported."""
    try:
        return importlib.util.find_spec("livekit.plugins.silero") is not None
    except (ImportError, ValueError):
        return False


def _heard_pipeline(
    script: Sequence[ScriptedTurn], seed: int, preset: str
) -> tuple[Any, Coroutine[Any, Any, Any]]:
    """The demo with real audio: each scripted turn's utterance as a synthetic voice of its
    length, heard by the Silero VAD with the preset's settings; STT, LLM and TTS keep the
    script's delays, and each reply starts with 0-150 ms of silence."""
    from livekit.plugins import silero

    from lk_observe.demo_audio import (
        SpokenTurn,
        build_spoken_pipeline,
        run_spoken_pipeline,
        synthetic_voice,
    )
    from lk_observe.presets import vad_preset

    settings = vad_preset(preset)
    rng = random.Random(seed)
    turns = [
        SpokenTurn(
            synthetic_voice(turn.speech_s, seed=seed * 1000 + i),
            leading_silence_s=round(rng.uniform(0.0, 0.15), 3),
            stt_s=turn.stt_s,
            llm_ttft_s=turn.llm_ttft_s,
            tts_ttfb_s=turn.tts_ttfb_s,
            reply_audio_s=turn.reply_audio_s,
            gap_s=turn.gap_s,
        )
        for i, turn in enumerate(script)
    ]
    vad = silero.VAD.load(
        min_speech_duration=settings.min_speech_duration,
        min_silence_duration=settings.min_silence_duration,
        prefix_padding_duration=settings.prefix_padding_duration,
        activation_threshold=settings.activation_threshold,
    )
    pipeline = build_spoken_pipeline(
        turns,
        vad=vad,
        noise_dbfs=-50.0,
        seed=seed,
        min_endpointing_s=settings.min_endpointing_delay,
        greeting_audio_s=0.8,
    )
    return pipeline.session, run_spoken_pipeline(pipeline)


async def _demo(args: argparse.Namespace) -> int:
    import lk_observe
    from lk_observe.demo import build_pipeline, route_providers, run_pipeline
    from lk_observe.presets import speed_profile, vad_preset
    from lk_observe.server import serve

    provider, memory = _configure_tracing(args.console_spans)
    monitor = lk_observe.LatencyMonitor()
    server = None
    if args.port is not None:
        try:
            server = serve(host=args.host, port=args.port, monitor=monitor)
            print(f"ops app: {server.url}/  (live page; /metrics, /metrics/latency, /slo)")
        except OSError as exc:
            print(f"cannot serve the ops app on port {args.port}: {exc}", file=sys.stderr)
            print("choose another with --port P, or --port -1 for none", file=sys.stderr)
            return 2

    profile = speed_profile(args.speed)
    vad = vad_preset(args.preset or profile.vad_preset)
    total = args.turns
    done: list[lk_observe.Turn] = []

    def on_turn(turn: lk_observe.Turn) -> None:
        done.append(turn)
        user_turns = sum(1 for t in done if t.kind == "user")
        print(f"[{user_turns:>3}/{total}] {_format_turn(turn)}")
        why = _format_breakdown(turn)
        if why is not None:
            print(why)
        if args.spans:
            for line in _span_tree(memory.get_finished_spans(), turn):  # type: ignore[attr-defined]
                print(line)
        if user_turns and user_turns % 5 == 0 and turn.kind == "user":
            print(
                "\n".join(["  rolling 5-minute percentiles (ms):", *_live_table(monitor, "demo")])
            )

    script = demo_script(total, args.seed, preset=vad.name, speed=profile.name)
    models = demo_models(profile.name)
    session: Any
    play: Coroutine[Any, Any, Any]
    if args.vad == "silero" or (args.vad == "auto" and silero_installed()):
        session, play = _heard_pipeline(script, args.seed, vad.name)
        route_providers(session, script, greeting=demo_greeting(profile.name))
        heard_by = (
            "the caller is a synthetic voice over a -50 dBFS noise floor, pushed in 10 ms frames "
            f"at real pace and heard by the real Silero VAD (livekit-plugins-silero, preset "
            f"{vad.name}'s settings); e2e is measured from the audio"
        )
    else:
        pipeline = build_pipeline(
            script,
            greeting=demo_greeting(profile.name),
            min_endpointing_s=vad.min_endpointing_delay,
            min_silence_s=vad.min_silence_duration,
        )
        session, play = pipeline.session, run_pipeline(pipeline)
        heard_by = (
            "scripted VAD (no audio: e2e from LiveKit's timestamps); with the silero extra "
            "(uv run --extra silero lk-observe demo) a voice is heard by the real Silero VAD"
        )
    lk_observe.instrument(
        session,
        agent_name="demo",
        tracer_provider=provider,  # type: ignore[arg-type]
        monitor=monitor,
        on_turn=on_turn,
    )
    print(
        f"scripted voice session: {total} user turns, VAD preset {vad.name}, speed {profile.name}"
        "; no LiveKit server or key needed"
    )
    print("simulated providers: each stage's turns split between two, at random (A/B):")
    for kind, (a, b) in models.items():
        print(f"  {kind}  {simulated(a)} | {simulated(b)}")
    print(f"VAD: {heard_by}")
    task = asyncio.ensure_future(play)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiters: list[asyncio.Future[Any]] = [task, asyncio.ensure_future(stop.wait())]
    if args.duration:
        waiters.append(asyncio.ensure_future(asyncio.sleep(args.duration)))
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters[1:]:
        waiter.cancel()
    if not task.done():
        print("stopping: closing the session")
        await session.aclose()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    await asyncio.to_thread(lk_observe.flush, 10.0)
    await asyncio.sleep(0.05)
    print("\nsummary over the session (ms):")
    print("\n".join(_live_table(monitor, "demo")))
    for slo in DEFAULT_SLOS:
        good, all_turns = monitor.count_at_or_below(slo.component, slo.threshold_ms, agent="demo")
        if all_turns:
            print(
                f"  SLO {slo.name}: {good}/{all_turns} turns within {slo.threshold_ms:.0f} ms "
                f"(objective {slo.objective:.0%})"
            )
    tiers = {tier: sum(1 for t in done if t.tier == tier) for tier in TIERS}
    print(f"  tiers: {tiers}, interrupted: {sum(1 for t in done if t.interrupted)}")
    for line in (*_breakdown_table(done), *_provider_table(done)):
        print(line)
    if server is not None:
        if args.keep_serving and not stop.is_set():
            print(f"serving {server.url}/ until Ctrl-C")
            await stop.wait()
        await asyncio.to_thread(server.stop)
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
    from lk_observe.otlp import shutdown_tracing

    await asyncio.to_thread(shutdown_tracing, provider, 5.0)  # type: ignore[arg-type]
    return 0


# -- entry point -------------------------------------------------------------------------------


def port(text: str, *, allow_none: bool = False) -> int:
    """A TCP port for argparse: 0-65535 (0: any free port), and -1 where "none" is allowed."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if allow_none and value == -1:
        return value
    if not 0 <= value <= 65535:
        extra = ", or -1 for none" if allow_none else ""
        raise argparse.ArgumentTypeError(f"{value} is not a port: use 0-65535 (0: any free){extra}")
    return value


def _demo_port(text: str) -> int:
    return port(text, allow_none=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, but not "(default: None)" or "(default: False)"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or action.default is True:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from lk_observe.presets import SPEED_PROFILES, VAD_PRESETS
    from lk_observe.rules import RUNBOOK_BASE_URL

    parser = argparse.ArgumentParser(
        prog="lk-observe",
        description=__doc__,
        epilog="`lk-observe COMMAND --help` lists each command's options and their defaults.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,generate,serve}")

    demo = sub.add_parser(
        "demo",
        help="run a scripted voice session, instrumented, with the live page",
        description="Play a scripted conversation through a real AgentSession (no LiveKit "
        "server, key or network), print each turn and its trace, serve the ops app.",
        formatter_class=_HelpFormatter,
    )
    demo.add_argument("--turns", type=_positive_int, default=12, help="user turns to play")
    demo.add_argument("--duration", type=_positive_float, default=None, help="stop after S seconds")
    demo.add_argument(
        "--speed",
        choices=sorted(SPEED_PROFILES),
        default=DEMO_SPEED_PROFILE,
        help="speed profile: the STT, LLM and TTS models whose typical latency is played",
    )
    demo.add_argument(
        "--preset",
        choices=sorted(VAD_PRESETS),
        default=None,
        help="VAD preset (default: the speed profile's; ultra: fast_qa)",
    )
    demo.add_argument(
        "--vad",
        choices=("auto", "silero", "scripted"),
        default="auto",
        help="silero: a synthetic voice at real pace through the real Silero VAD (the silero "
        "extra); scripted: no audio, the full script (tool call, barge-in); auto: silero when "
        "installed",
    )
    demo.add_argument("--host", default="127.0.0.1", help="ops app address")
    demo.add_argument(
        "--port", type=_demo_port, default=8080, help="ops app port; 0 = any free, -1 = none"
    )
    demo.add_argument("--seed", type=int, default=7, help="random seed of the script's jitter")
    demo.add_argument("--console-spans", action="store_true", help="also print spans as JSON")
    demo.add_argument("--no-spans", dest="spans", action="store_false", help="omit the span trees")
    demo.add_argument(
        "--keep-serving", action="store_true", help="keep the ops app up after the last turn"
    )
    demo.set_defaults(func=cmd_demo)

    generate = sub.add_parser(
        "generate",
        help="write dashboards/ and alerting/ from SLO specs",
        description="Write Grafana dashboards (dashboards/) and Prometheus rules, examples and "
        "Kubernetes objects (alerting/) from the default SLOs or an SLO file.",
        formatter_class=_HelpFormatter,
    )
    generate.add_argument("--out", default=".", help="directory to write dashboards/ alerting/ in")
    generate.add_argument(
        "--slo", default=None, help="SLO file, YAML or TOML (default: the built-in SLOs)"
    )
    generate.add_argument(
        "--runbook-url",
        default=None,
        help=f"base URL of the runbooks the alerts link (default: the SLO file's "
        f"runbook_base_url, else {RUNBOOK_BASE_URL})",
    )
    generate.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if any file differs"
    )
    generate.set_defaults(func=cmd_generate)

    srv = sub.add_parser(
        "serve",
        help="serve the ops app standalone",
        description="Serve the ops app (/health /ready /metrics /metrics/latency /slo and the "
        "live page) on its own, reading every job process through PROMETHEUS_MULTIPROC_DIR.",
        formatter_class=_HelpFormatter,
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 in a pod")
    srv.add_argument("--port", type=port, default=8080, help="port; 0 = any free")
    srv.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "port", 0) == -1:
        args.port = None
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
