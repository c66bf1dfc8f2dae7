"""Real Prometheus and Alertmanager for tests, on loopback ports, in temp dirs.

The binaries are Debian's (see scripts/setup-prometheus.sh); they are fetched on first use and
never skipped: CI must have them. Typical use:

    from tests import promstack

    with promstack.prometheus(
        {"scrape_configs": [promstack.scrape_job("agent", "127.0.0.1:9100")]},
        rule_files=[Path("alerting/lk-observe.rules.yml")],
    ) as prom:
        prom.wait_for('up{job="agent"} == 1')
        rows = prom.query('sum(rate(voice_agent_latency_seconds_count[1m]))')

    with promstack.alertmanager(am_config_dict) as am:
        ...  # pass am.url as prometheus(..., alertmanager_url=am.url)

`promstack.promtool(*args)` runs promtool (check/test rules, tsdb backfill).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
SETUP_SCRIPT = REPO / "scripts" / "setup-prometheus.sh"
HOST = "127.0.0.1"  # loopback only, always

# Short enough that a test sees a scrape, a rule evaluation and a notification within seconds.
TEST_GLOBAL = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}


@functools.cache
def binaries() -> Path:
    """Directory holding prometheus, promtool, prometheus-alertmanager and amtool.

    Runs scripts/setup-prometheus.sh (idempotent, cached under .cache/promstack/) and fails
    loudly if it cannot: these tests are not optional.
    """
    done = subprocess.run(
        ["bash", str(SETUP_SCRIPT)], capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{SETUP_SCRIPT} failed ({done.returncode}):\n{done.stderr}")
    bin_dir = Path(done.stdout.strip().splitlines()[-1])
    for name in ("prometheus", "promtool", "prometheus-alertmanager", "amtool"):
        if not (bin_dir / name).exists():
            raise RuntimeError(f"{name} missing from {bin_dir}")
    return bin_dir


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool with `args`; returns the completed process (check returncode yourself)."""
    return subprocess.run(
        [str(binaries() / "promtool"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )


def free_port() -> int:
    """A loopback port free right now (the OS may hand it out again; callers retry on clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def scrape_job(name: str, *targets: str, path: str = "/metrics") -> dict[str, Any]:
    """A static scrape_configs entry for targets like "127.0.0.1:9100"."""
    return {
        "job_name": name,
        "metrics_path": path,
        "static_configs": [{"targets": list(targets)}],
    }


def http_json(url: str, *, data: bytes | None = None, timeout: float = 5.0) -> Any:
    request = urllib.request.Request(url, data=data)
    if data is not None:
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def query(base_url: str, expr: str, *, at: float | None = None) -> list[dict[str, Any]]:
    """Instant query; returns `data.result` (for vectors: [{"metric": {...}, "value": [t, "v"]}]).

    Raises RuntimeError with Prometheus's own message when the expression is invalid.
    """
    params = {"query": expr}
    if at is not None:
        params["time"] = repr(at)
    body = urllib.parse.urlencode(params).encode()
    try:
        reply = http_json(f"{base_url}/api/v1/query", data=body)
    except urllib.error.HTTPError as exc:
        reply = json.loads(exc.read() or b"{}")
    if reply.get("status") != "success":
        raise RuntimeError(f"query failed: {expr!r}: {reply.get('error', reply)}")
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


def query_exemplars(base_url: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    """/api/v1/query_exemplars over [start, end] (needs `prometheus(..., exemplars=True)`):
    [{"seriesLabels": {...}, "exemplars": [{"labels": {...}, "value": "0.3", "timestamp": t}]}]."""
    body = urllib.parse.urlencode({"query": expr, "start": repr(start), "end": repr(end)})
    try:
        reply = http_json(f"{base_url}/api/v1/query_exemplars", data=body.encode())
    except urllib.error.HTTPError as exc:
        reply = json.loads(exc.read() or b"{}")
    if reply.get("status") != "success":
        raise RuntimeError(f"exemplar query failed: {expr!r}: {reply.get('error', reply)}")
    result: list[dict[str, Any]] = reply["data"]
    return result


@dataclass
class Server:
    """A running Prometheus or Alertmanager; `url` is http://127.0.0.1:<port>."""

    name: str
    url: str
    workdir: Path
    process: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        """host:port, as scrape targets and alertmanager static_configs want it."""
        return self.url.removeprefix("http://")

    def log(self) -> str:
        return (self.workdir / f"{self.name}.log").read_text(errors="replace")

    def query(self, expr: str, *, at: float | None = None) -> list[dict[str, Any]]:
        return query(self.url, expr, at=at)

    def query_exemplars(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        return query_exemplars(self.url, expr, start, end)

    def wait_for(self, expr: str, *, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll `expr` until it returns a non-empty result; raise TimeoutError with the log."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.query(expr)
            if rows:
                return rows
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expr!r} still empty after {timeout}s\n{self.log()[-3000:]}")
            time.sleep(0.2)

    def alerts(self) -> list[dict[str, Any]]:
        """Prometheus only: active (pending and firing) alerts from /api/v1/alerts."""
        alerts: list[dict[str, Any]] = http_json(f"{self.url}/api/v1/alerts")["data"]["alerts"]
        return alerts


def wait_ready(
    url: str, process: subprocess.Popen[bytes], timeout: float, *, interval: float = 0.1
) -> bool:
    """Poll `url`/-/ready until it answers 200 (True), the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(interval)
    return False


def _wait_ready(server: Server, timeout: float) -> None:
    if wait_ready(server.url, server.process, timeout):
        return
    if server.process.poll() is not None:
        raise RuntimeError(f"{server.name} exited ({server.process.returncode}):\n{server.log()}")
    raise TimeoutError(f"{server.name} not ready after {timeout}s:\n{server.log()}")


@contextmanager
def _run(
    name: str, argv_for_port: Callable[[int], list[str]], workdir: Path, timeout: float
) -> Iterator[Server]:
    """Start `argv_for_port(port)`, retrying on a port clash, and stop it on exit."""
    last_error: Exception | None = None
    for _attempt in range(3):
        port = free_port()
        log = (workdir / f"{name}.log").open("wb")
        process = subprocess.Popen(
            argv_for_port(port), stdout=log, stderr=subprocess.STDOUT, cwd=workdir
        )
        server = Server(name=name, url=f"http://{HOST}:{port}", workdir=workdir, process=process)
        try:
            _wait_ready(server, timeout)
        except (RuntimeError, TimeoutError) as exc:
            last_error = exc
            stop(process)
            log.close()
            if "address already in use" not in server.log():
                raise
            continue
        try:
            yield server
        finally:
            stop(process)
            log.close()
        return
    raise RuntimeError(f"{name} could not get a port") from last_error


def stop(process: subprocess.Popen[bytes]) -> None:
    """Terminate, then kill after 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _load(config: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    loaded = yaml.safe_load(Path(config).read_text())
    return dict(loaded or {})


@contextmanager
def prometheus(
    config: Mapping[str, Any] | str | os.PathLike[str],
    rule_files: Sequence[str | os.PathLike[str]] = (),
    *,
    alertmanager_url: str | None = None,
    resend_delay: str = "1s",
    extra_args: Sequence[str] = (),
    exemplars: bool = False,
    timeout: float = 30.0,
) -> Iterator[Server]:
    """A Prometheus with `config` (dict or YAML path) and `rule_files`, ready to query.

    Missing `global` keys get test speeds (1s scrape and evaluation). `rule_files` replace any in
    the config (absolute paths). With `alertmanager_url`, alerts go there, resent every
    `resend_delay` (the 1m default would drop the first minute of alerts: rules evaluate before
    Prometheus has found the Alertmanager). `exemplars` turns on exemplar storage (a feature
    flag) for `query_exemplars`. Storage is a fresh temp dir, removed on exit.
    """
    cfg = _load(config)
    cfg["global"] = {**TEST_GLOBAL, **dict(cfg.get("global") or {})}
    if rule_files:
        cfg["rule_files"] = [str(Path(p).resolve()) for p in rule_files]
    if alertmanager_url is not None:
        target = alertmanager_url.removeprefix("http://").rstrip("/")
        cfg["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [target]}]}]}
    bin_dir = binaries()
    with tempfile.TemporaryDirectory(prefix="promstack-prom-") as tmp:
        workdir = Path(tmp)
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

        def argv(port: int) -> list[str]:
            return [
                str(bin_dir / "prometheus"),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address={HOST}:{port}",
                f"--rules.alert.resend-delay={resend_delay}",
                *(["--enable-feature=exemplar-storage"] if exemplars else []),
                *extra_args,
            ]

        with _run("prometheus", argv, workdir, timeout) as server:
            yield server


@contextmanager
def alertmanager(
    config: Mapping[str, Any] | str | os.PathLike[str], *, timeout: float = 30.0
) -> Iterator[Server]:
    """An Alertmanager with `config` (dict or YAML path), clustering off, ready for alerts.

    Needs Debian's default template at /usr/share/prometheus/alertmanager/default.tmpl, which
    scripts/setup-prometheus.sh installs (Alertmanager refuses to start without it).
    """
    cfg = _load(config)
    bin_dir = binaries()
    with tempfile.TemporaryDirectory(prefix="promstack-am-") as tmp:
        workdir = Path(tmp)
        config_path = workdir / "alertmanager.yml"
        config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

        def argv(port: int) -> list[str]:
            return [
                str(bin_dir / "prometheus-alertmanager"),
                f"--config.file={config_path}",
                f"--storage.path={workdir / 'data'}",
                f"--web.listen-address={HOST}:{port}",
                "--cluster.listen-address=",  # no gossip port: a lone instance on loopback
            ]

        with _run("alertmanager", argv, workdir, timeout) as server:
            yield server
