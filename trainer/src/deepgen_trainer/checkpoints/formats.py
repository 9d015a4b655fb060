"""Every checkpoint format the original DeepGen-RL code and its SFT stage (xtuner / mmengine /
DeepSpeed) write or read, read into one flat ``{key: tensor}`` dict without running pickled code.

`read_checkpoint(path)` accepts:

- a ``.safetensors`` file, or a folder of them (the original's RL ``checkpoint-N/model.safetensors``,
  an HF-style shard folder);
- a torch file (``.pth`` / ``.pt`` / ``.bin``): a bare state dict, one wrapped under ``state_dict`` /
  ``module`` / ``model``, or an mmengine Runner file (``meta``, ``state_dict``, ``message_hub``, ...);
- a DeepSpeed checkpoint folder: the tag folder itself (xtuner's ``iter_N.pth/`` with
  ``mp_rank_00_model_states.pt`` and the ZeRO ``*_optim_states.pt`` shards), a folder with a
  ``latest`` file naming the tag, or an mmengine work dir with a ``last_checkpoint`` file. ZeRO-2
  and ZeRO-3 alike: the parameters the engine trained are rebuilt in fp32 from the optimizer shards
  with DeepSpeed's own ``zero_to_fp32`` functions (as xtuner's ``guess_load_checkpoint`` does), the
  ``module`` entry fills in what the shards do not hold (buffers, a model's filtered state dict);
- a checkpoint of this trainer (``checkpoint-N/`` with its ``complete`` marker): the DiT under
  ``transformer.`` and the DeepGen-only weights it was trained with.

Torch files go through `torch_file.load_torch_file` (DeepSpeed's ``zero_to_fp32`` too, for the
shards it reads): objects of unknown classes (mmengine's ``HistoryBuffer``, a client state's own
classes) become inert placeholders, and a file that asks for anything else is refused. Every file read
from a folder, and whatever ``latest`` / ``last_checkpoint`` names, must resolve (symlinks included)
inside the folder the user named (`paths`).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from deepgen_trainer.checkpoints.paths import PathEscapeError, inside, named_entry
from deepgen_trainer.checkpoints.safe_pickle import UnsafePickleError, foreign_classes
from deepgen_trainer.checkpoints.torch_file import load_torch_file

logger = logging.getLogger(__name__)

DEEPSPEED_MODEL_FILE = "mp_rank_00_model_states.pt"
_STATE_DICT_WRAPPERS = ("state_dict", "module", "model")


class CheckpointReadError(ValueError):
    """A checkpoint that cannot be read safely or is not in a known format; the message says why."""


class UnsafeCheckpointError(CheckpointReadError):
    """A file refused by the safe loader (it asks for code, memory or files it may not have); the
    message names the file and the reason. Commands exit with code 2 on it."""


@dataclass
class CheckpointContents:
    """What `read_checkpoint` found.

    tensors: every tensor, keys as written (wrappers such as ``module.`` are the loader's business).
    format: the format, in words ("DeepSpeed ZeRO-2 folder", "mmengine Runner file", ...).
    trained: names of the parameters the writing engine trained (DeepSpeed's ``param_shapes``); a
        loader must find all of them in `tensors` or the checkpoint was not read whole.
    from_zero_shards: keys rebuilt from the ZeRO optimizer shards (fp32 master weights).
    foreign: classes of the non-tensor objects kept only as placeholders (e.g. mmengine's MessageHub
        state), for the log.
    """

    path: Path
    format: str
    tensors: dict[str, Tensor]
    trained: list[str] = field(default_factory=list)
    from_zero_shards: list[str] = field(default_factory=list)
    foreign: set[str] = field(default_factory=set)


def read_checkpoint(path: str | Path) -> CheckpointContents:
    """Read `path` in any format of the module docstring. Raises FileNotFoundError for a missing
    path, UnsafeCheckpointError for a file the safe loader refuses or an entry pointing outside
    `path`, and CheckpointReadError for an unknown layout."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist (pass a .pth/.pt/.safetensors file, a DeepSpeed or mmengine "
            "checkpoint folder, or a checkpoint-<step> folder)"
        )
    from deepgen_trainer.checkpoints.run_checkpoint import CheckpointError

    path = path.resolve()  # the user named it: everything it points at must stay inside
    try:
        return _read(path, path)
    except PathEscapeError as exc:
        raise UnsafeCheckpointError(str(exc)) from exc
    except CheckpointError as exc:  # a checkpoint of this trainer (run_checkpoint) that cannot be read
        raise (UnsafeCheckpointError if is_refusal(exc) else CheckpointReadError)(str(exc)) from exc


def is_refusal(exc: BaseException) -> bool:
    """Whether `exc` (or an error it was raised from) is the safe loader refusing a file: a hostile
    file or an entry pointing outside the folder, which commands report with exit code 2."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, UnsafeCheckpointError | UnsafePickleError | PathEscapeError):
            return True
        seen = seen.__cause__
    return False


def _read(path: Path, root: Path) -> CheckpointContents:
    if path.is_dir():
        return _read_directory(path, root)
    if path.suffix == ".safetensors":
        return CheckpointContents(path, "safetensors file", load_file(str(path)))
    return _read_torch_file(path)


def _torch_load(path: Path, mmap: bool = False) -> Any:
    try:
        return load_torch_file(path, map_location="cpu", mmap=mmap)
    except (UnsafePickleError, OSError) as exc:
        raise UnsafeCheckpointError(f"{path}: {exc}") from exc


def _read_torch_file(path: Path) -> CheckpointContents:
    obj = _torch_load(path)
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    fmt = "torch file"
    if isinstance(obj.get("state_dict"), Mapping) and ("meta" in obj or "message_hub" in obj):
        fmt = "mmengine Runner file"
    for wrapper in _STATE_DICT_WRAPPERS:
        if isinstance(obj.get(wrapper), Mapping):
            if fmt == "torch file":
                fmt = f"torch file (under {wrapper!r})"
            foreign = foreign_classes({k: v for k, v in obj.items() if k != wrapper})
            obj = obj[wrapper]
            break
    else:
        foreign = set()
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointReadError(f"{path} holds no tensors")
    return CheckpointContents(path, fmt, tensors, foreign=foreign | foreign_classes(obj))


def _read_directory(path: Path, root: Path) -> CheckpointContents:
    from deepgen_trainer.checkpoints.run_checkpoint import is_complete, sft_state_dict

    if is_complete(path):
        return CheckpointContents(path, "checkpoint of this trainer", sft_state_dict(path))
    last = path / "last_checkpoint"  # an mmengine work dir: the file names the latest checkpoint
    if last.is_file():
        target = named_entry(root, inside(root, last, str(last)))
        logger.info("%s: mmengine's last_checkpoint names %s", path, target)
        return _read(target, root)
    latest = path / "latest"  # DeepSpeed's root folder: the file names the tag folder
    tag_dir = named_entry(root, inside(root, latest, str(latest))) if latest.is_file() else path
    if list(tag_dir.glob("*model_states.pt")):
        return _read_deepspeed(tag_dir, root)
    shards = [inside(root, shard, str(shard)) for shard in sorted(path.glob("*.safetensors"))]
    if not shards:
        raise CheckpointReadError(
            f"checkpoint folder {path} holds none of: {DEEPSPEED_MODEL_FILE} (a DeepSpeed tag folder, or one "
            "named by a `latest` file), an mmengine `last_checkpoint` file, .safetensors files, or this "
            "trainer's `complete` marker"
        )
    tensors: dict[str, Tensor] = {}
    for shard in shards:
        tensors.update(load_file(str(shard)))
    return CheckpointContents(path, f"safetensors folder ({len(shards)} files)", tensors)


def _read_deepspeed(tag_dir: Path, root: Path) -> CheckpointContents:
    # zero_to_fp32 globs the tag folder itself: every file it may open must stay inside the root.
    for file in [*tag_dir.glob("*model_states.pt"), *tag_dir.glob("*optim_states.pt")]:
        inside(root, file, str(file))
    model_file = tag_dir / DEEPSPEED_MODEL_FILE
    if not model_file.is_file():  # ZeRO-3 writes one model-states file per rank
        model_file = sorted(tag_dir.glob("*model_states.pt"))[0]
    state = _torch_load(model_file)
    if not isinstance(state, Mapping) or not isinstance(state.get("module"), Mapping):
        raise CheckpointReadError(f"{model_file} has no 'module' entry: not a DeepSpeed model-states file")
    # ZeRO-3 leaves empty placeholders of its partitioned parameters in `module`.
    module = {k: v for k, v in state["module"].items() if isinstance(v, Tensor) and v.numel() > 0}
    trained = [name for group in state.get("param_shapes") or [] for name in group]
    foreign = foreign_classes({k: v for k, v in state.items() if k != "module"})
    optim_files = sorted(tag_dir.glob("*optim_states.pt"))
    rebuilt: dict[str, Tensor] = {}
    if optim_files:
        rebuilt = _rebuild_from_zero_shards(tag_dir)
    elif set(trained) - module.keys():
        logger.warning(
            "%s has no ZeRO optimizer shards (*_optim_states.pt): the %d trained parameters missing from its "
            "'module' entry cannot be rebuilt",
            tag_dir,
            len(set(trained) - module.keys()),
        )
    zero_stage = _zero_stage(optim_files[0]) if optim_files else None
    fmt = "DeepSpeed folder without optimizer shards"
    if zero_stage is not None:
        fmt = f"DeepSpeed ZeRO-{zero_stage} folder"
    if "message_hub" in state or "meta" in state:
        fmt = f"mmengine {fmt}"
    tensors = {**module, **rebuilt}
    return CheckpointContents(tag_dir, fmt, tensors, trained=trained, from_zero_shards=sorted(rebuilt), foreign=foreign)


def _zero_stage(optim_file: Path) -> int | None:
    state = _torch_load(optim_file, mmap=True)
    stage = state.get("optimizer_state_dict", {}).get("zero_stage") if isinstance(state, Mapping) else None
    return None if stage is None else int(stage)


def _rebuild_from_zero_shards(tag_dir: Path) -> dict[str, Tensor]:
    """Full fp32 parameters from the ZeRO shards, by DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint`
    (which reads the files with plain ``torch.load``: it runs here with `load_torch_file`)."""
    from deepspeed.utils import zero_to_fp32

    captured = io.StringIO()
    with _restricted_torch_in(zero_to_fp32), contextlib.redirect_stdout(captured):
        try:
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        except UnsafePickleError as exc:
            raise UnsafeCheckpointError(f"{tag_dir}: {exc}") from exc
    logger.debug("zero_to_fp32: %s", captured.getvalue().strip())
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


class _TorchWithRestrictedLoad:
    """The torch module as `zero_to_fp32` sees it, with `load` replaced by `load_torch_file`."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def load(f: Any, map_location: Any = None, *, mmap: bool = False, **_: Any) -> Any:
        return load_torch_file(f, map_location=map_location or "cpu", mmap=bool(mmap))


@contextlib.contextmanager
def _restricted_torch_in(module: Any) -> Iterator[None]:
    original = module.torch
    module.torch = _TorchWithRestrictedLoad()
    try:
        yield
    finally:
        module.torch = original
