"""What a training run is made of, built once before the loop: model, frozen reference, data,
rewards, optimizer, EMA, trackers and evaluation client, resumed from the newest checkpoint in the
output folder: this trainer's (everything restored), or the original trainer's ``checkpoint-N/``
(weights and step; its DeepSpeed optimizer state does not map onto this optimizer and is not
restored). A folder holding other checkpoints is refused rather than written into."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deepgen_common.client import EvalClient, RewardServiceError, TransientError, is_ready
from deepgen_trainer.checkpoints.ema import DitEma
from deepgen_trainer.checkpoints.loading import build_model
from deepgen_trainer.checkpoints.original_run import OriginalCheckpoint, scan_output_dir
from deepgen_trainer.checkpoints.rng_state import apply_rng
from deepgen_trainer.checkpoints.run_checkpoint import (
    DIT_PREFIX,
    EMA_FILE,
    SAMPLING_POLICY_FILE,
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    rng_file,
    sampler_file,
)
from deepgen_trainer.config import ConfigError, TrainConfig
from deepgen_trainer.data.prompt_sampler import PromptSampler
from deepgen_trainer.data.prompts import (
    DataConfigError,
    TrainData,
    load_eval_data,
    load_train_data,
    simple_train_data,
)
from deepgen_trainer.data.sftaux import SftAuxLoader, load_sftaux_data
from deepgen_trainer.data.sftaux_mmengine import load_mmengine_sftaux
from deepgen_trainer.engine.distributed import World
from deepgen_trainer.engine.ds_config import deepspeed_config
from deepgen_trainer.engine.optim import Updater, build_updater
from deepgen_trainer.engine.sampling_policy import SamplingPolicy
from deepgen_trainer.evaluation.evaluate import EvalPlan
from deepgen_trainer.model.deepgen import DEEPGEN_ONLY_PREFIXES, NEGATIVE_PROMPT, Conditioning, DeepGen
from deepgen_trainer.observe.flops import DeepGenShape
from deepgen_trainer.observe.grad_norms import GradParts
from deepgen_trainer.observe.metric_window import MetricWindow
from deepgen_trainer.observe.tracking import Tracker
from deepgen_trainer.rewards.clip_sim import ClipSimReward, build_tiny_clip
from deepgen_trainer.rewards.original_names import check_reward_funcs
from deepgen_trainer.rewards.original_services import recognise_original_service
from deepgen_trainer.rewards.outage import wait_for_reward_services
from deepgen_trainer.rewards.scorer import REWARD_NAMES, REWARD_URL_ENV, RewardFn, RewardScorer, build_reward

log = logging.getLogger("deepgen_trainer")


@dataclass
class Run:
    """Everything `setup` builds for the loop."""

    cfg: TrainConfig
    world: World
    model: DeepGen
    reference: torch.nn.Module | None
    data: TrainData
    reward_names: tuple[str, ...]
    sampler: PromptSampler
    sftaux: SftAuxLoader | None
    scorer: RewardScorer
    updater: Updater
    tracker: Tracker
    eval_client: EvalClient | None
    eval_plans: list[EvalPlan]
    start_step: int
    total_steps: int
    uncond: Conditioning | None
    ema: DitEma | None = None
    # The original's logging options: --logging_steps, --log_component_grad_norm, --log_tflops.
    window: MetricWindow | None = None
    grad_parts: GradParts | None = None
    shape: DeepGenShape | None = None
    sampling_policy: SamplingPolicy | None = None  # DiffusionNFT --atrain_nft_off_policy: v_old, the rollout's DiT


def setup(cfg: TrainConfig, world: World, model: DeepGen | None = None) -> Run:
    """Build the model, data, rewards, optimizer and trackers; resume from the newest checkpoint.
    `model` replaces the one `--model` names (benchmarks/bench_gpu.py: real size, random weights)."""
    data = train_data(cfg)
    _seed_everything(cfg.seed + world.rank)
    reward_names = data.reward_names
    model = (model if model is not None else build_model(cfg)).place(world.device)  # the vision tower stays on CPU
    model.vae_batch_size = cfg.vae_batch_size
    model.set_gradient_checkpointing(cfg.gradient_checkpointing)
    reference = None
    if cfg.beta > 0:  # the KL reference: a frozen copy of the initial DiT
        reference = copy.deepcopy(model.transformer).requires_grad_(False).eval()
    sampling_policy = None
    if cfg.atrain_algorithm == "diffusionnft" and cfg.atrain_nft_off_policy:  # copied before DeepSpeed wraps the DiT
        sampling_policy = SamplingPolicy(model)
    remote = {name: reward_url(cfg, name) for name in reward_names if name in REWARD_URL_ENV}
    wait_for_reward_services({n: u for n, u in remote.items() if u}, cfg.reward_ready_timeout)
    scorer = RewardScorer({name: _reward(name, cfg, world) for name in reward_names})
    sampler = PromptSampler(data, cfg.prompts_per_rank_for(world.world_size), cfg.seed, world.rank, world.world_size)
    sftaux = sftaux_loader(cfg, world.rank)
    epochs_steps = math.ceil(cfg.num_train_epochs * sampler.batches_per_epoch)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else epochs_steps
    resume, original = _resume_source(cfg.output_dir)
    if original is not None:  # its weights go in before DeepSpeed wraps (and under ZeRO-3 partitions) the DiT
        try:
            _load_original_weights(model, original)
        except CheckpointError as exc:
            raise ConfigError(f"cannot resume from {original.path}: {exc}") from exc
    updater = build_updater(model.transformer, cfg, world, total_steps)
    # Every rank keeps the EMA (evaluation runs on all of them); under ZeRO-3 its update gathers the DiT.
    ema = DitEma(updater.trainable_state(is_main=True), cfg.ema_decay) if cfg.ema_decay > 0 else None

    start_step = 0
    if original is not None:
        start_step = _resume_original(cfg, world, original, updater, ema is not None, sampling_policy)
    elif resume is not None:
        start_step, ema = _resume(cfg, resume, world.rank, updater, ema, sampling_policy, sampler, sftaux)

    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    if world.is_main:
        (Path(cfg.output_dir) / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    tracker = build_tracker(cfg, world.rank)
    eval_client, eval_plans = evaluation_plans(cfg)
    uncond = model.encode_prompts([NEGATIVE_PROMPT]) if cfg.cfg_scale > 0 else None
    for note in cfg.algorithm_notices():
        log.info("%s", note)
    log.info(
        "training %d steps from step %d: %d prompts × %d images per rank, %d ranks, rewards %s, DiT %.3g M parameters",
        total_steps, start_step, cfg.prompts_per_rank_for(world.world_size), cfg.rollout_n, world.world_size,
        ", ".join(reward_names), sum(p.numel() for p in model.trainable_parameters()) / 1e6,
    )  # fmt: skip
    return Run(
        cfg, world, model, reference, data, reward_names, sampler, sftaux, scorer, updater, tracker, eval_client,
        eval_plans, start_step, total_steps, uncond, ema, window=MetricWindow(cfg.logging_steps),
        grad_parts=component_grad_parts(cfg, model),
        shape=DeepGenShape.from_model(model) if cfg.log_tflops else None,
        sampling_policy=sampling_policy,
    )  # fmt: skip


def _resume_original(
    cfg: TrainConfig,
    world: World,
    original: OriginalCheckpoint,
    updater: Updater,
    with_ema: bool,
    sampling_policy: SamplingPolicy | None,
) -> int:
    """Go on from the original trainer's checkpoint, whose weights are already in the model: the LR
    schedule moves on to its step; returns that step."""
    _fast_forward_schedule(updater, original.step * cfg.optimizer_steps(world.world_size))
    log.warning(
        "resumed from the original trainer's %s at step %d: the DiT and the DeepGen-only weights come from its "
        "%s; its optimizer state (DeepSpeed shards) does not map onto this optimizer and is NOT restored "
        "(AdamW moments restart from zero), the LR schedule is moved on to step %d, prompt order and RNG "
        "restart from --seed%s",
        original.path, original.step, "model.safetensors", original.step,
        "; the EMA starts at the resumed DiT" if with_ema else "",
    )  # fmt: skip
    if sampling_policy is not None:
        _resume_sampling_policy(sampling_policy, updater, original.path, None)
    return original.step


def _resume(
    cfg: TrainConfig,
    resume: Path,
    rank: int,
    updater: Updater,
    ema: DitEma | None,
    sampling_policy: SamplingPolicy | None,
    sampler: PromptSampler,
    sftaux: SftAuxLoader | None,
) -> tuple[int, DitEma | None]:
    """Restore this run's checkpoint `resume`: weights, optimizer, EMA, sampling copy, data order and
    RNG. Returns its step and the EMA (one at the resumed DiT when the checkpoint was saved without)."""
    # On the CPU: whole tensors onto every rank's GPU at once would add the DiT, its optimizer state and
    # the fp32 EMA to the peak; the restore copies each into place. A refused file (hostile, or pointing
    # outside the folder) stops the run before it trains: exit 2.
    try:
        ckpt = load_checkpoint(resume, map_location="cpu", rank=rank)
        updater.restore(ckpt)
        if sampling_policy is not None:
            _resume_sampling_policy(sampling_policy, updater, resume, ckpt)
        if ema is not None and ckpt.ema is not None:
            _resume_ema(ema, ckpt)
    except CheckpointError as exc:
        raise ConfigError(f"cannot resume from {resume}: {exc}") from exc
    except torch.OutOfMemoryError:  # a RuntimeError too, and no fault of the checkpoint's
        raise
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # another model's weights or optimizer
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__  # torch's lists every key
        raise ConfigError(
            f"cannot resume from {resume}: its DiT or optimizer state does not fit this run ({reason}); resume "
            "with the model and DeepSpeed config it was saved with, or pass a fresh --output_dir"
        ) from None
    if ema is not None and ckpt.ema is None:
        ema = DitEma(updater.trainable_state(is_main=True), cfg.ema_decay)
        log.warning("%s has no EMA (saved without --ema_decay): the EMA starts at the resumed DiT", resume)
    if ckpt.sampler_state is not None:
        with _must_fit(resume / sampler_file(rank)) as state_file:
            sampler.load_state_dict(ckpt.sampler_state["prompts"])
            if sftaux is not None and "sftaux" in ckpt.sampler_state:
                sftaux.load_state_dict(ckpt.sampler_state["sftaux"])
            elif sftaux is not None:
                log.warning("%s has no SFT-aux position (saved without SFT-aux): its images start over", state_file)
    if ckpt.rng is not None:
        with _must_fit(resume / rng_file(rank)):
            apply_rng(ckpt.rng)
    log.info("resumed from %s at step %d", resume, ckpt.step)
    return ckpt.step, ema


@contextlib.contextmanager
def _must_fit(state_file: Path) -> Iterator[Path]:
    """A per-rank state file holds whatever its writer put there: what does not fit this run (another
    --seed, a missing entry, another type) is a refusal naming the file, not a traceback."""
    try:
        yield state_file
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        reason = f"no entry {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ConfigError(
            f"cannot resume from {state_file.parent}: {state_file} does not fit this run: {reason}"
        ) from None


def component_grad_parts(cfg: TrainConfig, model: DeepGen) -> GradParts | None:
    """The gradient parts of ``--log_component_grad_norm``, measured with plain PyTorch and with
    DeepSpeed ZeRO stages 0-2. Under ZeRO-3 the flag (always on in the original's launch lines) has no
    effect, said in one line: each rank holds a shard of the weights, while measuring backpropagates
    into the whole weights on every rank."""
    if not cfg.log_component_grad_norm:
        return None
    zero = deepspeed_config(cfg.deepspeed, cfg).get("zero_optimization", {}) if cfg.deepspeed != "none" else {}
    if zero.get("stage", 0) >= 3:
        log.info(
            "--log_component_grad_norm has no effect under ZeRO-3 (--deepspeed %s): the weights are sharded over "
            "the ranks; use a ZeRO-2 config or --deepspeed none to log the norms",
            cfg.deepspeed,
        )
        return None
    return GradParts(model.trainable_parameters())


def build_tracker(cfg: TrainConfig, rank: int) -> Tracker:
    """The run's trackers: --report_to, with the modes, projects and run name of the config (from the flags
    or the original's WANDB_* / SWANLAB_* / RUN_NAME variables)."""
    return Tracker(
        cfg.report_to, output_dir=cfg.output_dir, config=cfg.to_dict(), prometheus_port=cfg.metrics_port, rank=rank,
        project=cfg.wandb_project, swanlab_project=cfg.swanlab_project, run_name=cfg.run_name,
        wandb_mode=cfg.wandb_mode, swanlab_mode=cfg.swanlab_mode,
    )  # fmt: skip


def evaluation_plans(cfg: TrainConfig) -> tuple[EvalClient | None, list[EvalPlan]]:
    """The eval client (when UNIGENBENCH_API_URL is set and evaluation is on) and one plan per entry of
    the eval YAML; without the YAML, the service's first set with its duplicates. A YAML naming a set
    the service does not serve stops the run here, with the list it serves; an unscored entry needs
    no service."""
    if not (cfg.eval_freq or cfg.eval_before_train):
        return None, []
    steps = cfg.eval_num_inference_steps or cfg.num_inference_steps
    client = EvalClient(cfg.unigenbench_api_url) if cfg.unigenbench_api_url else None
    if client is not None and not is_ready(cfg.unigenbench_api_url):  # stop at once at one of the original's
        fix = recognise_original_service("UNIGENBENCH_API_URL", cfg.unigenbench_api_url)
        if fix is not None:
            raise ConfigError(fix)
    if not cfg.eval_dataset_config:
        return client, [EvalPlan("", "", (), 0, cfg.eval_cfg_scale, steps)] if client is not None else []
    plans = []
    for d in load_eval_data(cfg.eval_dataset_config).datasets:
        cfg_scale = cfg.eval_cfg_scale if d.cfg_scale is None else d.cfg_scale
        prompts = tuple(zip(d.prompt_ids, d.prompts, strict=True))
        plan = EvalPlan(d.name, d.benchmark, prompts, d.duplicates, cfg_scale, d.num_inference_steps or steps)
        if d.benchmark is not None and client is None:
            log.warning("eval entry %s is scored by eval-unigenbench, but UNIGENBENCH_API_URL is not set: skipped",
                        d.name)  # fmt: skip
            continue
        plans.append(plan)
    if client is not None:
        _check_served(client, [p for p in plans if p.benchmark is not None], cfg.eval_dataset_config)
    return client, plans


def _check_served(client: EvalClient, plans: list[EvalPlan], config: str) -> None:
    """Every scored plan's set is served by eval-unigenbench (asked once at start)."""
    try:
        for plan in plans:
            try:
                client.prompts(plan.benchmark or "")
            except RewardServiceError as exc:  # INVALID_ARGUMENT: the service names the sets it serves
                raise ConfigError(
                    f"{config}: eval entry {plan.name!r} asks eval-unigenbench for set {plan.benchmark!r} "
                    f"(from its path), which it does not serve: {exc}. Serve it (BENCHMARK=...,"
                    f"test_prompts_{plan.benchmark}) or change the entry's path"
                ) from None
    except TransientError as exc:  # not reachable now: evaluations are skipped while it is down
        log.warning("eval-unigenbench not reachable at start (%s); the eval sets are checked at each evaluation", exc)


def train_data(cfg: TrainConfig) -> TrainData:
    """The train YAML (``--dataset_config``), else the original's simple mode: ``--prompts_file`` with
    ``--reward_funcs`` (default jpeg_compressibility), each reward weighted 1."""
    if cfg.dataset_config is not None:
        if cfg.prompts_file is not None or cfg.reward_funcs is not None:
            log.info("--prompts_file / --reward_funcs have no effect with --dataset_config: its datasets name the "
                     "prompts and rewards")  # fmt: skip
        return load_train_data(cfg.dataset_config, REWARD_NAMES)
    if cfg.prompts_file is None:
        raise ConfigError(
            "no training prompts: pass --dataset_config (or set DATASET_CONFIG) to a train YAML, or --prompts_file "
            "with --reward_funcs (simple mode)"
        )
    try:
        names = check_reward_funcs(cfg.reward_funcs or ("jpeg_compressibility",), REWARD_NAMES)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return simple_train_data(cfg.prompts_file, names)


def sftaux_loader(cfg: TrainConfig, rank: int) -> SftAuxLoader | None:
    """The SFT-aux loader: an MMEngine ``.py`` config (the original's) or this trainer's YAML. With
    ``--sftaux_disable_on_error`` data that cannot be loaded turns SFT-aux off with a warning."""
    if not cfg.uses_sftaux:
        return None
    path = str(cfg.sftaux_dataset_config)
    num_workers = cfg.sftaux_num_workers
    try:
        if path.endswith(".py"):
            data, settings = load_mmengine_sftaux(path)
            num_workers = settings.num_workers if num_workers is None else num_workers
        else:
            data = load_sftaux_data(path)
    except (DataConfigError, OSError) as exc:
        if not cfg.sftaux_disable_on_error:
            raise
        log.warning("SFT-aux is OFF for this run (--sftaux_disable_on_error): %s", exc)
        return None
    return SftAuxLoader(data, cfg.seed, rank, num_workers=num_workers or 0)


def reward_url(cfg: TrainConfig, name: str) -> str | None:
    """The service URL of a remote reward (``OCR_URL`` / ``UNIFIEDREWARD_THINK_URL``); None for in-process ones."""
    return {"ocr": cfg.ocr_url, "unifiedreward_think": cfg.unifiedreward_think_url}.get(name)


def _resume_source(output_dir: str) -> tuple[Path | None, OriginalCheckpoint | None]:
    """The newest checkpoint to resume from: this trainer's, or the original trainer's when it is newer.
    Raises ConfigError when the folder holds ``checkpoint-N`` folders of neither kind."""
    try:
        foreign = scan_output_dir(output_dir)
    except CheckpointError as exc:
        raise ConfigError(f"--output_dir {output_dir}: {exc}") from exc
    if foreign.unknown:
        raise ConfigError(
            f"--output_dir {output_dir} holds checkpoints this trainer did not write and cannot resume from: "
            f"{[p.name for p in foreign.unknown]} (no 'complete' marker, no model.safetensors). Pass a fresh "
            "--output_dir or move them away; they are never overwritten"
        )
    ours, original = latest_checkpoint(output_dir), foreign.latest_original
    if original is not None and (ours is None or original.step > int(ours.name.rsplit("-", 1)[1])):
        return None, original
    return ours, None


def _load_original_weights(model: DeepGen, original: OriginalCheckpoint) -> None:
    """The original's ``model.safetensors`` into `model`: the whole DiT (required) and the DeepGen-only
    modules it holds (the run trained with them, so they replace those of --checkpoint)."""
    weights = original.weights()
    dit = {k.removeprefix(DIT_PREFIX): v for k, v in weights.items() if k.startswith(DIT_PREFIX)}
    own = model.transformer.state_dict()
    missing, extra = sorted(own.keys() - dit.keys()), sorted(dit.keys() - own.keys())
    if missing or extra:
        raise ConfigError(
            f"{original.path}/model.safetensors does not hold this DiT (missing {missing[:3]}, unexpected "
            f"{extra[:3]}): check the SD3 folder, or pass a fresh --output_dir to start from --checkpoint"
        )
    model.transformer.load_state_dict(dit)
    frozen = {k: v for k, v in weights.items() if k.startswith(DEEPGEN_ONLY_PREFIXES)}
    current = model.deepgen_only_state()
    changed = [k for k, v in frozen.items() if k in current and not torch.equal(v.to(current[k]), current[k])]
    if changed:
        log.warning("%s: %d DeepGen-only tensors differ from --checkpoint's; using the original run's", original.path,
                    len(changed))  # fmt: skip
    model.load_state_dict(frozen, strict=False)


def _resume_ema(ema: DitEma, ckpt: Checkpoint) -> None:
    """The DiT's EMA from `ckpt`; CheckpointError naming the file when it does not fit this DiT."""
    assert ckpt.ema is not None
    try:
        ema.load_state_dict(ckpt.ema)
    except ValueError as exc:
        raise CheckpointError(
            f"{ckpt.path / EMA_FILE} does not hold an EMA of this DiT: {exc}; delete that file to resume with the "
            "EMA restarted at the resumed DiT"
        ) from exc


def _resume_sampling_policy(policy: SamplingPolicy, updater: Updater, source: Path, ckpt: Checkpoint | None) -> None:
    """DiffusionNFT off-policy: the sampling copy of the DiT from the checkpoint `ckpt` (None: `source` is
    the original trainer's); from one without a copy, the resumed DiT, with a warning that says why.
    CheckpointError naming the file when the saved copy does not fit this DiT."""
    if ckpt is not None and ckpt.sampling_policy is not None:
        try:
            policy.load_state_dict(ckpt.sampling_policy)
        except ValueError as exc:
            raise CheckpointError(
                f"{ckpt.path / SAMPLING_POLICY_FILE} does not hold a copy of this DiT: {exc}; delete that file to "
                "resume with the sampling copy restarted at the resumed DiT"
            ) from exc
        return
    policy.soft_update(updater.trainable_state(is_main=True), 0.0)
    log.warning(
        "diffusionnft off-policy: %s has no sampling copy of the DiT (%s): the copy restarts at the resumed DiT, "
        "so the next rollouts and v_old are not those the unbroken run would have had",
        source, _why_no_sampling_copy(ckpt),
    )  # fmt: skip


def _why_no_sampling_copy(ckpt: Checkpoint | None) -> str:
    if ckpt is None:
        return "the original trainer's checkpoints hold none"
    algorithm = ckpt.config.get("atrain_algorithm")
    if algorithm == "diffusionnft" and not ckpt.config.get("atrain_nft_off_policy"):
        return "it was saved by an on-policy run: --atrain_algorithm diffusionnft without --atrain_nft_off_policy"
    if algorithm is not None and algorithm != "diffusionnft":
        return f"it was saved by a --atrain_algorithm {algorithm} run"
    return f"no {SAMPLING_POLICY_FILE}: an older version of this trainer did not save it, or the file was removed"


def _fast_forward_schedule(updater: Updater, steps: int) -> None:
    """Tick the LR schedule `steps` times, as if the optimizer had stepped (no optimizer state to restore)."""
    scheduler = updater.scheduler  # type: ignore[attr-defined]  # both updaters expose their LR scheduler
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            scheduler.step()


def _reward(name: str, cfg: TrainConfig, world: World) -> RewardFn:
    if name == "clip_sim":
        if cfg.clip_model_name_or_path:
            dtype = torch.bfloat16 if cfg.bf16 else torch.float32  # the cosine itself is taken in float32
            clip = ClipSimReward.from_pretrained(cfg.clip_model_name_or_path, device=world.device, dtype=dtype)
        elif cfg.model == "tiny":
            clip = build_tiny_clip(seed=cfg.seed, device=world.device)
        else:
            raise ConfigError("reward clip_sim needs CLIP_MODEL_NAME_OR_PATH (or --clip_model_name_or_path)")
        return build_reward(name, clip=clip)
    url = reward_url(cfg, name)
    try:
        return build_reward(name, url=url)
    except ValueError as exc:  # a missing URL
        raise ConfigError(str(exc)) from None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
