"""Training checkpoints: atomic save, resume from the latest complete one, retention.

A checkpoint is a directory ``<output_dir>/checkpoint-<step>/``::

    transformer.safetensors   trainable weights (the DiT's state dict, diffusers key names)   rank 0
    deepgen_only.safetensors  the frozen DeepGen-only weights the run used (meta_queries,       rank 0
                              projector_1/2/3, connector; SFT key names), so that `convert`
                              writes every family the original's converter writes
    ema.safetensors           float32 EMA of the DiT (``--ema_decay``; absent when off)         rank 0
    sampling_policy.safetensors
                              DiffusionNFT's sampling copy of the DiT, in the DiT's dtype      rank 0
                              (``--atrain_nft_off_policy``; absent otherwise)
    optimizer.pt              optimizer state (torch path; absent when None)                   rank 0
    scheduler.pt              LR scheduler state (absent when None)                            rank 0
    config.json               the resolved run config                                          rank 0
    meta.json                 {"format_version", "step", "world_size", "metadata"}             rank 0
    rng_rank<r>.pt            python / numpy / torch CPU / CUDA RNG states of rank r           every rank
    sampler_rank<r>.json      data-sampler position of rank r                                  every rank
    deepspeed/                whatever ``engine.save_checkpoint`` writes (only with a hook)    every rank
    complete                  commit marker, written last                                      rank 0

Atomicity: everything is written into ``checkpoint-<step>.tmp-<hex>`` next to the final directory, every
file is fsynced, rank 0 writes ``complete`` and then renames the staging directory to
``checkpoint-<step>``; the rename is the commit point. A crash at any moment leaves either the previous
checkpoints untouched plus a stale ``.tmp-`` directory (ignored by `latest_checkpoint`, removed by
`prune_checkpoints`), or the new checkpoint complete. Directories being deleted (retention, or an older
save of the same step) are first renamed to ``checkpoint-<step>.trash-<hex>`` so that a crash in the middle
of a deletion never leaves a ``checkpoint-<step>`` with a marker but missing files.

A ``checkpoint-<step>`` directory without the marker was not written here (the original trainer's
``checkpoint-N/``, a copy): saving never replaces one (`CheckpointError`), pruning leaves it alone.

Everything ``torch.save``-d holds tensors and primitives only (`save_checkpoint` checks this before
writing and names the offending entry), so loading goes through `torch_file.load_torch_file` with
objects of other classes refused; every file is read through `folder_files` (inside the checkpoint
folder, symlinks included; JSON bounded and checked).

Multiple ranks: every rank calls `save_checkpoint` with its own ``rank`` and a ``barrier`` callable (e.g.
``torch.distributed.barrier``); this module never imports ``torch.distributed``. ``output_dir`` must be
on a filesystem all ranks share (the non-zero ranks find the staging directory rank 0 created).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from deepgen_trainer.checkpoints.folder_files import (
    CheckpointError,
    inside_folder,
    load_checkpoint_file,
    load_json_object,
)
from deepgen_trainer.checkpoints.rng_state import RngState, capture_rng
from deepgen_trainer.checkpoints.torch_file import MapLocation

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "transformer.safetensors"
DEEPGEN_ONLY_FILE = "deepgen_only.safetensors"
EMA_FILE = "ema.safetensors"
SAMPLING_POLICY_FILE = "sampling_policy.safetensors"
DIT_PREFIX = "transformer."
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"
COMPLETE_MARKER = "complete"
DEEPSPEED_DIR = "deepspeed"

_FINAL_RE = re.compile(r"^checkpoint-(\d+)$")
_STALE_RE = re.compile(r"^checkpoint-(\d+)\.(tmp|trash)-[0-9a-f]+$")


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def sampler_file(rank: int) -> str:
    return f"sampler_rank{rank}.json"


@dataclass(frozen=True)
class Checkpoint:
    """Everything `save_checkpoint` wrote, as seen by one rank (`rng` and `sampler_state` are that rank's).

    `rng` and `sampler_state` are None when the checkpoint has no file for this rank (it was written by
    a smaller world); `deepspeed_dir` is None when no DeepSpeed hook was used; `deepgen_only`, `ema`
    and `sampling_policy` are None when the checkpoint has no such file.
    """

    path: Path
    step: int
    trainable: dict[str, Tensor]
    optimizer_state: dict[str, Any] | None
    scheduler_state: dict[str, Any] | None
    rng: RngState | None
    sampler_state: dict[str, Any] | None
    config: dict[str, Any]
    metadata: dict[str, Any]
    world_size: int
    deepspeed_dir: Path | None
    deepgen_only: dict[str, Tensor] | None = None
    ema: dict[str, Tensor] | None = None
    sampling_policy: dict[str, Tensor] | None = None


# --- Saving --------------------------------------------------------------------------------------------


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    trainable: Mapping[str, Tensor] | None,
    deepgen_only: Mapping[str, Tensor] | None = None,
    ema: Mapping[str, Tensor] | None = None,
    sampling_policy: Mapping[str, Tensor] | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
    scheduler_state: Mapping[str, Any] | None = None,
    rng: RngState | None = None,
    sampler_state: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    deepspeed_save: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``<output_dir>/checkpoint-<step>`` atomically and return its path (on every rank).

    Call on every rank. Rank 0 writes `trainable` (full tensors: under ZeRO-3 gather them first),
    `deepgen_only` (the frozen DeepGen-only weights, SFT key names), `ema` (the DiT's EMA),
    `sampling_policy` (DiffusionNFT's off-policy sampling copy of the DiT), `optimizer_state`,
    `scheduler_state`, `config` and `metadata`; the other ranks may pass None for those. Every rank
    writes its own `rng` (None: `capture_rng()` now) and `sampler_state` (a JSON-able dict, or None).
    `barrier` synchronises all ranks (required when ``world_size > 1``).

    `deepspeed_save`, if given, is called on every rank with ``<staging dir>/deepspeed`` after the
    per-rank files are written, e.g. ``lambda d: engine.save_checkpoint(str(d), tag="state")``; the
    engine then carries the (sharded) optimizer state and `optimizer_state` may be None.

    Saving a step that already exists replaces it if this module wrote it; a ``checkpoint-<step>``
    without the marker (another trainer's) is never replaced: `CheckpointError`.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size}) and world_size >= 1")
    if world_size > 1 and barrier is None:
        raise ValueError(f"world_size={world_size} needs a barrier callable (e.g. torch.distributed.barrier)")
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    sync = barrier if barrier is not None else _no_barrier
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    rng = capture_rng() if rng is None else rng
    _check_weights_only_safe(rng, "rng")
    sampler_json = _to_json(sampler_state, "sampler_state") if sampler_state is not None else None

    if rank == 0:
        if trainable is None:
            raise ValueError("rank 0 must pass trainable (the state dict of the trainable module)")
        for name, state in (("optimizer_state", optimizer_state), ("scheduler_state", scheduler_state)):
            if state is not None:
                _check_weights_only_safe(state, name)
        config_json = _to_json(config or {}, "config")
        meta_json = _to_json(
            {"format_version": FORMAT_VERSION, "step": step, "world_size": world_size, "metadata": metadata or {}},
            "metadata",
        )
        if final.is_dir() and not is_complete(final):
            raise CheckpointError(
                f"{final} exists and was not written by this trainer (no '{COMPLETE_MARKER}' marker); refusing to "
                "replace it: move it away or pass another --output_dir"
            )
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in _staging_dirs(output_dir, step):
            _remove_dir(stale)
        staging = output_dir / f"checkpoint-{step}.tmp-{secrets.token_hex(4)}"
        staging.mkdir()
        logger.info("saving checkpoint step %d to %s", step, final)
        _write_safetensors(staging / WEIGHTS_FILE, trainable, step)
        if deepgen_only is not None:
            _write_safetensors(staging / DEEPGEN_ONLY_FILE, deepgen_only, step)
        if ema is not None:
            _write_safetensors(staging / EMA_FILE, ema, step)
        if sampling_policy is not None:
            _write_safetensors(staging / SAMPLING_POLICY_FILE, sampling_policy, step)
        if optimizer_state is not None:
            _write_torch(staging / OPTIMIZER_FILE, optimizer_state)
        if scheduler_state is not None:
            _write_torch(staging / SCHEDULER_FILE, scheduler_state)
        _write_text(staging / CONFIG_FILE, config_json)
        _write_text(staging / META_FILE, meta_json)
    sync()  # the staging directory exists

    if rank != 0:
        found = _staging_dirs(output_dir, step)
        if len(found) != 1:
            raise CheckpointError(
                f"rank {rank} expected one staging directory checkpoint-{step}.tmp-* in {output_dir}, found "
                f"{len(found)}: output_dir must be on a filesystem shared by all ranks"
            )
        staging = found[0]
    _write_torch(staging / rng_file(rank), rng)
    if sampler_json is not None:
        _write_text(staging / sampler_file(rank), sampler_json)
    if deepspeed_save is not None:
        deepspeed_save(staging / DEEPSPEED_DIR)
    sync()  # every rank's files are on disk

    if rank == 0:
        _commit(staging, final, step, world_size)
    sync()  # nobody moves on (to pruning, to the next step) before the commit
    return final


def _commit(staging: Path, final: Path, step: int, world_size: int) -> None:
    """Marker, fsync, rename: the rename of the staging directory onto `final` is the commit point."""
    missing = [rng_file(r) for r in range(world_size) if not (staging / rng_file(r)).is_file()]
    if missing:
        raise CheckpointError(f"{staging} lacks {missing}: output_dir must be on a filesystem shared by all ranks")
    _write_text(staging / COMPLETE_MARKER, json.dumps({"step": step}) + "\n")
    _fsync_dir(staging)
    trash = None
    if final.exists():
        # A directory cannot be renamed onto a non-empty one. Between these two renames neither exists
        # under its final name, so a crash there resumes from the previous step, never from half a one.
        logger.warning("replacing existing %s", final)
        trash = final.with_name(f"{final.name}.trash-{secrets.token_hex(4)}")
        os.replace(final, trash)
    os.replace(staging, final)
    _fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash)
    logger.info("checkpoint step %d committed: %s", step, final)


def _no_barrier() -> None:
    return None


def _staging_dirs(output_dir: Path, step: int) -> list[Path]:
    if not output_dir.is_dir():
        return []
    return sorted(
        p
        for p in output_dir.iterdir()
        if p.is_dir() and (m := _STALE_RE.match(p.name)) and m.group(2) == "tmp" and int(m.group(1)) == step
    )


_SAFE_LEAVES = (Tensor, bool, int, float, complex, str, bytes, bytearray, type(None), torch.dtype, torch.device)
# The containers torch's weights_only unpickler accepts (MultiStepLR keeps its milestones in a Counter).
# Exact types: any other dict or list subclass (defaultdict, a namedtuple) pickles as a class reference.
_SAFE_MAPPINGS = (dict, OrderedDict, Counter)
_SAFE_SEQUENCES = (list, tuple, set, torch.Size)


def _check_weights_only_safe(obj: Any, where: str) -> None:
    """Raise TypeError naming the first entry that ``torch.load(weights_only=True)`` could not load."""
    if isinstance(obj, _SAFE_LEAVES):
        return
    if type(obj) in _SAFE_MAPPINGS:
        for key, value in obj.items():
            _check_weights_only_safe(key, f"{where} key {key!r}")
            _check_weights_only_safe(value, f"{where}[{key!r}]")
        return
    if type(obj) in _SAFE_SEQUENCES:
        for i, value in enumerate(obj):
            _check_weights_only_safe(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which torch.load(weights_only=True) "
        "cannot load: convert it to tensors, numbers, strings, lists or dicts before saving"
    )


def _to_json(obj: Mapping[str, Any], where: str) -> str:
    try:
        return json.dumps(obj, indent=2, allow_nan=True) + "\n"
    except (TypeError, ValueError) as e:
        raise TypeError(f"{where} must be JSON-serialisable (dicts, lists, strings, numbers): {e}") from e


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_torch(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_safetensors(path: Path, tensors: Mapping[str, Tensor], step: int) -> None:
    # safetensors needs contiguous CPU tensors that do not share storage; a DiT state dict has no tied
    # weights, and .contiguous() is a no-op (no copy) for tensors that already are.
    flat = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    save_file(flat, path, metadata={"format": "pt", "step": str(step)})
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# --- Finding and loading -------------------------------------------------------------------------------


def is_complete(path: str | Path) -> bool:
    """Whether `path` is a committed checkpoint directory (named ``checkpoint-<step>``, with its marker)."""
    path = Path(path)
    return bool(_FINAL_RE.match(path.name)) and (path / COMPLETE_MARKER).is_file()


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints in `output_dir`, oldest step first (empty if the directory is absent)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=_step_of)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step in `output_dir`, or None when there is none."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """`path` itself when it is a complete checkpoint, else the latest complete checkpoint inside it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a checkpoint-<step> directory or its output dir")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory: pass a checkpoint-<step> directory or its output dir")
    if _FINAL_RE.match(path.name):
        if not is_complete(path):
            raise CheckpointError(f"{path} is incomplete (no '{COMPLETE_MARKER}' marker): it was not fully written")
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"{path} holds no complete checkpoint-<step> directory")
    return latest


