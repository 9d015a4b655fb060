"""One step of the rollout SDE on the flow-matching path, with the log-probability of the transition.

Flow matching here: x_σ = (1 − σ)·x0 + σ·x1 with x1 ~ N(0, I) the noise, velocity v = x1 − x0, and
sampling runs σ from 1 down to 0. Each sampler turns the model's velocity into a Gaussian transition
x_{σ'} ~ N(μ, std²·I); GRPO needs the log-density of that transition under the current policy.

`sde_step_with_logprob` is one free function (as in flow_grpo's `sd3_sde_with_logprob`): it samples
x' = μ + std·ε when `prev_sample` is None (rollout) and scores the given transition otherwise (policy
update). Both paths run the same code on the same inputs, so the log-prob recomputed for a stored
transition equals the one recorded when it was sampled, bit for bit: the first on-policy ratio is 1.

Every sampler's mean is linear in x and v, μ = a·x + b·v, with per-sample coefficients a, b that
depend only on σ, σ' and η. The coefficients are computed in float64 on (B,) tensors (cheap, and
exact enough that η = 1 gives cps_sde a zero x̂1 coefficient); the full-size tensors see two fused
multiply-adds for the mean instead of the half-dozen passes of the textbook formulas.

Dtypes: inputs of any floating dtype are promoted to at least float32 (bf16/fp16 → fp32, fp64 stays
fp64) and every output is in that dtype. Rollouts should store x_t, x_{t+1} and log p in float32.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Literal, get_args

import torch
from torch import Tensor

Sampler = Literal["cps_sde", "flowgrpo_sde", "dance_sde"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
# The trainer's default floor on the std that scores a transition (see "Small noise" in
# `sde_step_with_logprob`). Measured with benchmarks/bench_logprob_scale.py (exact log-prob, η = 1):
# cps_sde's step to σ' = 0.0089 takes 94% of the summed per-step gradient norms at 8 steps (an even
# share is 14%) and 30% at 50 (even 2%), and its v-based KL is ~6,000× the median step's; with the
# floor at 0.1: 11% and 0.4%, KL 48×. 0.05 leaves it at 33% at 8 steps. The floor applies only where
# the noise level itself is below it (σ' < min_std), the steps whose std collapses with σ' → 0: cps_sde's
# and flowgrpo_sde's last two at 50 steps (flowgrpo_sde's share 14% → 6%). A step with σ' ≥ min_std
# keeps its exact std however small: dance_sde's std η·√(−dt) does not shrink with σ', and its first
# 13 of 50 steps at η = 1 (√(−dt) = 0.083-0.099, the shifted grid is dense near σ = 1) are exact.
LOGPROB_MIN_STD = 0.1
# flowgrpo_sde divides by 1 − σ (σ' on the first step, where σ = 1). A zero-length first step
# (σ = σ' = 1) would divide by 0; flooring the denominator keeps it finite, and dt = 0 then makes the
# step the identity with std 0.
_MIN_ONE_MINUS_SIGMA = 1e-12


def sde_step_with_logprob(
    sampler: Sampler,
    velocity: Tensor,
    sample: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    eta: float,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    exact_logprob: bool = False,
    min_std: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Take (or score) one SDE step σ → σ' and return the transition's log-probability.

    Notation: x = `sample` (x_σ), v = `velocity`, η = `eta`, dt = σ' − σ ≤ 0, ε ~ N(0, I),
    D = C·H·W, x̂0 = x − σ·v (predicted data), x̂1 = x + (1 − σ)·v (predicted noise).

    - ``"cps_sde"`` (coefficients-preserving sampling, Flow-CPS): s = σ'·sin(ηπ/2),
      μ = (1 − σ')·x̂0 + √(σ'² − s²)·x̂1, std = s. Its default log p = −(1/D)·Σ(x' − μ)² is the
      reference's simplified score (no 1/(2s²), no normaliser; kept for parity with its training
      curves); ``exact_logprob=True`` gives the exact Gaussian log-density averaged over D instead.
      η = 1 gives μ = (1 − σ')·x̂0 and x' = (1 − σ')·x̂0 + σ'·ε; η = 0 is the Euler step.
    - ``"flowgrpo_sde"`` (Flow-GRPO): std_t = η·√(σ / (1 − σ)),
      μ = x + (v + std_t²/(2σ)·x̂1)·dt, std = std_t·√(−dt). On the first step σ = 1 the denominator
      1 − σ is replaced by 1 − σ' (the next grid value, as the reference does), which keeps std_t
      finite.
    - ``"dance_sde"`` (DanceGRPO, score-corrected Euler–Maruyama): μ = x + (v + ½η²·x̂1/σ)·dt,
      std = η·√(−dt).

    flowgrpo_sde and dance_sde always use the exact Gaussian log-density
    −(x' − μ)²/(2·std²) − log std − ½·log 2π, averaged over D (``exact_logprob`` changes nothing).

    Deterministic steps. A sample whose std is 0 (η = 0, or σ' = 0 for cps_sde) takes x' = μ and
    gets log p = 0: its transition is a point mass and carries no policy-gradient signal. The last
    step (σ' = 0) is deterministic for every sampler: it lands on x̂0 = x − σ·v (the Euler step to
    σ' = 0, and cps_sde's own mean there) with std 0. flowgrpo_sde and dance_sde would otherwise add
    noise of std η·σ/√(1 − σ) or η·√σ to the final latent, which then stays in the decoded image;
    the policy update never trains on the last step, so its log-prob is not needed.

    Small noise. The exact log-prob's gradient with respect to μ is (x' − μ)/std² = ε/std, so a step
    with a tiny but non-zero std dominates the policy gradient, and the KL penalty divides by 2·std²
    too. cps_sde has one such step: the grid's last positive σ' is the scheduler's smallest sigma
    (e.g. ..., 0.34, 0.0089, 0 for 8 steps), so the step before the last has std ≈ 0.009 while it
    hardly changes the image. ``min_std`` scores such a step with max(std, min_std): x' − μ = std·ε
    stays small, so that step's gradient shrinks to std·ε/min_std² instead of ε/std. The floor applies
    only to the steps that land below it, σ' < min_std, where the std collapses with σ' → 0 (cps_sde:
    s = σ'·sin(ηπ/2); flowgrpo_sde: std_t ∝ √σ). Every step with σ' ≥ min_std is scored with its exact
    std, however small: a small std there is a normal part of the grid (dance_sde at 50 steps, η = 1:
    √(−dt) = 0.083-0.099 on its first 13 steps; any sampler at small η). The trainer passes
    ``LOGPROB_MIN_STD`` by default (``--logprob_min_std``).

    Args:
        sampler: one of ``SAMPLERS``.
        velocity: v predicted by the model, (B, C, H, W), any float dtype.
        sample: x_σ, (B, C, H, W), any float dtype.
        sigma: σ in [0, 1], a Python float or a (B,) tensor (one per sample; 0-d broadcasts).
        sigma_next: σ' in [0, σ], same forms as ``sigma``; σ' = 0 is the last step.
        eta: noise level η ≥ 0 (``--sde_eta``).
        prev_sample: x_{σ'} to score, (B, C, H, W); None samples a new one. It is treated as data:
            the log-prob has no gradient with respect to it (gradients flow through μ).
        generator: draws ε when sampling; it may live on another device than ``sample`` (the noise
            is drawn on the generator's device and moved), so CPU generators give the same noise on
            every device.
        exact_logprob: cps_sde only: exact Gaussian log-density instead of the simplified score.
        min_std: floor on the std that scores the transition (log-prob and returned std), on
            stochastic steps with σ' < min_std only; sampling keeps the true std. See "Small noise".

    Returns:
        prev_sample: x_{σ'}, (B, C, H, W), compute dtype (sampled, or the given one cast).
        log_prob: (B,), compute dtype, the per-element log-density averaged over C·H·W.
        prev_sample_mean: μ, (B, C, H, W), compute dtype (carries the gradient of ``velocity``).
        std: (B,), compute dtype, the transition's standard deviation floored at ``min_std`` (the
            noise scale s of the log-prob and of the KL penalty) where σ' < min_std; 0 on
            deterministic steps.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    if not (math.isfinite(min_std) and min_std >= 0):
        raise ValueError(f"min_std must be a finite number >= 0, got {min_std}")
    _check_tensors(velocity, sample, prev_sample)
    dtype = _compute_dtype(sample)
    x = sample.to(dtype)
    v = velocity.to(dtype)
    sig = _per_sample(sigma, "sigma", x)
    sig_next = _per_sample(sigma_next, "sigma_next", x)
    _check_grid(sigma, sigma_next)

    if sampler == "cps_sde":
        a, b, std = _cps_coefficients(sig, sig_next, eta)
    elif sampler == "flowgrpo_sde":
        a, b, std = _flowgrpo_coefficients(sig, sig_next, eta)
    else:
        a, b, std = _dance_coefficients(sig, sig_next, eta)
    # The last step lands on x̂0 = x − σ·v without noise, whatever the sampler (see the docstring).
    last = sig_next == 0
    a = torch.where(last, 1.0, a)
    b = torch.where(last, -sig, b)
    std = torch.where(last, 0.0, std)

    a, b, std = (t.to(dtype) for t in (a, b, std))
    mean = torch.addcmul(_expand(a, x) * x, _expand(b, x), v)
    if prev_sample is None:
        noise = _standard_normal(x, generator)
        # std = 0 adds exactly 0: deterministic samples come out equal to μ.
        prev_sample = torch.addcmul(mean, _expand(std, x), noise)
    else:
        prev_sample = prev_sample.to(dtype)
    simplified = sampler == "cps_sde" and not exact_logprob
    # The floor only where the std collapses with the noise level (σ' < min_std), never elsewhere.
    collapsing = (std > 0) & (sig_next < min_std)
    score_std = torch.where(collapsing, std.clamp_min(min_std), std)
    log_prob = _log_prob(prev_sample.detach(), mean, score_std, simplified)
    return prev_sample, log_prob, mean, score_std


def ode_step(velocity: Tensor, sample: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> Tensor:
    """Deterministic Euler step x + v·(σ' − σ) of the probability-flow ODE (evaluation sampler).

    Shapes and dtypes as in `sde_step_with_logprob`: (B, C, H, W) in, (B, C, H, W) out in at least
    float32; sigma and sigma_next are Python floats or (B,) tensors.
    """
    _check_tensors(velocity, sample, None)
    dtype = _compute_dtype(sample)
    x = sample.to(dtype)
    dt = _per_sample(sigma_next, "sigma_next", x) - _per_sample(sigma, "sigma", x)
    return torch.addcmul(x, _expand(dt.to(dtype), x), velocity.to(dtype))


def _cps_coefficients(sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor, Tensor]:
    # μ = (1 − σ')(x − σv) + c·(x + (1 − σ)v) with c = √(σ'² − s²)
    #   = [(1 − σ') + c]·x + [c(1 − σ) − σ(1 − σ')]·v
    # |sin| keeps std ≥ 0 for η > 2 (the useful range is η ∈ [0, 1]; η = 1 is the most noise).
    std = sigma_next * abs(math.sin(eta * math.pi / 2))
    # s² ≤ σ'² holds in rounding too (|sin| ≤ 1 and rounding is monotonic); the clamp is a cheap
    # guard that keeps the square root real whatever the inputs.
    c = torch.sqrt((sigma_next.square() - std.square()).clamp_min(0.0))
    a = (1 - sigma_next) + c
    b = c * (1 - sigma) - sigma * (1 - sigma_next)
    return a, b, std


def _flowgrpo_coefficients(sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor, Tensor]:
    # μ = x + (v + k·(x + (1 − σ)v))·dt with k = std_t²/(2σ)
    #   = (1 + k·dt)·x + dt·(1 + k(1 − σ))·v
    dt = sigma_next - sigma
    one_minus = torch.where(sigma == 1, 1 - sigma_next, 1 - sigma).clamp_min(_MIN_ONE_MINUS_SIGMA)
    std_t = eta * torch.sqrt(sigma / one_minus)
    # σ = 0 only with σ' = 0, which the caller overrides; the safe divisor keeps the unused branch
    # (and its gradient) finite.
    k = std_t.square() / (2 * _nonzero(sigma))
    return 1 + k * dt, dt * (1 + k * (1 - sigma)), std_t * torch.sqrt(-dt)


def _dance_coefficients(sigma: Tensor, sigma_next: Tensor, eta: float) -> tuple[Tensor, Tensor, Tensor]:
    # μ = x + (v + ½η²(x + (1 − σ)v)/σ)·dt: the same form as flowgrpo_sde with k = η²/(2σ).
    dt = sigma_next - sigma
    k = 0.5 * eta**2 / _nonzero(sigma)
    return 1 + k * dt, dt * (1 + k * (1 - sigma)), eta * torch.sqrt(-dt)


def _log_prob(prev_sample: Tensor, mean: Tensor, std: Tensor, simplified: bool) -> Tensor:
    """(B,) log-density of prev_sample under N(mean, std²), averaged over the non-batch dims."""
    dims = tuple(range(1, mean.ndim))
    # One fused pass (the norm squares and sums in its reduction) instead of square, then mean.
    mean_sq = torch.linalg.vector_norm(prev_sample - mean, dim=dims).square() / mean[0].numel()
    stochastic = std > 0
    if simplified:
        log_prob = -mean_sq
    else:
        # Substitute 1 where std = 0 so that neither branch of the where (nor its gradient) is NaN.
        safe_std = torch.where(stochastic, std, 1.0)
        log_prob = -mean_sq / (2 * safe_std.square()) - torch.log(safe_std) - _HALF_LOG_2PI
    return torch.where(stochastic, log_prob, 0.0)


def _standard_normal(like: Tensor, generator: torch.Generator | None) -> Tensor:
    if generator is None:
        return torch.randn(like.shape, device=like.device, dtype=like.dtype)
    noise = torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype)
    return noise.to(like.device)


def _per_sample(value: float | Tensor, name: str, like: Tensor) -> Tensor:
    """A Python number, 0-d or (B,) tensor → (B,) float64 on like's device."""
    batch = like.shape[0]
    if isinstance(value, Tensor):
        t = value.detach().to(device=like.device, dtype=torch.float64)
        if t.ndim == 0:
            return t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"{name} must be a float or a ({batch},) tensor, got shape {tuple(t.shape)}")
        return t.reshape(batch)
    if isinstance(value, Real):
        return torch.full((batch,), float(value), dtype=torch.float64, device=like.device)
    raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")


