"""The original's logging options done right: --logging_steps, --log_images_interval (bounded),
--log_component_grad_norm (the true norms of the gradient parts, against a hand computation) and
--log_tflops (against observe/flops.py's count over the step time)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from deepgen_trainer.config import parse_args
from deepgen_trainer.model.tiny import build_tiny
from deepgen_trainer.observe.flops import DeepGenShape, StepShape, model_flops, step_flops
from deepgen_trainer.observe.grad_norms import GradParts
from deepgen_trainer.observe.metric_window import MetricWindow
from deepgen_trainer.observe.training_samples import save_training_samples
from deepgen_trainer.run import component_grad_parts
from deepgen_trainer.train import train
from tests.trainer.test_train import SMALL, metrics, sftaux_yaml, train_yaml


def test_metric_window_sends_means_every_n_steps() -> None:
    window = MetricWindow(3)
    assert window.add(1, {"a": 1.0, "b": math.nan}) is None
    assert window.add(2, {"a": 2.0, "b": 4.0}) is None
    assert window.add(3, {"a": 6.0, "eval/x": 0.5}) == {"a": 3.0, "b": 4.0, "eval/x": 0.5}
    assert window.add(4, {"a": 1.0}, last=True) == {"a": 1.0}


def test_training_samples_keep_the_newest_steps(tmp_path: Path) -> None:
    images = torch.zeros((2, 8, 8, 3), dtype=torch.uint8)
    for step in range(1, 6):
        save_training_samples(tmp_path, step, images, "a prompt", [0.5, -1.25], keep=2)
    root = tmp_path / "training_samples"
    assert sorted(p.name for p in root.iterdir()) == ["step_0000004", "step_0000005"]
    assert sorted(p.name for p in (root / "step_0000005").iterdir()) == ["0_+0.5000.jpg", "1_-1.2500.jpg", "prompt.txt"]


def test_grad_parts_are_the_true_norms_of_each_parts_summed_gradient() -> None:
    # Hand computation: w = (w1, w2), two backward calls per part.
    #   policy: L = 2·w1 + 3·w2, then L = −1·w1 + 1·w2 → summed gradient (1, 4), norm √17
    #   beta_kl: L = w1², at w = (1, 1) gradient (2, 0) → norm 2
    # The original's proxy √(Σ‖g‖²) over the calls would give √(13 + 2) for the policy instead.
    w = nn.Parameter(torch.ones(2))
    parts = GradParts([w])
    parts.start()
    with parts.part("policy"):
        (2 * w[0] + 3 * w[1]).backward()
    with parts.part("policy"):
        (-w[0] + w[1]).backward()
    with parts.part("beta_kl"):
        (w[0] ** 2).backward()
    norms = parts.finish()
    assert norms == pytest.approx({"grad_norm/policy": math.sqrt(17), "grad_norm/beta_kl": 2.0})
    torch.testing.assert_close(w.grad, torch.tensor([3.0, 4.0]))  # the accumulated gradient is untouched
    (w[1] * 5).backward()  # hooks are off after finish
    assert parts.finish() == {}


def test_logging_options_in_a_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [*SMALL, "--dataset_config", str(train_yaml(tmp_path, "{clip_sim: 1.0}")), "--output_dir", str(out),
            "--max_steps", "4", "--sftaux_dataset_config", str(sftaux_yaml(tmp_path)), "--sftaux_coef", "0.1",
            "--beta", "0.5", "--log_component_grad_norm", "--logging_steps", "2", "--log_tflops",
            "--log_tflops_warmup_steps", "1", "--log_images_interval", "1", "--log_images_keep", "2"]  # fmt: skip
    run = train(parse_args(args, environ={}))
    rows = metrics(out)
    for step in (2, 4):  # --log_component_grad_norm_every defaults to --logging_steps
        assert {"grad_norm/policy", "grad_norm/beta_kl", "grad_norm/sftaux"} <= rows[step].keys()
        assert all(rows[step][f"grad_norm/{p}"] > 0 for p in ("policy", "beta_kl", "sftaux"))
    assert "grad_norm/policy" not in rows[1]
    # TFLOP/s: the analytic count of this step's shapes over its measured time; none in the warm-up step.
    assert "perf/tflops" not in rows[1]
    shape = DeepGenShape.from_model(run)
    for step in (2, 4):
        row = rows[step]
        # prompt tokens of the padded batch are not logged; bound them between the extremes instead
        lo, hi = (model_flops(step_flops(_step(tokens, with_sft="sft/loss" in row), shape)) for tokens in (1, 64))
        assert lo / 1e12 < row["perf/step_tflop"] < hi / 1e12
        tokens = [t for t in range(1, 65) if model_flops(step_flops(_step(t, "sft/loss" in row), shape)) / 1e12 ==
                  pytest.approx(row["perf/step_tflop"], rel=1e-9)]  # fmt: skip
        assert len(tokens) == 1  # the count of one padded prompt length, exactly
        assert row["perf/tflops"] == pytest.approx(row["perf/step_tflop"] / row["time/step"])
        assert row["perf/mfu"] == pytest.approx(row["perf/tflops"] / 989.0)
    samples = sorted(p.name for p in (out / "training_samples").iterdir())
    assert samples == ["step_0000003", "step_0000004"]


def _step(prompt_tokens: int, with_sft: bool) -> StepShape:
    return StepShape(
        prompts=2, rollout_n=2, num_inference_steps=4, num_train_timesteps=2, image_height=64, image_width=64,
        beta=0.5, sftaux_batch=2 if with_sft else 0, prompt_tokens=prompt_tokens,
    )  # fmt: skip


def test_component_norms_have_no_effect_under_deepspeed_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    # The original's launch lines pass --log_component_grad_norm (always on there) with a ZeRO config.
    caplog.set_level(logging.INFO, logger="deepgen_trainer")
    model = build_tiny(0)
    assert component_grad_parts(parse_args(["--log_component_grad_norm"], environ={}), model) is None
    assert "--log_component_grad_norm has no effect under DeepSpeed" in caplog.text
    plain = parse_args(["--log_component_grad_norm", "--deepspeed", "none"], environ={})
    assert isinstance(component_grad_parts(plain, model), GradParts)


def test_tiny_shape_from_the_built_model() -> None:
    shape = DeepGenShape.from_model(build_tiny(0))
    assert (shape.dit.num_layers, shape.vlm.hidden_size, shape.vae.latent_channels) == (2, 64, 4)
