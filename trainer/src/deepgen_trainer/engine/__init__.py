"""How the update runs across processes: the `torchrun` process group, DeepSpeed configs, and the
optimizer step behind one interface (DeepSpeed ZeRO or plain PyTorch).

- `distributed`: rank, world size, device and the few collectives the trainer needs;
- `ds_config`: DeepSpeed JSONs with their "auto" values resolved from the flags;
- `optim`: `Updater`, the DiT's backward and optimizer step.

May import `checkpoints`, `config` and the levels below them.
"""
