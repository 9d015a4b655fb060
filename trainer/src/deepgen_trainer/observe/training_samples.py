"""``--log_images_interval``: the first group's images of a step, on disk for a look at what the policy
draws (the original's ``training_samples/``). Rank 0 writes ``<output_dir>/training_samples/step_<s>/``
with ``prompt.txt`` and ``<k>_<advantage:+.4f>.jpg`` per image of the group; only the newest
``keep`` step folders stay (the original wrote every step on every rank and never deleted)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

FOLDER = "training_samples"
_STEP = re.compile(r"step_(\d+)")


def save_training_samples(
    output_dir: Path, step: int, images: torch.Tensor, prompt: str, advantages: Sequence[float], keep: int
) -> Path:
    """Write one step's group: ``images`` uint8 (n, H, W, 3), its prompt and each image's advantage;
    then drop the oldest step folders beyond ``keep`` (0: keep all). Returns the step's folder."""
    root = output_dir / FOLDER
    folder = root / f"step_{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompt.txt").write_text(prompt + "\n", encoding="utf-8")
    for k, (image, advantage) in enumerate(zip(images.cpu(), advantages, strict=True)):
        Image.fromarray(image.numpy()).save(folder / f"{k}_{advantage:+.4f}.jpg", quality=95)
    if keep:
        steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.fullmatch(p.name)))
        for _, old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return folder
