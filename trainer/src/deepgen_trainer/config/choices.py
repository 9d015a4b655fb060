"""The closed sets of values the flags take, and the files a DeepSpeed config name stands for.

Each `Literal` is the annotation of a `TrainConfig` field; its tuple of names is what validation
checks and what the help and the error messages list.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, get_args

from deepgen_trainer.config.errors import ConfigError

ModelKind = Literal["hf", "tiny"]
MODEL_KINDS: tuple[str, ...] = get_args(ModelKind)
EvalInferenceMode = Literal["ode", "sde"]
EVAL_INFERENCE_MODES: tuple[str, ...] = get_args(EvalInferenceMode)
REPORT_TO: tuple[str, ...] = ("wandb", "swanlab")
DEFAULT_REPORT_TO: tuple[str, ...] = ("wandb", "swanlab")  # the seed's; both offline unless WANDB_MODE / SWANLAB_MODE
TRACKER_MODES: dict[str, tuple[str, ...]] = {
    "wandb_mode": ("online", "offline", "disabled"),
    "swanlab_mode": ("online", "offline", "local", "disabled"),
}
DEEPSPEED_DIR = Path(__file__).resolve().parents[3] / "deepspeed"  # trainer/deepspeed
DEEPSPEED_CONFIG_NAMES: tuple[str, ...] = ("zero2", "zero3", "zero3_offload", "zero3_sd3")


# --atrain_algorithm: the update rule (DESIGN §4 "The original's other algorithms").
Algorithm = Literal["flowgrpo", "grpoguard", "diffusionnft"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
NftRollout = Literal["ode", "sde"]
NFT_ROLLOUTS: tuple[str, ...] = get_args(NftRollout)


def deepspeed_config_path(name_or_path: str | Path) -> Path | None:
    """The DeepSpeed JSON file of a config name (``zero2``, ...) or a path to a .json file; None for
    ``none`` (plain PyTorch DDP)."""
    if str(name_or_path) == "none":
        return None
    if str(name_or_path) in DEEPSPEED_CONFIG_NAMES:
        return DEEPSPEED_DIR / f"{name_or_path}.json"
    path = Path(name_or_path)
    if path.suffix != ".json" or not path.is_file():
        raise ConfigError(
            f"--deepspeed {str(name_or_path)!r} is neither a config name ({', '.join(DEEPSPEED_CONFIG_NAMES)}), "
            "none (plain PyTorch DDP) nor an existing .json file; pass one of those"
        )
    return path


def lr_scheduler_types() -> tuple[str, ...]:
    """Every scheduler name transformers' `get_scheduler` takes (imported on first use: transformers is slow
    to import)."""
    from transformers.trainer_utils import SchedulerType

    return tuple(s.value for s in SchedulerType)


def tracker_names(value: str | Sequence[str]) -> tuple[str, ...]:
    """The trackers a ``--report_to`` value names: comma-separated or a list, ``none`` for none."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [n.strip() for n in names if n.strip()]
    return () if names == ["none"] else tuple(names)
