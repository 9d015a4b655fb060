"""The trainer package's layout: concept folders, imports only downwards, stable public paths, and the
commands users type (`python -m ... --help`)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import deepgen_trainer

PACKAGE = Path(deepgen_trainer.__file__).parent
# Level of each folder or top-level module: a module may import the trainer only from its own folder
# and from lower levels (folders of one level do not import each other).
LEVELS = {
    "model": 0,
    "algorithms": 0,
    "original": 0,
    "config": 1,
    "data": 2,
    "rewards": 2,
    "checkpoints": 2,
    "observe": 2,
    "engine": 3,
    "evaluation": 4,
    "run": 5,
    "train": 6,
    # The stable public paths and commands: thin re-exports of their folders.
    "sde": 1,
    "advantages": 1,
    "convert": 5,
    "demo_reward": 5,
}


def unit(module: str) -> str:
    """The folder or top-level module a `deepgen_trainer.*` module belongs to."""
    return module.split(".")[1]


def trainer_imports(path: Path) -> list[str]:
    """Every `deepgen_trainer.*` module the file imports, lazily imported ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deepgen_trainer."):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("deepgen_trainer.")]
    return found


def modules() -> list[tuple[str, Path]]:
    return [
        (".".join(("deepgen_trainer", *p.relative_to(PACKAGE).with_suffix("").parts)), p)
        for p in sorted(PACKAGE.rglob("*.py"))
    ]


def test_at_most_eight_top_level_modules_and_six_concept_folders_each_saying_what_it_holds() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    folders = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert len(top) <= 8, top
    assert len(folders) >= 6, folders
    assert set(LEVELS) == {Path(n).stem for n in top if n != "__init__.py"} | set(folders)
    for folder in folders:
        doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text()))
        assert doc, f"{folder}/__init__.py: say what lives there"
        assert "import" in doc.lower(), f"{folder}/__init__.py: say what it may import"


def test_imports_only_go_down_the_levels() -> None:
    wrong = []
    for name, path in modules():
        if name == "deepgen_trainer.__init__":
            continue
        here = unit(name)
        for target in trainer_imports(path):
            there = unit(target)
            if there != here and LEVELS[there] >= LEVELS[here]:
                wrong.append(f"{name} imports {target} (level {LEVELS[there]} >= {LEVELS[here]})")
    assert not wrong, "\n".join(wrong)


def test_the_levels_check_catches_an_upward_import(tmp_path: Path) -> None:
    # The check above must be able to fail: a model module importing the training loop is caught.
    bad = tmp_path / "bad.py"
    bad.write_text("from deepgen_trainer.train import main\nimport deepgen_trainer.rewards.scorer\n")
    assert trainer_imports(bad) == ["deepgen_trainer.train", "deepgen_trainer.rewards.scorer"]
    assert LEVELS[unit("deepgen_trainer.train")] > LEVELS[unit("deepgen_trainer.model.deepgen")]


def test_the_public_math_api_keeps_its_paths() -> None:
    from deepgen_trainer.advantages import compute_advantages
    from deepgen_trainer.algorithms import advantages, sde
    from deepgen_trainer.sde import sde_step_with_logprob

    assert sde_step_with_logprob is sde.sde_step_with_logprob
    assert compute_advantages is advantages.compute_advantages


@pytest.mark.integration
def test_every_command_answers_help() -> None:
    commands = {
        "deepgen_trainer.train": "--dataset_config",
        "deepgen_trainer.convert": "--merge-onto",
        "deepgen_trainer.demo_reward": "DEMO_REWARD_OBJECTIVE",
        "deepgen_trainer.evaluation.evaluate_checkpoint": "--sets",
    }
    runs = {
        module: subprocess.Popen(
            [sys.executable, "-m", module, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for module in commands
    }
    for module, proc in runs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"{module} --help: {err}"
        assert commands[module] in out, f"{module} --help does not mention {commands[module]}"
