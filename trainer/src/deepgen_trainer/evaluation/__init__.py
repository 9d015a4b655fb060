"""Evaluation on UniGenBench through eval-unigenbench: during training, and of a finished checkpoint
(`make eval`).

- `evaluate`: generate the benchmark's prompts and collect the judge's summary;
- `evaluate_checkpoint`: `python -m deepgen_trainer.evaluation.evaluate_checkpoint` behind `make eval`.

May import every folder but the top level's `run` and `train`.
"""
