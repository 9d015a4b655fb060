"""benchmarks/memory_table.py: the per-item GPU memory of the default step, counted on the meta device (the
table in trainer/README.md); here at 2 layers per stack, real widths."""

from __future__ import annotations

import pytest
import torch

from benchmarks.memory_table import items, main
from benchmarks.real_size import build_deepgen, model_shape
from tests.helpers import REPO


def test_zero2_partitions_the_optimizer_state_and_the_rest_is_per_gpu():
    model = build_deepgen(model_shape(2), 2, torch.device("meta"), torch.bfloat16)
    one, eight = dict(items(model, 1, 8, 512)), dict(items(model, 8, 8, 512))
    trainable_gib = sum(p.numel() for p in model.trainable_parameters()) / 2**30
    assert one["Adam moments, float32 (ZeRO-2: 1/W)"] == pytest.approx(8 * trainable_gib)
    for name in one:
        partitioned = "1/W" in name
        assert eight[name] == pytest.approx(one[name] / 8 if partitioned else one[name]), name
    assert one["DiT weights (bf16)"] == one["KL reference DiT (bf16, --beta > 0)"] > 0
    # Checkpointing keeps the block inputs only: far less than one block's own activations at 8 images.
    assert (
        0
        < one["activations, 8 images (checkpointed block inputs)"]
        < 2 * one["activations, one block recomputed in backward"]
    )


def test_table_prints_every_item_and_the_totals(capsys: pytest.CaptureFixture[str]):
    out = main(["--depth", "2", "--gpus", "1,8"])
    assert "| item | 1 GPU (GiB/GPU) | 8 GPUs (GiB/GPU) |" in out
    assert "vision tower stays on the CPU" in out
    assert "**total counted**" in out
    assert out in capsys.readouterr().out


@pytest.mark.slow
def test_readme_holds_the_real_size_table():
    readme = (REPO / "trainer" / "README.md").read_text(encoding="utf-8")
    assert main([]) in readme, "rerun python benchmarks/memory_table.py and paste its table into trainer/README.md"
