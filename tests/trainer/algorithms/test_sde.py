"""deepgen_trainer.algorithms.sde: hand-derived steps, parity with a naive per-element implementation, edge cases."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.testing import assert_close

from deepgen_trainer.algorithms.policy_loss import kl_penalty
from deepgen_trainer.algorithms.sde import LOGPROB_MIN_STD, SAMPLERS, ode_step, sde_step_with_logprob

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def naive_step(
    sampler: str,
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigmas: list[float],
    sigmas_next: list[float],
    eta: float,
    prev_sample: torch.Tensor,
    exact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The design doc's formulas, literally, one element at a time in Python floats.

    Returns (log_prob (B,), mean (B, ...), std (B,)) in float64.
    """
    means, log_probs, stds = [], [], []
    for i in range(sample.shape[0]):
        s, s_next = sigmas[i], sigmas_next[i]
        dt = s_next - s
        if s_next == 0:
            std = 0.0
        elif sampler == "cps_sde":
            std = s_next * math.sin(eta * math.pi / 2)
        elif sampler == "flowgrpo_sde":
            std_t = eta * math.sqrt(s / (1 - (s_next if s == 1 else s)))
            std = std_t * math.sqrt(-dt)
        else:
            std = eta * math.sqrt(-dt)
        mean_i, total = [], 0.0
        xs, vs, ps = (t[i].flatten().tolist() for t in (sample, velocity, prev_sample))
        for x, v, p in zip(xs, vs, ps, strict=True):
            x0, x1 = x - s * v, x + (1 - s) * v
            if s_next == 0:
                mu = x0
            elif sampler == "cps_sde":
                mu = (1 - s_next) * x0 + math.sqrt(s_next**2 - std**2) * x1
            elif sampler == "flowgrpo_sde":
                mu = x + (v + std_t**2 / (2 * s) * x1) * dt
            else:
                mu = x + (v + 0.5 * eta**2 * x1 / s) * dt
            mean_i.append(mu)
            d = p - mu
            if std == 0:
                total += 0.0
            elif sampler == "cps_sde" and not exact:
                total += -(d**2)
            else:
                total += -(d**2) / (2 * std**2) - math.log(std) - HALF_LOG_2PI
        means.append(torch.tensor(mean_i, dtype=torch.float64).view(sample.shape[1:]))
        log_probs.append(total / len(xs))
        stds.append(std)
    return torch.tensor(log_probs, dtype=torch.float64), torch.stack(means), torch.tensor(stds, dtype=torch.float64)


def _inputs(batch: int = 4, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 2, 3, 3)
    return tuple(torch.randn(shape, generator=g, dtype=dtype) for _ in range(3))


def _one(value: float) -> torch.Tensor:
    return torch.full((1, 1, 1, 1), value)


# --- hand-derived cases (x = 1, v = 0.5 everywhere; one element so the mean over D is the element) ---


def test_cps_sde_hand_derived() -> None:
    # σ = 0.5, σ' = 0.25, η = 0.5:
    #   x̂0 = 1 − 0.5·0.5 = 0.75, x̂1 = 1 + 0.5·0.5 = 1.25
    #   s = 0.25·sin(π/4) = 0.1767767, √(σ'² − s²) = √(0.0625 − 0.03125) = 0.1767767
    #   μ = 0.75·0.75 + 0.1767767·1.25 = 0.5625 + 0.2209709 = 0.7834709
    # scoring x' = 0.9: d = 0.1165291
    #   simplified log p = −d² = −0.0135790
    #   exact log p = −d²/(2s²) − log s − ½log 2π = −0.2172646 + 1.7328680 − 0.9189385 = 0.5966648
    prev, log_prob, mean, std = sde_step_with_logprob("cps_sde", _one(0.5), _one(1.0), 0.5, 0.25, 0.5, _one(0.9))
    assert_close(mean, _one(0.7834709))
    assert_close(std, torch.tensor([0.1767767]))
    assert_close(log_prob, torch.tensor([-0.0135790]))
    assert_close(prev, _one(0.9))
    _, exact, _, _ = sde_step_with_logprob(
        "cps_sde", _one(0.5), _one(1.0), 0.5, 0.25, 0.5, _one(0.9), exact_logprob=True
    )
    assert_close(exact, torch.tensor([0.5966648]))


