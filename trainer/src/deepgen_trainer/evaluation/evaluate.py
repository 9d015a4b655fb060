"""Evaluation during training: generate the benchmark prompts of eval-unigenbench and log its summary.

Rank 0 lists the prompts and opens the run; every rank generates its share (item k of the
prompt × duplicate list goes to rank k mod world size) with the ODE sampler and submits the images
itself over the network; rank 0 finishes the run. Per-image seeds are index·1000 + duplicate + 42, so
an image does not depend on the world size or the batch it lands in (the offline evaluation,
`evaluate_checkpoint`, generates the same images from the same weights).

Metrics of a set (e.g. `en`): `eval/<set>/overall` is the leaderboard's Overall, the mean of the
primary-dimension accuracies; `eval/<set>/pooled` pools every testpoint; `eval/<set>/primary/<dim>`
per primary dimension; image counts. Rank 0 keeps the summary, the per-image CSV and a contact sheet
(`contact_sheet.py`) in `<output_dir>/eval/<set>/step-<step>/`.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from deepgen_common.client import EvalClient, EvalImage, EvalRun, RewardServiceError, TransientError
from deepgen_common.eval_results import write_results_csv, write_summary_json
from deepgen_common.types import RunSummary
from deepgen_trainer.algorithms.rollout import ode_sample
from deepgen_trainer.engine.distributed import World
from deepgen_trainer.model.deepgen import NEGATIVE_PROMPT, DeepGen, to_uint8
from deepgen_trainer.observe.contact_sheet import SheetEntry, save_contact_sheet, sheet_prompt_ids

log = logging.getLogger(__name__)

CONTACT_SHEET_FILE = "contact_sheet.png"


@dataclass(frozen=True)
class EvalItem:
    """Duplicate `duplicate` of the benchmark's `index`-th prompt (`prompt_id`)."""

    index: int
    prompt_id: str
    prompt: str
    duplicate: int

    @property
    def seed(self) -> int:
        """The seed of this image's initial noise: index·1000 + duplicate + 42."""
        return self.index * 1000 + self.duplicate + 42


@dataclass(frozen=True)
class EvalOutcome:
    """What one evaluation gives rank 0: the metrics, the summary and the contact sheet's path."""

    metrics: dict[str, float]
    summary: RunSummary
    contact_sheet: Path


def eval_items(prompts: Sequence[tuple[str, str]], duplicates: int) -> list[EvalItem]:
    """Every (prompt, duplicate) of a benchmark, prompt-major."""
    return [EvalItem(k, pid, prompt, dup) for k, (pid, prompt) in enumerate(prompts) for dup in range(duplicates)]


@torch.no_grad()
def generate_pngs(
    model: DeepGen,
    items: Sequence[EvalItem],
    *,
    height: int,
    width: int,
    num_inference_steps: int,
    cfg_scale: float,
    batch_size: int,
) -> Iterator[list[tuple[EvalItem, bytes]]]:
    """ODE-sample `items` in batches of `batch_size`; yields each batch's (item, PNG bytes)."""
    sigmas = model.sigmas(num_inference_steps)
    uncond = model.encode_prompts([NEGATIVE_PROMPT]) if cfg_scale > 0 else None
    shape = model.latent_shape(height, width)
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(i.seed)) for i in batch])
        cond = model.encode_prompts([i.prompt for i in batch])
        images = to_uint8(model.decode(ode_sample(model, noise.to(model.device), cond, sigmas, cfg_scale, uncond)))
        yield [(item, png(image)) for item, image in zip(batch, images, strict=True)]


