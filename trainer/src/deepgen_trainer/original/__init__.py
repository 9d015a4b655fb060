"""The original DeepGen-RL's own file formats, read as the original wrote them.

- `mmengine_config`: MMEngine Python config files (the `--model_config` model config, the SFT-aux
  dataset config) into plain values, without importing the original's classes.

Imports nothing else of the trainer.
"""