def test_flowgrpo_sde_hand_derived() -> None:
    # σ = 0.8, σ' = 0.6, η = 0.5, dt = −0.2:
    #   std_t = 0.5·√(0.8/0.2) = 1, std_t²/(2σ) = 1/1.6 = 0.625, x̂1 = 1 + 0.2·0.5 = 1.1
    #   μ = 1 + (0.5 + 0.625·1.1)·(−0.2) = 1 − 0.2375 = 0.7625, std = 1·√0.2 = 0.4472136
    # scoring x' = μ + std (one standard deviation away):
    #   log p = −½ − log 0.4472136 − ½log 2π = −0.5 + 0.8047190 − 0.9189385 = −0.6142196
    std = math.sqrt(0.2)
    _, log_prob, mean, out_std = sde_step_with_logprob(
        "flowgrpo_sde", _one(0.5), _one(1.0), 0.8, 0.6, 0.5, _one(0.7625 + std)
    )
    assert_close(mean, _one(0.7625))
    assert_close(out_std, torch.tensor([std]))
    assert_close(log_prob, torch.tensor([-0.6142196]))


def test_flowgrpo_sde_first_step_sigma_one() -> None:
    # σ = 1 would divide by 1 − σ = 0: the next grid value σ' = 0.8 stands in for σ there.
    #   std_t = 0.5·√(1/(1 − 0.8)) = 1.1180340, std_t²/(2σ) = 1.25/2 = 0.625, x̂1 = x + 0·v = 1
    #   μ = 1 + (0.5 + 0.625·1)·(−0.2) = 0.775, std = 1.1180340·√0.2 = 0.5
    # scoring x' = μ: log p = −log 0.5 − ½log 2π = 0.6931472 − 0.9189385 = −0.2257913
    _, log_prob, mean, std = sde_step_with_logprob("flowgrpo_sde", _one(0.5), _one(1.0), 1.0, 0.8, 0.5, _one(0.775))
    assert_close(mean, _one(0.775))
    assert_close(std, torch.tensor([0.5]))
    assert_close(log_prob, torch.tensor([-0.2257913]))


def test_flowgrpo_sde_zero_length_first_step_is_identity() -> None:
    # σ = σ' = 1: dt = 0, the step must be x' = x with std 0, finite everywhere.
    velocity, sample, _ = _inputs(dtype=torch.float32)
    prev, log_prob, mean, std = sde_step_with_logprob("flowgrpo_sde", velocity, sample, 1.0, 1.0, 1.0)
    assert_close(prev, sample)
    assert_close(mean, sample)
    assert torch.equal(std, torch.zeros(4))
    assert torch.equal(log_prob, torch.zeros(4))


def test_dance_sde_hand_derived() -> None:
    # σ = 0.5, σ' = 0.25, η = 0.5, dt = −0.25:
    #   ½η²·x̂1/σ = 0.125·1.25/0.5 = 0.3125, μ = 1 + (0.5 + 0.3125)·(−0.25) = 0.796875
    #   std = 0.5·√0.25 = 0.25
    # scoring x' = 0.921875 (d = 0.125 = std/2):
    #   log p = −⅛ − log 0.25 − ½log 2π = −0.125 + 1.3862944 − 0.9189385 = 0.3423559
    _, log_prob, mean, std = sde_step_with_logprob("dance_sde", _one(0.5), _one(1.0), 0.5, 0.25, 0.5, _one(0.921875))
    assert_close(mean, _one(0.796875))
    assert_close(std, torch.tensor([0.25]))
    assert_close(log_prob, torch.tensor([0.3423558]))


def test_ode_step_hand_derived() -> None:
    # x + v·(σ' − σ) = 1 + 0.5·(0.3 − 0.5) = 0.9
    assert_close(ode_step(_one(0.5), _one(1.0), 0.5, 0.3), _one(0.9))


# --- parity with the naive implementation ---

