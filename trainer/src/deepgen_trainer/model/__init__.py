"""The DeepGen model: the Qwen2.5-VL VLM, the SCB connector, the SD3.5-style DiT with its masked joint
attention, and the tiny random build of tests and demos.

- `deepgen`: `DeepGen` (conditioning, velocity, VAE encode/decode), its config and key families;
- `connector`: the Stacked Channel Bridging connector and its think tokens;
- `joint_attention`: the DiT's joint attention with a padding mask;
- `tiny`: a tiny random DeepGen built in code (no download).

Imports nothing else of the trainer.
"""
