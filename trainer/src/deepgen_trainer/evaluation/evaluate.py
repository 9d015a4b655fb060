"""Evaluation during training: every entry of the eval YAML (or the eval service's first set), generated,
scored by eval-unigenbench when the entry is scored, and logged under the entry's name.

A scored entry names an eval-unigenbench set (``en``, ``zh_long``, ...) and its duplicates: rank 0
lists the set's prompts and opens a run with those duplicates; every rank generates its share (item
k of the prompt × duplicate list goes to rank k mod world size) and submits the images itself over
the network; rank 0 finishes the run. An unscored entry (no ``scoring``, the original's "generate and
log only") reads its prompts from its file; each rank writes its images to
``<output_dir>/eval/<name>/step-<step>/images/<id>.<dup>.png``.

Sampling (`EvalSampling`, the original's ``--eval_*`` options): ``ode`` is the deterministic Euler
sampler; ``sde`` the training sampler with η = ``--eval_sde_eta``, each image's SDE noise drawn from
its own generator seeded index·1000 + duplicate + 42 + 1000000 (the original's). The initial noise is
seeded index·1000 + duplicate + 42 in both, so an image does not depend on the world size or the
batch it lands in (the offline evaluation, `evaluate_checkpoint`, generates the same ODE images).

Metrics of an entry `<name>`: `eval/<name>/overall` is the leaderboard's Overall, the mean of the
primary-dimension accuracies; `eval/<name>/pooled` pools every testpoint; `eval/<name>/primary/<dim>`
per primary dimension; image counts. The original's names are logged as well, so dashboards built on
it keep working: `eval/<name>/overall_accuracy` (= pooled), `eval/<name>/success_rate` (images whose
answer parsed / images sent), and one key per sub-dimension, `eval/<name>/<Primary>.<Primary-Sub>`
(`Attribute - Color` → `Attribute.Attribute-Color`; a name without " - " as it is). Rank 0 keeps the
summary, the per-image CSV and a contact sheet (`contact_sheet.py`) in
`<output_dir>/eval/<name>/step-<step>/`, and the first N images (prompt-major: the smallest indices,
every duplicate) in its `uploads/` for the trackers (``--eval_wandb_num_upload_images``,
``--eval_swanlab_num_upload_images``).
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
from deepgen_trainer.algorithms.sde import Sampler, sde_step_with_logprob
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


SDE_SEED_OFFSET = 1_000_000  # the original's: an image's SDE noise is seeded with its seed + this


@dataclass(frozen=True)
class EvalPlan:
    """One evaluation: an eval YAML entry, or the service's first set.

    name: metrics and folders are named after it ("": after the set the service evaluated).
    benchmark: the eval-unigenbench set ("": the service's first); None = generate and log only.
    prompts: (prompt id, prompt) of an unscored plan; the service lists a scored plan's.
    duplicates: images per prompt (0: the service's default).
    """

    name: str
    benchmark: str | None
    prompts: tuple[tuple[str, str], ...]
    duplicates: int
    cfg_scale: float
    num_inference_steps: int


@dataclass(frozen=True)
class EvalSampling:
    """How evaluation images are generated (the original's ``--eval_*`` options)."""

    mode: str  # "ode" or "sde"
    sampler: Sampler
    eta: float
    height: int
    width: int
    batch_size: int
    uploads: int = 0  # images kept for the trackers (the larger of the wandb and swanlab counts)


@dataclass(frozen=True)
class EvalOutcome:
    """What one evaluation gives rank 0: the metrics, the summary (None when not scored), the contact
    sheet's path and the images kept for the trackers ((PNG path, caption), prompt-major)."""

    metrics: dict[str, float]
    summary: RunSummary | None
    contact_sheet: Path
    uploads: list[tuple[Path, str]]


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
    sde: tuple[Sampler, float] | None = None,
) -> Iterator[list[tuple[EvalItem, bytes]]]:
    """Sample `items` in batches of `batch_size` (ODE, or the SDE `sde` = (sampler, η)); yields each
    batch's (item, PNG bytes)."""
    sigmas = model.sigmas(num_inference_steps)
    uncond = model.encode_prompts([NEGATIVE_PROMPT]) if cfg_scale > 0 else None
    shape = model.latent_shape(height, width)
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(i.seed)) for i in batch])
        cond = model.encode_prompts([i.prompt for i in batch])
        if sde is None:
            latents = ode_sample(model, noise.to(model.device), cond, sigmas, cfg_scale, uncond)
        else:
            latents = _sde_sample(model, noise.to(model.device), cond, sigmas, cfg_scale, uncond, batch, *sde)
        images = to_uint8(model.decode(latents))
        yield [(item, png(image)) for item, image in zip(batch, images, strict=True)]


