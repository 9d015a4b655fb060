"""What a run shows: step metrics to wandb, swanlab and Prometheus, the reward curve as a PNG, and
the evaluation's contact sheets.

- `tracking`: `Tracker`, one flat dict of scalars per step to every backend;
- `reward_plot`: the reward curve of a run and its one-line summary;
- `contact_sheet`: a grid of generated images with their prompts and scores.

May import `config` and the levels below it (`model`, `algorithms`).
"""
