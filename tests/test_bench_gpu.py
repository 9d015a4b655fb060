"""benchmarks/bench_gpu.py (`make bench-gpu`): the real-size model it builds, the peak table, the checks of
its options before torchrun starts, and its reduced variant (real widths, 2 layers per stack, 64² images,
2 SDE steps) run end to end on the CPU: torchrun, ZeRO-2, the real training loop, the row with a remote
reward of fixed latency and --one_step_off_policy, a failed run's reason, the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.bench_gpu import main, peak_tflops_for
from benchmarks.flops import DeepGenShape
from benchmarks.real_size import build_deepgen, model_shape


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


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA B200", 2250.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_tflops_by_device_name(name: str, tflops: float | None):
    assert peak_tflops_for(name) == tflops


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "2"], "this machine has no GPU .* pass sizes from 1 to 1"),
        (["--gpus", "one"], "give world sizes and/or 'all'"),
        (["--depth", "1"], "--depth 2 or more"),
        (["--peak_tflops", "0"], "--peak_tflops must be > 0"),
        (["--rollout_n", "3", "--rollout_micro_batch_size", "4"], "the trainer refuses these options: .*multiple of"),
    ],
)
def test_options_are_checked_before_torchrun_starts(args: list[str], message: str, monkeypatch):
    monkeypatch.setattr("subprocess.run", lambda *a, **k: pytest.fail("torchrun started"))
    with pytest.raises(SystemExit, match=message):
        main(args)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(900)
def test_reduced_variant_runs_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    report = tmp_path / "report.json"
    args = [
        "--depth", "2", "--image_size", "64", "--num_inference_steps", "2", "--prompts", "1", "--rollout_n", "2",
        "--rollout_micro_batch_size", "2", "--atrain_micro_batch_size", "2", "--warmup", "0", "--steps", "1",
        "--no-bf16", "--gpus", "1", "--deepspeed", "zero2", "--peak_tflops", "1", "--reward_latency", "0.5",
        "--report", str(report),
    ]  # fmt: skip
    result, remote = main(args)
    assert (result.world_size, result.variant) == (1, "clip_sim only")
    assert result.images_per_gpu == 2
    assert result.images_per_sec_per_gpu == pytest.approx(2 / result.times["step"])
    assert result.times["rollout"] > 0
    assert result.times["clip_sim"] > 0  # its own column, no longer inside the rollout's
    assert result.times["update"] > 0
    assert result.peak_device_gib > 1  # real widths: the connector alone is 0.7 GB in fp32 (peak RSS on CPU)
    assert result.peak_allocated_gib is None  # torch's allocator figures exist on a GPU only
    assert 0 < result.mfu < result.hfu  # HFU adds the recompute of gradient checkpointing
    # The row with a remote reward of fixed latency, scored while the next step generates.
    assert (remote.world_size, remote.variant) == (1, "+0.5s reward, 1-off")
    table = capsys.readouterr().out
    assert "bench-gpu on CPU (no GPU): DeepGen (2 layer(s) per stack, real widths)" in table
    for column in ("clip_sim", "alloc GiB", "resv GiB", "dev GiB"):
        assert column in table
    assert "upper bound" in table
    payload = json.loads(report.read_text())
    assert [r["variant"] for r in payload["results"]] == ["clip_sim only", "+0.5s reward, 1-off"]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_failed_run_ends_with_the_workers_reason(tmp_path: Path):
    # A DeepSpeed config the trainer accepts by name but refuses when it builds the optimizer (only an
    # Adam/AdamW block is honoured), in the worker.
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"optimizer": {"type": "SGD"}, "zero_optimization": {"stage": 2}}))
    args = [
        "--depth", "2", "--image_size", "64", "--num_inference_steps", "2", "--prompts", "1", "--rollout_n", "2",
        "--rollout_micro_batch_size", "2", "--atrain_micro_batch_size", "2", "--warmup", "0", "--steps", "1",
        "--no-bf16", "--gpus", "1", "--deepspeed", str(config), "--reward_latency", "0",
    ]  # fmt: skip
    with pytest.raises(
        SystemExit,
        match=r"the 1-rank run \(clip_sim only\) exited 1: rank 0: ConfigError: .*remove the 'optimizer' block",
    ):
        main(args)