def _sde_sample(
    model: DeepGen,
    noise: torch.Tensor,
    cond: object,
    sigmas: torch.Tensor,
    cfg_scale: float,
    uncond: object,
    items: Sequence[EvalItem],
    sampler: Sampler,
    eta: float,
) -> torch.Tensor:
    """The SDE sampler with each image's noise from its own generator (seed + SDE_SEED_OFFSET): the
    step mean and std come from `sde_step_with_logprob`, x' = mean + std·ε_i."""
    generators = [torch.Generator().manual_seed(i.seed + SDE_SEED_OFFSET) for i in items]
    x = noise.float()
    for k in range(len(sigmas) - 1):
        v = model.velocity(x, sigmas[k].item(), cond, cfg_scale, uncond)
        _, _, mean, std = sde_step_with_logprob(
            sampler, v, x, sigmas[k].item(), sigmas[k + 1].item(), eta, prev_sample=x
        )
        eps = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(x)
        x = mean + std.reshape(-1, *([1] * (x.ndim - 1))).expand(len(x), *([1] * (x.ndim - 1))) * eps
    return x


def evaluate(
    model: DeepGen,
    client: EvalClient | None,
    world: World,
    step: int,
    plan: EvalPlan,
    sampling: EvalSampling,
    *,
    output_dir: Path,
) -> EvalOutcome | None:
    """One evaluation; the outcome on rank 0 (None elsewhere, and when the service fails: a failed
    evaluation is logged and training goes on)."""
    if plan.benchmark is None:
        return _generate_only(model, world, step, plan, sampling, output_dir)
    assert client is not None, "a scored evaluation needs the eval service"
    try:
        opened = world.broadcast(_open_run(client, step, plan) if world.is_main else None)
    except (TransientError, RewardServiceError) as exc:  # only rank 0 talks before the broadcast
        log.warning("evaluation skipped: %s", exc)
        opened = world.broadcast(None)
    if opened is None:
        return None
    run, prompts, duplicates = opened
    items = eval_items(prompts, duplicates)
    mine = items[world.rank :: world.world_size]
    keep = _kept(prompts, items, sampling.uploads)
    kept: dict[tuple[str, int], bytes] = {}
    failed = False
    for batch in _generate(model, mine, plan, sampling):
        kept |= {(i.prompt_id, i.duplicate): data for i, data in batch if (i.prompt_id, i.duplicate) in keep}
        try:
            client.submit(run, [EvalImage(i.prompt_id, i.duplicate, data) for i, data in batch])
        except (TransientError, RewardServiceError) as exc:
            log.warning("evaluation images not accepted: %s", exc)
            failed = True
            break
    gathered = world.gather_objects(kept)
    if not world.is_main:
        return None
    try:
        summary = client.finish(run)
    except (TransientError, RewardServiceError) as exc:
        log.warning("evaluation run %s could not be finished: %s", run, exc)
        return None
    if failed:
        log.warning("evaluation run %s is incomplete: some images were not accepted", run)
    label = plan.name or summary.benchmark or "unigenbench"
    folder = output_dir / "eval" / label / f"step-{step:07d}"
    images = {key: data for part in gathered for key, data in part.items()}
    sheet = write_evaluation(folder, summary, [(pid, prompt, images.get((pid, 0))) for pid, prompt in prompts])
    uploads = _write_uploads(folder, items, images, sampling.uploads)
    return EvalOutcome(summary_metrics(summary, label), summary, sheet, uploads)


def _generate(
    model: DeepGen, items: Sequence[EvalItem], plan: EvalPlan, sampling: EvalSampling
) -> Iterator[list[tuple[EvalItem, bytes]]]:
    return generate_pngs(
        model, items, height=sampling.height, width=sampling.width, num_inference_steps=plan.num_inference_steps,
        cfg_scale=plan.cfg_scale, batch_size=sampling.batch_size,
        sde=(sampling.sampler, sampling.eta) if sampling.mode == "sde" else None,
    )  # fmt: skip


def _kept(prompts: Sequence[tuple[str, str]], items: Sequence[EvalItem], uploads: int) -> set[tuple[str, int]]:
    """(prompt id, duplicate) of the images rank 0 needs: duplicate 0 of the contact sheet's prompts
    and the first `uploads` images."""
    on_sheet = {(pid, 0) for pid in sheet_prompt_ids([pid for pid, _ in prompts])}
    return on_sheet | {(i.prompt_id, i.duplicate) for i in items[:uploads]}


