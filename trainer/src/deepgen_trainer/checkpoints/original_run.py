"""Output folders that hold checkpoints this trainer did not write, in particular the original
DeepGen-RL trainer's.

The original (an HF ``Trainer`` with DeepSpeed) writes ``<output_dir>/checkpoint-N/`` with
``model.safetensors`` (the model's filtered state dict: ``transformer.*``, ``connector.*``,
``projector_1/2/3.*``, ``meta_queries``), ``trainer_state.json`` (``global_step``), DeepSpeed's
``global_stepN/`` shards, ``scheduler.pt``, ``rng_state_*.pth`` and a pickled ``training_args.bin``.

`scan_output_dir` sorts the ``checkpoint-N`` folders that lack this trainer's ``complete`` marker
into the original's (resumable: weights from ``model.safetensors``, step from ``trainer_state.json``)
and unknown ones (the run refuses to start rather than write next to them). Nothing pickled is read,
and both files must resolve (symlinks included) inside the output folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor

from deepgen_trainer.checkpoints.folder_files import inside_folder, load_checkpoint_json
from deepgen_trainer.checkpoints.run_checkpoint import is_complete

ORIGINAL_WEIGHTS_FILE = "model.safetensors"
ORIGINAL_STATE_FILE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class OriginalCheckpoint:
    """One ``checkpoint-N/`` of the original trainer."""

    path: Path
    step: int

    def weights(self) -> dict[str, Tensor]:
        """``model.safetensors``: the SFT model's key names (``transformer.*`` and the DeepGen-only families)."""
        return load_file(inside_folder(self.path.parent, self.path / ORIGINAL_WEIGHTS_FILE))


@dataclass(frozen=True)
class ForeignCheckpoints:
    """``checkpoint-N`` folders in an output dir that this trainer did not write."""

    original: list[OriginalCheckpoint] = field(default_factory=list)
    unknown: list[Path] = field(default_factory=list)

    @property
    def latest_original(self) -> OriginalCheckpoint | None:
        return max(self.original, key=lambda c: c.step, default=None)


def scan_output_dir(output_dir: str | Path) -> ForeignCheckpoints:
    """The ``checkpoint-N`` folders of `output_dir` without this trainer's marker, sorted into the
    original trainer's and unknown ones (empty when the folder does not exist)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return ForeignCheckpoints()
    original, unknown = [], []
    for path in sorted(output_dir.iterdir()):
        if not path.is_dir() or not _CHECKPOINT_RE.match(path.name) or is_complete(path):
            continue
        if (path / ORIGINAL_WEIGHTS_FILE).is_file():
            original.append(OriginalCheckpoint(path, _original_step(path)))
        else:
            unknown.append(path)
    return ForeignCheckpoints(original, unknown)


def _original_step(path: Path) -> int:
    """``global_step`` of ``trainer_state.json``, else the N of the folder name."""
    state_file = path / ORIGINAL_STATE_FILE
    if state_file.is_file():
        state = load_checkpoint_json(path.parent, state_file)
        step = state.get("global_step") if isinstance(state, dict) else None
        if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
            return step
    match = _CHECKPOINT_RE.match(path.name)
    assert match is not None
    return int(match.group(1))