SIGMAS = [1.0, 0.7, 0.3, 0.05]
SIGMAS_NEXT = [0.9, 0.5, 0.0, 0.02]  # sample 0 is a first step (σ = 1), sample 2 a last step (σ' = 0)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_parity_with_naive_float64(sampler: str, exact: bool) -> None:
    velocity, sample, prev = _inputs()
    out_prev, log_prob, mean, std = sde_step_with_logprob(
        sampler,
        velocity,
        sample,
        torch.tensor(SIGMAS),
        torch.tensor(SIGMAS_NEXT),
        0.7,
        prev_sample=prev,
        exact_logprob=exact,
    )
    # The grid goes through float32 tensors here, as it does from the scheduler.
    sigmas = torch.tensor(SIGMAS).tolist()
    sigmas_next = torch.tensor(SIGMAS_NEXT).tolist()
    ref_log_prob, ref_mean, ref_std = naive_step(sampler, velocity, sample, sigmas, sigmas_next, 0.7, prev, exact)
    assert out_prev.dtype == log_prob.dtype == mean.dtype == std.dtype == torch.float64
    assert_close(mean, ref_mean)
    assert_close(std, ref_std)
    assert_close(log_prob, ref_log_prob)
    assert torch.equal(out_prev, prev)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_parity_with_naive_float32(sampler: str) -> None:
    velocity, sample, prev = _inputs(dtype=torch.float32)
    _, log_prob, mean, std = sde_step_with_logprob(
        sampler, velocity, sample, torch.tensor(SIGMAS), torch.tensor(SIGMAS_NEXT), 1.0, prev_sample=prev
    )
    sigmas, sigmas_next = torch.tensor(SIGMAS).tolist(), torch.tensor(SIGMAS_NEXT).tolist()
    ref_log_prob, ref_mean, ref_std = naive_step(sampler, velocity, sample, sigmas, sigmas_next, 1.0, prev)
    assert log_prob.dtype == mean.dtype == std.dtype == torch.float32
    assert_close(mean, ref_mean.float())
    assert_close(std, ref_std.float())
    assert_close(log_prob, ref_log_prob.float(), rtol=1e-5, atol=1e-5)


# --- required properties ---


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_stored_transition_scores_exactly_as_sampled(sampler: str) -> None:
    # The policy update recomputes log p for the stored (x_t, x_{t+1}) with the same weights on
    # its first pass: the ratio must be exactly 1 in fp32, or clipping at 1 ± 1e-4 fires on noise.
    velocity, sample, _ = _inputs(batch=3, dtype=torch.float32)
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.2]), torch.tensor([0.95, 0.55, 0.1])
    g = torch.Generator().manual_seed(1)
    prev, old_log_prob, _, _ = sde_step_with_logprob(sampler, velocity, sample, sigma, sigma_next, 1.0, generator=g)
    _, new_log_prob, _, _ = sde_step_with_logprob(sampler, velocity, sample, sigma, sigma_next, 1.0, prev_sample=prev)
    assert torch.equal(new_log_prob, old_log_prob)
    assert torch.equal(torch.exp(new_log_prob - old_log_prob), torch.ones(3))


def test_stored_transition_with_bf16_model_output() -> None:
    # A bf16 DiT output is promoted once, the same way in rollout and update.
    velocity, sample, _ = _inputs(batch=2, dtype=torch.float32)
    velocity = velocity.bfloat16()
    g = torch.Generator().manual_seed(2)
    prev, old, _, _ = sde_step_with_logprob("cps_sde", velocity, sample, 0.6, 0.5, 1.0, generator=g)
    _, new, _, _ = sde_step_with_logprob("cps_sde", velocity, sample, 0.6, 0.5, 1.0, prev_sample=prev)
    assert prev.dtype == old.dtype == torch.float32
    assert torch.equal(new, old)


