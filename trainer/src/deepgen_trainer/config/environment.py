"""The environment variables behind flag defaults, and the two functions that read them.

Deployment facts (model paths, service URLs, output and data-config paths) fall back to environment
variables when their flag is not given: the flag is the variable's name in lower case (``--ocr_url`` ←
``OCR_URL``); `deployment_env` reads them. The original trainer's algorithm knobs (``ATRAIN_NFT_BETA``,
...) are the defaults of their flags; `algorithm_env` reads them. Algorithm switches never come from the
environment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from deepgen_trainer.config.errors import ConfigError
from deepgen_trainer.original import urls as original_urls

# Environment variables of the seed that are deployment facts, and the field each one backs.
ENV_FIELDS: dict[str, str] = {
    name: name.lower()
    for name in (
        "SD3_5_MODEL_NAME_OR_PATH",
        "QWEN2_5_VL_MODEL_NAME_OR_PATH",
        "CLIP_MODEL_NAME_OR_PATH",
        "CHECKPOINT",
        "OUTPUT_DIR",
        "OCR_URL",
        "UNIFIEDREWARD_THINK_URL",
        "UNIGENBENCH_API_URL",
        "DATASET_CONFIG",
        "EVAL_DATASET_CONFIG",
        "SFTAUX_DATASET_CONFIG",
        "METRICS_PORT",
        "MODEL_CONFIG",
        "WANDB_MODE",
        "SWANLAB_MODE",
        "WANDB_PROJECT",
    )
}
# Service URLs: `host:port` means http://host:port, as the original accepted (`deepgen_trainer.original.urls`).
URL_FIELDS: tuple[str, ...] = ("ocr_url", "unifiedreward_think_url", "unigenbench_api_url")
# Deployment facts several variables of the seed can set: the first one set wins.
ENV_ALIASES: dict[str, tuple[str, ...]] = {
    "swanlab_project": ("SWANLAB_PROJECT", "SWANLAB_PROJ_NAME"),
    "run_name": ("WANDB_RUN_NAME", "WANDB_NAME", "RUN_NAME", "SWANLAB_EXP_NAME"),
}
# The original trainer's environment knobs of its algorithms, and the flag each one is the default of
# (a flag given on the command line wins; `parse_args` logs where each value came from).
ALGORITHM_ENV_FIELDS: dict[str, str] = {
    "ATRAIN_NFT_BETA": "atrain_nft_beta",
    "ATRAIN_NFT_ADV_CLIP_RANGE": "atrain_nft_adv_clip_range",
    "ATRAIN_ADV_CLIP_MAX": "adv_clip",
    "ATRAIN_GRPOGUARD_HIGHCLIP_RANGE": "clip_range_high",
}
# The original's switches for GRPO-Guard variants that have no meaning here: one notice each when set.
ALGORITHM_ENV_NOTICES: dict[str, str] = {
    "ATRAIN_GRPOGUARD_PAPER_IMPL": "GRPO-Guard always applies RatioNorm and the 1/(−dt) gradient weight (the paper's "
    "method, the original's ATRAIN_GRPOGUARD_PAPER_IMPL=1 path)",
    "ATRAIN_CLAMP_LOGPROB_DIFF": "the log-ratio is not clamped: old log-probs are kept in float32, so it stays finite",
    "ATRAIN_CLAMP_LOGPROB": "log-probs are not clamped: old log-probs are kept in float32, so they stay finite",
}
log = logging.getLogger("deepgen_trainer")


def deployment_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Field values of the deployment facts set in the environment (the only environment read)."""
    environ = os.environ if environ is None else environ
    values = {name: environ[var] for var, name in ENV_FIELDS.items() if environ.get(var)}
    values |= {ENV_FIELDS[var]: url for var, url in original_urls.unset_url_defaults(environ).items()}
    values |= {name: original_urls.with_scheme(values[name]) for name in URL_FIELDS if values.get(name)}
    for name, variables in ENV_ALIASES.items():
        first = next((environ[v] for v in variables if environ.get(v)), None)
        if first is not None:
            values[name] = first
    return values


def algorithm_env(environ: Mapping[str, str] | None = None) -> dict[str, float]:
    """Flag defaults from the original's algorithm knobs (``ATRAIN_NFT_BETA``, ...) set in the
    environment, and a notice for each of its switches that have no meaning here."""
    environ = os.environ if environ is None else environ
    values = {}
    for var, name in ALGORITHM_ENV_FIELDS.items():
        if environ.get(var):
            try:
                values[name] = float(environ[var])
            except ValueError:
                raise ConfigError(f"{var}={environ[var]!r} is not a number (it is the default of --{name})") from None
    for var, note in ALGORITHM_ENV_NOTICES.items():
        if environ.get(var):
            log.info("%s=%s has no effect: %s", var, environ[var], note)
    return values
