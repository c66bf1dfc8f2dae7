"""The docs are true and stand on their own: every link resolves inside the repository, every
default they state is the code's, every demo flag is listed, and the install commands work."""

from __future__ import annotations

import ast
import inspect
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

import lk_observe
from lk_observe.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
README = (ROOT / "README.md").read_text(encoding="utf-8")
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE):
        text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
        found.add(text.replace(" ", "-"))
    return found


def test_no_document_or_docstring_refers_to_a_file_the_repository_does_not_have() -> None:
    sources = [*DOCS, *(ROOT / "lk_observe").rglob("*.py"), ROOT / "examples" / "agent.py"]
    offenders = [str(p.relative_to(ROOT)) for p in sources if "DESIGN.md" in p.read_text()]
    assert offenders == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_in_the_repository(doc: Path) -> None:
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL (images, upstream projects)
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        assert resolved.exists(), f"{doc.name}: {target}"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved.read_text(encoding="utf-8")), f"{doc.name}: {target}"


def _documented_call(text: str, call: str) -> dict[str, str]:
    """keyword=default pairs of the first documented `call(...)` in a code block."""
    start = text.index(call + "(")
    depth, end = 0, start
    for end in range(start + len(call), len(text)):
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        if depth == 0:
            break
    body = re.sub(r"#[^\n]*", "", text[start + len(call) + 1 : end])
    return dict(re.findall(r"(\w+)=([^,\n]+)", body))


@pytest.mark.parametrize(
    ("call", "function"),
    [
        ("lk_observe.serve", lk_observe.serve),
        ("lk_observe.configure_tracing", lk_observe.configure_tracing),
        ("lk_observe.create_app", lk_observe.create_app),
        ("lk_observe.instrument", lk_observe.instrument),
    ],
)
def test_documented_defaults_are_the_codes(call: str, function: object) -> None:
    documented = _documented_call(CONFIGURATION, call)
    parameters = inspect.signature(function).parameters  # type: ignore[arg-type]
    assert documented
    for name, text in documented.items():
        if name not in parameters:
            continue  # e.g. **app_kwargs spelled out
        default = parameters[name].default
        value = ast.literal_eval(text.strip())
        assert value == default, f"{call}: {name} documented {text}, is {default!r}"


def test_the_readme_lists_every_demo_flag() -> None:
    demo = build_parser()._subparsers._group_actions[0].choices["demo"]  # type: ignore[union-attr]
    flags = [a.option_strings[-1] for a in demo._actions if a.option_strings]
    missing = [f for f in flags if f not in ("--help",) and f"`{f}" not in README]
    assert missing == []


def test_the_first_command_installs_only_what_the_demo_needs() -> None:
    first = next(line for line in README.splitlines() if "lk-observe demo" in line)
    assert "uv run --no-dev lk-observe demo" in first  # not the dev group (mypy, hypothesis, ...)
    assert "bash scripts/test.sh" in README


def test_no_doc_tells_you_to_install_from_pypi() -> None:
    sources = [*DOCS, ROOT / "examples" / "agent.py"]
    for path in sources:
        for match in re.finditer(r"pip install ([^\n]*)", path.read_text()):
            assert not match.group(1).startswith(("lk-observe", "lk_observe ")), (path, match[0])


def test_a_wheel_builds_from_the_repository_with_the_page_and_the_command(tmp_path: Path) -> None:
    uv = shutil.which("uv")
    if uv is None:
        pytest.skip("uv is not on PATH")
    done = subprocess.run(
        [uv, "build", "--wheel", "--out-dir", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("lk_observe-*.whl")
    assert wheel.name == f"lk_observe-{lk_observe.__version__}-py3-none-any.whl"
    assert f"dist/{wheel.name}" in README  # the name the README tells you to install
    names = zipfile.ZipFile(wheel).namelist()
    assert {"lk_observe/static/app.js", "lk_observe/static/index.html"} <= set(names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lk-observe = lk_observe.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
