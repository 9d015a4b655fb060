"""deepgen-trainer: MR-GRPO training of DeepGen 1.0.

The public math API is pure tensor functions: `deepgen_trainer.sde` (SDE steps with log-probs),
`deepgen_trainer.advantages` (multi-reward advantages) and `deepgen_trainer.policy_loss` (clipped
policy loss, KL penalty, flow-matching loss).
"""

__version__ = "0.1.0"