def test_cps_sde_eta_one_is_x0_prediction_plus_sigma_next_noise() -> None:
    # η = 1: s = σ', √(σ'² − s²) = 0, so x' = (1 − σ')·x̂0 + σ'·ε.
    velocity, sample, _ = _inputs(dtype=torch.float32)
    sigma, sigma_next = 0.7, 0.4
    prev, _, mean, std = sde_step_with_logprob(
        "cps_sde", velocity, sample, sigma, sigma_next, 1.0, generator=torch.Generator().manual_seed(3)
    )
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(3))
    x0 = sample - sigma * velocity
    assert_close(mean, (1 - sigma_next) * x0)
    assert_close(prev, (1 - sigma_next) * x0 + sigma_next * noise)
    assert_close(std, torch.full((4,), sigma_next))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_last_step_is_deterministic(sampler: str) -> None:
    velocity, sample, _ = _inputs(dtype=torch.float32)
    velocity.requires_grad_(True)
    outs = [
        sde_step_with_logprob(sampler, velocity, sample, 0.2, 0.0, 1.0, generator=torch.Generator().manual_seed(seed))
        for seed in (0, 1)
    ]
    (prev_a, log_prob_a, mean_a, std_a), (prev_b, _, _, _) = outs
    assert torch.equal(prev_a, prev_b)
    assert_close(prev_a, sample - 0.2 * velocity)
    assert torch.equal(prev_a, mean_a)
    assert torch.equal(log_prob_a, torch.zeros(4))
    assert torch.equal(std_a, torch.zeros(4))
    # No NaN sneaks in through the unused branches, forward or backward.
    (log_prob_a.sum() + mean_a.sum()).backward()
    assert velocity.grad is not None
    assert torch.isfinite(velocity.grad).all()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_last_step_in_a_mixed_batch(sampler: str) -> None:
    velocity, sample, prev = _inputs(batch=2, dtype=torch.float32)
    _, log_prob, mean, std = sde_step_with_logprob(
        sampler, velocity, sample, torch.tensor([0.1, 0.5]), torch.tensor([0.0, 0.4]), 1.0, prev_sample=prev
    )
    assert std[0] == 0
    assert log_prob[0] == 0
    assert std[1] > 0
    assert log_prob[1] != 0
    assert_close(mean[0], sample[0] - 0.1 * velocity[0])
    assert torch.isfinite(log_prob).all()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_eta_zero_is_the_euler_step(sampler: str) -> None:
    # η = 0 removes the noise and the score correction: every sampler reduces to x + v·dt.
    velocity, sample, _ = _inputs(dtype=torch.float32)
    prev, log_prob, mean, std = sde_step_with_logprob(sampler, velocity, sample, 0.6, 0.5, 0.0)
    assert_close(mean, ode_step(velocity, sample, 0.6, 0.5))
    assert torch.equal(prev, mean)
    assert torch.equal(std, torch.zeros(4))
    assert torch.equal(log_prob, torch.zeros(4))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampled_noise_has_the_returned_std(sampler: str) -> None:
    g = torch.Generator().manual_seed(4)
    sample = torch.randn(2, 4, 32, 32, generator=g)
    velocity = torch.randn(2, 4, 32, 32, generator=g)
    prev, _, mean, std = sde_step_with_logprob(sampler, velocity, sample, 0.6, 0.5, 0.8, generator=g)
    empirical = (prev - mean).flatten(1).std(dim=1)
    assert_close(empirical, std, rtol=0.03, atol=0.0)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_per_sample_sigmas_match_scalar_calls(sampler: str) -> None:
    velocity, sample, prev = _inputs(batch=2, dtype=torch.float32)
    _, log_prob, mean, std = sde_step_with_logprob(
        sampler, velocity, sample, torch.tensor([0.9, 0.4]), torch.tensor([0.8, 0.3]), 0.9, prev_sample=prev
    )
    for i, (s, s_next) in enumerate([(0.9, 0.8), (0.4, 0.3)]):
        _, lp_i, mean_i, std_i = sde_step_with_logprob(
            sampler, velocity[i : i + 1], sample[i : i + 1], s, s_next, 0.9, prev_sample=prev[i : i + 1]
        )
        assert_close(log_prob[i : i + 1], lp_i)
        assert_close(mean[i : i + 1], mean_i)
        assert_close(std[i : i + 1], std_i)


def test_zero_dim_sigma_tensor_broadcasts() -> None:
    velocity, sample, prev = _inputs(dtype=torch.float32)
    a = sde_step_with_logprob("dance_sde", velocity, sample, torch.tensor(0.5), torch.tensor(0.4), 1.0, prev)
    b = sde_step_with_logprob("dance_sde", velocity, sample, 0.5, 0.4, 1.0, prev)
    for x, y in zip(a, b, strict=True):
        assert_close(x, y)


def test_same_generator_seed_same_sample() -> None:
    velocity, sample, _ = _inputs(dtype=torch.float32)
    a = sde_step_with_logprob("cps_sde", velocity, sample, 0.5, 0.4, 1.0, generator=torch.Generator().manual_seed(9))
    b = sde_step_with_logprob("cps_sde", velocity, sample, 0.5, 0.4, 1.0, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0])