def _write_uploads(
    folder: Path, items: Sequence[EvalItem], images: dict[tuple[str, int], bytes], count: int
) -> list[tuple[Path, str]]:
    """The first `count` images as `uploads/<id>.<dup>.png`, with the original's caption "[id.dup] prompt"."""
    out = []
    for item in items[:count]:
        data = images.get((item.prompt_id, item.duplicate))
        if data is None:
            continue
        path = folder / "uploads" / f"{item.prompt_id}.{item.duplicate}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        out.append((path, f"[{item.prompt_id}.{item.duplicate}] {item.prompt}"))
    return out


def _generate_only(
    model: DeepGen, world: World, step: int, plan: EvalPlan, sampling: EvalSampling, output_dir: Path
) -> EvalOutcome | None:
    """The original's unscored entry: generate, keep every image on disk (each rank its own), log."""
    items = eval_items(plan.prompts, plan.duplicates)
    keep = _kept(plan.prompts, items, sampling.uploads)
    folder = output_dir / "eval" / plan.name / f"step-{step:07d}"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    kept: dict[tuple[str, int], bytes] = {}
    for batch in _generate(model, items[world.rank :: world.world_size], plan, sampling):
        for item, data in batch:
            (folder / "images" / f"{item.prompt_id}.{item.duplicate}.png").write_bytes(data)
            if (item.prompt_id, item.duplicate) in keep:
                kept[(item.prompt_id, item.duplicate)] = data
    gathered = world.gather_objects(kept)
    if not world.is_main:
        return None
    images = {key: data for part in gathered for key, data in part.items()}
    shown = set(sheet_prompt_ids([pid for pid, _ in plan.prompts]))
    entries = [SheetEntry(pid, p, images.get((pid, 0)), None) for pid, p in plan.prompts if pid in shown]
    sheet = save_contact_sheet(folder / CONTACT_SHEET_FILE, entries)
    uploads = _write_uploads(folder, items, images, sampling.uploads)
    return EvalOutcome({f"eval/{plan.name}/images_generated": float(len(items))}, None, sheet, uploads)


def write_evaluation(folder: Path, summary: RunSummary, prompts: Sequence[tuple[str, str, bytes | None]]) -> Path:
    """Write `summary.json`, `results.csv` and the contact sheet (the sheet's prompts among `prompts`:
    (prompt_id, prompt, duplicate 0's PNG or None)) into `folder`; returns the sheet's path."""
    write_summary_json(folder / "summary.json", summary)
    write_results_csv(folder / "results.csv", summary.images)
    verdicts = {v.prompt_id: v for v in summary.images if v.duplicate == 0}
    shown = set(sheet_prompt_ids([pid for pid, _, _ in prompts]))
    entries = [SheetEntry(pid, prompt, data, verdicts.get(pid)) for pid, prompt, data in prompts if pid in shown]
    return save_contact_sheet(folder / CONTACT_SHEET_FILE, entries)


def _open_run(client: EvalClient, step: int, plan: EvalPlan) -> tuple[EvalRun, list[tuple[str, str]], int]:
    listed = client.prompts(plan.benchmark or "")
    duplicates = plan.duplicates or listed.duplicates
    return client.start_run(step, plan.benchmark or "", duplicates), listed.prompts, duplicates


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
    # The original's names (evaluation/unigenbench.py format_wandb_metrics), next to ours.
    sent = summary.images_judged + summary.parse_failures + summary.errors
    metrics[f"{prefix}/overall_accuracy"] = summary.overall_accuracy
    metrics[f"{prefix}/success_rate"] = summary.images_judged / sent if sent else math.nan
    for dim in summary.sub_dimensions:
        metrics[f"{prefix}/{original_dimension_key(dim.name)}"] = dim.accuracy
    return {k: v for k, v in metrics.items() if not math.isnan(v)}


def original_dimension_key(sub_dimension: str) -> str:
    """The original's metric name of a sub-dimension: "Attribute - Color" → "Attribute.Attribute-Color";
    a name without " - " stays as it is."""
    if " - " not in sub_dimension:
        return sub_dimension
    primary = sub_dimension.split(" - ", 1)[0].strip()
    return f"{primary}.{sub_dimension.replace(' - ', '-')}"


def png(image: torch.Tensor) -> bytes:
    """PNG bytes of a (H, W, 3) uint8 image."""
    buffer = io.BytesIO()
    Image.fromarray(image.cpu().numpy()).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
