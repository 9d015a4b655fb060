"""The original's simple mode: ``--reward_funcs`` with ``--prompts_file`` and no train YAML. The JPEG
rewards are computed in process as the original computes them; every other name of its registry, and
a misspelt one, is refused at start."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from deepgen_trainer.config import ConfigError, parse_args
from deepgen_trainer.observe.reward_plot import summarize
from deepgen_trainer.rewards.jpeg import jpeg_compressibility, jpeg_incompressibility
from deepgen_trainer.rewards.original_names import REFUSED
from deepgen_trainer.run import train_data
from deepgen_trainer.train import train
from tests.trainer.test_learning import LEARN


def test_jpeg_rewards_are_the_quality_95_size_in_kilobytes() -> None:
    flat = torch.full((1, 32, 32, 3), 128, dtype=torch.uint8)
    noisy = torch.randint(0, 256, (1, 32, 32, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    images = torch.cat([flat, noisy])
    sizes = []
    for image in images:  # the original: PIL save, JPEG quality 95, buffer.tell() / 1000
        buffer = io.BytesIO()
        Image.fromarray(image.numpy()).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    torch.testing.assert_close(jpeg_incompressibility(images, ["a", "b"]), torch.tensor(sizes))
    torch.testing.assert_close(jpeg_compressibility(images, ["a", "b"]), -torch.tensor(sizes) / 500)
    assert sizes[0] < sizes[1]
    pil = [Image.fromarray(i.numpy()) for i in images]  # PIL images score the same
    torch.testing.assert_close(jpeg_incompressibility(pil, ["a", "b"]), torch.tensor(sizes))


def test_simple_mode_builds_one_dataset_with_unit_reward_weights(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a cat"}\n{"caption": "a dog"}\n')
    cfg = parse_args(["--prompts_file", str(prompts), "--reward_funcs", "jpeg_compressibility", "ocr"], environ={})
    data = train_data(cfg)
    assert [d.prompts for d in data.datasets] == [("a cat", "a dog")]
    assert dict(data.datasets[0].rewards) == {"jpeg_compressibility": 1.0, "ocr": 1.0}
    default = train_data(parse_args(["--prompts_file", str(prompts)], environ={}))  # the original's default
    assert dict(default.datasets[0].rewards) == {"jpeg_compressibility": 1.0}
    with pytest.raises(ConfigError, match=r"--dataset_config .* or --prompts_file"):
        train_data(parse_args([], environ={}))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_every_other_name_of_the_original_is_refused_saying_what_to_use(tmp_path: Path, name: str) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    cfg = parse_args(["--prompts_file", str(prompts), "--reward_funcs", "jpeg_compressibility", name], environ={})
    with pytest.raises(ConfigError, match=rf"--reward_funcs: '{name}': .*(use|drop it)"):
        train_data(cfg)


def test_a_misspelt_name_is_refused_with_the_closest_one(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    cfg = parse_args(["--prompts_file", str(prompts), "--reward_funcs", "jpeg_compresibility"], environ={})
    with pytest.raises(ConfigError, match="unknown reward \\(did you mean 'jpeg_compressibility'\\?\\)"):
        train_data(cfg)


STEPS = 20


def test_tiny_model_learns_a_jpeg_reward_in_simple_mode(tmp_path: Path) -> None:
    # jpeg_incompressibility: at the tiny model's image size a JPEG is mostly its fixed header, and
    # incompressibility (more detail) is the direction in which the group's sizes differ the most.
    reward = "jpeg_incompressibility"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"a picture of thing number {i}" for i in range(64)) + "\n")
    out = tmp_path / "run"
    argv = [*LEARN, "--prompts_file", str(prompts), "--reward_funcs", reward, "--output_dir", str(out)]
    train(parse_args(argv, environ={}))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rewards = [row["reward/total"] for row in rows]
    assert len(rewards) == STEPS
    curve = summarize(rewards)
    assert curve.slope > 0, rewards
    assert curve.t > 3, (curve, rewards)
