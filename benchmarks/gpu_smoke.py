"""`make gpu-smoke`: the four facts about the default step that a CPU cannot settle, in a few minutes on one GPU.
Run it first on a new machine, then `make bench-gpu`.

1. VAE decode of a 32-image batch (the rollout micro-batch) at once and in chunks of --vae_batch_size: the
   images must agree (to a uint8 step), and the peak memory of each shows what the chunks save.
2. The SDPA kernel of the DiT's joint attention, without a mask (no padding: flash may run) and with one
   (padding: flash cannot take a mask), from the profiler's kernel names.
3. Rollout and update velocities for the same weights and inputs: the rollout runs the DiT in eval mode
   without grad on a 32-image micro-batch, the update in train mode with grad and gradient checkpointing on
   an 8-image one. Different kernels (batch sizes, autograd) may round differently; the first PPO ratio is
   exp(log p_update − log p_rollout) and must stay within the clip range 1e-4, else clipping acts on noise.
4. The SFT-aux gradient's share under bf16: 30 policy passes and λ·L_sft (λ = 1e-4) through the trainer's
   `--deepspeed none` updater (float32 masters and accumulation, the term on its own backward); the step's
   gradient must contain λ·∇L_sft (relative error < 5%).
And two checks of the trainer's own GPU paths: a pass measured by `--log_component_grad_norm` (the policy
and β·KL pieces in one batched backward) gives the unmeasured pass's gradient, with no vmap fallback loop
in the GPU kernels' backward and its extra peak memory shown; the EMA's update from GPU weights (a
side-stream copy, the average in a thread) equals the formula while the weights keep changing.

The model is DeepGen at its real size with random weights (as bench-gpu builds it), or `--model tiny` (the
CPU test's variant). Exit status 1 when a fact fails its check.

Usage:
  make gpu-smoke                                  # = python benchmarks/gpu_smoke.py
  python benchmarks/gpu_smoke.py --device cpu --model tiny --image_size 64 --batch 4 --update_batch 2 \\
      --vae_batch_size 2 --passes 3              # the CPU variant (tests/test_gpu_smoke.py)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `benchmarks.bench_gpu` when run as a script

from benchmarks.real_size import build_deepgen, model_shape  # noqa: E402
from deepgen_trainer.algorithms.policy_loss import (  # noqa: E402
    clipped_policy_loss,
    flow_matching_inputs,
    flow_matching_loss,
    kl_penalty,
)
from deepgen_trainer.algorithms.sde import sde_step_with_logprob  # noqa: E402
from deepgen_trainer.checkpoints.ema import DitEma  # noqa: E402
from deepgen_trainer.config import parse_args  # noqa: E402
from deepgen_trainer.engine.distributed import World  # noqa: E402
from deepgen_trainer.engine.optim import TorchUpdater, build_updater  # noqa: E402
from deepgen_trainer.model.deepgen import DeepGen  # noqa: E402
from deepgen_trainer.model.tiny import build_tiny  # noqa: E402
from deepgen_trainer.observe.grad_norms import GradParts  # noqa: E402

PROMPTS = ["a red cat on a wooden chair", "the word HELLO painted on a wall", "mountains at sunset", "a bowl"]
CLIP_RANGE = 1e-4
SFT_COEF = 1e-4


# ------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float | None]]:
    """Yields a dict whose "gib" is, after the block, the peak allocated above the start (None on the CPU)."""
    out: dict[str, float | None] = {"gib": None}
    if device.type != "cuda":
        yield out
        return
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield out
    torch.cuda.synchronize(device)
    out["gib"] = (torch.cuda.max_memory_allocated(device) - start) / 2**30


def prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def latents(model: DeepGen, n: int, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator(model.device).manual_seed(seed)
    return torch.randn((n, *model.latent_shape(size, size)), generator=g, device=model.device)


# ------------------------------------------------------------------------------------------- the four facts


def vae_decode(model: DeepGen, args: argparse.Namespace) -> dict:
    z = latents(model, args.batch, args.image_size, seed=0)
    model.vae_batch_size = args.batch
    with peak_memory(model.device) as whole_mem:
        whole = model.decode(z)
    model.vae_batch_size = args.vae_batch_size
    with peak_memory(model.device) as chunk_mem:
        chunked = model.decode(z)
    diff = (whole - chunked).abs().max().item()
    return {
        "batch": args.batch, "vae_batch_size": args.vae_batch_size, "max_abs_diff": diff,
        "peak_gib_whole": whole_mem["gib"], "peak_gib_chunked": chunk_mem["gib"],
        "finite": bool(torch.isfinite(whole).all()), "ok": diff <= 1 / 255 and bool(torch.isfinite(whole).all()),
    }  # fmt: skip


def attention_kernels(model: DeepGen, args: argparse.Namespace) -> dict:
    """The kernels SDPA runs in one DiT forward, for an unpadded and a padded batch."""
    z = latents(model, 2, args.image_size, seed=1)
    same = model.encode_prompts(prompts(1)).repeat_interleave(2)
    padded = model.encode_prompts([PROMPTS[0], PROMPTS[1] + " with many more words in it than the first one"])
    found = {}
    for name, cond in (("unpadded", same), ("padded", padded)):
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
        with torch.no_grad(), profile(activities=activities) as prof:
            model.velocity(z, 0.5, cond)
        names = {e.name for e in prof.events()}
        found[name] = sorted(n for n in names if _is_attention_kernel(n))
    flash = any("flash" in n.lower() or "cudnn" in n.lower() for n in found["unpadded"])
    return {**found, "unpadded_uses_flash": flash, "ok": flash or model.device.type != "cuda"}


def _is_attention_kernel(name: str) -> bool:
    lowered = name.lower()
    return "scaled_dot_product" in lowered or "flash" in lowered or "fmha" in lowered or "attention" in lowered


def rollout_vs_update(model: DeepGen, args: argparse.Namespace) -> dict:
    """Velocities and log-probs of one SDE transition, as the rollout and as the update compute them."""
    sigmas = model.sigmas(args.num_inference_steps)
    j = len(sigmas) // 2
    sigma, sigma_next = sigmas[j].item(), sigmas[j + 1].item()
    cond = model.encode_prompts(prompts(args.batch // 8 or 1)).repeat_interleave(8)[: args.batch]
    x = latents(model, args.batch, args.image_size, seed=2)
    model.eval()
    g = torch.Generator(model.device).manual_seed(3)
    with torch.no_grad():
        v_rollout = model.velocity(x, sigma, cond)
        x_next, old, _, _ = sde_step_with_logprob("cps_sde", v_rollout, x, sigma, sigma_next, 1.0, generator=g)
    model.train()
    model.set_gradient_checkpointing(True)
    worst_v, worst_ratio = 0.0, 0.0
    for s in range(0, args.batch, args.update_batch):
        sl = slice(s, s + args.update_batch)
        v = model.velocity(x[sl], sigma, cond[sl])
        _, log_prob, _, _ = sde_step_with_logprob("cps_sde", v, x[sl], sigma, sigma_next, 1.0, x_next[sl])
        v.float().sum().backward()  # the update's backward, so autograd is really on
        worst_v = max(worst_v, (v.detach().float() - v_rollout[sl].float()).abs().max().item())
        worst_ratio = max(worst_ratio, (log_prob.detach() - old[sl]).exp().sub(1).abs().max().item())
    model.transformer.zero_grad(set_to_none=True)
    model.eval()
    return {
        "sigma": sigma, "rollout_batch": args.batch, "update_batch": args.update_batch,
        "max_abs_velocity_diff": worst_v, "max_abs_ratio_minus_1": worst_ratio, "clip_range": CLIP_RANGE,
        "ok": worst_ratio < CLIP_RANGE,
    }  # fmt: skip


def sft_share(model: DeepGen, args: argparse.Namespace) -> dict:
    """λ·∇L_sft in the step's gradient through the `--deepspeed none` updater, against it alone."""
    world = World(rank=0, world_size=1, local_rank=0, device=model.device)
    cfg = parse_args(["--model", "tiny", "--deepspeed", "none", "--bf16", "--learning_rate", "0"], environ={})
    dit = model.transformer
    n = args.update_batch
    cond = model.encode_prompts(prompts(n))
    sigmas = model.sigmas(args.num_inference_steps)

    def policy(i: int) -> torch.Tensor:
        x = latents(model, n, args.image_size, seed=100 + i)
        j = i % (len(sigmas) - 2)
        s, s_next = sigmas[j].item(), sigmas[j + 1].item()
        g = torch.Generator(model.device).manual_seed(200 + i)
        with torch.no_grad():
            x_next, old, _, _ = sde_step_with_logprob(
                "cps_sde", model.velocity(x, s, cond), x, s, s_next, 1.0, generator=g
            )
        _, log_prob, _, _ = sde_step_with_logprob("cps_sde", model.velocity(x, s, cond), x, s, s_next, 1.0, x_next)
        advantages = torch.randn(n, generator=torch.Generator().manual_seed(i)).to(model.device)
        return clipped_policy_loss(log_prob, old, advantages, CLIP_RANGE)[0].mean() * (1 - SFT_COEF) / args.passes

    def sft() -> torch.Tensor:
        z, noise = latents(model, n, args.image_size, seed=300), latents(model, n, args.image_size, seed=301)
        sigma = torch.rand(n, generator=torch.Generator().manual_seed(302)).to(model.device)
        v = model.velocity(flow_matching_inputs(z, noise, sigma), sigma, cond)
        return SFT_COEF * flow_matching_loss(v, z, noise).mean()

    def step_gradient(with_sft: bool) -> torch.Tensor:
        updater = build_updater(dit, cfg, world, 10)
        assert isinstance(updater, TorchUpdater)
        for i in range(args.passes):
            if with_sft and i == args.passes - 1:
                updater.backward_small(sft())
            updater.backward(policy(i))
        grad = torch.cat([m.grad.reshape(-1).cpu() for m in updater.masters if m.grad is not None])
        updater.optimizer.zero_grad(set_to_none=True)
        return grad  # on the CPU: three float32 copies of the DiT's gradient need not share the GPU

    model.train()
    with_term, without = step_gradient(True), step_gradient(False)
    alone = torch.cat([g.float().reshape(-1).cpu() for g in torch.autograd.grad(sft(), model.trainable_parameters())])
    model.eval()
    share = (alone.norm() / without.norm()).item()
    error = ((with_term - without) - alone).norm().item() / alone.norm().item()
    return {"passes": args.passes, "share": share, "relative_error": error, "ok": error < 0.05}


