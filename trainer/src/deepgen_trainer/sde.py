"""The SDE samplers' stable public path (DESIGN.md §2): `deepgen_trainer.sde.sde_step_with_logprob`.

The code lives in `deepgen_trainer.algorithms.sde`; this module re-exports its public names.
"""

from deepgen_trainer.algorithms.sde import LOGPROB_MIN_STD, SAMPLERS, Sampler, ode_step, sde_step_with_logprob

__all__ = ["LOGPROB_MIN_STD", "SAMPLERS", "Sampler", "ode_step", "sde_step_with_logprob"]
