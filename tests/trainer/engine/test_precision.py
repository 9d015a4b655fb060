"""bf16 training on CPU (CPU does bf16): the optimizer step keeps what bf16 would round away.

- `--deepspeed none --bf16`: AdamW steps float32 master weights, so the default lr 2e-6 moves the weights;
- the SFT-aux term (λ = 1e-4) reaches the optimizer in full: its own backward, float32 accumulation
  (the masters' gradients, or DeepSpeed's `data_types.grad_accum_dtype: fp32`), where one bf16 backward
  of the sum drops most of it.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from deepgen_trainer.config import parse_args
from deepgen_trainer.engine.distributed import World
from deepgen_trainer.engine.optim import TorchUpdater, Updater, build_updater
from deepgen_trainer.model.deepgen import DeepGen
from deepgen_trainer.model.tiny import build_tiny

CPU_WORLD = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SFT_COEF = 1e-4  # the default --sftaux_coef λ
PASSES = 30  # backward passes of one default step: the policy loss of each is scaled by 1/30


@pytest.fixture(scope="module")
def process_group():
    """The world of one DeepSpeed needs (made by the first `DeepSpeedUpdater`), left at the module's end:
    DeepSpeed keeps its groups, so a group destroyed between two engines breaks the second."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def bf16_model() -> DeepGen:
    return build_tiny(seed=0).to(torch.bfloat16)


def config(*flags: str):
    return parse_args(["--model", "tiny", "--bf16", "--lr_scheduler_type", "constant", *flags], environ={})


def test_plain_adamw_on_bf16_weights_loses_the_default_update() -> None:
    # The defect being fixed: bf16(0.02) + 2e-6 == 0.02, so torch AdamW on bf16 weights never moves them.
    weight = torch.nn.Parameter(torch.full((4,), 0.02, dtype=torch.bfloat16))
    optimizer = torch.optim.AdamW([weight], lr=2e-6, weight_decay=0.0)
    for _ in range(50):
        weight.grad = torch.ones_like(weight)
        optimizer.step()
    assert torch.equal(weight, torch.full((4,), 0.02, dtype=torch.bfloat16))


def test_deepspeed_none_bf16_weights_move_at_lr_2e_6() -> None:
    model = bf16_model()
    updater = build_updater(model.transformer, config("--deepspeed", "none", "--learning_rate", "2e-6"), CPU_WORLD, 100)
    assert isinstance(updater, TorchUpdater)
    assert all(m.dtype == torch.float32 for m in updater.masters)
    start = {k: v.float().clone() for k, v in updater.trainable_state(is_main=True).items()}
    steps = 60
    for _ in range(steps):
        # Gradient +1 on every trainable weight: each AdamW step moves it by lr (m/√v = 1).
        updater.backward(sum(p.float().sum() for p in model.trainable_parameters()))
        updater.step()
    state = updater.trainable_state(is_main=True)
    names = [n for n, p in model.transformer.named_parameters() if p.requires_grad]
    for name in names:
        assert state[name].dtype == torch.float32  # the masters are what a checkpoint and the EMA get
        torch.testing.assert_close(state[name], start[name] - steps * 2e-6, rtol=1e-5, atol=1e-6)
    # The bf16 model holds the masters rounded, so a weight moves once its master crossed half a bf16 step:
    # after 60 steps (1.2e-4) a fifth of the tiny DiT's weights have (those below ~0.03 in magnitude).
    params = dict(model.transformer.named_parameters())
    moved = sum(int((params[n].float() != start[n]).sum()) for n in names)
    total = sum(params[n].numel() for n in names)
    for name in names:
        assert torch.equal(params[name], state[name].to(torch.bfloat16))
    assert moved / total > 0.1


# The step's losses on a bf16 layer, with the loop's weights: 30 passes of the policy loss, each scaled by
# (1 − λ)/30, and λ·L_sft (λ = 1e-4) with a gradient of the same per-loss size: the SFT term is ~3e-3 of a
# pass's gradient and ~1e-4 of the step's, both below bf16's relative precision of 2⁻⁸ = 3.9e-3.
WIDTH = 64


def bf16_layer() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh(), torch.nn.Linear(WIDTH, WIDTH)).to(
        torch.bfloat16
    )


def pass_loss(layer: torch.nn.Module, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    x, advantage = torch.randn(8, WIDTH, generator=g), torch.randn(8, WIDTH, generator=g)
    return (layer(x.to(next(layer.parameters()).dtype)).float() * advantage).mean() * (1 - SFT_COEF) / PASSES


def sft_loss(layer: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000)
    z, target = torch.randn(8, WIDTH, generator=g), torch.randn(8, WIDTH, generator=g)
    return SFT_COEF * ((layer(z.to(next(layer.parameters()).dtype)).float() - target) ** 2).mean()


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.float().reshape(-1) for t in tensors])


