"""The generated dashboards type-check against Grafana's own schema (npm @grafana/schema, tsc)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from lk_observe.dashboards import render_dashboards
from lk_observe.slo import DEFAULT_SLOS

REPO = Path(__file__).resolve().parents[2]
SCHEMA_DIR = REPO / "tools" / "grafana-schema"


def test_generated_json_type_checks_against_grafana_schema(tmp_path: Path) -> None:
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("Node.js/npm not installed; the schema check needs them")
    setup = subprocess.run(
        [str(REPO / "scripts" / "setup-grafana-schema.sh")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert setup.returncode == 0, setup.stderr
    for name, text in render_dashboards(DEFAULT_SLOS).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    check = subprocess.run(
        ["node", str(SCHEMA_DIR / "check.mjs"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_schema_check_rejects_an_unknown_key(tmp_path: Path) -> None:
    if shutil.which("node") is None or not (SCHEMA_DIR / "node_modules").is_dir():
        pytest.skip("run scripts/setup-grafana-schema.sh first")
    board = json.loads(render_dashboards(DEFAULT_SLOS)["voice-agent-overview.json"])
    board["panels"][0]["fieldConfig"]["defaults"]["thresholds"]["mode"] = "absolutely"
    board["templating"]["list"][0]["refreshh"] = 1
    (tmp_path / "broken.json").write_text(json.dumps(board), encoding="utf-8")
    check = subprocess.run(
        ["node", str(SCHEMA_DIR / "check.mjs"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 1
    assert '"absolutely"' in check.stderr
