"""Multi-reward advantages' stable public path (DESIGN.md §2): `deepgen_trainer.advantages.compute_advantages`.

The code lives in `deepgen_trainer.algorithms.advantages`; this module re-exports its public names.
"""

from deepgen_trainer.algorithms.advantages import (
    ADVANTAGE_TYPES,
    GROUP_NORMALISING_TYPES,
    AdvantageType,
    AllGather,
    clamp_fraction,
    compute_advantages,
    weighted_reward_sum,
)

__all__ = [
    "ADVANTAGE_TYPES",
    "GROUP_NORMALISING_TYPES",
    "AdvantageType",
    "AllGather",
    "clamp_fraction",
    "compute_advantages",
    "weighted_reward_sum",
]
