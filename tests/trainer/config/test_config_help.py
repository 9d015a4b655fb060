"""`python -m deepgen_trainer.train --help` names every option's default (one formatter, so flags added
later are covered too)."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import pytest

from deepgen_trainer.config import build_parser, shown_default


def option_help(help_text: str) -> dict[str, str]:
    """Each option's entry in a --help text (its usage column and help, whitespace collapsed), by flag."""
    options = help_text.split("\noptions:\n", 1)[1]
    entries = re.split(r"\n(?=  -)", options)
    by_flag = {}
    for entry in entries:
        # Drop the title lines of argument groups ("flags of the original DeepGen-RL ...:").
        entry = "\n".join(line for line in entry.splitlines() if line.startswith(" "))
        flags = re.findall(r"(?:^|,\s)(-{1,2}[\w-]+)", entry.strip().split("  ", 1)[0])
        for flag in flags:
            by_flag[flag] = " ".join(entry.split())
    return by_flag


def assert_every_default_named(parser: argparse.ArgumentParser) -> int:
    entries = option_help(parser.format_help())
    checked = 0
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        entry = entries[action.option_strings[0]]
        # The help names the default in its own words (the original's flags: unset, and the original's).
        if "(default" in (action.help or "") or action.default is argparse.SUPPRESS:
            assert "(default: " in entry, entry
        else:
            # argparse may wrap a long default at a hyphen ("deepgen-" / "rl"): compare without spaces.
            assert f"(default:{shown_default(action.default)})".replace(" ", "") in entry.replace(" ", ""), entry
        checked += 1
    return checked


def test_every_option_names_its_default() -> None:
    parser = build_parser({})
    assert assert_every_default_named(parser) == len(parser._actions) - 1
    entries = option_help(parser.format_help())
    # The case, a flag without help text, and one whose help names the default itself.
    assert entries["--report_to"].endswith("or none (default: wandb,swanlab)")
    assert entries["--image_height"].endswith("(default: 512)")
    assert entries["--prompts_per_step"].endswith("(default: unset)")
    assert entries["--gradient_checkpointing"].endswith("(default: True)")
    assert entries["--save_total_limit"].endswith("-1 or 0: all (default: all)")  # not also "(default: None)"


def test_environment_defaults_are_shown() -> None:
    parser = build_parser({"OCR_URL": "grpc://ocr:50051", "OUTPUT_DIR": "/outputs"})
    assert_every_default_named(parser)
    entries = option_help(parser.format_help())
    assert entries["--ocr_url"].endswith("[env OCR_URL] (default: grpc://ocr:50051)")
    assert entries["--output_dir"].endswith("[env OUTPUT_DIR] (default: /outputs)")


def test_flags_added_later_are_covered() -> None:
    parser = build_parser({})
    parser.add_argument("--new_rate", type=float, default=0.5, help="a rate of 50%%")  # argparse %-formats help texts
    parser.add_argument("--new_names", default=("a", "b"))
    parser.add_argument("--new_switch", action=argparse.BooleanOptionalAction, default=False, help="on or off")
    parser.add_argument("--new_list", default=())
    assert_every_default_named(parser)
    entries = option_help(parser.format_help())
    assert entries["--new_rate"].endswith("a rate of 50% (default: 0.5)")
    assert entries["--new_names"].endswith("(default: a,b)")
    assert entries["--new_switch"].endswith("on or off (default: False)")
    assert entries["--new_list"].endswith("(default: none)")


@pytest.mark.integration
def test_train_help_shows_the_defaults() -> None:
    env = {**os.environ, "COLUMNS": "120"}
    for name in ("OCR_URL", "OUTPUT_DIR"):
        env.pop(name, None)
    done = subprocess.run(
        [sys.executable, "-m", "deepgen_trainer.train", "--help"],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    entries = option_help(done.stdout)
    assert entries["--report_to"].endswith("(default: wandb,swanlab)")
    assert entries["--learning_rate"].endswith("(default: 2e-06)")
    missing = [flag for flag, entry in entries.items() if flag.startswith("--") and flag != "--help"
               and "(default: " not in entry]  # fmt: skip
    assert not missing
