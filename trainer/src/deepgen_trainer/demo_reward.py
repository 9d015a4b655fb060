"""`python -m deepgen_trainer.demo_reward`: the brightness reward service of `make demo-learn`.

The service lives in `deepgen_trainer.rewards.demo`; this module keeps the command users type.
"""

from deepgen_trainer.rewards.demo import serve

if __name__ == "__main__":
    serve()
