"""The GRPO math as pure tensor functions: no I/O, no config objects, no `torch.distributed`.

- `sde`: SDE steps with log-probs (cps_sde, flowgrpo_sde, dance_sde) and the ODE step;
- `advantages`: multi-reward advantages (gdpo, grpo, grpo_global_std, reinforcepp);
- `policy_loss`: clipped policy loss, KL penalties, flow-matching loss;
- `rollout`: SDE rollouts that record latents and log-probs, ODE sampling for evaluation.

Imports nothing else of the trainer (a model is any object with a `velocity` method).
"""