def evaluate(
    model: DeepGen,
    client: EvalClient,
    world: World,
    step: int,
    *,
    output_dir: Path,
    label: str = "",
    height: int,
    width: int,
    num_inference_steps: int,
    cfg_scale: float,
    batch_size: int,
) -> EvalOutcome | None:
    """One evaluation run of the service's default set; the outcome on rank 0 (None elsewhere, and when
    the service fails: a failed evaluation is logged and training goes on). Metrics are named after
    `label`, else after the set the service evaluated."""
    try:
        plan = world.broadcast(_open_run(client, step) if world.is_main else None)
    except (TransientError, RewardServiceError) as exc:  # only rank 0 talks before the broadcast
        log.warning("evaluation skipped: %s", exc)
        plan = world.broadcast(None)
    if plan is None:
        return None
    run, prompts, duplicates = plan
    mine = eval_items(prompts, duplicates)[world.rank :: world.world_size]
    on_sheet = set(sheet_prompt_ids([pid for pid, _ in prompts]))
    sheet_images: dict[str, bytes] = {}
    failed = False
    for batch in generate_pngs(
        model, mine, height=height, width=width, num_inference_steps=num_inference_steps, cfg_scale=cfg_scale,
        batch_size=batch_size,
    ):  # fmt: skip
        sheet_images |= {i.prompt_id: data for i, data in batch if i.prompt_id in on_sheet and i.duplicate == 0}
        try:
            client.submit(run, [EvalImage(i.prompt_id, i.duplicate, data) for i, data in batch])
        except (TransientError, RewardServiceError) as exc:
            log.warning("evaluation images not accepted: %s", exc)
            failed = True
            break
    gathered = world.gather_objects(sheet_images)
    if not world.is_main:
        return None
    try:
        summary = client.finish(run)
    except (TransientError, RewardServiceError) as exc:
        log.warning("evaluation run %s could not be finished: %s", run, exc)
        return None
    if failed:
        log.warning("evaluation run %s is incomplete: some images were not accepted", run)
    label = label or summary.benchmark or "unigenbench"
    folder = output_dir / "eval" / label / f"step-{step:07d}"
    images = {pid: data for part in gathered for pid, data in part.items()}
    sheet = write_evaluation(folder, summary, [(pid, prompt, images.get(pid)) for pid, prompt in prompts])
    return EvalOutcome(summary_metrics(summary, label), summary, sheet)


def write_evaluation(folder: Path, summary: RunSummary, prompts: Sequence[tuple[str, str, bytes | None]]) -> Path:
    """Write `summary.json`, `results.csv` and the contact sheet (the sheet's prompts among `prompts`:
    (prompt_id, prompt, duplicate 0's PNG or None)) into `folder`; returns the sheet's path."""
    write_summary_json(folder / "summary.json", summary)
    write_results_csv(folder / "results.csv", summary.images)
    verdicts = {v.prompt_id: v for v in summary.images if v.duplicate == 0}
    shown = set(sheet_prompt_ids([pid for pid, _, _ in prompts]))
    entries = [SheetEntry(pid, prompt, data, verdicts.get(pid)) for pid, prompt, data in prompts if pid in shown]
    return save_contact_sheet(folder / CONTACT_SHEET_FILE, entries)


def _open_run(client: EvalClient, step: int) -> tuple[EvalRun, list[tuple[str, str]], int]:
    listed = client.prompts()
    return client.start_run(step), listed.prompts, listed.duplicates


def summary_metrics(summary: RunSummary, label: str) -> dict[str, float]:
    """`eval/<label>/...` metrics of a summary; NaN accuracies (nothing judged) are left out."""
    prefix = f"eval/{label}"
    metrics = {
        f"{prefix}/overall": summary.primary_mean_accuracy,
        f"{prefix}/pooled": summary.overall_accuracy,
        f"{prefix}/images_judged": float(summary.images_judged),
        f"{prefix}/parse_failures": float(summary.parse_failures),
        f"{prefix}/errors": float(summary.errors),
    }
    for dim in summary.primary_dimensions:
        metrics[f"{prefix}/primary/{dim.name}"] = dim.accuracy
    return {k: v for k, v in metrics.items() if not math.isnan(v)}


def png(image: torch.Tensor) -> bytes:
    """PNG bytes of a (H, W, 3) uint8 image."""
    buffer = io.BytesIO()
    Image.fromarray(image.cpu().numpy()).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
