"""GRPO-Guard's RatioNorm and loss (`algorithms/grpo_guard.py`): hand-derived identities on each
sampler's real transitions, a naive per-sample loop, the centring that motivates it, and edge cases."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from deepgen_trainer.algorithms.grpo_guard import grpo_guard_loss, guard_metrics, noise_bucket, normalized_log_ratio
from deepgen_trainer.algorithms.sde import SAMPLERS, sde_step_with_logprob

# (σ, σ') steps of the tiny model's 8-step grid: high noise, middle, and the step into low noise.
STEPS = [(1.0, 0.9545), (0.548, 0.338), (0.338, 0.0089)]


def _transition(sampler: str, sigma: float, sigma_next: float, seed: int = 0, batch: int = 6):
    """A transition sampled by an old velocity and scored under a nearby new one (exact log-density)."""
    g = torch.Generator().manual_seed(seed)
    x, v_old = torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 4, 8, 8, generator=g)
    x_next, old_lp, old_mean, _ = sde_step_with_logprob(
        sampler, v_old, x, sigma, sigma_next, 1.0, generator=g, exact_logprob=True
    )
    v_new = (v_old + 0.05 * torch.randn(v_old.shape, generator=g)).requires_grad_()
    _, lp, mean, std = sde_step_with_logprob(
        sampler, v_new, x, sigma, sigma_next, 1.0, prev_sample=x_next, exact_logprob=True
    )
    return x_next, old_lp, old_mean, v_new, lp, mean, std


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("step", STEPS)
def test_ratio_norm_is_the_noise_times_the_mean_shift_for_every_sampler(
    sampler: str, step: tuple[float, float]
) -> None:
    # Derivation: log p = −|x' − μ|²/(2s²D) − log s − ½log 2π, so with δ = μ_θ − μ_old
    # Δ = (|x' − μ_old|² − |x' − μ_θ|²)/(2s²D) = (2(x' − μ_old)·δ − |δ|²)/(2s²D), and
    # s·(Δ + m/(2s²)) with m = |δ|²/D is (x' − μ_old)·δ/(s·D): the sample's noise ε = (x' − μ_old)/s
    # dotted with the mean shift, over D. This needs s to be the transition's own std.
    x_next, old_lp, old_mean, _, lp, mean, std = _transition(sampler, *step)
    log_ratio, delta = normalized_log_ratio(lp, old_lp, mean, old_mean, std)
    d = mean[0].numel()
    expected = ((x_next - old_mean) * (mean - old_mean)).flatten(1).sum(1) / (std * d)
    assert_close(log_ratio, expected, rtol=1e-4, atol=1e-6)
    assert_close(delta, lp - old_lp)


def test_loss_matches_a_naive_per_sample_loop() -> None:
    _, old_lp, old_mean, _, lp, mean, std = _transition("flowgrpo_sde", 0.548, 0.338, batch=5)
    adv = torch.tensor([1.5, -0.7, 0.0, 2.0, -3.0])
    dt = 0.338 - 0.548
    out = grpo_guard_loss(lp, old_lp, mean, old_mean, std, dt, adv, 0.01, 0.02)
    for b in range(5):
        s = std[b].item()
        delta = (lp[b] - old_lp[b]).item()
        m = ((mean[b] - old_mean[b]) ** 2).mean().item()
        ratio = torch.exp(torch.tensor(s * delta + m / (2 * s), dtype=torch.float64)).item()
        a = adv[b].item()
        loss = max(-a * ratio, -a * min(max(ratio, 0.99), 1.02)) / -dt
        assert out.loss[b].item() == pytest.approx(loss, rel=1e-4, abs=1e-7)
        assert out.ratio[b].item() == pytest.approx(ratio, rel=1e-4)
        assert out.clipped[b].item() == (ratio < 0.99 or ratio > 1.02)


def test_normalised_ratio_is_centred_where_the_raw_ratio_drifts() -> None:
    # Under the sampling policy the raw log-ratio has mean −m/(2s²): on the low-noise step (s = 0.0089)
    # even a small mean shift drives the raw ratio far below 1, while RatioNorm keeps it at 1 ± noise.
    # Here δμ = (1 − σ')·σ·δv ≈ 0.99·0.338·0.05·N(0, 1), m ≈ 2.8e-4, so Δ ≈ −m/(2s²) ≈ −1.8: raw r ≈ 0.17.
    _, old_lp, old_mean, _, lp, mean, std = _transition("cps_sde", 0.338, 0.0089, batch=256)
    out = grpo_guard_loss(lp, old_lp, mean, old_mean, std, -0.33, torch.ones(256), 0.2)
    assert out.raw_ratio.mean() < 0.3
    assert abs(out.ratio.mean().item() - 1.0) < 0.01
    assert out.ratio.std() < 0.02


def test_gradient_is_weighted_by_one_over_minus_dt() -> None:
    # The weight multiplies the clipped surrogate: ∂L/∂v = ∂surrogate/∂v / (−dt).
    _, old_lp, old_mean, v, lp, mean, std = _transition("dance_sde", 0.548, 0.338)
    adv = torch.linspace(-1, 1, 6)
    (g_weighted,) = torch.autograd.grad(
        grpo_guard_loss(lp, old_lp, mean, old_mean, std, -0.21, adv, 1.0).loss.sum(), v, retain_graph=True
    )
    log_ratio, _ = normalized_log_ratio(lp, old_lp, mean, old_mean, std)
    (g_plain,) = torch.autograd.grad((-adv * torch.exp(log_ratio)).sum(), v)
    assert_close(g_weighted, g_plain / 0.21, rtol=1e-4, atol=1e-8)


def test_upper_clip_is_asymmetric_when_given() -> None:
    lp, old = torch.zeros(2), torch.zeros(2)
    mean = torch.zeros(2, 1, 1, 1)
    old_mean = torch.zeros(2, 1, 1, 1)
    std = torch.ones(2)
    # r̃ = exp(s·Δ) = exp(0.15) ≈ 1.16 for sample 0, exp(−0.15) ≈ 0.86 for sample 1.
    lp = torch.tensor([0.15, -0.15])
    sym = grpo_guard_loss(lp, old, mean, old_mean, std, -1.0, torch.ones(2), 0.1)
    high = grpo_guard_loss(lp, old, mean, old_mean, std, -1.0, torch.ones(2), 0.1, 0.2)
    assert sym.clipped.tolist() == [True, True]
    assert high.clipped.tolist() == [False, True]


def test_deterministic_steps_and_bad_inputs() -> None:
    mean = torch.randn(2, 1, 2, 2)
    log_ratio, _ = normalized_log_ratio(torch.zeros(2), torch.zeros(2), mean, mean + 1, torch.zeros(2))
    assert torch.equal(log_ratio, torch.zeros(2))  # s = 0: a point mass, no signal
    with pytest.raises(TypeError, match="float32"):
        normalized_log_ratio(torch.zeros(2), torch.zeros(2).bfloat16(), mean, mean, torch.ones(2))
    with pytest.raises(ValueError, match="dt must be < 0"):
        grpo_guard_loss(torch.zeros(2), torch.zeros(2), mean, mean, torch.ones(2), 0.0, torch.ones(2), 0.1)
    with pytest.raises(ValueError, match="clip_range must be > 0"):
        grpo_guard_loss(torch.zeros(2), torch.zeros(2), mean, mean, torch.ones(2), -0.1, torch.ones(2), 0.1, 0.0)


def test_metrics_per_noise_bucket() -> None:
    assert [noise_bucket(s) for s in (1.0, 0.7, 0.5, 0.2, 0.0)] == ["high", "high", "mid", "low", "low"]
    _, old_lp, old_mean, _, lp, mean, std = _transition("flowgrpo_sde", 0.548, 0.338)
    out = grpo_guard_loss(lp, old_lp, mean, old_mean, std, -0.21, torch.ones(6), 0.2)
    metrics = guard_metrics(out, 0.548)
    assert set(metrics) == {
        f"guard/{k}/mid" for k in ("ratio_raw_mean", "ratio_raw_std", "ratio_norm_mean", "ratio_norm_std", "clipfrac")
    }
    assert metrics["guard/ratio_norm_mean/mid"] == pytest.approx(out.ratio.mean().item())
