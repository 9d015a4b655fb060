"""deepgen_trainer.algorithms.policy_loss: clipped surrogate, KL penalty, flow-matching loss, approx KL."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from deepgen_trainer.algorithms.policy_loss import (
    KL_TYPES,
    approx_kl,
    clipped_policy_loss,
    flow_matching_inputs,
    flow_matching_loss,
    kl_penalty,
)


def naive_clipped_loss(
    log_prob: list[float], old: list[float], adv: list[float], c: float
) -> tuple[list[float], list[bool]]:
    losses, clipped = [], []
    for lp, o, a in zip(log_prob, old, adv, strict=True):
        r = math.exp(lp - o)
        losses.append(max(-a * r, -a * min(max(r, 1 - c), 1 + c)))
        clipped.append(r < 1 - c or r > 1 + c)
    return losses, clipped


def naive_per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    out = []
    for i in range(a.shape[0]):
        xs, ys = a[i].flatten().tolist(), b[i].flatten().tolist()
        out.append(sum((x - y) ** 2 for x, y in zip(xs, ys, strict=True)) / len(xs))
    return out


# --- clipped_policy_loss ---


def test_clipped_loss_hand_derived() -> None:
    # c = 0.05; r = e^0.1 = 1.1051709 (above 1.05) or e^−0.1 = 0.9048374 (below 0.95).
    #   A = +1, r = 1.105: max(−1.105, −1.05) = −1.05     (clipped branch)
    #   A = −1, r = 1.105: max(+1.105, +1.05) = +1.105    (unclipped: pessimistic)
    #   A = +1, r = 0.905: max(−0.905, −0.95) = −0.905    (unclipped)
    #   A = −1, r = 0.905: max(+0.905, +0.95) = +0.95     (clipped branch)
    #   A = +2, r = e^0.01 = 1.0100502 (inside): −2·1.0100502 = −2.0201003
    log_prob = torch.tensor([0.1, 0.1, -0.1, -0.1, 0.01])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    loss, ratio, clipped = clipped_policy_loss(log_prob, torch.zeros(5), adv, 0.05)
    assert_close(ratio, torch.tensor([1.1051709, 1.1051709, 0.9048374, 0.9048374, 1.0100502]))
    assert_close(loss, torch.tensor([-1.05, 1.1051709, -0.9048374, 0.95, -2.0201003]))
    assert clipped.tolist() == [True, True, True, True, False]


def test_clipped_loss_parity_with_naive() -> None:
    g = torch.Generator().manual_seed(0)
    log_prob = torch.randn(64, generator=g, dtype=torch.float64) * 0.1
    old = log_prob + torch.randn(64, generator=g, dtype=torch.float64) * 0.05
    adv = torch.randn(64, generator=g, dtype=torch.float64)
    loss, _ratio, clipped = clipped_policy_loss(log_prob, old, adv, 0.03)
    ref_loss, ref_clipped = naive_clipped_loss(log_prob.tolist(), old.tolist(), adv.tolist(), 0.03)
    assert_close(loss, torch.tensor(ref_loss, dtype=torch.float64))
    assert clipped.tolist() == ref_clipped
    assert 0 < sum(ref_clipped) < 64  # both sides exercised


@pytest.mark.parametrize(
    ("dtype", "margin"),
    [
        # float64: 1e-9 in log space is far above its rounding (1e-16).
        (torch.float64, 1e-9),
        # float32: ratios near 1 are spaced 1.2e-7 apart; 1e-6 (1% of c) is a few ulps off the edge.
        (torch.float32, 1e-6),
    ],
)
def test_clipping_engages_exactly_outside_the_range(dtype: torch.dtype, margin: float) -> None:
    c = 1e-4
    upper, lower = math.log1p(c), math.log1p(-c)
    log_prob = torch.tensor(
        [upper - margin, upper + margin, lower + margin, lower - margin, 0.0], dtype=dtype
    )  # just inside, just outside, for 1 + c and 1 − c; and the on-policy ratio 1
    _, ratio, clipped = clipped_policy_loss(log_prob, torch.zeros(5, dtype=dtype), torch.ones(5, dtype=dtype), c)
    assert clipped.tolist() == [False, True, False, True, False]
    assert ratio.dtype == dtype


@pytest.mark.parametrize(
    ("advantage", "log_ratio", "zero_grad"),
    [
        (1.0, 0.1, True),  # A > 0, r > 1 + c: gain capped, no gradient
        (1.0, -0.1, False),  # A > 0, r < 1 − c: unclipped term is the max, keeps its gradient
        (-1.0, -0.1, True),  # A < 0, r < 1 − c: capped
        (-1.0, 0.1, False),  # A < 0, r > 1 + c: keeps its gradient
        (1.0, 0.01, False),  # inside the range
    ],
)
def test_gradient_on_each_side_of_the_clip(advantage: float, log_ratio: float, zero_grad: bool) -> None:
    log_prob = torch.tensor([log_ratio], requires_grad=True)
    loss, ratio, _ = clipped_policy_loss(log_prob, torch.zeros(1), torch.tensor([advantage]), 0.05)
    loss.sum().backward()
    assert log_prob.grad is not None
    if zero_grad:
        assert log_prob.grad.item() == 0.0
    else:
        # d(−A·r)/d log p = −A·r
        assert_close(log_prob.grad, -advantage * ratio.detach())


def test_old_log_prob_in_bf16_is_rejected() -> None:
    with pytest.raises(TypeError, match="float32"):
        clipped_policy_loss(torch.zeros(2), torch.zeros(2, dtype=torch.bfloat16), torch.ones(2), 1e-4)


def test_bf16_rounding_dwarfs_the_clip_range() -> None:
    # Why old log-probs stay in fp32: typical cps_sde log-probs are −σ'²-sized (0.1 to 1); bf16
    # rounding moves them by up to ~2e-3, i.e. an on-policy ratio of e^±2e-3 against a 1e-4 clip.
    log_prob = torch.linspace(-0.95, -0.5, 101)
    rounding = (log_prob.bfloat16().float() - log_prob).abs()
    assert rounding.max() > 10 * 1e-4
    _, _, clipped = clipped_policy_loss(log_prob, log_prob.bfloat16().float(), torch.ones(101), 1e-4)
    assert clipped.float().mean() > 0.5  # most on-policy samples would be "clipped"


def test_clipped_loss_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="clip_range must be > 0"):
        clipped_policy_loss(torch.zeros(2), torch.zeros(2), torch.ones(2), 0.0)
    with pytest.raises(ValueError, match="same shape"):
        clipped_policy_loss(torch.zeros(2), torch.zeros(3), torch.ones(2), 0.1)


# --- kl_penalty ---


@pytest.mark.parametrize("kind", KL_TYPES)
def test_kl_is_zero_when_policy_equals_reference(kind: str) -> None:
    x = torch.randn(3, 2, 4, 4)
    assert torch.equal(kl_penalty(kind, x, x.clone(), torch.tensor([0.1, 0.0, 1.0])), torch.zeros(3))  # type: ignore[arg-type]


def test_kl_hand_derived() -> None:
    # policy − reference = 0.5 everywhere → mean square 0.25.
    #   s = 0.5: 0.25/(2·0.25 + 1e-7) = 0.4999999;  s = 0.1: 0.25/(0.02 + 1e-7) = 12.4999375
    policy = torch.ones(2, 1, 2, 2)
    kl = kl_penalty("v-based", policy, policy * 0.5, torch.tensor([0.5, 0.1]))
    assert_close(kl, torch.tensor([0.25 / (0.5 + 1e-7), 0.25 / (0.02 + 1e-7)]))


@pytest.mark.parametrize("kind", KL_TYPES)
def test_kl_parity_with_naive(kind: str) -> None:
    g = torch.Generator().manual_seed(1)
    policy = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    reference = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    std = torch.tensor([0.3, 0.0, 1.0, 0.05], dtype=torch.float64)
    expected = [
        m / (2 * s**2 + 1e-7) for m, s in zip(naive_per_sample_mse(policy, reference), std.tolist(), strict=True)
    ]
    assert_close(kl_penalty(kind, policy, reference, std), torch.tensor(expected, dtype=torch.float64))  # type: ignore[arg-type]


def test_x_based_kl_is_the_gaussian_kl() -> None:
    # KL(N(μθ, s²) ‖ N(μref, s²)) per element = (μθ − μref)²/(2s²); averaged over elements.
    g = torch.Generator().manual_seed(2)
    mean, mean_ref = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    std = torch.tensor([0.4, 0.9])
    scale = std.view(-1, 1, 1, 1).expand_as(mean)
    exact = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, scale), torch.distributions.Normal(mean_ref, scale)
    ).mean(dim=(1, 2, 3))
    assert_close(kl_penalty("x-based", mean, mean_ref, std), exact, rtol=1e-5, atol=1e-6)


def test_kl_float_std_gradient_and_finite_at_zero_std() -> None:
    policy = torch.full((2, 1, 2, 2), 1.0, requires_grad=True)
    reference = torch.zeros(2, 1, 2, 2, requires_grad=True)
    kl = kl_penalty("v-based", policy, reference, 0.0)
    assert torch.isfinite(kl).all()
    assert_close(kl, torch.full((2,), 1e7))
    kl.sum().backward()
    assert policy.grad is not None
    assert reference.grad is None


def test_kl_rejects_unknown_kind_and_bad_std() -> None:
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="v-based, x-based"):
        kl_penalty("k3", x, x, 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(2,\) tensor"):
        kl_penalty("v-based", x, x, torch.ones(3))


# --- flow matching ---


def test_flow_matching_inputs_hand_derived() -> None:
    # x_σ = (1 − σ)z + σε: z = 1, ε = 3 → σ = 0.25: 0.75 + 0.75 = 1.5;  σ = 1: 3;  σ = 0: 1
    z, eps = torch.ones(3, 1, 2, 2), torch.full((3, 1, 2, 2), 3.0)
    x = flow_matching_inputs(z, eps, torch.tensor([0.25, 1.0, 0.0]))
    assert_close(x[:, 0, 0, 0], torch.tensor([1.5, 3.0, 1.0]))
    assert_close(flow_matching_inputs(z, eps, 0.5), torch.full((3, 1, 2, 2), 2.0))


def test_flow_matching_target_is_the_path_velocity() -> None:
    # d x_σ / dσ = ε − z: a model predicting exactly that has zero loss.
    g = torch.Generator().manual_seed(3)
    z, eps = (
        torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64),
        torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64),
    )
    h = 1e-6
    velocity = (flow_matching_inputs(z, eps, 0.3 + h) - flow_matching_inputs(z, eps, 0.3)) / h
    assert_close(velocity, eps - z, rtol=1e-6, atol=1e-6)
    assert_close(flow_matching_loss(eps - z, z, eps), torch.zeros(2, dtype=torch.float64))


def test_flow_matching_loss_parity_with_naive() -> None:
    g = torch.Generator().manual_seed(4)
    v, z, eps = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    loss = flow_matching_loss(v, z, eps)
    assert loss.shape == (3,)
    assert_close(loss, torch.tensor(naive_per_sample_mse(v, eps - z)))


def test_flow_matching_loss_in_bf16_is_computed_in_fp32() -> None:
    v = torch.randn(2, 1, 4, 4, requires_grad=True)
    z, eps = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    loss = flow_matching_loss(v.bfloat16(), z.bfloat16(), eps.bfloat16())
    assert loss.dtype == torch.float32
    loss.mean().backward()
    assert v.grad is not None


def test_flow_matching_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        flow_matching_loss(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 3))
    with pytest.raises(ValueError, match=r"\(2,\) tensor"):
        flow_matching_inputs(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), torch.ones(3))


# --- approx_kl ---


def test_approx_kl_hand_derived() -> None:
    # ½·mean([0.1², 0.1², 0², 0.2²]) = ½·(0.01 + 0.01 + 0 + 0.04)/4 = 0.0075
    log_prob = torch.tensor([0.1, -0.1, 0.3, 0.2], requires_grad=True)
    old = torch.tensor([0.0, 0.0, 0.3, 0.0])
    kl = approx_kl(log_prob, old)
    assert kl.shape == ()
    assert_close(kl, torch.tensor(0.0075))
    assert not kl.requires_grad
    assert approx_kl(old, old) == 0
