"""`lk-observe generate`: writes every artifact from one SLO source; --check fails on drift."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lk_observe.cli import generated_files, main
from lk_observe.slo import DEFAULT_SLOS

ROOT = Path(__file__).resolve().parents[2]


def test_committed_artifacts_are_exactly_what_generate_writes() -> None:
    for relative, text in generated_files(DEFAULT_SLOS).items():
        assert (ROOT / relative).read_text(encoding="utf-8") == text, relative
    assert main(["generate", "--check", "--out", str(ROOT)]) == 0


def test_check_fails_on_drift_and_generate_repairs_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["generate", "--out", str(tmp_path)]) == 0
    rules = tmp_path / "alerting" / "lk-observe.rules.yml"
    rules.write_text(rules.read_text() + "# hand edit\n")
    (tmp_path / "dashboards" / "voice-agent-slo.json").unlink()
    assert main(["generate", "--check", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "alerting/lk-observe.rules.yml" in err and "dashboards/voice-agent-slo.json" in err
    assert main(["generate", "--out", str(tmp_path)]) == 0
    assert main(["generate", "--check", "--out", str(tmp_path)]) == 0


def test_a_user_slo_file_changes_rules_and_dashboards_together(tmp_path: Path) -> None:
    slo_file = tmp_path / "slos.yaml"
    slo_file.write_text(
        "slos:\n"
        "  - name: e2e_fast\n"
        "    component: e2e\n"
        "    threshold_s: 0.7\n"
        "    objective: 0.99\n"
        "    severity: page\n"
    )
    out = tmp_path / "out"
    assert main(["generate", "--out", str(out), "--slo", str(slo_file)]) == 0
    rules = (out / "alerting" / "lk-observe.rules.yml").read_text()
    dashboard = (out / "dashboards" / "voice-agent-slo.json").read_text()
    assert "e2e_fast" in rules and 'le="0.7"' in rules
    assert "e2e_fast" in dashboard
    assert "e2e_good" not in rules


def test_a_threshold_that_is_not_a_bucket_edge_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slo_file = tmp_path / "slos.yaml"
    slo_file.write_text(
        "slos:\n  - {name: odd, component: e2e, threshold_s: 0.75, objective: 0.95}\n"
    )
    assert main(["generate", "--out", str(tmp_path / "out"), "--slo", str(slo_file)]) == 2
    assert "bucket edge" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert main(["generate", "--slo", str(tmp_path / "missing.yaml")]) == 2


def test_generate_into_a_copy_of_the_repo_is_a_no_op(tmp_path: Path) -> None:
    for folder in ("dashboards", "alerting", "examples"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)  # what makes it lk_observe's own repository
    assert main(["generate", "--check", "--out", str(tmp_path)]) == 0
    # the repository's deploy example is kept in step with the generated objects
    (tmp_path / "examples" / "deploy" / "k8s" / "podmonitor.yaml").write_text("stale\n")
    assert main(["generate", "--check", "--out", str(tmp_path)]) == 1
