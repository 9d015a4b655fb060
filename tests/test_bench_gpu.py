"""benchmarks/bench_gpu.py (`make bench-gpu`): the real-size model it builds, and its reduced variant (real
widths, 2 layers per stack, 64² images, 2 SDE steps) run end to end on the CPU: torchrun, ZeRO-2, the
real training loop, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.bench_gpu import build_deepgen, main, model_shape
from benchmarks.flops import DeepGenShape


def billions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e9


def test_real_size_model_has_deepgen_s_parameter_counts():
    # On the meta device: shapes and counts only, nothing allocated.
    model = build_deepgen(model_shape(), None, torch.device("meta"), torch.bfloat16)
    assert billions(model.transformer) == pytest.approx(2.243, abs=1e-3)  # SD3.5-Medium's MMDiT
    assert billions(model.lmm.model.visual) == pytest.approx(0.669, abs=1e-3)  # Qwen2.5-VL-3B's vision tower
    # Qwen2.5-VL-3B is 3.75 B with its 151,936-token vocabulary; the tokenizer built here has 384 tokens.
    assert billions(model.lmm) == pytest.approx(3.444, abs=1e-3)
    assert model.config.num_queries == 128
    assert len(model.layer_ids) == 6
    assert model.transformer.dtype == model.lmm.dtype == torch.bfloat16


def test_reduced_shape_keeps_the_widths():
    full, reduced = DeepGenShape(), model_shape(2)
    depths = (reduced.dit.num_layers, reduced.vlm.num_hidden_layers, reduced.deepgen.connector.num_hidden_layers)
    assert depths == (2, 2, 2)
    assert reduced.dit.width == full.dit.width
    assert reduced.vlm.hidden_size == full.vlm.hidden_size
    assert reduced.deepgen.connector.hidden_size == full.deepgen.connector.hidden_size
    assert reduced.deepgen.fused_layers == 1
    with pytest.raises(SystemExit, match="--depth 2 or more"):
        model_shape(1)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(900)
def test_reduced_variant_runs_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    report = tmp_path / "report.json"
    args = [
        "--depth", "2", "--image_size", "64", "--num_inference_steps", "2", "--prompts", "1", "--rollout_n", "2",
        "--rollout_micro_batch_size", "2", "--atrain_micro_batch_size", "2", "--warmup", "0", "--steps", "1",
        "--no-bf16", "--gpus", "1", "--deepspeed", "zero2", "--peak_tflops", "1", "--report", str(report),
    ]  # fmt: skip
    [result] = main(args)
    assert result.world_size == 1
    assert result.images_per_gpu == 2
    assert result.images_per_sec_per_gpu == pytest.approx(2 / result.times["step"])
    assert result.times["rollout"] > 0
    assert result.times["update"] > 0
    assert result.peak_memory_gib > 1  # real widths: the connector alone is 0.7 GB in fp32
    assert result.memory_kind == "host memory (peak RSS)"
    assert 0 < result.mfu < result.hfu  # HFU adds the recompute of gradient checkpointing
    table = capsys.readouterr().out
    assert "bench-gpu on CPU (no GPU): DeepGen (2 layer(s) per stack, real widths)" in table
    assert json.loads(report.read_text())["results"][0]["world_size"] == 1
