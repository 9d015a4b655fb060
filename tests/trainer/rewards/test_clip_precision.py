"""clip_sim runs CLIP in bf16 under --bf16 (half the memory of fp32 on the training GPU) and its scores stay
those of fp32 to bf16's precision (the cosine itself is taken in float32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deepgen_trainer.config import parse_args
from deepgen_trainer.engine.distributed import World
from deepgen_trainer.rewards.clip_sim import ClipSimReward, build_tiny_clip
from deepgen_trainer.run import _reward

CPU_WORLD = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_clip_sim_loads_in_the_run_precision_and_scores_alike(tmp_path: Path) -> None:
    build_tiny_clip(seed=0).save_pretrained(tmp_path)
    loaded = {}
    for flag in ("--bf16", "--no-bf16"):
        cfg = parse_args(["--model", "tiny", flag, "--clip_model_name_or_path", str(tmp_path)], environ={})
        clip = _reward("clip_sim", cfg, CPU_WORLD).fn
        assert isinstance(clip, ClipSimReward)
        loaded[flag] = clip
    assert loaded["--bf16"].model.dtype == torch.bfloat16
    assert loaded["--no-bf16"].model.dtype == torch.float32
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8))
    prompts = ["a red cat", "a blue dog", 'the word "HI"']
    bf16, fp32 = loaded["--bf16"](images, prompts), loaded["--no-bf16"](images, prompts)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=0.03)