def test_gradient_flows_through_the_mean_only() -> None:
    velocity, sample, prev = _inputs(dtype=torch.float32)
    velocity.requires_grad_(True)
    prev.requires_grad_(True)
    _, log_prob, _, _ = sde_step_with_logprob("flowgrpo_sde", velocity, sample, 0.5, 0.4, 1.0, prev)
    log_prob.sum().backward()
    assert velocity.grad is not None
    assert velocity.grad.abs().sum() > 0
    assert prev.grad is None


# --- errors ---


def test_unknown_sampler_lists_valid_names() -> None:
    velocity, sample, _ = _inputs()
    with pytest.raises(ValueError, match="cps_sde, flowgrpo_sde, dance_sde"):
        sde_step_with_logprob("ddim", velocity, sample, 0.5, 0.4, 1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma": 0.3, "sigma_next": 0.4}, "sigma_next <= sigma"),
        ({"sigma": 1.2, "sigma_next": 0.4}, "sigma <= 1"),
        ({"eta": -0.1}, "eta"),
        ({"sigma": torch.tensor([0.5, 0.4])}, r"\(4,\) tensor"),
        ({"prev_sample": torch.zeros(4, 2, 3)}, "prev_sample shape"),
        ({"velocity": torch.zeros(4, 2, 3, 1)}, "velocity shape"),
    ],
)
def test_invalid_inputs_are_rejected(kwargs: dict[str, object], message: str) -> None:
    velocity, sample, _ = _inputs()
    args: dict[str, object] = {
        "sampler": "cps_sde",
        "velocity": velocity,
        "sample": sample,
        "sigma": 0.5,
        "sigma_next": 0.4,
        "eta": 1.0,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        sde_step_with_logprob(**args)  # type: ignore[arg-type]


# --- small noise: the step to σ' ≈ 0 stays well scaled with a floor on the scoring std ---

# The tail of the tiny model's 8-step grid (FlowMatchEulerDiscreteScheduler, shift 3): 0.548, 0.338,
# 0.0089, 0; cps_sde's std is σ', so the step 0.338 → 0.0089 has std 0.0089.
MID_STEP, SMALL_STEP = (0.548, 0.338), (0.338, 0.0089)


def _grad_and_kl(step: tuple[float, float], min_std: float, sigma_next: float | None = None) -> tuple[float, float]:
    """|∂ log p/∂v| (exact cps log-prob of a sampled transition) and the v-based KL for the same
    velocity error, at one step."""
    sigma, s_next = step[0], step[1] if sigma_next is None else sigma_next
    g = torch.Generator().manual_seed(0)
    x, v0 = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 4, 8, 8, generator=g)
    x_next, *_ = sde_step_with_logprob("cps_sde", v0, x, sigma, s_next, 1.0, generator=g)
    v = (v0 + 0.01 * torch.randn(v0.shape, generator=g)).requires_grad_()
    _, log_prob, _, std = sde_step_with_logprob(
        "cps_sde", v, x, sigma, s_next, 1.0, prev_sample=x_next, exact_logprob=True, min_std=min_std
    )
    log_prob.sum().backward()
    assert torch.isfinite(log_prob).all()
    kl = kl_penalty("v-based", v.detach(), v0, std)
    return v.grad.norm().item(), kl.mean().item()


def test_without_a_floor_the_small_noise_step_dominates() -> None:
    grad_mid, kl_mid = _grad_and_kl(MID_STEP, 0.0)
    grad_small, kl_small = _grad_and_kl(SMALL_STEP, 0.0)
    assert grad_small > 30 * grad_mid  # ∝ 1/std: 0.338 / 0.0089 ≈ 38
    assert kl_small > 1000 * kl_mid  # ∝ 1/std²


@pytest.mark.parametrize("sigma_next", [0.0089, 1e-3, 1e-6])
def test_floor_keeps_log_prob_gradient_and_kl_of_the_order_of_the_other_steps(sigma_next: float) -> None:
    grad_mid, kl_mid = _grad_and_kl(MID_STEP, LOGPROB_MIN_STD)
    grad_small, kl_small = _grad_and_kl(SMALL_STEP, LOGPROB_MIN_STD, sigma_next)
    # The floored step's gradient is std·ε/min_std² ≤ ε/min_std: at most that of a step with std min_std.
    assert grad_small <= grad_mid
    # KL ∝ 1/max(std, min_std)²: (0.338 / 0.1)² ≈ 11× the step to 0.338, instead of (0.338 / σ')².
    assert kl_small <= 12 * kl_mid
    assert math.isfinite(kl_small)


