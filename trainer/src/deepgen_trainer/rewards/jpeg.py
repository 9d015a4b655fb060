"""The JPEG rewards of the original DeepGen-RL's simple mode, in process, as it computes them (the
DDPO / Flow-GRPO definition): the size of the image saved as JPEG at quality 95, in kB (1000 bytes).

- ``jpeg_incompressibility``: the size in kB (higher = more detail);
- ``jpeg_compressibility``: −size / 500 (higher = simpler images).

The original sums these with [0, 1] rewards unscaled; here a dataset's reward weights scale them (the
advantages normalise each reward within its group by default, `gdpo`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

Images = torch.Tensor | Sequence[Image.Image]
"""uint8 (N, H, W, 3) RGB tensor (any device), or a sequence of N PIL images (as `rewards.scorer.Images`)."""

JPEG_QUALITY = 95
COMPRESSIBILITY_SCALE = 500.0  # kB; the original divides the negated size by it


def jpeg_kilobytes(images: Images) -> torch.Tensor:
    """(N,) float32: each image's size as a quality-95 JPEG, in kB. ``images``: uint8 (N, H, W, 3) or PIL."""
    sizes = []
    for image in images:
        if isinstance(image, torch.Tensor):
            image = Image.fromarray(np.ascontiguousarray(image.detach().cpu().numpy()))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


def jpeg_incompressibility(images: Images, prompts: Sequence[str]) -> torch.Tensor:
    """(N,) JPEG size in kB; the prompts are not used."""
    return jpeg_kilobytes(images)


def jpeg_compressibility(images: Images, prompts: Sequence[str]) -> torch.Tensor:
    """(N,) −JPEG size in kB / 500; the prompts are not used."""
    return -jpeg_kilobytes(images) / COMPRESSIBILITY_SCALE
