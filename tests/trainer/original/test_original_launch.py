"""Parity: the original DeepGen-RL's launch line, as its `scripts/train.sh` writes it, plus the flags its users
commonly add, starts a run unchanged: `scripts/train.sh` (torchrun, one CPU process) trains the tiny DeepGen
2 steps against a live reward-ocr, with the original's MMEngine model config and its shipped zero2.json, the
original's tracker variables and an OCR_URL written the original's way (host:port)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepgen_trainer.model.tiny import TINY_IMAGE_SIZE
from tests.helpers import PROMPT_FIXTURES, REPO, original_files
from tests.trainer.rewards.test_outage import free_port

MODEL_CONFIG = "configs/models/qwen2_5_vl_7b_stable_diffusion_3_5_medium_hf_dynamic_dpo_fusion.py"


# The torchrun arguments of the original scripts/train.sh, in its order. Left out, with the issue that adds
# them: --checkpoint (a real DeepGen .pth; the tiny model has none), --sftaux_dataset_config (the original's
# MMEngine SFT-aux config: issue 18), --eval_dataset_config (the original's eval YAML format: not this issue).
def original_launch_line(model_config: str, dataset: str, output_dir: str, run_name: str, zero2: str) -> list[str]:
    return [
        "--model_config", model_config, "--dataset_config", dataset, "--output_dir", output_dir,
        "--num_train_epochs", "10", "--lr_scheduler_type", "constant_with_warmup", "--report_to", "wandb,swanlab",
        "--run_name", run_name, "--deepspeed", zero2,
    ]  # fmt: skip


# Flags the original's users commonly add (ORIGINAL.md §3-§4), at sizes the tiny model runs in seconds:
# 4 images per step = 2 prompts × --rollout_n 2 on one rank.
COMMON = [
    "--rollout_n", "2", "--rollout_micro_batch_size", "2", "--rollout_global_batch_size", "4",
    "--atrain_micro_batch_size", "2", "--atrain_global_batch_size", "4", "--atrain_num_actor_update_steps", "1",
    "--log_prob_micro_batch_size", "2", "--num_inference_steps", "4", "--timestep_fraction", "0.5",
    "--image_height", str(TINY_IMAGE_SIZE), "--image_width", str(TINY_IMAGE_SIZE), "--learning_rate", "1e-3",
    "--beta", "0", "--cfg_scale", "0", "--sde_eta", "1.0", "--clip_range", "1e-4", "--max_grad_norm", "1.0",
    "--atrain_sde_sampler", "cps_sde", "--atrain_adv_type", "gdpo", "--atrain_kl_type", "v-based",
    "--ema_diffusion", "0.99", "--save_steps", "2", "--save_total_limit", "-1", "--max_steps", "2",
    "--eval_freq", "0", "--dataloader_num_workers", "4", "--bf16", "--gradient_checkpointing", "--init_same_noise",
    "--local_rank", "0",
]  # fmt: skip


@pytest.mark.integration
@pytest.mark.slow
def test_the_original_launch_line_trains_two_steps_of_the_tiny_model(tmp_path: Path, ocr_service) -> None:
    original = original_files()
    dataset = tmp_path / "train.yaml"
    dataset.write_text(
        "sampling_mode: sample_proportional\ndatasets:\n"
        f"  - name: ocr\n    path: {PROMPT_FIXTURES / 'ocr.txt'}\n    sample_weight: 3.0\n"
        "    rewards: {clip_sim: 0.3, ocr: 0.7}\n"
    )
    out = tmp_path / "outputs" / "deepgen_rl_test"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SWANLAB_", "NODE_", "MASTER_"))},
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "NGPUS": "1", "NODE_IP_LIST": "127.0.0.1", "INDEX": "0", "CHIEF_IP": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OCR_URL": f"127.0.0.1:{ocr_service.http_port}",  # the original's form: no scheme
        "UNIFIEDREWARD_THINK_URL": "", "UNIGENBENCH_API_URL": "",  # not in this dataset; evaluation off
        "WANDB_MODE": "offline", "WANDB_PROJECT": "DeepGen-RL", "SWANLAB_MODE": "disabled",
        "SWANLAB_PROJ_NAME": "DeepGen-RL", "WANDB_SILENT": "true", "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
    }  # fmt: skip
    argv = [
        *original_launch_line(str(original / MODEL_CONFIG), str(dataset), str(out), "train_test_run",
                              str(original / "scripts" / "deepspeed" / "zero2.json")),
        "--model", "tiny", *COMMON,
    ]  # fmt: skip
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "train.sh"), *argv], env=env, cwd=tmp_path, capture_output=True, text=True,
        timeout=280,
    )  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    assert (out / "checkpoint-2").is_dir(), sorted(p.name for p in out.iterdir())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    # One INFO line for each translated flag, a notice for each flag without effect, none silently dropped.
    for line in ("--rollout_global_batch_size 4 = --prompts_per_step 2", "--ema_diffusion 0.99 = --ema_decay 0.99",
                 "--atrain_num_actor_update_steps 1 = --optimizer_steps_per_rollout 1", "--atrain_global_batch_size 4",
                 "--log_prob_micro_batch_size 2: no effect", "--dataloader_num_workers 4: no effect",
                 "--local_rank 0: no effect", "DeepSpeed builds the AdamW", "--model_config"):  # fmt: skip
        assert line in log, line
    # The original's tracker variables: an offline wandb run under project DeepGen-RL, nothing from swanlab.
    [wandb_run] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"DeepGen-RL" in wandb_run.read_bytes()
    assert b"train_test_run" in wandb_run.read_bytes()
    assert not (out / "swanlog").exists()
    # The launcher's per-node log and the configs the run used, as the original launcher keeps them.
    assert "training 2 steps" in (out / "logs" / "0.log").read_text()
    copied = sorted(p.name for p in (out / "configs").iterdir())
    assert copied == sorted([Path(MODEL_CONFIG).name, "train.sh", "train.yaml", "zero2.json"])
