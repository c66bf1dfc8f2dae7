"""Module boundaries that keep an upgrade from breaking lk_observe silently: no module uses a
private name of another lk_observe module, and only livekit_events.py reads privates of another
package (each one listed at its top and checked in test_livekit_events.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import lk_observe

PACKAGE = Path(lk_observe.__file__).parent
MODULES = sorted(PACKAGE.glob("*.py"))

# (module, name): local names that hold an object of a class defined in that same module, so
# their private attributes are the module's own
OWN_OBJECTS = {
    ("demo.py", "owner"),  # the scripted plugin that created the stream
    ("demo_audio.py", "owner"),
    ("instrument.py", "handle"),
    ("livekit_events.py", "me"),
    ("livekit_events.py", "SessionEvents"),
    ("monitor.py", "view"),
}
# namedtuple's public methods carry an underscore so they cannot clash with field names
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make"}
LIVEKIT_PRIVATES = {attribute for _, attribute in lk_observe.livekit_events.PRIVATE_ATTRIBUTES}


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_imports_a_private_name_of_another() -> None:
    found = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lk_observe"):
                found += [f"{path.name}: {a.name}" for a in node.names if private(a.name)]
    assert not found


def test_private_attributes_are_read_only_on_own_objects() -> None:
    found = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Attribute) and private(node.attr)):
                continue
            if node.attr in NAMEDTUPLE_API:
                continue
            base = node.value
            if isinstance(base, ast.Call) and ast.unparse(base.func) == "super":
                continue  # our own class's parent
            while isinstance(base, ast.Attribute) and private(base.attr):
                base = base.value  # self._owner._clock: an own object's own object
            if isinstance(base, ast.Name) and (
                base.id in ("self", "cls") or (path.name, base.id) in OWN_OBJECTS
            ):
                continue
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert not found


def test_only_livekit_events_reads_privates_by_name() -> None:
    found = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)
                and private(node.args[1].value)
            ):
                continue
            name = node.args[1].value
            if path.name == "livekit_events.py" and name in LIVEKIT_PRIVATES:
                continue
            if path.name == "instrument.py" and name == "_lk_observe_handle":
                continue  # our own marker on the instrumented session
            found.append(f"{path.name}:{node.lineno}: {name}")
    assert not found


def test_livekit_events_lists_every_private_it_reads() -> None:
    source = (PACKAGE / "livekit_events.py").read_text()
    for owner, attribute in lk_observe.livekit_events.PRIVATE_ATTRIBUTES:
        assert f"`{owner}.{attribute}`" in source.split('"""')[1]  # named in the docstring


def test_the_public_api_is_exactly_all() -> None:
    public = {name for name in vars(lk_observe) if not name.startswith("_")}
    submodules = {path.stem for path in MODULES} - set(lk_observe.__all__)
    assert public - submodules == set(lk_observe.__all__) - {"__version__"}
