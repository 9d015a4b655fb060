"""The random states of one process (python, numpy, torch CPU, CUDA), captured into a checkpoint and
restored from it, so a resumed run draws exactly what an unbroken one would."""

from __future__ import annotations

import logging
import random
from typing import Any, TypedDict

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)


class RngState(TypedDict):
    """RNG states as tensors and primitives only (loadable with ``weights_only=True``).

    python: ``random.getstate()``; numpy: the legacy global ``np.random`` state as
    (name, keys as a list of 624 ints, pos, has_gauss, cached_gaussian); torch: the CPU generator state
    (uint8 tensor); cuda: one state per visible device, empty when CUDA is unavailable.
    """

    python: tuple[Any, ...]
    numpy: tuple[str, list[int], int, int, float]
    torch: Tensor
    cuda: list[Tensor]


def capture_rng() -> RngState:
    """The current python, numpy (global), torch CPU and CUDA (if available) RNG states of this process."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return RngState(
        python=random.getstate(),
        numpy=(str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)),
        torch=torch.get_rng_state(),
        cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    )


def apply_rng(state: RngState) -> None:
    """Restore states captured by `capture_rng`, so the random streams continue exactly where they were."""
    version, internal, gauss_next = state["python"]
    # torch.load may hand back lists where random.setstate insists on tuples.
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            logger.warning(
                "checkpoint has CUDA RNG states for %d devices, this process sees %d: CUDA RNG not restored",
                len(cuda),
                torch.cuda.device_count(),
            )
        else:
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    elif cuda:
        logger.warning("checkpoint has CUDA RNG states but CUDA is unavailable: CUDA RNG not restored")
