"""The original's logging options done right: --logging_steps, --log_images_interval (bounded),
--log_component_grad_norm (the true norms of the gradient parts, against a hand computation) and
--log_tflops (against observe/flops.py's count over the step time)."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from deepgen_trainer.config import parse_args
from deepgen_trainer.model.tiny import build_tiny
from deepgen_trainer.observe.flops import DeepGenShape, StepShape, model_flops, step_flops
from deepgen_trainer.observe.grad_norms import GradParts, gradient_loss
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
    # Hand computation: w = (w1, w2) at (1, 1); the policy and β·KL pieces share a graph (h = 1·w).
    #   pass 1: policy 2·h1 + 3·h2 → (2, 3); β·KL h1² → (2, 0)
    #   pass 2: policy −h1 + h2 → (−1, 1)
    #   SFT-aux, its own graph: 0.5·w2 → (0, 0.5)
    # Summed: policy (1, 4), norm √17; β·KL norm 2; SFT-aux 0.5. (The original's proxy √(Σ‖g‖²) over
    # the calls would give √(13 + 2) for the policy instead.)
    w = nn.Parameter(torch.ones(2))
    parts = GradParts([w])
    parts.start()
    traversals = []
    h = w * 1.0
    h.register_hook(lambda grad: traversals.append(1))
    parts.measure([("policy", 2 * h[0] + 3 * h[1]), ("beta_kl", h[0] ** 2)]).backward()
    assert traversals == [1]  # one backward pass carries both pieces' cotangents
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        h.sum().backward()  # and no graph kept for another
    parts.measure([("policy", -w[0] + w[1])]).backward()
    parts.measure([("sftaux", 0.5 * w[1])]).backward()
    norms = parts.finish()
    want = {"grad_norm/policy": math.sqrt(17), "grad_norm/beta_kl": 2.0, "grad_norm/sftaux": 0.5}
    assert norms == pytest.approx(want)
    # What the optimizer receives is the sum of every piece's gradient, as from unmeasured backward calls.
    torch.testing.assert_close(w.grad, torch.tensor([3.0, 4.5]))
    assert parts.finish() == {}
    with pytest.raises(ValueError, match="unknown gradient part 'kl'"):
        parts.measure([("kl", w.sum())])


def test_gradient_loss_hands_over_exact_gradients_in_the_weights_dtype() -> None:
    w = nn.Parameter(torch.randn(3, 4, dtype=torch.bfloat16))
    unused = nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    g = torch.randn(3, 4, dtype=torch.bfloat16)
    gradient_loss([w, unused], [g, None]).backward()
    assert torch.equal(w.grad, g)
    assert unused.grad is None


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


@pytest.mark.integration
@pytest.mark.parametrize("deepspeed", ["none", "zero2"])
def test_measuring_the_parts_leaves_the_update_unchanged(tmp_path: Path, deepspeed: str) -> None:
    # The original's launch lines pass --log_component_grad_norm (always on there) with a ZeRO-2 config: the
    # measured run takes the same optimizer steps (DeepSpeedUpdater.step fails on an extra micro-step) to
    # the same weights, with policy, β·KL and SFT-aux parts on every step. One process per run: DeepSpeed
    # keeps its process groups for the life of the process.
    trained, sft = {}, sftaux_yaml(tmp_path)
    for measured in (False, True):
        out = tmp_path / f"measured-{measured}"
        args = [*SMALL, "--dataset_config", str(train_yaml(tmp_path, "{clip_sim: 1.0}")), "--output_dir", str(out),
                "--max_steps", "2", "--save_steps", "2", "--deepspeed", deepspeed, "--beta", "0.5",
                "--sftaux_coef", "0.1", "--sftaux_dataset_config", str(sft)]  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "deepgen_trainer.train", *args, *(["--log_component_grad_norm"] * measured)],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        trained[measured] = (load_file(out / "checkpoint-2" / "transformer.safetensors"), metrics(out))
    (weights, rows), (measured_weights, measured_rows) = trained[False], trained[True]
    for name, value in weights.items():
        torch.testing.assert_close(measured_weights[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for step in (1, 2):
        assert measured_rows[step]["optim/steps"] == rows[step]["optim/steps"] == step
        assert measured_rows[step]["grad_norm"] == pytest.approx(rows[step]["grad_norm"], rel=1e-4)
        assert "grad_norm/policy" not in rows[step]
    # The KL's gradient is zero while the policy is the reference (step 1), not after.
    assert measured_rows[1]["grad_norm/beta_kl"] == 0
    assert all(measured_rows[2][f"grad_norm/{p}"] > 0 for p in ("policy", "beta_kl", "sftaux"))


@pytest.mark.integration
def test_a_lone_policy_part_is_the_gradient_the_optimizer_steps_with(tmp_path: Path) -> None:
    # No reference, no SFT-aux: the policy part is the whole gradient, summed over the step's backward
    # passes, so its norm is the optimizer's (pre-clipping) gradient norm.
    out = tmp_path / "run"
    args = [*SMALL, "--dataset_config", str(train_yaml(tmp_path, "{clip_sim: 1.0}")), "--output_dir", str(out),
            "--max_steps", "2", "--beta", "0", "--log_component_grad_norm"]  # fmt: skip
    train(parse_args(args, environ={}))
    for row in metrics(out).values():
        assert row["grad_norm/policy"] == pytest.approx(row["grad_norm"], rel=1e-5)
        assert "grad_norm/beta_kl" not in row


def test_component_norms_have_no_effect_under_zero3_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="deepgen_trainer")
    model = build_tiny(0)
    zero3 = parse_args(["--log_component_grad_norm", "--deepspeed", "zero3"], environ={})
    assert component_grad_parts(zero3, model) is None
    assert "--log_component_grad_norm has no effect under ZeRO-3" in caplog.text
    for deepspeed in ("zero2", "none"):
        cfg = parse_args(["--log_component_grad_norm", "--deepspeed", deepspeed], environ={})
        assert isinstance(component_grad_parts(cfg, model), GradParts)


def test_tiny_shape_from_the_built_model() -> None:
    shape = DeepGenShape.from_model(build_tiny(0))
    assert (shape.dit.num_layers, shape.vlm.hidden_size, shape.vae.latent_channels) == (2, 64, 4)
