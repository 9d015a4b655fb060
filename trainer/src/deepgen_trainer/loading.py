"""Build `DeepGen` from HF-format folders and apply a DeepGen checkpoint on top.

`load_deepgen(sd3_path, qwen_path, checkpoint)`:

1. the SD3 folder gives `transformer/`, `vae/`, `scheduler/`; the Qwen folder gives the VLM and its
   tokenizer (the caller resolves them, e.g. from `SD3_5_MODEL_NAME_OR_PATH` and
   `QWEN2_5_VL_MODEL_NAME_OR_PATH`; this module reads no environment);
2. the checkpoint (`.pth`/`.pt`/`.bin` state dict, `.safetensors` file, a directory of
   `.safetensors` files, or a DeepSpeed checkpoint directory) is read without unpickling arbitrary
   objects (`torch.load(weights_only=True)`), its keys are normalised (below) and loaded
   non-strictly; the `LoadReport` lists what was missing and unexpected.

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

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file
from torch import Tensor
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from deepgen_trainer.model import DEEPGEN_ONLY_PREFIXES, DeepGen, DeepGenConfig

logger = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("module", "model")
_OLD_QWEN_LAYOUT = (
    (re.compile(r"^lmm\.model\.(layers|embed_tokens|norm)\."), r"lmm.model.language_model.\1."),
    (re.compile(r"^lmm\.visual\."), "lmm.model.visual."),
)
_LORA_A = re.compile(r"^lmm\.(?P<module>.+)\.(lora_A\.weight|lora_embedding_A)$")
_DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"


@dataclass
class LoadReport:
    """What `load_deepgen` did with the checkpoint.

    missing: model keys the checkpoint did not set (they keep the HF-folder or initial weights).
    unexpected: checkpoint keys (after normalisation) that match nothing in the model.
    lora_modules: VLM modules (relative to `lmm`) that received a LoRA; empty when none.
    """

    checkpoint: str | None
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    lora_modules: list[str] = field(default_factory=list)
    lora_rank: int | None = None
    lora_alpha: float | None = None

    @property
    def missing_deepgen_only(self) -> list[str]:
        """Missing keys that no HF folder provides: think tokens, projectors, connector (left random)."""
        return [k for k in self.missing if k.startswith(DEEPGEN_ONLY_PREFIXES)]

    def summary(self, limit: int = 5) -> str:
        """One paragraph: counts, missing keys per top-level module, and the first `limit` names."""
        if self.checkpoint is None:
            return "no checkpoint: DeepGen-only weights (think tokens, projectors, connector) are at their init"
        per_module = Counter(k.split(".", 1)[0] for k in self.missing)
        lines = [
            f"checkpoint {self.checkpoint}: loaded {self.loaded} tensors, {len(self.unexpected)} unexpected, "
            f"{len(self.missing)} not in it ({dict(per_module)}; kept from the HF folders, except "
            f"{len(self.missing_deepgen_only)} DeepGen-only ones left at init)",
        ]
        if self.lora_modules:
            lines.append(
                f"VLM LoRA on {len(self.lora_modules)} modules, rank {self.lora_rank}, alpha {self.lora_alpha}"
            )
        if self.missing:
            lines.append(f"first missing: {self.missing[:limit]}")
        if self.unexpected:
            lines.append(f"first unexpected: {self.unexpected[:limit]}")
        return "; ".join(lines)


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
        apply_checkpoint(model, read_state_dict(checkpoint), report, lora_alpha=lora_alpha)
    if checkpoint is None or report.missing_deepgen_only:
        logger.warning("DeepGen-only weights not loaded (conditioning is untrained): %s", report.summary())
    else:
        logger.info("%s", report.summary())
    return model, report


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a checkpoint as a flat {key: tensor} dict without unpickling arbitrary objects.

    Accepts a `.safetensors` file, a torch file (`.pth`, `.pt`, `.bin`; a bare state dict or one
    wrapped under `state_dict` / `module` / `model`), a directory of `.safetensors` files, or a
    DeepSpeed checkpoint directory (`latest` tag file or a tag directory with `mp_rank_00_model_states.pt`;
    ZeRO-1/2 keep full weights there, ZeRO-3 checkpoints must be consolidated with DeepSpeed's
    `zero_to_fp32.py` first).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (pass a .pth/.pt/.safetensors file or a directory)")
    if path.is_dir():
        return _read_directory(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return _torch_load_tensors(path)


def apply_checkpoint(
    model: DeepGen, state_dict: dict[str, Tensor], report: LoadReport, lora_alpha: float | None = None
) -> LoadReport:
    """Normalise `state_dict`'s keys, inject a VLM LoRA if it has one, and load it non-strictly into `model`.

    Fills and returns `report`. Raises ValueError listing the keys whose shapes do not match.
    """
    top_level = {name for name, _ in model.named_children()} | {
        name for name, _ in model.named_parameters(recurse=False)
    }
    renamed = {_canonical(_old_qwen_layout(_strip_wrappers(k, top_level))): v for k, v in state_dict.items()}

    lora = {m.group("module"): v.shape[0] for k, v in renamed.items() if (m := _LORA_A.match(k))}
    if lora:
        _inject_lmm_lora(model, lora, lora_alpha, report)

    by_canonical = {_canonical(k): k for k in model.state_dict()}
    own = model.state_dict()
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
    report.loaded = len(to_load)
    report.missing = sorted(missing)
    report.unexpected = sorted(unexpected)
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


def _read_directory(path: Path) -> dict[str, Tensor]:
    latest = path / "latest"
    tag_dir = path / latest.read_text().strip() if latest.is_file() else path
    if (tag_dir / _DEEPSPEED_MODEL_FILE).is_file():
        state = _torch_load_tensors(tag_dir / _DEEPSPEED_MODEL_FILE)
        if any(t.numel() == 0 for t in state.values()):
            raise ValueError(
                f"{tag_dir} is a ZeRO-3 checkpoint (partitioned weights); consolidate it first with "
                f"`python {path}/zero_to_fp32.py {path} OUT --safe_serialization` and pass OUT"
            )
        return state
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(
            f"checkpoint directory {path} has no {_DEEPSPEED_MODEL_FILE} (DeepSpeed, via a `latest` file or "
            "directly) and no .safetensors files"
        )
    state: dict[str, Tensor] = {}
    for shard in shards:
        state.update(load_file(str(shard)))
    return state


def _torch_load_tensors(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError or RuntimeError depending on the object
        raise ValueError(
            f"{path} holds pickled objects other than tensors and plain containers; refusing to unpickle it. "
            "Re-save the state dict with safetensors or torch.save(state_dict)"
        ) from exc
    for wrapper in ("state_dict", "module", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"{path} holds no tensors")
    return tensors
