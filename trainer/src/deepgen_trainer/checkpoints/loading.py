"""Build `DeepGen` from HF-format folders and apply a DeepGen checkpoint on top.

`load_deepgen(sd3_path, qwen_path, checkpoint)`:

1. the SD3 folder gives `transformer/`, `vae/`, `scheduler/`; the Qwen folder gives the VLM and its
   tokenizer (the caller resolves them, e.g. from `SD3_5_MODEL_NAME_OR_PATH` and
   `QWEN2_5_VL_MODEL_NAME_OR_PATH`; this module reads no environment);
2. the checkpoint is read in any format the original code writes (`checkpoint_formats`: flat
   `.pth` / `.safetensors`, DeepSpeed ZeRO-2/3 folders rebuilt from their optimizer shards, mmengine
   Runner files, the original's RL `checkpoint-N/`, this trainer's checkpoints) without running
   pickled code; its keys are normalised (below) and loaded non-strictly;
3. the `LoadReport` says where each module's weights came from (the checkpoint, the HF folders, or
   their initial value) and lists the problems: a DeepGen-only module (think tokens, projectors,
   connector) or the VLM LoRA not (fully) in the checkpoint, a DiT only partly in it, parameters the
   checkpoint's engine trained that it does not hold. `check_complete` turns problems into a
   `PartialCheckpointError` unless the caller accepts them (`--allow_partial_checkpoint`).

Key normalisation, in order:
- `module.` / `model.` wrappers in front of the DeepGen attribute names are stripped (DeepSpeed,
  DDP and trainer wrappers): `module.model.transformer.x` → `transformer.x`;
- the transformers < 5 Qwen2.5-VL layout is mapped to the 5.x one: `lmm.model.{layers,embed_tokens,
  norm}.*` → `lmm.model.language_model.*` and `lmm.visual.*` → `lmm.model.visual.*`;
- LoRA keys with or without peft's adapter name and `base_layer` (`q_proj.lora_A.default.weight`,
  `q_proj.lora_A.weight`, `q_proj.base_layer.weight`, `q_proj.weight`) match whichever the model has.

If the checkpoint carries LoRA weights for the VLM (the SFT model trains a rank-64 LoRA on the frozen
VLM), the LoRA layers are injected first (`peft.inject_adapter_in_model`; `add_adapter` needs
peft ≥ 0.22), with the target modules and rank read off the checkpoint and α = `lora_alpha`
(default 2·rank, the SFT model's 128/64). The LoRA stays frozen.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from peft import LoraConfig, inject_adapter_in_model
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from deepgen_trainer.checkpoints.formats import CheckpointContents, CheckpointReadError, read_checkpoint
from deepgen_trainer.config import ConfigError, TrainConfig
from deepgen_trainer.model.connector import ConnectorConfig
from deepgen_trainer.model.deepgen import DEEPGEN_ONLY_PREFIXES, DeepGen, DeepGenConfig
from deepgen_trainer.model.tiny import build_tiny
from deepgen_trainer.original.model_config import ModelConfigError, read_model_config

logger = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("module", "model")
_OLD_QWEN_LAYOUT = (
    (re.compile(r"^lmm\.model\.(layers|embed_tokens|norm)\."), r"lmm.model.language_model.\1."),
    (re.compile(r"^lmm\.visual\."), "lmm.model.visual."),
)
_LORA_A = re.compile(r"^lmm\.(?P<module>.+)\.(lora_A\.weight|lora_embedding_A)$")


LORA_FAMILY = "lmm LoRA"
# Modules whose weights exist only in a DeepGen checkpoint: left at init they make the conditioning untrained.
_MUST_LOAD = ("meta_queries", "projector_1", "connector", "projector_2", "projector_3", LORA_FAMILY)
_FIX = (
    "pass the SFT checkpoint in full (for a DeepSpeed folder: the tag folder with its *_optim_states.pt "
    "shards), or --allow_partial_checkpoint to train with these weights at their initial value"
)


class PartialCheckpointError(ValueError):
    """A checkpoint that leaves a DeepGen-only module, the VLM LoRA or part of the DiT at its initial value."""


def family(key: str) -> str:
    """The module a state-dict key belongs to: its top-level name, with the VLM's LoRA apart."""
    if key.startswith("lmm.") and ".lora_" in key:
        return LORA_FAMILY
    return key.split(".", 1)[0]


@dataclass
class ModuleSource:
    """How many of a module's tensors came from the checkpoint; the rest come from `fallback`."""

    loaded: int
    total: int
    fallback: str

    def describe(self) -> str:
        if self.loaded == self.total:
            return "checkpoint"
        if self.loaded == 0:
            return self.fallback
        return f"{self.loaded}/{self.total} from the checkpoint, the rest {self.fallback}"


