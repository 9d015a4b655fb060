"""The original DeepGen-RL's four DeepSpeed JSONs (`scripts/deepspeed/*.json`) run as shipped: a real DeepSpeed
engine on CPU (gloo) takes one optimizer step of the tiny DiT with each, its "auto" values filled as HF fills
them, the `optimizer` block honoured (DeepSpeed builds AdamW with our learning rate), the fixed batch values
of zero3.json / zero3_sd3.json reconciled."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deepgen_trainer.config import ConfigError, parse_args
from deepgen_trainer.engine.ds_config import resolve_deepspeed_config
from tests.helpers import REPO, original_files

NAMES = ("zero2", "zero3", "zero3_offload", "zero3_sd3")
# A small rollout: 1 prompt × 2 images, 2 trained timesteps of 4, micro-batch 2 → 2 backward passes per step.
SMALL = ["--model", "tiny", "--prompts_per_rank", "1", "--rollout_n", "2", "--rollout_micro_batch_size", "2",
         "--atrain_micro_batch_size", "2", "--num_inference_steps", "4", "--timestep_fraction", "0.5",
         "--learning_rate", "1e-3"]  # fmt: skip

ENGINE_STEP = r"""
import json, logging, sys, torch
logging.basicConfig(level=logging.INFO)
from deepgen_trainer.config import parse_args
from deepgen_trainer.engine.distributed import World
from deepgen_trainer.engine.optim import build_updater
from deepgen_trainer.model.tiny import build_tiny

out = {}
for path in sys.argv[2:]:
    cfg = parse_args([*json.loads(sys.argv[1]), "--deepspeed", path], environ={})
    dit = build_tiny(seed=0).transformer
    before = {k: v.detach().clone() for k, v in dit.state_dict().items()}
    updater = build_updater(dit, cfg, World(0, 1, 0, torch.device("cpu")), total_steps=2)
    c, bf16 = dit.config, {"dtype": torch.bfloat16}
    for _ in range(cfg.gradient_accumulation_steps(1)):
        velocity = updater.engine(
            hidden_states=torch.randn(2, c.in_channels, 8, 8, **bf16),
            encoder_hidden_states=torch.randn(2, 3, c.joint_attention_dim, **bf16),
            pooled_projections=torch.randn(2, c.pooled_projection_dim, **bf16), timestep=torch.tensor([500.0, 250.0]),
        ).sample
        updater.backward(velocity.float().pow(2).mean() / cfg.gradient_accumulation_steps(1))
    updater.step()
    state = updater.trainable_state(is_main=True)
    moved = any(not torch.equal(before[k], state[k].to(before[k].dtype)) for k in before)
    opt = updater.engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    group = inner.param_groups[0]
    out[path] = {"steps": updater.optimizer_steps, "moved": moved, "optimizer": type(inner).__name__,
                 "lr": group["lr"], "betas": list(group["betas"]), "eps": group["eps"],
                 "weight_decay": group["weight_decay"], "stage": updater.engine.zero_optimization_stage(),
                 "gas": updater.engine.gradient_accumulation_steps()}
print("RESULT " + json.dumps(out))
"""


def test_each_original_deepspeed_json_runs_a_real_engine_on_cpu() -> None:
    files = [str(original_files() / "scripts" / "deepspeed" / f"{name}.json") for name in NAMES]
    done = subprocess.run(
        [sys.executable, "-c", ENGINE_STEP, json.dumps([*SMALL, "--warmup_steps", "0"]), *files],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    for name, path in zip(NAMES, files, strict=True):
        run = result[path]
        assert (run["steps"], run["moved"]) == (1, True), (name, run)
        assert run["gas"] == 2, (name, run)  # the backward passes per optimizer step, whatever the file says
        assert run["stage"] == (2 if name == "zero2" else 3)
        assert (run["lr"], run["betas"], run["eps"], run["weight_decay"]) == (1e-3, [0.9, 0.999], 1e-8, 0.0), name
        assert run["optimizer"] == "AdamW", (name, run)
    assert "fixed batch values" in done.stderr
    assert "DeepSpeed builds the AdamW" in done.stderr


def original_json(name: str) -> dict:
    return json.loads((original_files() / "scripts" / "deepspeed" / f"{name}.json").read_text())


def test_auto_values_are_filled_as_hf_fills_them_with_the_dits_hidden_size() -> None:
    cfg = parse_args([*SMALL, "--max_grad_norm", "0.5"], environ={})
    zero3 = resolve_deepspeed_config(original_json("zero3_offload"), cfg, world_size=4, hidden_size=16, cpu=True)
    assert zero3["optimizer"]["params"] == {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                                            "torch_adam": True}  # fmt: skip
    zero = zero3["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"]) == (256, 230)
    assert zero["stage3_param_persistence_threshold"] == 160
    assert (zero3["train_micro_batch_size_per_gpu"], zero3["gradient_accumulation_steps"]) == (2, 2)
    assert (zero3["train_batch_size"], zero3["gradient_clipping"], zero3["bf16"]["enabled"]) == (16, 0.5, True)
    # zero3.json has no gradient_clipping: --max_grad_norm is applied anyway (the original silently did not).
    assert resolve_deepspeed_config(original_json("zero3"), cfg, hidden_size=16)["gradient_clipping"] == 0.5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gradient_accumulation_steps": 4}, r'gradient_accumulation_steps is 4 .* set it to "auto"'),
        ({"optimizer": {"type": "Lamb", "params": {}}}, "optimizer type 'Lamb' is not supported"),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, r"optimizer.params.lr is 0.1 .*--learning_rate"),
        ({"bf16": {"enabled": True}}, r"bf16.enabled is True but the trainer's flags give False"),
    ],
)
def test_values_that_would_change_the_run_are_refused_with_the_fix(change, message) -> None:
    cfg = parse_args([*SMALL, "--no-bf16"], environ={})
    with pytest.raises(ConfigError, match=message):
        resolve_deepspeed_config({**original_json("zero2"), **change}, cfg, hidden_size=16)
