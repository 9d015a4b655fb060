"""One file of a checkpoint folder, read as untrusted input (DESIGN §8): whoever wrote the folder, a file
is read only where it resolves (symlinks included) inside the folder named, torch files go through the
safe loader and JSON files are bounded and parsed without a crash; anything else is a `CheckpointError`
naming the file and the reason, which the commands turn into exit 2 and one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deepgen_trainer.checkpoints.paths import PathEscapeError, inside
from deepgen_trainer.checkpoints.safe_pickle import UnsafePickleError
from deepgen_trainer.checkpoints.torch_file import MapLocation, load_torch_file

# Ours are kilobytes; the original's trainer_state.json grows with its log history (megabytes).
MAX_JSON_BYTES = 64 << 20


class CheckpointError(RuntimeError):
    """A checkpoint directory that is incomplete, inconsistent or cannot be read safely."""


def inside_folder(root: Path, file: Path) -> Path:
    """`file` resolved, or CheckpointError when it (a symlink, a pointer) leaves the folder `root`."""
    try:
        return inside(root, file, str(file))
    except PathEscapeError as exc:
        raise CheckpointError(str(exc)) from exc


def load_checkpoint_file(root: Path, path: Path, map_location: MapLocation = "cpu", *, allow_foreign: bool) -> Any:
    """A torch file of a checkpoint folder `root` through the safe loader; CheckpointError naming the
    file and the reason when it is refused or leaves `root` (also for DeepSpeed's engine resume)."""
    resolved = inside_folder(root, path)
    try:
        return load_torch_file(resolved, map_location, allow_foreign=allow_foreign)
    except (UnsafePickleError, OSError) as e:
        raise CheckpointError(f"{path}: refused: {e}") from e


def load_checkpoint_json(root: Path, path: Path) -> Any:
    """A JSON file of a checkpoint folder `root` (meta, config, sampler state, the original's
    ``trainer_state.json``): a regular file inside `root` of at most `MAX_JSON_BYTES`, parsed; anything
    else is a CheckpointError naming the file and the reason (never a traceback, a hang on a FIFO or a
    recursion crash on deep nesting)."""
    resolved = inside_folder(root, path)
    if not resolved.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    size = resolved.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {size} bytes, over the {MAX_JSON_BYTES} a checkpoint's JSON file may hold")
    try:
        return json.loads(resolved.read_bytes())
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise CheckpointError(f"{path}: not valid JSON: {reason}") from None


def load_json_object(root: Path, path: Path) -> dict[str, Any]:
    """`load_checkpoint_json` of a file that must hold a JSON object."""
    value = load_checkpoint_json(root, path)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return value