def sft_state_dict(path: str | Path, use_ema: bool = False) -> dict[str, Tensor]:
    """The complete checkpoint `path` under the SFT model's key names: the DiT under ``transformer.``
    (its EMA with `use_ema`) plus the DeepGen-only weights the run used, when the checkpoint has them."""
    path = resolve_checkpoint(path)
    dit_file = path / (EMA_FILE if use_ema else WEIGHTS_FILE)
    if not dit_file.is_file():
        raise CheckpointError(f"{path} has no {EMA_FILE}: the run was trained without --ema_decay")
    state = {DIT_PREFIX + k: v for k, v in load_file(inside_folder(path, dit_file)).items()}
    if (path / DEEPGEN_ONLY_FILE).is_file():
        state.update(load_file(inside_folder(path, path / DEEPGEN_ONLY_FILE)))
    return state


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, rank: int = 0) -> Checkpoint:
    """Load the complete checkpoint directory `path` as seen by `rank` (RNG and sampler state of that rank).

    Tensors of weights and optimizer/scheduler states go to `map_location`; RNG states stay on the CPU.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not is_complete(path):
        raise CheckpointError(
            f"{path} is not a complete checkpoint (expected a checkpoint-<step> directory with a "
            f"'{COMPLETE_MARKER}' marker); use latest_checkpoint(output_dir) to find one"
        )
    meta = _checked_meta(path, load_json_object(path, path / META_FILE))
    step, world_size = meta["step"], meta["world_size"]
    if step != _step_of(path):
        raise CheckpointError(f"{path}: meta.json says step {step}, the directory name says {_step_of(path)}")
    rng_path, sampler_path = inside_folder(path, path / rng_file(rank)), inside_folder(path, path / sampler_file(rank))
    if not rng_path.is_file():
        logger.warning("%s has no RNG state for rank %d (saved with world_size=%d)", path, rank, world_size)
    deepspeed_dir = path / DEEPSPEED_DIR
    return Checkpoint(
        path=path,
        step=step,
        trainable=load_file(inside_folder(path, path / WEIGHTS_FILE), device=str(map_location)),
        optimizer_state=_load_torch(path / OPTIMIZER_FILE, map_location),
        scheduler_state=_load_torch(path / SCHEDULER_FILE, map_location),
        rng=_load_torch(rng_path, "cpu"),
        sampler_state=load_json_object(path, sampler_path) if sampler_path.is_file() else None,
        config=load_json_object(path, path / CONFIG_FILE),
        metadata=meta["metadata"],
        world_size=world_size,
        deepspeed_dir=deepspeed_dir if deepspeed_dir.is_dir() else None,
        deepgen_only=_load_safetensors(path / DEEPGEN_ONLY_FILE, map_location),
        ema=_load_safetensors(path / EMA_FILE, map_location),
        sampling_policy=_load_safetensors(path / SAMPLING_POLICY_FILE, map_location),
    )


def _checked_meta(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """meta.json's fields, of the types `save_checkpoint` writes; CheckpointError naming the field."""
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {_short(meta.get('format_version'))} != {FORMAT_VERSION}")
    for key, low in (("step", 0), ("world_size", 1)):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise CheckpointError(f"{path / META_FILE}: {key!r} must be an integer >= {low}, got {_short(value)}")
    if not isinstance(meta.get("metadata"), dict):
        raise CheckpointError(
            f"{path / META_FILE}: 'metadata' must be a JSON object, got {_short(meta.get('metadata'))}"
        )
    return meta


