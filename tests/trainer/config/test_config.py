"""deepgen_trainer.config and .ds_config: the seed's defaults, env fallbacks, validation, DeepSpeed configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepgen_trainer.config import (
    DEEPSPEED_CONFIG_NAMES,
    DEEPSPEED_DIR,
    ENV_FIELDS,
    ConfigError,
    TrainConfig,
    deployment_env,
    parse_args,
)
from deepgen_trainer.engine.ds_config import deepspeed_config, resolve_deepspeed_config

NO_ENV: dict[str, str] = {}

# DESIGN §4 "Flags", plus the stack's own flags.
DESIGN_DEFAULTS = {
    "learning_rate": 2e-6,
    "rollout_n": 8,
    "rollout_micro_batch_size": 32,
    "atrain_micro_batch_size": 32,
    "atrain_sde_sampler": "cps_sde",
    "atrain_adv_type": "gdpo",
    "beta": 5e-7,
    "atrain_kl_type": "v-based",
    "num_inference_steps": 50,
    "image_height": 512,
    "image_width": 512,
    "timestep_fraction": 0.6,
    "clip_range": 1e-4,
    "sftaux_coef": 1e-4,
    "eval_freq": 10,
    "gradient_checkpointing": True,
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 20,
    "save_steps": 50,
    "deepspeed": "zero2",
    "report_to": ("wandb", "swanlab"),
    "cfg_scale": 0.0,
    "sde_eta": 1.0,
    "init_same_noise": True,
    "eval_cfg_scale": 4.0,
    "adv_eps": 1e-4,
    "adv_clip": 5.0,
    "max_grad_norm": 1.0,
    "exact_logprob": False,
    "global_adv_stats": False,
    "step_per_backward": False,
    "eval_before_train": False,
    "model": "hf",
    "max_steps": -1,
    "dataset_config": None,
    "ocr_url": "http://localhost:18082",  # the original's default when OCR_URL is not set at all
}


def parse(*argv: str, env: dict[str, str] | None = None) -> TrainConfig:
    return parse_args(list(argv), NO_ENV if env is None else env)


def test_parse_defaults_equal_the_design() -> None:
    cfg = parse()
    for name, value in DESIGN_DEFAULTS.items():
        assert getattr(cfg, name) == value, name
    # Reward URLs whose variable is not set at all: the original's local addresses.
    assert cfg == TrainConfig(ocr_url="http://localhost:18082", unifiedreward_think_url="http://localhost:18087")
    assert cfg.num_train_timesteps == 30  # int(50 · 0.6)
    assert cfg.images_per_rank(world_size=8) == 32


def test_flags_override_and_booleans_switch_off() -> None:
    cfg = parse(
        "--learning_rate", "1e-5", "--rollout_n", "4", "--prompts_per_rank", "8", "--atrain_adv_type", "reinforcepp",
        "--no-gradient_checkpointing", "--no-init_same_noise", "--exact_logprob", "--report_to", "none",
        "--save_total_limit", "3", "--deepspeed", "zero3_sd3", "--atrain_kl_type", "x-based",
    )  # fmt: skip
    assert (cfg.learning_rate, cfg.rollout_n, cfg.atrain_adv_type) == (1e-5, 4, "reinforcepp")
    assert (cfg.gradient_checkpointing, cfg.init_same_noise, cfg.exact_logprob) == (False, False, True)
    assert (cfg.report_to, cfg.save_total_limit, cfg.deepspeed) == ((), 3, "zero3_sd3")
    assert parse("--report_to", "swanlab").report_to == ("swanlab",)


def test_env_fills_deployment_facts_only_and_flags_win() -> None:
    env = {var: f"/env/{var.lower()}" for var in ENV_FIELDS}
    env |= {
        "LEARNING_RATE": "1.0",
        "ROLLOUT_N": "2",
        "OCR_URL": "grpc://ocr:50051",
        "UNIFIEDREWARD_THINK_URL": "http://judge:18087",
        "UNIGENBENCH_API_URL": "grpcs://eval-1:50053,eval-2:50053",
        "CHECKPOINT": "",
        "METRICS_PORT": "9400",
        "WANDB_MODE": "online",
        "SWANLAB_MODE": "disabled",
    }
    cfg = parse("--output_dir", "/flag/out", env=env)
    assert (cfg.wandb_mode, cfg.swanlab_mode) == ("online", "disabled")
    assert cfg.metrics_port == 9400
    assert cfg.output_dir == "/flag/out"
    assert cfg.ocr_url == "grpc://ocr:50051"
    assert cfg.sd3_5_model_name_or_path == "/env/sd3_5_model_name_or_path"
    assert cfg.sftaux_dataset_config == "/env/sftaux_dataset_config"
    assert cfg.checkpoint is None  # an empty variable counts as unset
    assert (cfg.learning_rate, cfg.rollout_n) == (2e-6, 8)  # algorithm switches never come from the env
    # Only the reward URLs have defaults (the original's local addresses), and only for unset variables.
    assert deployment_env({"PATH": "/bin"}) == {
        "ocr_url": "http://localhost:18082", "unifiedreward_think_url": "http://localhost:18087"
    }  # fmt: skip
    assert deployment_env({"OCR_URL": "", "UNIFIEDREWARD_THINK_URL": ""}) == {}  # compose: set but empty = off


def test_to_dict_round_trips_and_is_json() -> None:
    cfg = parse("--report_to", "wandb", "--seed", "7", "--prompts_per_step", "64")
    saved = json.loads(json.dumps(cfg.to_dict()))
    assert saved["report_to"] == ["wandb"]
    assert TrainConfig.from_dict(saved) == cfg
    with pytest.raises(ConfigError, match=r"unknown config keys \['rollout_nn'\]"):
        TrainConfig.from_dict(saved | {"rollout_nn": 8})


BAD_FLAGS = [
    (["--rollout_n", "1"], "raise --rollout_n or use --atrain_adv_type reinforcepp"),
    (["--rollout_n", "1", "--atrain_adv_type", "grpo_global_std"], "needs --rollout_n >= 2"),
    (["--rollout_micro_batch_size", "24"], "not a multiple of --rollout_micro_batch_size 24; set"),
    (["--atrain_micro_batch_size", "64"], "is not a multiple of --atrain_micro_batch_size 64; set"),
    (["--prompts_per_rank", "3"], "3 prompts × --rollout_n 8 = 24 images"),
    (["--timestep_fraction", "0"], "--timestep_fraction must be in (0, 1]"),
    (["--timestep_fraction", "1.5"], "--timestep_fraction must be in (0, 1]"),
    (["--timestep_fraction", "0.01"], "trains on no step; raise --timestep_fraction to at least 0.02"),
    (["--atrain_sde_sampler", "euler"], "valid values: cps_sde, flowgrpo_sde, dance_sde"),
    (["--atrain_adv_type", "ppo"], "valid values: gdpo, grpo, grpo_global_std, reinforcepp"),
    (["--atrain_kl_type", "k3"], "valid values: v-based, x-based"),
    (["--lr_scheduler_type", "step"], "valid values: linear, cosine, cosine_with_restarts"),
    (["--model", "big"], "valid values: hf, tiny"),
    (["--learning_rate=-1e-6"], "--learning_rate must be a finite number >= 0"),
    (["--beta", "nan"], "--beta must be a finite number >= 0"),
    (["--clip_range", "0"], "--clip_range must be a finite number > 0"),
    (["--sftaux_coef", "1.5"], "--sftaux_coef must be in [0, 1]"),
    (["--image_height", "500"], "--image_height must be a positive multiple of 16"),
    (["--num_inference_steps", "1"], "--num_inference_steps must be >= 2"),
    (["--max_steps", "0"], "or -1 to train --num_train_epochs"),
    (["--report_to", "neptune"], "valid values: wandb,swanlab (comma-separated) or none"),
    (["--deepspeed", "zero4"], "neither a config name (zero2, zero3, zero3_offload, zero3_sd3)"),
    (["--ocr_url", "ftp://reward-ocr:50051"], "(OCR_URL): unsupported service URL 'ftp://reward-ocr:50051': use"),
    (["--unigenbench_api_url", "grpc://h"], "(UNIGENBENCH_API_URL): service URL 'grpc://h': address 'h' needs a port"),
    (["--rollout_nn", "8"], "unrecognized arguments: --rollout_nn 8; see --help"),
    (["--rollout_n", "eight"], "invalid int value"),
    (["--optimizer_steps_per_rollout", "0"], "--optimizer_steps_per_rollout must be >= 1"),
    (["--optimizer_steps_per_rollout", "4"], "must divide the trained timesteps (30 = int(--num_inference_steps 50"),
    (["--optimizer_steps_per_rollout", "2", "--step_per_backward"], "drop --optimizer_steps_per_rollout 2 or"),
    (["--logprob_min_std=-0.1"], "--logprob_min_std must be a finite number >= 0 (0: no floor)"),
    (["--reward_ready_timeout", "inf"], "--reward_ready_timeout must be a finite number of seconds >= 0"),
    (["--reward_failure_patience", "0"], "--reward_failure_patience must be >= 1"),
]


@pytest.mark.parametrize(("argv", "fix"), BAD_FLAGS)
def test_bad_flags_fail_with_the_fix(argv: list[str], fix: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse(*argv)
    assert fix in str(error.value)


def test_rollout_n_one_is_fine_without_groups() -> None:
    cfg = parse("--rollout_n", "1", "--atrain_adv_type", "reinforcepp", "--prompts_per_rank", "32")
    assert cfg.images_per_rank(1) == 32


def test_timestep_fraction_one_trains_every_step_but_the_last() -> None:
    assert parse("--timestep_fraction", "1").num_train_timesteps == 49


def test_global_prompts_per_step_is_checked_against_the_world_size() -> None:
    cfg = parse("--prompts_per_step", "32")
    assert cfg.prompts_per_rank_for(8) == 4
    assert cfg.images_per_rank(4) == 64
    with pytest.raises(ConfigError, match="does not divide over 3 ranks; use a multiple of 3"):
        cfg.prompts_per_rank_for(3)
    with pytest.raises(ConfigError, match=r"--prompts_per_step 32 over 16 ranks: 2 prompts .* set"):
        cfg.prompts_per_rank_for(16)


def test_gradient_accumulation_counts_backward_passes() -> None:
    cfg = parse("--prompts_per_rank", "8", "--atrain_micro_batch_size", "16")
    assert cfg.gradient_accumulation_steps(world_size=2) == 64 // 16 * 30
    assert parse("--step_per_backward").gradient_accumulation_steps(world_size=2) == 1
    # K optimizer steps per rollout split the passes evenly; --step_per_backward is K = every pass.
    two = parse("--prompts_per_rank", "8", "--atrain_micro_batch_size", "16", "--optimizer_steps_per_rollout", "2")
    assert (two.optimizer_steps(2), two.gradient_accumulation_steps(world_size=2)) == (2, 64 // 16 * 15)
    assert parse("--step_per_backward").optimizer_steps(world_size=2) == 32 // 32 * 30


# ------------------------------------------------------------------------------------------------- DeepSpeed


def _walk(node: object) -> list[object]:
    if isinstance(node, dict):
        return [leaf for value in node.values() for leaf in _walk(value)]
    return [node]


@pytest.mark.parametrize("name", DEEPSPEED_CONFIG_NAMES)
def test_deepspeed_configs_resolve_with_no_auto_left(name: str) -> None:
    raw = json.loads((DEEPSPEED_DIR / f"{name}.json").read_text())
    assert "optimizer" not in raw
    assert "scheduler" not in raw
    assert raw["zero_allow_untested_optimizer"] is True
    assert raw["train_batch_size"] == raw["gradient_accumulation_steps"] == "auto"
    cfg = parse("--max_grad_norm", "0.5", "--no-bf16")
    resolved = deepspeed_config(name, cfg, world_size=4)
    assert "auto" not in _walk(resolved)
    assert resolved["train_micro_batch_size_per_gpu"] == 32
    assert resolved["gradient_accumulation_steps"] == 30  # 32 images / 32 per micro-batch × 30 timesteps
    assert resolved["train_batch_size"] == 32 * 30 * 4
    assert (resolved["gradient_clipping"], resolved["bf16"]["enabled"], resolved["fp16"]["enabled"]) == (
        0.5,
        False,
        False,
    )
    assert resolved["zero_optimization"]["stage"] == (2 if name == "zero2" else 3)


def test_deepspeed_accepts_the_resolved_configs() -> None:
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = parse("--step_per_backward")
    for name in DEEPSPEED_CONFIG_NAMES:
        ds = DeepSpeedConfig(deepspeed_config(name, cfg, world_size=1))
        assert (ds.train_batch_size, ds.gradient_accumulation_steps, ds.gradient_clipping) == (32, 1, 1.0)
        assert ds.bfloat16_config.enabled


def test_deepspeed_config_errors_say_what_to_change(tmp_path: Path) -> None:
    cfg = parse()
    with pytest.raises(ConfigError, match="optimizer type 'SGD' is not supported; use \"AdamW\""):
        resolve_deepspeed_config({"optimizer": {"type": "SGD"}}, cfg)
    with pytest.raises(ConfigError, match=r"gradient_clipping is 2.0 but the trainer's flags give 1.0 .* \"auto\""):
        resolve_deepspeed_config({"gradient_clipping": 2.0}, cfg)
    # A fixed micro batch is DeepSpeed's bookkeeping only: reconciled with the flags.
    assert resolve_deepspeed_config({"train_micro_batch_size_per_gpu": 16}, cfg)["train_micro_batch_size_per_gpu"] == 32
    with pytest.raises(ConfigError, match=r"zero_optimization.reduce_bucket_size is \"auto\" .* set a value"):
        resolve_deepspeed_config({"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}, cfg)
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"zero_optimization": {"stage": 1}, "gradient_clipping": 1.0}))
    resolved = deepspeed_config(custom, cfg, world_size=2)
    assert resolved["train_batch_size"] == 32 * 30 * 2
    assert parse("--deepspeed", str(custom)).deepspeed == str(custom)