@dataclass
class LoadReport:
    """What `load_deepgen` / `apply_checkpoint` did with the checkpoint.

    format: the checkpoint's format in words (see `checkpoint_formats`).
    missing: model keys the checkpoint did not set (they keep the HF-folder or initial weights).
    unexpected: checkpoint keys (after normalisation) that match nothing in the model.
    sources: per module (`family`), where its weights came from.
    trained_not_loaded: parameters the checkpoint's engine trained (DeepSpeed's list) that it does not
        hold, e.g. a VLM LoRA present only in missing ZeRO optimizer shards.
    lora_modules: VLM modules (relative to `lmm`) that received a LoRA; empty when none.
    """

    checkpoint: str | None
    format: str | None = None
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    sources: dict[str, ModuleSource] = field(default_factory=dict)
    trained_not_loaded: list[str] = field(default_factory=list)
    lora_modules: list[str] = field(default_factory=list)
    lora_rank: int | None = None
    lora_alpha: float | None = None

    @property
    def missing_deepgen_only(self) -> list[str]:
        """Missing keys that no HF folder provides: think tokens, projectors, connector (left at init)."""
        return [k for k in self.missing if k.startswith(DEEPGEN_ONLY_PREFIXES)]

    @property
    def problems(self) -> list[str]:
        """Why the model would differ from the checkpoint's: one sentence per problem, empty when none."""
        if self.checkpoint is None:
            return ["no checkpoint: the DeepGen-only modules (think tokens, projectors, connector) are at init"]
        found = [
            f"{name} is not (fully) in the checkpoint: {src.describe()}"
            for name, src in self.sources.items()
            if name in _MUST_LOAD and src.loaded < src.total
        ]
        dit = self.sources.get("transformer")
        if dit is not None and 0 < dit.loaded < dit.total:
            found.append(f"the DiT is only partly in the checkpoint: {dit.describe()}")
        if self.trained_not_loaded:
            lora = [k for k in self.trained_not_loaded if ".lora_" in k]
            what = f"including the VLM LoRA ({len(lora)} tensors) " if lora else ""
            found.append(
                f"the checkpoint's engine trained {len(self.trained_not_loaded)} parameters it does not hold "
                f"{what}(first: {self.trained_not_loaded[:3]})"
            )
        return found

    def summary(self, limit: int = 5) -> str:
        """One paragraph: counts, where each module came from, the problems and the first odd keys."""
        if self.checkpoint is None:
            return "no checkpoint: DeepGen-only weights (think tokens, projectors, connector) are at their init"
        lines = [
            f"checkpoint {self.checkpoint} ({self.format}): loaded {self.loaded} tensors, "
            f"{len(self.unexpected)} unexpected"
        ]
        lines.append("weights from: " + ", ".join(f"{name} {src.describe()}" for name, src in self.sources.items()))
        if self.lora_modules:
            lines.append(
                f"VLM LoRA on {len(self.lora_modules)} modules, rank {self.lora_rank}, alpha {self.lora_alpha}"
            )
        lines.extend(f"PROBLEM: {p}" for p in self.problems)
        if self.unexpected:
            lines.append(f"first unexpected: {self.unexpected[:limit]}")
        return "; ".join(lines)


def check_complete(report: LoadReport, allow_partial: bool) -> None:
    """Raise `PartialCheckpointError` (with the fix) when the report lists problems, unless
    `allow_partial`, in which case they are logged as warnings."""
    problems = report.problems
    if not problems:
        return
    if not allow_partial:
        raise PartialCheckpointError(
            f"the checkpoint would leave weights at their initial value: {'; '.join(problems)}. Fix: {_FIX}"
        )
    for problem in problems:
        logger.warning("--allow_partial_checkpoint: %s", problem)


