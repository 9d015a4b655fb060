"""`python -m deepgen_trainer.convert`: RL checkpoint → SFT-format ``.pth`` (`make convert CKPT=...`).

The converter lives in `deepgen_trainer.checkpoints.convert`; this module keeps the command users type.
"""

from deepgen_trainer.checkpoints.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
