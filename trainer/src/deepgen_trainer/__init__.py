"""deepgen-trainer: MR-GRPO training of DeepGen 1.0.

The package, one folder per concept, from the bottom up (a module imports only from its own level
and the levels below; folders of one level do not import each other):

1. `model/` (DeepGen, connector, joint attention, tiny build) and `algorithms/` (SDE samplers,
   advantages, policy losses, rollouts: pure tensor functions): nothing else of the trainer;
2. `config` (flags, YAML and environment → one `TrainConfig`);
3. `data/`, `rewards/`, `checkpoints/`, `observe/`;
4. `engine/` (process group, DeepSpeed configs, optimizer step);
5. `evaluation/`;
6. `run` (building a run from its config) and `train` (the training loop, top to bottom).

The public math API keeps its stable paths: `deepgen_trainer.sde` (SDE steps with log-probs) and
`deepgen_trainer.advantages` (multi-reward advantages) re-export `algorithms/`; `python -m
deepgen_trainer.convert` and `python -m deepgen_trainer.demo_reward` are the commands of
`checkpoints/convert` and `rewards/demo`.
"""

__version__ = "0.1.0"