def load_deepgen(
    sd3_path: str | Path,
    qwen_path: str | Path,
    checkpoint: str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    config: DeepGenConfig | None = None,
    lora_alpha: float | None = None,
    attn_implementation: str = "sdpa",
) -> tuple[DeepGen, LoadReport]:
    """Build DeepGen on CPU from HF-format folders, then apply `checkpoint` (see the module docstring).

    Args:
        sd3_path: SD3(.5) folder (or hub id) with `transformer/`, `vae/`, `scheduler/`.
        qwen_path: Qwen2.5-VL folder (or hub id) with the model and its tokenizer.
        checkpoint: DeepGen weights to load on top, or None.
        dtype: dtype of every module (VLM, connector, DiT, VAE).
        config: the DeepGen-only shape (think tokens, fused layers, connector); DeepGen 1.0's by default.
        lora_alpha: α of a VLM LoRA found in the checkpoint; default 2·rank.

    Raises:
        FileNotFoundError: a folder, subfolder or the checkpoint does not exist (the message names it).
        ValueError: the checkpoint cannot be read safely or has tensors of the wrong shape.
    """
    sd3, qwen = _resolve(sd3_path, ("transformer", "vae", "scheduler")), _resolve(qwen_path, ("config.json",))
    lmm = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        qwen, dtype=dtype, attn_implementation=attn_implementation
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(qwen)
    transformer = SD3Transformer2DModel.from_pretrained(sd3, subfolder="transformer", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(sd3, subfolder="vae", torch_dtype=dtype).eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(sd3, subfolder="scheduler")
    model = DeepGen(lmm, transformer, vae, scheduler, tokenizer, config)

    report = LoadReport(checkpoint=None if checkpoint is None else str(checkpoint))
    if checkpoint is not None:
        apply_checkpoint(model, read_checkpoint(checkpoint), report, lora_alpha=lora_alpha)
    if report.problems:
        logger.warning("%s", report.summary())
    else:
        logger.info("%s", report.summary())
    return model, report


def apply_checkpoint(
    model: DeepGen,
    contents: CheckpointContents,
    report: LoadReport,
    lora_alpha: float | None = None,
    fallback: str = "from the HF folders",
) -> LoadReport:
    """Normalise the checkpoint's keys, inject a VLM LoRA if it has one, and load it non-strictly into `model`.

    Fills and returns `report`; `fallback` says where the weights the checkpoint lacks come from
    (DeepGen-only modules and the LoRA are always "at init"). Raises ValueError listing the keys whose
    shapes do not match.
    """
    top_level = {name for name, _ in model.named_children()} | {
        name for name, _ in model.named_parameters(recurse=False)
    }

    def normalise(key: str) -> str:
        return _canonical(_old_qwen_layout(_strip_wrappers(key, top_level)))

    renamed = {normalise(k): v for k, v in contents.tensors.items()}
    lora = {m.group("module"): v.shape[0] for k, v in renamed.items() if (m := _LORA_A.match(k))}
    if lora:
        _inject_lmm_lora(model, lora, lora_alpha, report)

    own = model.state_dict()
    by_canonical = {_canonical(k): k for k in own}
    to_load, unexpected, wrong_shape = {}, [], []
    for key, value in renamed.items():
        target = by_canonical.get(key)
        if target is None:
            unexpected.append(key)
        elif own[target].shape != value.shape:
            wrong_shape.append(f"{target}: checkpoint {tuple(value.shape)} vs model {tuple(own[target].shape)}")
        else:
            to_load[target] = value
    if wrong_shape:
        raise ValueError(
            f"checkpoint {report.checkpoint} does not fit the model ({len(wrong_shape)} shape mismatches, "
            f"check the DeepGenConfig and the HF folders): {wrong_shape[:5]}"
        )
    missing, _ = model.load_state_dict(to_load, strict=False)
    model.freeze()
    report.format = contents.format
    report.loaded = len(to_load)
    report.missing = sorted(missing)
    report.unexpected = sorted(unexpected)
    report.trained_not_loaded = sorted({normalise(k) for k in contents.trained} - renamed.keys())
    totals, loaded = Counter(family(k) for k in own), Counter(family(k) for k in to_load)
    report.sources = {
        name: ModuleSource(loaded[name], total, "at init" if name in _MUST_LOAD else fallback)
        for name, total in totals.items()
    }
    return report


def _inject_lmm_lora(model: DeepGen, ranks: dict[str, int], alpha: float | None, report: LoadReport) -> None:
    """Wrap the VLM modules named in `ranks` (relative to `lmm`) with frozen LoRA layers (adapter "default")."""
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = float(alpha) if alpha is not None else 2.0 * rank
    targets = sorted(ranks)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=targets,
        # peft matches rank_pattern keys as regexes on the module path.
        rank_pattern={rf"^{re.escape(name)}$": r for name, r in ranks.items() if r != rank},
    )
    inject_adapter_in_model(config, model.lmm, adapter_name="default")
    model.lmm.to(model.lmm.dtype)
    model.lmm.eval()
    report.lora_modules, report.lora_rank, report.lora_alpha = targets, rank, alpha


