"""Every flag of the original DeepGen-RL's entry point (`deepgen_rl/grpo_deepgen.py` argparse) is accepted:
with its meaning where this trainer has the feature, translated with one INFO line where the vocabulary
differs, with a notice where it has no effect, refused naming the replacement where the original refused
it too. Nothing is silently ignored."""

from __future__ import annotations

import logging

import pytest

from deepgen_trainer.config import ConfigError, TrainConfig, lr_scheduler_types, parse_args

# The original's argparse, flag by flag: (flag, a value as its users pass it or None for a store_true flag).
ORIGINAL_FLAGS: list[tuple[str, str | None]] = [
    ("--model_config", "MODEL_CONFIG"),
    ("--checkpoint", "/ckpt.pth"),
    ("--output_dir", "OUT"),
    ("--num_train_epochs", "10"),
    ("--learning_rate", "2e-6"),
    ("--lr_scheduler_type", "constant_with_warmup"),
    ("--warmup_steps", "20"),
    ("--logging_steps", "1"),
    ("--save_steps", "50"),
    ("--save_total_limit", "-1"),
    ("--max_steps", "-1"),
    ("--bf16", None),
    ("--dataloader_num_workers", "4"),
    ("--rollout_n", "8"),
    ("--rollout_micro_batch_size", "32"),
    ("--rollout_global_batch_size", "256"),
    ("--atrain_micro_batch_size", "32"),
    ("--atrain_global_batch_size", "256"),
    ("--log_prob_micro_batch_size", "32"),
    ("--beta", "5e-7"),
    ("--cfg_scale", "0"),
    ("--num_inference_steps", "50"),
    ("--image_height", "512"),
    ("--image_width", "512"),
    ("--log_images_interval", "1"),
    ("--reward_funcs", "jpeg_compressibility"),
    ("--prompts_file", "prompts.txt"),
    ("--dataset_config", "train.yaml"),
    ("--report_to", "wandb,swanlab"),
    ("--run_name", "my-run"),
    ("--log_component_grad_norm", None),
    ("--log_component_grad_norm_every", "1"),
    ("--log_tflops", None),
    ("--log_tflops_every", "1"),
    ("--log_tflops_warmup_steps", "5"),
    ("--deepspeed", "DS_JSON"),
    ("--local_rank", "0"),
    ("--gradient_checkpointing", None),
    ("--max_grad_norm", "1.0"),
    ("--sftaux_dataset_config", "sftaux.yaml"),
    ("--sftaux_coef", "0.0001"),
    ("--sftaux_every_n_steps", "1"),
    ("--sftaux_micro_batch_size", "32"),
    ("--sftaux_num_workers", "4"),
    ("--sftaux_disable_on_error", None),
    ("--init_same_noise", None),
    ("--timestep_fraction", "0.6"),
    ("--ema_diffusion", "0.999"),
    ("--clip_range", "1e-4"),
    ("--sde_eta", "1.0"),
    ("--atrain_algorithm", "flowgrpo"),
    ("--atrain_nft_beta", "0.1"),
    ("--atrain_nft_adv_clip_range", "5.0"),
    ("--atrain_nft_off_policy", None),
    ("--atrain_sde_sampler", "cps_sde"),
    ("--atrain_adv_type", "gdpo"),
    ("--atrain_kl_type", "v-based"),
    ("--atrain_num_actor_update_steps", "1"),
    ("--eval_freq", "10"),
    ("--eval_before_train", None),
    ("--eval_dataset_config", "eval.yaml"),
    ("--eval_inference_mode", "ode"),
    ("--eval_cfg_scale", "4.0"),
    ("--eval_num_inference_steps", "50"),
    ("--eval_sde_eta", "1.0"),
    ("--eval_image_height", "512"),
    ("--eval_image_width", "512"),
    ("--eval_micro_batch_size", "160"),
    ("--eval_wandb_num_upload_images", "0"),
    ("--eval_swanlab_num_upload_images", "32"),
]
# The original's deprecated flags, refused by it and here, each naming its replacement.
REFUSED = {"--num_generations": "--rollout_n", "--per_device_train_batch_size": "--prompts_per_rank",
           "--gradient_accumulation_steps": "--optimizer_steps_per_rollout"}  # fmt: skip


def parse(*argv: str, env: dict[str, str] | None = None) -> TrainConfig:
    return parse_args(list(argv), environ=env or {})


def argv_of(flag: str, value: str | None, tmp_path) -> list[str]:
    if value is None:
        return [flag]
    ds = tmp_path / "ds.json"
    ds.write_text('{"train_micro_batch_size_per_gpu": "auto"}')
    return [
        flag,
        {"MODEL_CONFIG": str(tmp_path / "model.py"), "OUT": str(tmp_path), "DS_JSON": str(ds)}.get(value, value),
    ]


@pytest.mark.parametrize(("flag", "value"), ORIGINAL_FLAGS)
def test_every_flag_of_the_original_parses(flag, value, tmp_path) -> None:
    parse(*argv_of(flag, value, tmp_path))


def test_the_original_flag_list_is_the_original_argparse() -> None:
    # 71 add_argument calls in grpo_deepgen.py's parse_args (3 of them the deprecated, refused flags).
    assert len(ORIGINAL_FLAGS) + len(REFUSED) == 73
    assert len({f for f, _ in ORIGINAL_FLAGS}) == len(ORIGINAL_FLAGS)


@pytest.mark.parametrize(("flag", "replacement"), REFUSED.items())
def test_the_originals_deprecated_flags_are_refused_naming_the_replacement(flag, replacement) -> None:
    with pytest.raises(ConfigError, match=replacement):
        parse(flag, "4")


