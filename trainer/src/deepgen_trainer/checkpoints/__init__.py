"""Every file a run reads or writes as weights: this trainer's checkpoints, the original trainer's
and the SFT model's formats, loading them into a model, conversion, RNG state and the EMA.

- `run_checkpoint`: this trainer's ``checkpoint-N`` folders (atomic save, resume, retention);
- `formats`: reading ``.pth``, ``.safetensors``, DeepSpeed and mmengine files into tensors;
- `torch_file`: the one reader of torch files (zip container checks, then `safe_pickle`);
- `safe_pickle`, `pickle_allowlist`: the bounded unpickler and the calls it may make;
- `paths`: entries of a checkpoint folder confined to it;
- `loading`: building the model a config names and applying a checkpoint to it;
- `original_run`: output folders of the original DeepGen-RL trainer;
- `rng_state`: RNG states saved with a checkpoint;
- `convert`: RL checkpoint → SFT-format ``.pth`` (`python -m deepgen_trainer.convert`);
- `ema`: the DiT's exponential moving average.

May import `config` and the levels below it (`model`, `algorithms`).
"""