def test_floor_changes_neither_sampling_nor_steps_with_larger_noise() -> None:
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x, v = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    for sigma, s_next in (MID_STEP, SMALL_STEP, (0.338, 0.0)):
        plain = sde_step_with_logprob("cps_sde", v, x, sigma, s_next, 1.0, generator=g1, exact_logprob=True)
        floored = sde_step_with_logprob(
            "cps_sde", v, x, sigma, s_next, 1.0, generator=g2, exact_logprob=True, min_std=LOGPROB_MIN_STD
        )
        assert torch.equal(plain[0], floored[0])  # the same sample
        assert torch.equal(plain[2], floored[2])  # the same mean
        if s_next >= LOGPROB_MIN_STD or s_next == 0:
            assert torch.equal(plain[1], floored[1])
            assert torch.equal(plain[3], floored[3])
        else:
            assert torch.equal(floored[3], torch.full((4,), LOGPROB_MIN_STD, dtype=floored[3].dtype))


def test_negative_min_std_is_rejected() -> None:
    with pytest.raises(ValueError, match="min_std must be a finite number >= 0"):
        sde_step_with_logprob("cps_sde", torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 0.5, 0.4, 1.0, min_std=-1.0)


def _grid(num_inference_steps: int) -> list[float]:
    """The trainer's sigma grid (FlowMatchEulerDiscreteScheduler, shift 3, as DeepGen's scheduler)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(num_inference_steps)
    return scheduler.sigmas.tolist()


def test_dance_sde_at_50_steps_is_scored_with_its_exact_unfloored_density() -> None:
    # dance_sde's std is η·√(−dt); the shifted grid is dense near σ = 1, so at 50 steps and η = 1 the
    # first 13 steps have std 0.083-0.099 < LOGPROB_MIN_STD. They are a normal part of the grid: the
    # floor must leave them (and every other step) exact. Naive density, per element:
    # log N(x'; μ, s²) = −(x' − μ)²/(2s²) − log s − ½·log 2π, averaged over C·H·W.
    sigmas = _grid(50)
    g = torch.Generator().manual_seed(5)
    x, v = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    small = 0
    for sigma, s_next in itertools.pairwise(sigmas[:-1]):
        x_next, log_prob, mean, std = sde_step_with_logprob(
            "dance_sde", v, x, sigma, s_next, 1.0, generator=g, min_std=LOGPROB_MIN_STD
        )
        true_std = math.sqrt(sigma - s_next)
        small += true_std < LOGPROB_MIN_STD
        naive = (-((x_next - mean) ** 2) / (2 * true_std**2) - math.log(true_std) - 0.5 * math.log(2 * math.pi)).mean(
            dim=(1, 2, 3)
        )
        torch.testing.assert_close(std, torch.full((3,), true_std))
        torch.testing.assert_close(log_prob, naive, rtol=1e-5, atol=1e-5)
    assert small == 13  # the case the floor used to change (log p by up to 0.22, step 0's gradient × 0.69)


@pytest.mark.parametrize("sampler", ["cps_sde", "flowgrpo_sde"])
def test_floor_touches_only_the_steps_landing_below_it(sampler: str) -> None:
    # At 50 steps both samplers' std collapses on the last two stochastic steps (σ' = 0.067, 0.0089):
    # only those are floored; every step with σ' >= LOGPROB_MIN_STD is scored exactly.
    sigmas = _grid(50)
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    floored = []
    for i, (sigma, s_next) in enumerate(itertools.pairwise(sigmas[:-1])):
        exact = sde_step_with_logprob(sampler, v, x, sigma, s_next, 1.0, generator=torch.Generator().manual_seed(i))
        with_floor = sde_step_with_logprob(
            sampler, v, x, sigma, s_next, 1.0, generator=torch.Generator().manual_seed(i), min_std=LOGPROB_MIN_STD
        )
        if not torch.equal(exact[3], with_floor[3]):
            floored.append(i)
            assert s_next < LOGPROB_MIN_STD
            assert torch.equal(with_floor[3], torch.full((2,), LOGPROB_MIN_STD))
        else:
            assert torch.equal(exact[1], with_floor[1])
    assert floored == [47, 48]
