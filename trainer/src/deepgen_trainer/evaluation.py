"""Evaluation during training: generate the benchmark prompts of eval-unigenbench and log its summary.

Rank 0 lists the prompts and opens the run; every rank generates its share (item k of the
prompt × duplicate list goes to rank k mod world size) with the ODE sampler and submits the images
itself over the network; rank 0 finishes the run. Per-image seeds are index·1000 + duplicate + 42, so
an image does not depend on the world size or the batch it lands in.
"""

from __future__ import annotations

import io
import logging
import math

import torch
from PIL import Image

from deepgen_common.client import EvalClient, EvalImage, EvalRun, RewardServiceError, TransientError
from deepgen_common.types import RunSummary
from deepgen_trainer.distributed import World
from deepgen_trainer.model import NEGATIVE_PROMPT, DeepGen, to_uint8
from deepgen_trainer.rollout import ode_sample

log = logging.getLogger(__name__)


def evaluate(
    model: DeepGen,
    client: EvalClient,
    world: World,
    step: int,
    *,
    height: int,
    width: int,
    num_inference_steps: int,
    cfg_scale: float,
    batch_size: int,
) -> dict[str, float]:
    """One evaluation run; returns `eval/*` metrics on rank 0 ({} elsewhere, and when the service fails:
    a failed evaluation is logged and training goes on)."""
    try:
        plan = world.broadcast(_open_run(client, step) if world.is_main else None)
    except (TransientError, RewardServiceError) as exc:  # only rank 0 talks before the broadcast
        log.warning("evaluation skipped: %s", exc)
        plan = world.broadcast(None)
    if plan is None:
        return {}
    run, prompts, duplicates = plan
    items = [(k, pid, prompt, dup) for k, (pid, prompt) in enumerate(prompts) for dup in range(duplicates)]
    mine = items[world.rank :: world.world_size]
    sigmas = model.sigmas(num_inference_steps)
    uncond = model.encode_prompts([NEGATIVE_PROMPT]) if cfg_scale > 0 else None
    shape = model.latent_shape(height, width)
    failed = False
    for start in range(0, len(mine), batch_size):
        batch = mine[start : start + batch_size]
        noise = torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(k * 1000 + dup + 42)) for k, _, _, dup in batch]
        ).to(model.device)
        cond = model.encode_prompts([prompt for _, _, prompt, _ in batch])
        images = to_uint8(model.decode(ode_sample(model, noise, cond, sigmas, cfg_scale, uncond)))
        try:
            client.submit(
                run, [EvalImage(pid, dup, _png(img)) for (_, pid, _, dup), img in zip(batch, images, strict=True)]
            )
        except (TransientError, RewardServiceError) as exc:
            log.warning("evaluation images not accepted: %s", exc)
            failed = True
            break
    world.barrier()
    if not world.is_main:
        return {}
    try:
        summary = client.finish(run)
    except (TransientError, RewardServiceError) as exc:
        log.warning("evaluation run %s could not be finished: %s", run, exc)
        return {}
    if failed:
        log.warning("evaluation run %s is incomplete: some images were not accepted", run)
    return summary_metrics(summary)


def _open_run(client: EvalClient, step: int) -> tuple[EvalRun, list[tuple[str, str]], int]:
    listed = client.prompts()
    return client.start_run(step), listed.prompts, listed.duplicates


def summary_metrics(summary: RunSummary) -> dict[str, float]:
    metrics = {
        "eval/overall_accuracy": summary.overall_accuracy,
        "eval/primary_mean_accuracy": summary.primary_mean_accuracy,
        "eval/images_judged": float(summary.images_judged),
        "eval/parse_failures": float(summary.parse_failures),
        "eval/errors": float(summary.errors),
    }
    for dim in summary.primary_dimensions:
        metrics[f"eval/primary/{dim.name}"] = dim.accuracy
    return {k: v for k, v in metrics.items() if not math.isnan(v)}


def _png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.numpy()).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