def component_norms(model: DeepGen, args: argparse.Namespace) -> dict:
    """One policy pass measured as ``--log_component_grad_norm`` measures it (the policy and β·KL pieces in
    one batched backward, then `gradient_loss`) against the same pass unmeasured: the same gradient, no
    vmap fallback (an op without a batching rule, e.g. an attention backward kernel, would loop over the
    pieces), and the peak memory of each."""
    n = args.update_batch
    cond = model.encode_prompts(prompts(n))
    sigmas = model.sigmas(args.num_inference_steps)
    j = len(sigmas) // 2
    s, s_next = sigmas[j].item(), sigmas[j + 1].item()
    x = latents(model, n, args.image_size, seed=400)
    g = torch.Generator(model.device).manual_seed(401)
    model.eval()
    with torch.no_grad():
        v_old = model.velocity(x, s, cond)
        x_next, old, _, _ = sde_step_with_logprob("cps_sde", v_old, x, s, s_next, 1.0, generator=g)
        v_ref = v_old + 0.1 * latents(model, n, args.image_size, seed=402).to(v_old.dtype)  # a reference apart
    advantages = torch.randn(n, generator=torch.Generator().manual_seed(403)).to(model.device)

    def pieces() -> list[tuple[str, torch.Tensor]]:
        v = model.velocity(x, s, cond)
        _, log_prob, _, std = sde_step_with_logprob("cps_sde", v, x, s, s_next, 1.0, x_next)
        policy = clipped_policy_loss(log_prob, old, advantages, CLIP_RANGE)[0].mean()
        return [("policy", policy), ("beta_kl", kl_penalty("v-based", v, v_ref, std).mean())]

    def gradient() -> torch.Tensor:
        grad = torch.cat([p.grad.float().reshape(-1).cpu() for p in params if p.grad is not None])
        model.transformer.zero_grad(set_to_none=True)
        return grad

    params = model.trainable_parameters()
    model.train()
    model.set_gradient_checkpointing(True)
    with peak_memory(model.device) as unmeasured_mem:
        policy, kl = pieces()
        (policy[1] + kl[1]).backward()
    want = gradient()
    parts = GradParts(params)
    torch._C._functorch._set_vmap_fallback_warning_enabled(True)
    try:
        with warnings.catch_warnings(record=True) as caught, peak_memory(model.device) as measured_mem:
            warnings.simplefilter("always")
            parts.start()
            parts.measure(pieces()).backward()
            norms = parts.finish()
    finally:
        torch._C._functorch._set_vmap_fallback_warning_enabled(False)
    got = gradient()
    model.eval()
    fallbacks = sorted({str(w.message)[:160] for w in caught if "batching rule" in str(w.message)})
    error = ((got - want).norm() / want.norm()).item()
    return {
        "relative_error": error, "vmap_fallbacks": fallbacks, **norms,
        "peak_gib_unmeasured": unmeasured_mem["gib"], "peak_gib_measured": measured_mem["gib"],
        "ok": error < 0.02 and not fallbacks,
    }  # fmt: skip