def test_translations_give_our_fields_each_with_one_info_line(caplog) -> None:
    caplog.set_level(logging.INFO, logger="deepgen_trainer.config")
    cfg = parse(
        "--rollout_global_batch_size", "256", "--ema_diffusion", "0.999", "--atrain_num_actor_update_steps", "2",
        "--atrain_global_batch_size", "128", "--log_prob_micro_batch_size", "16", "--dataloader_num_workers", "8",
        "--local_rank", "0",
    )  # fmt: skip
    assert cfg.prompts_per_step == 32  # 256 images / 8 per group: 4 prompts × 8 images per rank on 8 ranks
    assert cfg.prompts_per_rank_for(8) == 4
    assert (cfg.ema_decay, cfg.eval_with_ema) == (0.999, True)
    assert cfg.optimizer_steps_per_rollout == 2
    lines = [r.getMessage() for r in caplog.records]
    for flag in ("--rollout_global_batch_size 256 = --prompts_per_step 32", "--ema_diffusion 0.999 = --ema_decay",
                 "--atrain_num_actor_update_steps 2 = --optimizer_steps_per_rollout 2", "--atrain_global_batch_size",
                 "--log_prob_micro_batch_size 16: no effect", "--dataloader_num_workers 8: no effect",
                 "--local_rank 0: no effect"):  # fmt: skip
        assert sum(line.startswith(flag) for line in lines) == 1, (flag, lines)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rollout_global_batch_size", "100"], "multiple of 8"),
        (["--rollout_global_batch_size", "256", "--prompts_per_step", "16"], "pass only one of them"),
        (["--ema_diffusion", "0.99", "--ema_decay", "0.9"], "pass only one of them"),
        (
            [
                "--atrain_global_batch_size",
                "256",
                "--atrain_num_actor_update_steps",
                "2",
                "--rollout_global_batch_size",
                "256",
            ],
            "at most 128",
        ),
        (["--atrain_num_actor_update_steps", "7"], "--optimizer_steps_per_rollout 7 must divide"),
    ],
)
def test_translations_that_cannot_hold_are_refused_with_the_fix(argv, message) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(*argv)


def test_always_on_booleans_keep_working_as_flags_and_can_be_switched_off() -> None:
    on = parse("--bf16", "--gradient_checkpointing", "--init_same_noise")
    assert (on.bf16, on.gradient_checkpointing, on.init_same_noise) == (True, True, True)
    off = parse("--no-bf16", "--no-gradient_checkpointing", "--no-init_same_noise")
    assert (off.bf16, off.gradient_checkpointing, off.init_same_noise) == (False, False, False)


@pytest.mark.parametrize(("value", "kept"), [("-1", None), ("0", None), ("3", 3)])
def test_save_total_limit_minus_one_keeps_all(value, kept) -> None:
    assert parse("--save_total_limit", value).save_total_limit == kept


def test_every_scheduler_name_of_transformers_is_taken_or_refused_with_what_it_needs() -> None:
    from transformers import SchedulerType

    assert set(lr_scheduler_types()) == {s.value for s in SchedulerType}
    needs = {"cosine_with_min_lr": '{"min_lr_rate": 0.1}', "cosine_warmup_with_min_lr": '{"min_lr_rate": 0.1}',
             "warmup_stable_decay": '{"num_decay_steps": 5}'}  # fmt: skip
    for name in lr_scheduler_types():
        if name in ("reduce_lr_on_plateau", "greedy"):
            with pytest.raises(ConfigError, match="validation metric"):
                parse("--lr_scheduler_type", name)
        elif name in needs:
            with pytest.raises(ConfigError, match="--lr_scheduler_kwargs"):
                parse("--lr_scheduler_type", name)
            assert parse("--lr_scheduler_type", name, "--lr_scheduler_kwargs", needs[name]).lr_scheduler_type == name
        else:
            assert parse("--lr_scheduler_type", name).lr_scheduler_type == name


def test_report_to_takes_the_originals_values(caplog) -> None:
    caplog.set_level(logging.INFO, logger="deepgen_trainer.config")
    assert parse("--report_to", "all").report_to == ("wandb", "swanlab")
    assert parse("--report_to", "wandb,tensorboard").report_to == ("wandb",)
    assert parse("--report_to", "none").report_to == ()
    assert parse("--report_to", "mlflow,comet_ml").report_to == ()
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("--report_to tensorboard: no such tracker") for line in lines)
    assert any(line.startswith("--report_to all = wandb,swanlab") for line in lines)


def test_run_name_and_tracker_settings_from_flags_and_the_originals_variables() -> None:
    assert parse("--run_name", "r1").run_name == "r1"
    env = {"RUN_NAME": "from-run-name", "SWANLAB_EXP_NAME": "from-swanlab", "SWANLAB_PROJ_NAME": "seed-proj",
           "WANDB_PROJECT": "wb-proj", "WANDB_MODE": "disabled", "SWANLAB_MODE": "local"}  # fmt: skip
    cfg = parse(env=env)
    assert (cfg.run_name, cfg.swanlab_project, cfg.wandb_project) == ("from-run-name", "seed-proj", "wb-proj")
    assert (cfg.wandb_mode, cfg.swanlab_mode) == ("disabled", "local")
    assert parse(env={**env, "WANDB_RUN_NAME": "wb", "SWANLAB_PROJECT": "sp"}).run_name == "wb"
    assert parse(env={**env, "SWANLAB_PROJECT": "sp"}).swanlab_project == "sp"
    assert parse("--run_name", "flag", env=env).run_name == "flag"
    with pytest.raises(ConfigError, match="--wandb_mode 'local' is unknown"):
        parse(env={"WANDB_MODE": "local"})
