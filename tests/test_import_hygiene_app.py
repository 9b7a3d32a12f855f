"""The app's own layering: the screens reach the app through s2v_tui.app_handle, never by importing s2v_tui.app.

s2v_tui.app imports every screen, so a screen importing it back is a loop that only a function-level import hides
(it worked until someone imported the screen first). Only the command that starts the app imports it, at the top.
"""
from __future__ import annotations

import ast
from pathlib import Path

from s2v_tui.app import build_app
from s2v_tui.app_handle import AppHandle
from s2v_tui.session import start_session
from s2v_tui.testing.fakes import fake_services

REPO = Path(__file__).resolve().parents[1]
APP_PACKAGE = REPO / "s2v_tui"
APP_MODULE = "s2v_tui.app"
# Above the app: the entry points that build it. Everything else is below it and must not import it at all.
ABOVE_THE_APP = ("s2v_tui/commands/",)


def imports_of_the_app(tree: ast.AST) -> list[tuple[int, bool]]:
    """(line, inside a function) for every import of s2v_tui.app in `tree`."""
    inside = {id(node) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
              for node in ast.walk(fn)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module == "s2v_tui":
            names = [f"s2v_tui.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        if APP_MODULE in names:
            found.append((node.lineno, id(node) in inside))
    return found


def app_files():
    for path in sorted(APP_PACKAGE.rglob("*.py")):
        yield path.relative_to(REPO).as_posix(), ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_no_module_imports_the_app_inside_a_function():
    offenders = [f"{name}:{line}" for name, tree in app_files() for line, nested in imports_of_the_app(tree) if nested]
    assert not offenders, f"function-level imports of s2v_tui.app (use s2v_tui.app_handle): {offenders}"


def test_only_the_entry_points_import_the_app():
    offenders = [f"{name}:{line}" for name, tree in app_files() for line, _ in imports_of_the_app(tree)
                 if name != "s2v_tui/app.py" and not name.startswith(ABOVE_THE_APP)]
    assert not offenders, f"modules below the app import it (use s2v_tui.app_handle): {offenders}"


def test_the_check_sees_every_form_of_the_import():
    tree = ast.parse("import s2v_tui.app\nfrom s2v_tui import app\ndef f():\n    from s2v_tui.app import S2VApp\n"
                     "from s2v_tui.app_handle import app_of\n")
    assert imports_of_the_app(tree) == [(1, False), (2, False), (4, True)]


def handle_members() -> set[str]:
    methods = {name for name, value in vars(AppHandle).items() if callable(value) and not name.startswith("_")}
    return set(AppHandle.__annotations__) | methods


def test_the_app_is_the_handle_its_screens_are_given(tmp_path, presets_dir):
    app = build_app(fake_services(tmp_path, presets_dir=presets_dir), start_session(None, presets_dir))
    assert isinstance(app, AppHandle)
    assert {"services", "session", "handle_worker_state", "apply_settings"} <= handle_members()


def test_the_screens_ask_the_handle_only_for_its_members():
    """`app_of(self).X`: X is declared on AppHandle, so the handle's type covers every use (none reaches past it)."""
    members = handle_members()
    used = {(name, node.attr) for name, tree in app_files() for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name) and node.value.func.id == "app_of"}
    assert used, "the screens reach the app through app_of"
    assert not {u for u in used if u[1] not in members}, "declare these on AppHandle"
