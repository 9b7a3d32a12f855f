"""One function says whether settings may run here (engine.train.allowed.setting_problems), and every caller
asks it: the runner's check phase, `s2v-tui check PRESET.toml`, the memory switches and the app (through
s2v_tui/services.py, for the Run and Config screens). The older per-topic functions are gone, so no caller can ask
a second, different question."""
from __future__ import annotations

import ast
from pathlib import Path

import torch

from engine.config import with_value
from engine.train.allowed import SAVE_ATTENTION_CONFLICT, setting_problems
from s2v_tui.commands.demo import demo_config

REPO = Path(__file__).resolve().parents[1]
OLD_NAMES = ("unsupported_switches", "combination_problems")
CALLERS = ("engine/runner.py", "engine/train/switches.py", "s2v_tui/commands/check.py", "s2v_tui/services.py")


def _names_defined_or_used(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.name.rsplit(".", 1)[-1])
    return names


def test_the_old_rule_functions_no_longer_exist_anywhere():
    files = [p for d in ("engine", "s2v_tui", "tests") for p in (REPO / d).rglob("*.py")]
    users = {str(p.relative_to(REPO)): sorted(_names_defined_or_used(p) & set(OLD_NAMES)) for p in files}
    assert {k: v for k, v in users.items() if v} == {}


def test_every_caller_imports_the_one_function():
    for caller in CALLERS:
        tree = ast.parse((REPO / caller).read_text(encoding="utf-8"))
        imported = {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    for alias in node.names}
        assert ("engine.train.allowed", "setting_problems") in imported, caller


def test_device_and_world_size_rules_come_from_the_same_call():
    config = demo_config("m", "r")
    for key, value in {"memory.block_offload": True, "memory.gradient_checkpointing": True,
                       "memory.checkpoint_interval": 1}.items():
        config = with_value(config, key, value)
    assert setting_problems(config) == []  # device unknown, one process
    assert any("CUDA GPU" in p for p in setting_problems(config, device=torch.device("cpu")))
    assert any("pinned host memory" in p for p in setting_problems(config, world_size=2))
    offloaded = with_value(with_value(demo_config("m", "r"), "memory.offload_checkpoint_inputs", True),
                           "memory.checkpoint_policy", "save_attention")
    assert setting_problems(offloaded) == [SAVE_ATTENTION_CONFLICT]


def test_check_command_refuses_a_preset_that_cannot_run(tmp_path, capsys):
    from s2v_tui.commands import check as check_cmd

    (tmp_path / "clips").mkdir()
    preset = tmp_path / "p.toml"
    preset.write_text('[memory]\nblock_offload = true\ngradient_checkpointing = true\ncheckpoint_interval = 2\n'
                      '[[data.datasets]]\npath = "clips"\n', encoding="utf-8")
    assert check_cmd.main([str(preset)]) == check_cmd.EXIT_USAGE
    err = capsys.readouterr().err
    assert "cannot run" in err and "checkpoint_interval = 1" in err
