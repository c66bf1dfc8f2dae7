"""The offline modules (SLO specs, rule and dashboard generators, presets) never load the runtime.

Checked on the source, not by importing: importing any lk_observe module runs the package's
__init__, which loads the runtime, so only the modules' own import statements can tell.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lk_observe"
OFFLINE = ("turns", "promql", "presets", "slo", "rules", "dashboards")
RUNTIME_PACKAGES = {"livekit", "opentelemetry", "prometheus_client", "fastapi"}


def imported_modules(tree: ast.Module) -> Iterator[str]:
    """Every module an import statement names, wherever it stands (functions, TYPE_CHECKING)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports would hide what is imported"
            assert node.module is not None
            yield node.module
            if node.module == "lk_observe":  # `from lk_observe import x`: x may be a module
                yield from (f"lk_observe.{alias.name}" for alias in node.names)


def forbidden(module: str) -> bool:
    top, _, rest = module.partition(".")
    if top in RUNTIME_PACKAGES:
        return True
    # lk_observe itself only through other offline modules: its __init__ is the runtime
    return top == "lk_observe" and rest.split(".")[0] not in OFFLINE


@pytest.mark.parametrize("name", OFFLINE)
def test_offline_module_imports_nothing_of_the_runtime(name: str) -> None:
    tree = ast.parse((PACKAGE / f"{name}.py").read_text(encoding="utf-8"))
    bad = sorted({m for m in imported_modules(tree) if forbidden(m)})
    assert not bad, f"lk_observe/{name}.py imports runtime modules: {bad}"


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ("from lk_observe.monitor import LatencyMonitor", ["lk_observe.monitor"]),
        ("import prometheus_client.core", ["prometheus_client.core"]),
        ("def f():\n    from opentelemetry import trace", ["opentelemetry"]),
        ("from lk_observe import metrics", ["lk_observe", "lk_observe.metrics"]),
        ("from lk_observe.promql import num\nimport yaml", []),
    ],
)
def test_the_check_sees_each_way_of_importing(source: str, bad: list[str]) -> None:
    found = sorted(m for m in imported_modules(ast.parse(source)) if forbidden(m))
    assert found == bad