def _check_grid(sigma: float | Tensor, sigma_next: float | Tensor) -> None:
    # Checked for Python numbers only: checking tensor values would synchronise with the device.
    if isinstance(sigma, Real) and isinstance(sigma_next, Real) and not 0 <= sigma_next <= sigma <= 1:
        raise ValueError(f"need 0 <= sigma_next <= sigma <= 1, got sigma={sigma}, sigma_next={sigma_next}")


def _check_tensors(velocity: Tensor, sample: Tensor, prev_sample: Tensor | None) -> None:
    if sample.ndim < 2:
        raise ValueError(f"sample must be batched, (B, C, H, W), got shape {tuple(sample.shape)}")
    if velocity.shape != sample.shape:
        raise ValueError(f"velocity shape {tuple(velocity.shape)} != sample shape {tuple(sample.shape)}")
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} != sample shape {tuple(sample.shape)}")
    if not sample.is_floating_point():
        raise TypeError(f"sample must be a floating-point tensor, got {sample.dtype}")


def _compute_dtype(sample: Tensor) -> torch.dtype:
    # bf16 cannot hold μ accurately enough (the ratio of two log-probs is compared against 1 ± 1e-4).
    return torch.promote_types(sample.dtype, torch.float32)


def _nonzero(t: Tensor) -> Tensor:
    return torch.where(t != 0, t, 1.0)


def _expand(per_sample: Tensor, like: Tensor) -> Tensor:
    """(B,) → (B, 1, ..., 1), broadcastable against like."""
    return per_sample.view(-1, *([1] * (like.ndim - 1)))
