"""DiffusionNFT's loss (`algorithms/diffusion_nft.py`): hand-derived values and gradients, a naive
per-sample loop, the optimality probability, the KL and the old policy's decay schedules."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from deepgen_trainer.algorithms.diffusion_nft import (
    forward_noised,
    nft_loss,
    old_policy_decay,
    optimality_probability,
    velocity_kl,
)


def test_optimality_probability_by_hand() -> None:
    # r = ½ + ½·clip(A/a, −1, 1) with a = 5: A = 0 → ½, a/2 → ¾, a → 1, −2a → 0.
    r = optimality_probability(torch.tensor([0.0, 2.5, 5.0, -10.0, -1.0]), 5.0)
    assert_close(r, torch.tensor([0.5, 0.75, 1.0, 0.0, 0.4]))
    with pytest.raises(ValueError, match="adv_clip must be > 0"):
        optimality_probability(torch.zeros(1), 0.0)


def _inputs(seed: int = 0, batch: int = 4):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(batch, 4, 4, 4, generator=g), torch.randn(batch, 4, 4, 4, generator=g)
    v_old = eps - x0 + 0.3 * torch.randn(batch, 4, 4, 4, generator=g)
    v = (v_old + 0.1 * torch.randn(batch, 4, 4, 4, generator=g)).requires_grad_()
    return x0, eps, v_old, v


def test_loss_matches_a_naive_per_sample_loop() -> None:
    x0, eps, v_old, v = _inputs()
    t, beta = torch.tensor([0.9, 0.5, 0.3, 0.1]), 0.1
    r = torch.tensor([1.0, 0.0, 0.5, 0.8])
    x_t = forward_noised(x0, eps, t)
    out = nft_loss(v, v_old, x_t, x0, t, r, beta)
    for b in range(4):
        tb = t[b].item()
        assert_close(x_t[b], (1 - tb) * x0[b] + tb * eps[b])
        pos = x_t[b] - tb * (beta * v[b] + (1 - beta) * v_old[b]) - x0[b]
        neg = x_t[b] - tb * ((1 + beta) * v_old[b] - beta * v[b]) - x0[b]
        lp = (pos**2).mean() / pos.abs().mean()
        ln = (neg**2).mean() / neg.abs().mean()
        assert out.positive[b].item() == pytest.approx(lp.item(), rel=1e-5)
        assert out.negative[b].item() == pytest.approx(ln.item(), rel=1e-5)
        assert out.loss[b].item() == pytest.approx(((r[b] * lp + (1 - r[b]) * ln) / beta).item(), rel=1e-5)


def test_on_policy_gradient_is_a_reward_signed_regression() -> None:
    # With v_old = v_θ (detached) both implicit policies equal v_θ, x̂0 = x_t − t·v and w = mean|x̂0 − x0|.
    # ∂L⁺/∂v = −2tβ(x̂0 − x0)/(w·D), ∂L⁻/∂v = +2tβ(x̂0 − x0)/(w·D), so
    # ∂L/∂v = 2t(1 − 2r)(x̂0 − x0)/(w·D): zero at r = ½, towards the sample (x̂0 → x0) at r = 1.
    x0, eps, _, v = _inputs(1)
    t = 0.6
    r = torch.tensor([0.5, 1.0, 0.0, 0.75])
    x_t = forward_noised(x0, eps, t)
    (grad,) = torch.autograd.grad(nft_loss(v, v.detach(), x_t, x0, t, r, 0.3).loss.sum(), v)
    err = (x_t - t * v - x0).detach()
    w = err.abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = 2 * t * (1 - 2 * r).view(-1, 1, 1, 1) * err / (w * err[0].numel())
    assert_close(grad, expected, rtol=1e-4, atol=1e-7)
    assert grad[0].abs().max() < 1e-7  # r = ½: the two halves cancel (to rounding)


def test_positive_sample_pulls_the_prediction_onto_it() -> None:
    # A gradient step on r = 1 lowers the clean-image error of v_θ; on r = 0 it raises it.
    x0, eps, v_old, v = _inputs(2)
    x_t = forward_noised(x0, eps, 0.7)
    for r, sign in ((1.0, -1), (0.0, 1)):
        vv = v.detach().clone().requires_grad_()
        (grad,) = torch.autograd.grad(nft_loss(vv, v_old, x_t, x0, 0.7, torch.full((4,), r), 0.5).loss.sum(), vv)
        before = (x_t - 0.7 * vv - x0).square().mean()
        after = (x_t - 0.7 * (vv - 1e-2 * grad) - x0).square().mean()
        assert (after - before).sign().item() == sign


def test_kl_has_no_variance_divisor_and_bad_arguments_are_refused() -> None:
    v, ref = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert_close(velocity_kl(3 * v, ref), torch.full((2,), 9.0))
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="beta must be > 0"):
        nft_loss(v, v, x, x, 0.5, torch.ones(2), 0.0)
    with pytest.raises(ValueError, match="same shape"):
        nft_loss(v, v, x, torch.zeros(2, 1, 2, 3), 0.5, torch.ones(2), 0.1)


def test_identical_prediction_gets_the_weight_floor_not_a_nan() -> None:
    x0 = torch.randn(2, 1, 2, 2)
    v = torch.zeros(2, 1, 2, 2, requires_grad=True)
    out = nft_loss(v, v.detach(), x0, x0, 0.5, torch.ones(2), 0.1)  # x_t = x0 and v = 0: x̂0 = x0 exactly
    assert torch.equal(out.loss, torch.zeros(2))


def test_decay_schedules() -> None:
    assert [old_policy_decay(s, 1) for s in (0, 1, 100, 500, 5000)] == [0.0, 0.001, 0.1, 0.5, 0.5]
    assert [old_policy_decay(s, 2) for s in (1, 74, 75, 175, 10_000)] == [0.0, 0.0, 0.0, 0.75, 0.999]
    with pytest.raises(ValueError, match="valid schedules: 1, 2"):
        old_policy_decay(1, 3)  # type: ignore[arg-type]
