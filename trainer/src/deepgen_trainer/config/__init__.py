"""The trainer's flags: one typed, frozen config, parsed from the command line and checked in one place.

Flag names and defaults are the seed's (DESIGN §4 "Flags"). Every field is a ``--flag`` of the same
name; booleans also get ``--no-flag`` (``--no-gradient_checkpointing``). Deployment facts (model
paths, service URLs, output and data-config paths) fall back to environment variables when the flag
is not given: the flag is the variable's name in lower case (``--ocr_url`` ← ``OCR_URL``). The one
exception for algorithm knobs is the original's ``ATRAIN_*`` variables, read as defaults of their flags
(a flag wins, and one line names each value's source) so that its launch environments keep working.
Both tables of variables, and the two functions that read them, are in `environment`.

Validation runs in `TrainConfig.__post_init__`, so a config from the command line, from a saved run
(`TrainConfig.from_dict`) or built in code is checked the same way; every message says how to fix it.
Checks that need the world size (the per-rank batch when ``--prompts_per_step`` is global) are in
`TrainConfig.prompts_per_rank_for`.

- `train_config`: `TrainConfig`, its fields (each one's help) and the values derived from them;
- `validation`: its invariants, in the order they are checked, with their fix-it messages;
- `command_line`: the parser, the --help formatter and `parse_args` (flags > environment > defaults);
- `environment`: the environment variables behind flag defaults and the two functions that read them;
- `choices`: the closed sets of flag values and the DeepSpeed config names' files;
- `errors`: `ConfigError`.

Imports only the levels below it (`model`, `algorithms`, `original`). This module re-exports the names
the rest of the trainer, the tests and the benchmarks import from `deepgen_trainer.config`.
"""

from deepgen_trainer.config.choices import (
    ALGORITHMS,
    DEEPSPEED_CONFIG_NAMES,
    DEEPSPEED_DIR,
    MODEL_KINDS,
    deepspeed_config_path,
    lr_scheduler_types,
)
from deepgen_trainer.config.command_line import build_parser, parse_args, shown_default
from deepgen_trainer.config.environment import ENV_FIELDS, deployment_env
from deepgen_trainer.config.errors import ConfigError
from deepgen_trainer.config.train_config import TrainConfig

__all__ = [
    "ALGORITHMS",
    "DEEPSPEED_CONFIG_NAMES",
    "DEEPSPEED_DIR",
    "ENV_FIELDS",
    "MODEL_KINDS",
    "ConfigError",
    "TrainConfig",
    "build_parser",
    "deepspeed_config_path",
    "deployment_env",
    "lr_scheduler_types",
    "parse_args",
    "shown_default",
]