def step_gradient(updater: Updater, layer: torch.nn.Module, with_sft: bool) -> torch.Tensor:
    """The float32 gradient the optimizer's step sees (flat), λ·L_sft in the last pass as the loop does it."""
    seen: list[torch.Tensor] = []
    inner = updater.optimizer if isinstance(updater, TorchUpdater) else updater.engine.optimizer.optimizer
    original = inner.step

    def step(*args, **kwargs):
        seen.append(flat(p.grad for group in inner.param_groups for p in group["params"]))
        return original(*args, **kwargs)

    inner.step = step
    try:
        for i in range(PASSES):
            if with_sft and i == PASSES - 1:
                updater.backward_small(sft_loss(layer))
            updater.backward(pass_loss(layer, i))
        updater.step()
    finally:
        inner.step = original
    [grad] = seen
    return grad


def bf16_accumulated_gradient(with_sft: bool) -> torch.Tensor:
    """The old path: every pass backpropagates into the bf16 .grad, λ·L_sft added to the last pass's loss."""
    layer = bf16_layer()
    for i in range(PASSES):
        loss = pass_loss(layer, i)
        if with_sft and i == PASSES - 1:
            loss = loss + sft_loss(layer)
        loss.backward()
    return flat(p.grad for p in layer.parameters())


def sft_gradient_alone(dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """λ·∇L_sft on its own (its bf16 backward is exact to its own 2⁻⁸), in float32."""
    layer = bf16_layer().to(dtype)
    return flat(torch.autograd.grad(sft_loss(layer), list(layer.parameters())))


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_sft_gradient_survives_bf16_with_deepspeed_none() -> None:
    cfg = config("--deepspeed", "none", "--learning_rate", "0")
    got = {}
    for case in (False, True):
        layer = bf16_layer()
        got[case] = step_gradient(build_updater(layer, cfg, CPU_WORLD, 10), layer, case)
    want = sft_gradient_alone()
    assert float(want.norm() / got[False].norm()) < 2**-8  # the term is below bf16's precision of the step
    # Its own backward, float32 accumulation: the optimizer sees λ·∇L_sft in full.
    assert relative_error(got[True] - got[False], want) < 0.02
    # The old path, 30 backward passes accumulated in bf16 with the term in the last: it is lost.
    old = {case: bf16_accumulated_gradient(case) for case in (False, True)}
    assert relative_error(old[True] - old[False], want) > 0.5


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp32"])
def test_sft_gradient_survives_bf16_under_zero2(bf16: bool, process_group: None) -> None:
    # bf16: a second backward within the micro-step, into the float32 partitions. fp32 (one dtype, where ZeRO-2
    # keeps only a micro-step's last backward): the term joins the next backward.
    pytest.importorskip("deepspeed")
    dtype = torch.bfloat16 if bf16 else torch.float32
    cfg = config(
        "--bf16" if bf16 else "--no-bf16",
        "--deepspeed", "zero2", "--learning_rate", "0", "--prompts_per_rank", "1", "--rollout_n", "2",
        "--rollout_micro_batch_size", "2", "--atrain_micro_batch_size", "2", "--num_inference_steps", "31",
        "--timestep_fraction", "0.97",
    )  # fmt: skip
    assert cfg.gradient_accumulation_steps(1) == PASSES
    got = {}
    for case in (False, True):
        layer = bf16_layer().to(dtype)
        got[case] = step_gradient(build_updater(layer, cfg, CPU_WORLD, 10), layer, case)
    want = sft_gradient_alone(dtype)
    # One rank: ZeRO's partition is the weights flattened in order (plus alignment padding at the end).
    assert relative_error((got[True] - got[False])[: len(want)], want) < 0.02


def test_bf16_master_weights_resume_exactly() -> None:
    # A checkpoint holds the float32 masters (trainable_state); a resumed run continues from them, not from
    # their bf16 rounding, and takes the same next step as the unbroken run.
    cfg = config("--deepspeed", "none", "--learning_rate", "2e-6")
    layer = bf16_layer()
    updater = build_updater(layer, cfg, CPU_WORLD, 100)
    for i in range(3):
        updater.backward(pass_loss(layer, i))
        updater.step()
    saved = SimpleNamespace(
        path="checkpoint-3", trainable={k: v.clone() for k, v in updater.trainable_state(is_main=True).items()},
        **copy.deepcopy(updater.checkpoint_state()),  # as written to disk: not the live optimizer's tensors
    )  # fmt: skip
    resumed_layer = bf16_layer()
    resumed = build_updater(resumed_layer, cfg, CPU_WORLD, 100)
    resumed.restore(saved)
    for name, value in resumed.trainable_state(is_main=True).items():
        assert torch.equal(value, saved.trainable[name]), name
    assert resumed.optimizer_steps == 3
    for run, model in ((updater, layer), (resumed, resumed_layer)):
        run.backward(pass_loss(model, 3))
        run.step()
    after = resumed.trainable_state(is_main=True)
    for name, value in updater.trainable_state(is_main=True).items():
        assert torch.equal(after[name], value), name
