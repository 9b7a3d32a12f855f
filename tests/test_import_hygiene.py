"""engine/ knows nothing of any UI: it imports no textual, rich or s2v_tui, and it never prints.

Note on rich: huggingface_hub imports httpx, whose optional command-line client imports rich when it is
installed, so importing engine.models loads rich through no fault of ours. The runtime test therefore records
who asks for each UI package: textual and s2v_tui must not be loaded at all, rich only by third-party code,
never by an engine file; the engine's core modules (no heavy dependencies) must leave rich unloaded too. A
static scan catches direct imports that an already-loaded module would hide at runtime.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINE = REPO / "engine"
FORBIDDEN = ("textual", "rich", "s2v_tui")


def engine_modules() -> list[str]:
    names = []
    for path in sorted(ENGINE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


# Runs in a fresh interpreter so nothing this test process imported can hide a leak. The finder only watches:
# for each first request of a UI package it records the file that asked (the first frame outside the import
# machinery and outside the package itself), then lets the normal finders answer.
_PROBE = """
import importlib, importlib.abc, json, sys

FORBIDDEN = {forbidden!r}
attempts = []

def outside(filename):
    return not ("importlib" in filename or filename.startswith("<")
                or any(f"/{{p}}/" in filename for p in FORBIDDEN))

class WatchUi(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            frame = sys._getframe(1)
            while frame and not outside(frame.f_code.co_filename):
                frame = frame.f_back
            attempts.append([name, frame.f_code.co_filename if frame else "?"])
        return None

sys.meta_path.insert(0, WatchUi())
errors = {{}}
for name in {modules!r}:
    try:
        importlib.import_module(name)
    except Exception as exc:
        errors[name] = f"{{type(exc).__name__}}: {{exc}}"
loaded = sorted({{m.split(".")[0] for m in sys.modules if m.split(".")[0] in FORBIDDEN}})
print(json.dumps({{"errors": errors, "loaded": loaded, "attempts": attempts}}))
"""

# The engine's own foundations: no torch, diffusers or transformers behind them, so nothing may load rich.
CORE = ["engine", "engine.events", "engine.config", "engine.gpu", "engine.gpu_fake"]


def run_probe(modules: list[str]) -> dict:
    code = _PROBE.format(forbidden=FORBIDDEN, modules=modules)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_engine_core_loads_no_ui_module():
    report = run_probe(CORE)
    assert report["errors"] == {}
    assert report["loaded"] == [], f"UI packages loaded by the engine core: {report['attempts']}"


def test_every_engine_module_imports_and_asks_for_no_ui_module():
    modules = engine_modules()
    assert set(CORE) <= set(modules)
    report = run_probe(modules)
    assert report["errors"] == {}, f"engine modules failed to import: {report['errors']}"
    assert "textual" not in report["loaded"] and "s2v_tui" not in report["loaded"], report["attempts"]
    ours = [a for a in report["attempts"] if Path(a[1]).resolve().is_relative_to(ENGINE)]
    assert not ours, f"engine code asked for UI packages: {ours}"


def engine_nodes():
    """(place, node) for every AST node of every engine file."""
    for path in sorted(ENGINE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            yield f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}", node


def imported_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module]
    return []


def test_engine_source_never_imports_ui_modules():
    offenders = [
        place for place, node in engine_nodes() if any(n.split(".")[0] in FORBIDDEN for n in imported_names(node))
    ]
    assert not offenders, f"engine code imports UI packages: {offenders}"


def test_engine_never_prints():
    offenders = [
        place
        for place, node in engine_nodes()
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
    ]
    assert not offenders, f"engine code must log, not print: {offenders}"


# ---- the engine's own stack: every import points down (or sideways within a layer) -----------------------------
# A unit is a subpackage (engine.train) or a top-level module (engine.runner). Lower numbers are lower; a unit may
# import units of its own layer or below, at module level and inside functions alike (a function-level import is
# still an arrow, and an upward one makes an import loop as soon as the lower module is imported first).
LAYERS = {
    0: ("engine", "engine.config", "engine.events", "engine.event_log", "engine.fsio", "engine.dtypes",
        "engine.frames", "engine.model_source", "engine.gpu", "engine.gpu_fake"),
    1: ("engine.models",),
    2: ("engine.data", "engine.memory", "engine.presets"),
    3: ("engine.infer",),
    4: ("engine.train",),  # validation samples through engine.infer
    5: ("engine.runner", "engine.run_folder", "engine.run_checkpoints", "engine.run_logs"),
}
LAYER_OF = {unit: layer for layer, units in LAYERS.items() for unit in units}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "engine" else module


def engine_imports():
    """(place, importing unit, imported unit) for every import of an engine module by an engine file."""
    for path in sorted(ENGINE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        source = unit_of(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            targets = imported_names(node)
            if isinstance(node, ast.ImportFrom) and node.module == "engine":  # from engine import fsio
                targets = [f"engine.{alias.name}" for alias in node.names]
            for target in targets:
                if target.split(".")[0] == "engine" and unit_of(target) != source:
                    yield f"{path.relative_to(REPO)}:{node.lineno}", source, unit_of(target)


def test_every_engine_unit_has_a_layer():
    units = {unit_of(m) for m in engine_modules()}
    assert units == set(LAYER_OF), f"give these a layer: {units - set(LAYER_OF)}; gone: {set(LAYER_OF) - units}"


def test_engine_imports_never_point_up_the_stack():
    """No exceptions: a check that needs a higher layer lives in that layer (lora.init_from's header check is
    engine.train.init_lora's, not engine.config's)."""
    upward = [(place, src, dst) for place, src, dst in engine_imports() if LAYER_OF[dst] > LAYER_OF[src]]
    assert not upward, f"imports up the stack (move the shared piece down instead): {upward}"


def test_the_event_log_builds_on_the_events_and_never_the_reverse():
    """events.jsonl's writer and reader use the event types; the types module imports nothing of its file, so
    neither module needs the other's lazy import (the loop engine/events.py used to break with __getattr__)."""
    targets = {(path.name, name) for path in (ENGINE / "events.py", ENGINE / "event_log.py")
               for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
               for name in imported_names(node) if name == "engine" or name.startswith("engine.")}
    assert ("event_log.py", "engine.events") in targets
    assert not [t for t in targets if t[0] == "events.py"], f"engine/events.py imports the engine: {targets}"
    assert "__getattr__" not in (ENGINE / "events.py").read_text(encoding="utf-8")


def test_the_layer_check_sees_function_level_imports():
    """The check parses the files: an import inside a function is an arrow like one at the top."""
    tree = ast.parse("def f():\n    from engine.runner import run\n    from engine import fsio\n")
    found = [name for node in ast.walk(tree) for name in imported_names(node)]
    assert found == ["engine.runner", "engine"]
