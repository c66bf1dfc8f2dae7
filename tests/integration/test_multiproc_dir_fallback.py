"""A missing or unwritable PROMETHEUS_MULTIPROC_DIR never raises into the agent.

prometheus_client picks file-backed values when it is imported with the variable set, and then
every metric it creates opens a file in that directory. Each case runs in a fresh interpreter
(the choice is made at import), as LiveKit's worker and the container image set it.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

WARNING = "PROMETHEUS_MULTIPROC_DIR="

INSTRUMENT = """
import json
import lk_observe
from prometheus_client import REGISTRY, generate_latest, values

class Session:
    def emit(self, event, *args):
        pass

file_backed = values.ValueClass is not values.MutexValue  # decided at import
handle = lk_observe.instrument(Session(), agent_name="probe")
print(json.dumps({"file_backed_at_import": file_backed, "active": handle.active,
                  "file_backed_now": values.ValueClass is not values.MutexValue,
                  "exposition": generate_latest(REGISTRY).decode()}))
"""


def run(
    code_or_args: list[str], directory: Path, *, read_only: bool = False
) -> subprocess.CompletedProcess[str]:
    # root ignores mode bits; without CAP_DAC_OVERRIDE it obeys them like any agent user
    prefix = ["setpriv", "--bounding-set=-dac_override"] if read_only and os.geteuid() == 0 else []
    return subprocess.run(
        [*prefix, sys.executable, *code_or_args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "PYTHONUNBUFFERED": "1"},
        check=False,
    )


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    yield directory
    directory.chmod(stat.S_IRWXU)  # so the tmp dir can be cleaned up


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if WARNING in line]


def test_a_missing_directory_is_created_and_metrics_are_shared(tmp_path: Path) -> None:
    directory = tmp_path / "not" / "there" / "yet"
    done = run(["-c", INSTRUMENT], directory)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["file_backed_at_import"] and report["active"]
    assert warnings_in(done.stderr) == []
    # file-backed: this process's values went to the shared files, not its own registry
    # (its live gauge file went at exit: a finished process's sessions are not active)
    assert sorted(p.name.split("_")[0] for p in directory.glob("*.db")) == [
        "counter",
        "histogram",
    ]
    assert report["file_backed_now"]


@pytest.mark.parametrize("case", ["read_only", "under_a_file"])
def test_an_unusable_directory_falls_back_to_in_process_metrics_with_one_warning(
    case: str, tmp_path: Path, read_only_dir: Path
) -> None:
    if case == "read_only":
        directory = read_only_dir
    else:
        (tmp_path / "a-file").write_text("")
        directory = tmp_path / "a-file" / "metrics"
    done = run(["-c", INSTRUMENT], directory, read_only=case == "read_only")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["file_backed_at_import"] and report["active"]
    [warning] = warnings_in(done.stderr)
    assert "cannot be used" in warning and str(directory) in warning
    assert "Traceback" not in done.stderr
    # in-process values from then on: this process's own /metrics (its REGISTRY) has them
    assert not report["file_backed_now"]
    assert 'voice_agent_sessions_total{agent="probe"} 1.0' in report["exposition"]
    if case == "read_only":
        assert list(read_only_dir.iterdir()) == []


@pytest.mark.parametrize("case", ["missing", "read_only"])
def test_the_demo_runs_with_a_missing_or_read_only_directory(
    case: str, tmp_path: Path, read_only_dir: Path
) -> None:
    directory = tmp_path / "missing" if case == "missing" else read_only_dir
    done = run(
        ["-m", "lk_observe.cli", "demo", "--turns=2", "--port=-1", "--no-spans"],
        directory,
        read_only=case == "read_only",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "summary over the session" in done.stdout
    assert "Traceback" not in done.stderr
    if case == "missing":
        assert warnings_in(done.stderr) == []
        assert list(directory.glob("histogram_*.db"))
    else:
        assert len(warnings_in(done.stderr)) == 1