def _short(value: Any) -> str:
    """`value`'s repr, cut for an error message (a file's value can be any size)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _load_safetensors(path: Path, map_location: str | torch.device) -> dict[str, Tensor] | None:
    return load_file(inside_folder(path.parent, path), device=str(map_location)) if path.is_file() else None


def _load_torch(path: Path, map_location: MapLocation) -> Any:
    if not path.is_file():
        return None
    return load_checkpoint_file(path.parent, path, map_location, allow_foreign=False)


def _step_of(path: Path) -> int:
    m = _FINAL_RE.match(path.name)
    if m is None:
        raise CheckpointError(f"{path} is not named checkpoint-<step>")
    return int(m.group(1))


# --- Retention -----------------------------------------------------------------------------------------


def prune_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Keep the newest `keep` complete checkpoints, delete older ones and stale staging/trash directories.

    Call on rank 0 only, after `save_checkpoint` returned (never while a save is in flight: its staging
    directory would look stale). Incomplete ``checkpoint-<step>`` directories (not written by
    `save_checkpoint`, e.g. a partial copy) are left alone with a warning. Returns the deleted paths.
    """
    if keep < 1:
        raise ValueError(f"keep={keep} must be >= 1 (the checkpoint to resume from)")
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    removed: list[Path] = []
    for p in sorted(output_dir.iterdir()):
        if p.is_dir() and _STALE_RE.match(p.name):
            logger.info("removing stale %s", p)
            _remove_dir(p)
            removed.append(p)
        elif p.is_dir() and _FINAL_RE.match(p.name) and not is_complete(p):
            logger.warning("leaving %s alone: it has no '%s' marker", p, COMPLETE_MARKER)
    for p in complete_checkpoints(output_dir)[:-keep]:
        logger.info("removing old checkpoint %s (keep=%d)", p, keep)
        _remove_dir(p)
        removed.append(p)
    return removed


def _remove_dir(path: Path) -> None:
    """Delete a directory; a committed checkpoint is first renamed so a crash mid-delete cannot corrupt it."""
    if _FINAL_RE.match(path.name):
        trash = path.with_name(f"{path.name}.trash-{secrets.token_hex(4)}")
        os.replace(path, trash)
        path = trash
    shutil.rmtree(path)
