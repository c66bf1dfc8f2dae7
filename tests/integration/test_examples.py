"""examples/agent.py builds its session offline, and examples/deploy/ hangs together.

The agent's session is built for real (no network, dummy keys): with each provider's plugin when
it is installed, otherwise through LiveKit Inference; tests that need a plugin skip and say so.
The manifests are parsed and cross-checked: probes, ports, labels, selectors, env, volumes.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import re
import shlex
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import httpx
import pytest
import tomllib
import yaml
from livekit.agents import inference
from prometheus_client import CollectorRegistry

import lk_observe
from lk_observe.monitor import LatencyMonitor
from lk_observe.presets import SPEED_PROFILES, VAD_PRESETS, speed_profile

ROOT = Path(__file__).resolve().parents[2]
AGENT_PATH = ROOT / "examples" / "agent.py"
DEPLOY = ROOT / "examples" / "deploy"
K8S = DEPLOY / "k8s"
NAME_LABEL = "app.kubernetes.io/name"

DUMMY_ENV = {
    "LIVEKIT_URL": "ws://127.0.0.1:7880",
    "LIVEKIT_API_KEY": "devkey",
    "LIVEKIT_API_SECRET": "dummy-secret-that-is-long-enough-for-hs256",
    "DEEPGRAM_API_KEY": "dummy",
    "OPENAI_API_KEY": "dummy",
    "CARTESIA_API_KEY": "dummy",
    "GROQ_API_KEY": "dummy",
    "ELEVEN_API_KEY": "dummy",
}
# component -> (plugin module, pip package, plugin class, LiveKit Inference fallback class)
PLUGINS: dict[str, tuple[str, str, str, type[Any]]] = {
    "deepgram": ("livekit.plugins.deepgram", "livekit-plugins-deepgram", "STT", inference.STT),
    "openai": ("livekit.plugins.openai", "livekit-plugins-openai", "LLM", inference.LLM),
    "groq": ("livekit.plugins.groq", "livekit-plugins-groq", "LLM", inference.LLM),
    "cartesia": ("livekit.plugins.cartesia", "livekit-plugins-cartesia", "TTS", inference.TTS),
    "elevenlabs": (
        "livekit.plugins.elevenlabs",
        "livekit-plugins-elevenlabs",
        "TTS",
        inference.TTS,
    ),
}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the livekit.plugins namespace itself is absent
        return False


@pytest.fixture(scope="module")
def agent() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("lk_example_agent", AGENT_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    if module._ops is not None:
        module._ops.stop()
    sys.modules.pop(spec.name, None)


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in DUMMY_ENV.items():
        monkeypatch.setenv(name, value)
    for name in ("AGENT_SPEED", "AGENT_VAD_PRESET", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)


async def built(agent: ModuleType, **kwargs: Any) -> AsyncIterator[Any]:
    session = agent.build_session(**kwargs)
    try:
        yield session
    finally:
        await session.aclose()


# -- the agent ----------------------------------------------------------------------------------


def test_the_module_imports_and_defines_a_discoverable_agent_server(agent: ModuleType) -> None:
    from livekit.agents import AgentServer
    from livekit.agents.cli.discover import get_import_data

    assert isinstance(agent.server, AgentServer)
    assert agent.server.setup_fnc is agent.prewarm
    # `python -m livekit.agents start examples/agent.py` finds the server by this name
    assert get_import_data(path=AGENT_PATH).app_name == "server"


def test_installed_plugins_are_registered_for_download_files(agent: ModuleType) -> None:
    from livekit.agents.plugin import Plugin

    registered = {plugin.package for plugin in Plugin.registered_plugins}
    for module in agent.INSTALLED_PLUGINS:
        assert installed(module)
        assert module in registered
    wanted = ["livekit.plugins.silero", *(where[0] for where in PLUGINS.values())]
    missing = [m for m in wanted if not installed(m)]
    assert sorted(agent.INSTALLED_PLUGINS) == sorted(set(wanted) - set(missing))


async def test_the_session_builds_offline_with_whatever_is_installed(
    agent: ModuleType, keys: None, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = speed_profile("fast")
    async for session in built(agent):
        used = {}
        for kind, model in (("stt", profile.stt), ("llm", profile.llm), ("tts", profile.tts)):
            provider = model.partition("/")[0]
            module, _, cls_name, fallback = PLUGINS[provider]
            component = getattr(session, kind)
            if installed(module):
                assert type(component).__name__ == cls_name
                assert type(component).__module__.startswith(module)
                used[kind] = f"plugin {module}"
            else:
                assert isinstance(component, fallback), kind
                assert component.model == model
                used[kind] = f"LiveKit Inference {model} (plugin not installed)"
        assert session.vad is not None
        assert session.turn_detection == "vad"
    with capsys.disabled():
        print(f"\nexample session built with: {used}")


@pytest.mark.parametrize("provider", sorted(PLUGINS))
async def test_each_providers_plugin_serves_its_component(
    agent: ModuleType, keys: None, provider: str
) -> None:
    module, package, cls_name, _ = PLUGINS[provider]
    if not installed(module):
        pytest.skip(
            f"{package} is not installed: that provider's models go through LiveKit "
            "Inference (checked by test_the_session_builds_offline_with_whatever_is_installed)"
        )
    profile = next(
        p
        for p in SPEED_PROFILES.values()
        if provider in {m.partition("/")[0] for m in (p.stt, p.llm, p.tts)}
    )
    async for session in built(agent, profile=profile):
        kind = cls_name.lower()
        component = getattr(session, kind)
        assert type(component).__module__.startswith(module)
        model = getattr(profile, kind).partition("/")[2]
        assert model in {getattr(component, "model", None), getattr(component._opts, "model", None)}


def test_the_vad_follows_the_preset(agent: ModuleType) -> None:
    for preset in VAD_PRESETS.values():
        vad = agent.load_vad(preset)
        if installed("livekit.plugins.silero"):
            assert type(vad).__module__.startswith("livekit.plugins.silero")
        else:
            assert isinstance(vad, inference.VAD)  # bundled with livekit-agents, offline
        assert vad._opts.min_silence_duration == preset.min_silence_duration
        assert vad._opts.activation_threshold == preset.activation_threshold


@pytest.mark.parametrize("profile", sorted(SPEED_PROFILES))
async def test_every_speed_profile_builds_with_its_presets_endpointing(
    agent: ModuleType, keys: None, monkeypatch: pytest.MonkeyPatch, profile: str
) -> None:
    monkeypatch.setenv("AGENT_SPEED", profile)
    preset = VAD_PRESETS[SPEED_PROFILES[profile].vad_preset]
    async for session in built(agent):
        assert session.options.endpointing["min_delay"] == preset.min_endpointing_delay
        assert session.options.endpointing["max_delay"] == preset.max_endpointing_delay
        assert session.options.preemptive_generation["enabled"] is True


async def test_agent_vad_preset_overrides_the_profiles(
    agent: ModuleType, keys: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_VAD_PRESET", "thoughtful")
    async for session in built(agent):
        assert session.options.endpointing["min_delay"] == 0.8
        assert session.vad._opts.min_silence_duration == 0.6


def test_an_unknown_setting_names_the_known_ones(
    agent: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_SPEED", "warp")
    with pytest.raises(KeyError, match="ultra, fast, balanced"):
        agent.selected_profile()


def test_prewarm_loads_the_vad_into_the_process(
    agent: ModuleType, keys: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_VAD_PRESET", "noisy")
    proc = SimpleNamespace(userdata={})
    agent.prewarm(proc)
    assert proc.userdata["vad"]._opts.activation_threshold == 0.7
    assert proc.userdata["tracer_provider"] is None  # no collector configured, no provider


@pytest.mark.parametrize("setting", ["AGENT_VAD_PRESET", "AGENT_SPEED"])
def test_an_empty_setting_as_env_example_ships_it_means_the_default(
    agent: ModuleType, keys: None, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    monkeypatch.setenv(setting, "")  # `AGENT_VAD_PRESET=` in .env.example
    proc = SimpleNamespace(userdata={})
    agent.prewarm(proc)  # raised KeyError('') before
    profile = speed_profile(lk_observe.DEFAULT_SPEED_PROFILE)
    assert agent.selected_profile() == profile
    assert agent.selected_preset() == VAD_PRESETS[profile.vad_preset]


def test_the_example_deployment_and_env_file_agree_with_configure_tracing(
    agent: ModuleType, deployment: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One protocol everywhere: the agent's provider is configure_tracing()'s, and the
    Deployment and .env.example name the port that protocol's collector listens on."""
    env_file = dict(
        line.split("=", 1)
        for line in (DEPLOY / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    pod = env_of(container)
    ports = {"http/protobuf": "4318", "grpc": "4317"}
    for env in (env_file, pod):
        protocol = env["OTEL_EXPORTER_OTLP_PROTOCOL"]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(":" + ports[protocol])
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            monkeypatch.setenv(name, env[name])
        provider = agent.make_tracer_provider()
        try:
            (entry,) = lk_observe.export_health(provider)["providers"]
            assert entry["protocol"] == protocol  # configure_tracing's, bounded and counted
        finally:
            lk_observe.shutdown_tracing(provider, 1.0)
    assert pod["OTEL_EXPORTER_OTLP_PROTOCOL"] == env_file["OTEL_EXPORTER_OTLP_PROTOCOL"]


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_traces_go_to_otlp_when_a_collector_is_named(
    agent: ModuleType, monkeypatch: pytest.MonkeyPatch, protocol: str
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "voice-agent-test")
    provider = agent.make_tracer_provider()
    try:
        assert provider.resource.attributes["service.name"] == "voice-agent-test"
    finally:
        provider.shutdown()


async def test_a_dead_collector_cannot_hold_up_the_end_of_a_call(
    agent: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    provider = agent.make_tracer_provider()
    try:
        with provider.get_tracer("test").start_as_current_span("voice.turn"):
            pass
        started = time.monotonic()
        await agent._flush(provider)
        assert time.monotonic() - started < 3 * agent._EXPORT_TIMEOUT_S
    finally:
        await asyncio.to_thread(provider.shutdown)


async def test_entrypoint_instruments_the_session_in_two_lines(
    agent: ModuleType, keys: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    sessions: list[Any] = []
    started: list[Any] = []
    real_build = agent.build_session

    def build_and_record(*args: Any, **kwargs: Any) -> Any:
        session = real_build(*args, **kwargs)

        async def start(**start_kwargs: Any) -> None:  # no room to join here
            started.append(start_kwargs)

        session.start = start
        session.generate_reply = lambda **_: None
        sessions.append(session)
        return session

    monkeypatch.setattr(agent, "build_session", build_and_record)
    # the real instrument(), kept off the process-wide registry and monitor other tests read
    isolated = SimpleNamespace(
        instrument=functools.partial(
            lk_observe.instrument, registry=CollectorRegistry(), monitor=LatencyMonitor()
        ),
        flush=lk_observe.flush,
    )
    monkeypatch.setattr(agent, "lk_observe", isolated)
    callbacks: list[Any] = []
    vad = agent.load_vad(VAD_PRESETS["conversation"])
    ctx = SimpleNamespace(
        proc=SimpleNamespace(userdata={"vad": vad, "tracer_provider": None}),
        room=object(),
        add_shutdown_callback=callbacks.append,
    )
    await agent.entrypoint(ctx)
    (session,) = sessions
    try:
        handle = session._lk_observe_handle
        assert handle.active and handle.agent_name == agent.AGENT_NAME
        assert session.vad is vad  # the prewarmed one, not a fresh load
        assert started[0]["room"] is ctx.room
        for callback in callbacks:
            await callback()  # flushes lk_observe off the loop
    finally:
        lk_observe.uninstrument(session)
        await session.aclose()


async def test_the_ops_app_starts_with_the_worker_and_is_ready_once_registered(
    agent: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LK_OBSERVE_HOST", "127.0.0.1")
    monkeypatch.setenv("LK_OBSERVE_PORT", "0")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setattr(agent, "_registered", False)
    monkeypatch.setattr(agent, "_ops", None)
    agent.server.emit("worker_started")
    ops = agent._ops
    assert ops is not None and ops.host == "127.0.0.1"
    try:
        async with httpx.AsyncClient(base_url=ops.url, timeout=5) as client:
            assert (await client.get("/health")).status_code == 200
            not_ready = await client.get("/ready")
            assert not_ready.status_code == 503
            assert not_ready.json()["failing"] == ["livekit_registered"]
            agent.server.emit("worker_registered", "AW_test", None)
            assert (await client.get("/ready")).status_code == 200
            assert (await client.get("/metrics")).status_code == 200
    finally:
        ops.stop()


# -- examples/deploy ----------------------------------------------------------------------------


def load_manifest(name: str) -> dict[str, Any]:
    documents = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    assert len(documents) == 1, name
    document: dict[str, Any] = documents[0]
    return document


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return load_manifest("deployment.yaml")


@pytest.fixture(scope="module")
def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(only)


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return dict(deployment["spec"]["template"]["metadata"]["labels"])


def port_names(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_every_manifest_is_valid_yaml_with_kind_and_name() -> None:
    names = sorted(p.name for p in K8S.glob("*.yaml"))
    assert names == [
        "deployment.yaml",
        "hpa.yaml",
        "podmonitor.yaml",
        "prometheusrule.yaml",  # generated, like podmonitor.yaml, by `lk-observe generate`
        "service.yaml",
    ]
    for name in names:
        manifest = load_manifest(name)
        assert manifest["apiVersion"] and manifest["kind"]
        assert manifest["metadata"]["name"] in ("voice-agent", "lk-observe-slos")


def test_probes_hit_health_and_ready_on_the_exposed_ops_port(container: dict[str, Any]) -> None:
    assert port_names(container) == {"ops": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "ops"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "ops"}
    startup = container.get("startupProbe")
    if startup:
        assert startup["httpGet"]["port"] == "ops"


def test_the_ops_app_listens_where_the_probes_look(container: dict[str, Any]) -> None:
    env = env_of(container)
    assert env["LK_OBSERVE_HOST"] == "0.0.0.0"  # loopback would fail every probe
    assert int(env["LK_OBSERVE_PORT"]) == port_names(container)["ops"]


def test_job_processes_share_metrics_through_a_mounted_directory(
    deployment: dict[str, Any], container: dict[str, Any]
) -> None:
    directory = env_of(container)["PROMETHEUS_MULTIPROC_DIR"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert directory in mounts
    assert "emptyDir" in volumes[mounts[directory]]  # per pod: no stale files from other pods


def test_secrets_come_from_a_secret_and_resources_are_set(container: dict[str, Any]) -> None:
    assert container["envFrom"][0]["secretRef"]["name"]
    for key in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][key])
    env = env_of(container)
    assert not any(re.search(r"KEY|SECRET|TOKEN", name) for name in env), "secrets in plain env"


def test_the_deployment_selects_its_own_pods(deployment: dict[str, Any]) -> None:
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector == {NAME_LABEL: "voice-agent"}
    assert selects(selector, pod_labels(deployment))


def test_the_service_targets_the_ops_port_of_the_pods(
    deployment: dict[str, Any], container: dict[str, Any]
) -> None:
    service = load_manifest("service.yaml")
    assert selects(service["spec"]["selector"], pod_labels(deployment))
    (port,) = service["spec"]["ports"]
    assert port["name"] == "ops" and port["targetPort"] in port_names(container)
    assert port["port"] == 8080


def test_the_hpa_scales_the_deployment() -> None:
    hpa = load_manifest("hpa.yaml")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "voice-agent")
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_the_podmonitor_scrapes_metrics_on_a_port_the_pods_expose(
    deployment: dict[str, Any], container: dict[str, Any]
) -> None:
    monitor = load_manifest("podmonitor.yaml")
    assert monitor["kind"] == "PodMonitor"
    assert selects(monitor["spec"]["selector"]["matchLabels"], pod_labels(deployment))
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in port_names(container)
    assert endpoint["path"] == "/metrics"


def test_the_generated_podmonitor_is_the_same_object() -> None:
    generated_path = ROOT / "alerting" / "kubernetes" / "podmonitor.yaml"
    if not generated_path.exists():
        pytest.skip("alerting/kubernetes/podmonitor.yaml is not generated in this tree")
    generated = yaml.safe_load(generated_path.read_text())
    ours = load_manifest("podmonitor.yaml")
    assert generated["metadata"]["name"] == ours["metadata"]["name"]
    assert generated["spec"]["selector"] == ours["spec"]["selector"]
    ports = {e["port"] for e in generated["spec"]["podMetricsEndpoints"]}
    assert ports == {"ops"}  # the Deployment's named container port
    assert generated["spec"] == ours["spec"]


# -- Dockerfile and .env.example ----------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) as Docker reads them: comment lines dropped, then continuations
    joined (so comments may sit inside a continued instruction)."""
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    out = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_the_image_is_python_slim_and_exposes_the_ops_port(container: dict[str, Any]) -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    exposed = {int(rest) for keyword, rest in instructions if keyword == "EXPOSE"}
    assert exposed == set(port_names(container).values())
    healthcheck = " ".join(rest for keyword, rest in instructions if keyword == "HEALTHCHECK")
    assert "/health" in healthcheck


def test_the_image_prewarms_models_at_build_time_as_the_runtime_user() -> None:
    instructions = dockerfile_instructions()
    runs = [(i, rest) for i, (keyword, rest) in enumerate(instructions) if keyword == "RUN"]
    download = [i for i, rest in runs if "download-files" in rest]
    user = [i for i, (keyword, _) in enumerate(instructions) if keyword == "USER"]
    assert download and user and user[0] < download[0]  # cached in the runtime user's home


def test_the_image_installs_plugins_matching_livekit_agents(container: dict[str, Any]) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("livekit-agents"))
    version = pin.split("==")[1]
    installs = " ".join(
        rest
        for keyword, rest in dockerfile_instructions()
        if keyword == "RUN" and "pip install" in rest
    )
    for package in ("silero", "deepgram", "openai", "cartesia"):
        assert f"livekit-plugins-{package}=={version}" in installs


def test_the_image_runs_the_example_with_the_same_env_as_the_pod(
    container: dict[str, Any],
) -> None:
    instructions = dockerfile_instructions()
    env_line = " ".join(rest for keyword, rest in instructions if keyword == "ENV")
    image_env = dict(
        item.split("=", 1) for item in shlex.split(env_line, comments=True) if "=" in item
    )
    pod_env = env_of(container)
    for name in ("PROMETHEUS_MULTIPROC_DIR", "LK_OBSERVE_HOST", "LK_OBSERVE_PORT"):
        assert image_env[name] == pod_env[name], name
    cmd = next(rest for keyword, rest in instructions if keyword == "CMD")
    assert "examples/agent.py" in cmd
    copied = " ".join(rest for keyword, rest in instructions if keyword == "COPY")
    assert "examples/agent.py" in copied


def test_env_example_lists_every_variable_the_agent_needs() -> None:
    entries = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            entries[name] = value
    needed = {
        "LIVEKIT_URL",
        "LIVEKIT_API_KEY",
        "LIVEKIT_API_SECRET",
        "DEEPGRAM_API_KEY",
        "OPENAI_API_KEY",
        "CARTESIA_API_KEY",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_SERVICE_NAME",
        "PROMETHEUS_MULTIPROC_DIR",
        "LK_OBSERVE_PORT",
        "LK_OBSERVE_HOST",
    }
    read_by_agent = set(
        re.findall(r'(?:os\.environ\.get|_setting)\(\s*"([A-Z_]+)"', AGENT_PATH.read_text())
    )
    read_by_agent -= {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"}  # an alternative, not required
    assert needed | read_by_agent <= set(entries)
    for name, value in entries.items():
        if re.search(r"KEY|SECRET", name):
            assert value == "", f"{name} must be left blank in the example"
