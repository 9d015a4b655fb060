"""Rewards: the scorer that fills the (N, K) reward matrix, and each reward behind it.

- `scorer`: the closed set of rewards, remote and local, and `RewardScorer`;
- `clip_sim`: the in-process CLIP text-image cosine;
- `outage`: waiting for the reward services at start and stopping on a sustained outage;
- `demo`: the brightness reward service of `make demo-learn` (`python -m deepgen_trainer.demo_reward`).

May import `config` and the levels below it (`model`, `algorithms`).
"""