def ema_update(model: DeepGen, args: argparse.Namespace) -> dict:
    """The EMA's update from GPU weights (side-stream copy, lerp in a thread) against the formula, with the
    weights changed right after each update as an optimizer step would."""
    weight = torch.randn(4096, 1024, device=model.device).to(torch.bfloat16)
    ema = DitEma({"w": weight}, decay=0.9)
    naive = weight.float().cpu()
    t0 = time.perf_counter()
    for _ in range(3):
        ema.update({"w": weight})
        naive.lerp_(weight.float().cpu(), 0.1)
        weight.add_(1.0)  # the next optimizer step, queued behind the EMA's copy
    update_s = time.perf_counter() - t0
    diff = (ema.state_dict()["w"] - naive).abs().max().item()
    return {"max_abs_diff": diff, "update_s": update_s, "ok": diff < 1e-5}


FACTS: dict[str, Callable[[DeepGen, argparse.Namespace], dict]] = {
    "vae_decode": vae_decode,
    "attention_kernels": attention_kernels,
    "rollout_vs_update": rollout_vs_update,
    "sft_share": sft_share,
    "component_norms": component_norms,
    "ema_update": ema_update,
}


def build(args: argparse.Namespace, device: torch.device) -> DeepGen:
    if args.model == "tiny":
        return build_tiny(seed=0).to(torch.bfloat16).place(device)
    return build_deepgen(model_shape(args.depth), args.depth, device, torch.bfloat16).place(device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=("real", "tiny"), default="real")
    parser.add_argument("--depth", type=int, default=None, help="layers per stack of the real-width model")
    parser.add_argument("--image_size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32, help="the rollout micro-batch (VAE decode, fact 3)")
    parser.add_argument("--update_batch", type=int, default=8, help="the training micro-batch")
    parser.add_argument("--vae_batch_size", type=int, default=8)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--passes", type=int, default=30, help="policy passes of one step (fact 4)")
    parser.add_argument("--report", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.batch % args.update_batch:
        raise SystemExit(f"gpu-smoke: --batch {args.batch} must be a multiple of --update_batch {args.update_batch}")
    device = torch.device(args.device)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu-smoke on {name}: DeepGen {args.model} (built in {time.perf_counter() - t0:.0f} s), bf16, "
          f"{args.image_size}x{args.image_size}")  # fmt: skip
    results = {}
    for fact, fn in FACTS.items():
        t0 = time.perf_counter()
        results[fact] = {**fn(model, args), "seconds": time.perf_counter() - t0}
        verdict = "ok" if results[fact]["ok"] else "FAILED"
        details = ", ".join(f"{k}={_fmt(v)}" for k, v in results[fact].items() if k not in ("ok",))
        print(f"{fact:<18} {verdict:<6} {details}")
    if args.report is not None:
        args.report.write_text(json.dumps({"device": name, "results": results}, indent=2) + "\n")
    return results


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3g}"
    return "n/a" if value is None else str(value)


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if all(r["ok"] for r in outcome.values()) else 1)
