"""`python -m deepgen_trainer.train` (under `torchrun` for several GPUs): MR-GRPO training of DeepGen.

One step, on every rank, in the order of `loop.train`:
1. rollout (`rollout.generate`): `rollout_n` images per prompt from one shared initial noise, SDE
   sampling with the log-prob of every transition kept in float32; each generation micro-batch is
   decoded and sent to the reward models at once, so scoring overlaps the next micro-batch's generation.
   With `--one_step_off_policy` the next step's rollout is generated while this step's images are scored;
2. rewards: wait for the scores, an (N, K) matrix with NaN for failed / not-applicable entries;
3. advantages (`--atrain_adv_type`, per-dataset reward weights; missing rewards are neutral);
4. policy update (`update.update_policy`): `num_train_timesteps` random SDE steps (never the last),
   every training micro-batch: clipped ratio loss + β·KL against the frozen initial DiT, one backward
   each (`--atrain_algorithm grpoguard`: after RatioNorm; `diffusionnft`: the forward-process loss);
5. SFT auxiliary loss on one image-caption batch (`--sftaux_dataset_config`), its own backward before the last;
6. `--optimizer_steps_per_rollout` optimizer steps (1 by default) over consecutive chunks of the
   trained timesteps (`--step_per_backward` emulates the reference's step after every backward);
7. (`bookkeeping`) evaluate every `--eval_freq` (the DiT's EMA with `--eval_with_ema`), log, checkpoint
   every `--save_steps`; stop with a checkpoint when a reward has failed for all its samples
   `--reward_failure_patience` steps in a row.
With `--ema_decay` the EMA of the DiT moves after every optimizer step; with `--atrain_algorithm
diffusionnft --atrain_nft_off_policy` the sampling copy of the DiT moves after every step. A run resumes
from the newest complete checkpoint in `--output_dir`, both included (see `run.py`).

The top of the package: its modules may import every other part of the trainer (`run` and below);
`rollout` ← `update` ← `bookkeeping` ← `loop` within it. Nothing in the trainer imports it.
"""

from deepgen_trainer.train.loop import main, train

__all__ = ["main", "train"]