def _strip_wrappers(key: str, top_level: set[str]) -> str:
    while True:
        head, _, rest = key.partition(".")
        if head in _WRAPPER_PREFIXES and head not in top_level and rest:
            key = rest
        else:
            return key


def _old_qwen_layout(key: str) -> str:
    for pattern, replacement in _OLD_QWEN_LAYOUT:
        key = pattern.sub(replacement, key)
    return key


def _canonical(key: str) -> str:
    """Drop peft's `base_layer` and adapter name so LoRA-wrapped and plain keys compare equal."""
    key = key.replace(".base_layer.", ".")
    key = re.sub(r"\.(lora_A|lora_B)\.[^.]+\.weight$", r".\1.weight", key)
    return re.sub(r"\.(lora_embedding_A|lora_embedding_B)\.[^.]+$", r".\1", key)


def _resolve(path: str | Path, required: tuple[str, ...]) -> str:
    """A local folder with the `required` entries, or a hub id passed through; else a clear error."""
    p = Path(path).expanduser()
    if p.exists():
        absent = [name for name in required if not (p / name).exists()]
        if absent:
            raise FileNotFoundError(f"{p} is missing {absent} (expected an HF-format folder with {list(required)})")
        return str(p)
    text = str(path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return text  # a hub id such as "stabilityai/stable-diffusion-3.5-medium"
    raise FileNotFoundError(f"model folder {p} does not exist (expected an HF-format folder with {list(required)})")


def build_model(cfg: TrainConfig) -> DeepGen:
    """The tiny model or the HF folders, with `--checkpoint` applied; a checkpoint that would leave
    weights at init is a ConfigError unless `--allow_partial_checkpoint` (no checkpoint at all, for
    `--model tiny`, is its random init by design)."""
    cfg, deepgen_config = _apply_model_config(cfg)
    try:
        if cfg.model == "tiny":
            model = build_tiny(seed=cfg.seed)
            if cfg.checkpoint is None:
                return model
            report = LoadReport(checkpoint=cfg.checkpoint)
            apply_checkpoint(model, read_checkpoint(cfg.checkpoint), report, fallback="from the tiny build")
        else:
            if not cfg.sd3_5_model_name_or_path or not cfg.qwen2_5_vl_model_name_or_path:
                raise ConfigError(
                    "--model hf needs SD3_5_MODEL_NAME_OR_PATH and QWEN2_5_VL_MODEL_NAME_OR_PATH (flags or env); "
                    "or pass --model tiny for a random tiny model"
                )
            dtype = torch.bfloat16 if cfg.bf16 else torch.float32
            model, report = load_deepgen(
                cfg.sd3_5_model_name_or_path, cfg.qwen2_5_vl_model_name_or_path, cfg.checkpoint, dtype=dtype,
                config=deepgen_config,
            )  # fmt: skip
        logger.info("model loaded: %s", report.summary())
        check_complete(report, cfg.allow_partial_checkpoint)
    except (PartialCheckpointError, CheckpointReadError, FileNotFoundError) as exc:
        raise ConfigError(f"--checkpoint: {exc}") from exc
    return model


def _apply_model_config(cfg: TrainConfig) -> tuple[TrainConfig, DeepGenConfig | None]:
    """``--model_config`` (the original's MMEngine model config): checked, then its model folders and
    ``pretrained_pth`` fill what the flags and environment leave unset, and its shape (think tokens,
    fused layers, connector, prompt template) builds the model. ``--model tiny`` checks it only."""
    if cfg.model_config is None:
        return cfg, None
    try:
        original = read_model_config(cfg.model_config)
    except ModelConfigError as exc:
        raise ConfigError(str(exc)) from None
    for note in original.notes:
        logger.info("%s", note)
    if cfg.model == "tiny":
        logger.info("--model_config %s checked; --model tiny builds its tiny random model instead", cfg.model_config)
        return cfg, None
    try:
        deepgen_config = DeepGenConfig(
            num_queries=original.num_queries,
            fused_layers=original.fused_layers,
            connector=ConnectorConfig(**original.connector),
            prompt_template=original.prompt_template,
        )
    except ValueError as exc:
        raise ConfigError(f"--model_config {cfg.model_config}: {exc}") from None
    filled = {
        name: getattr(original, name)
        for name in ("sd3_5_model_name_or_path", "qwen2_5_vl_model_name_or_path", "checkpoint")
        if getattr(cfg, name) is None and getattr(original, name)
    }
    logger.info("--model_config %s: %s; model folders from it: %s", cfg.model_config, deepgen_config, filled or "none")
    return dataclasses.replace(cfg, **filled), deepgen_config
