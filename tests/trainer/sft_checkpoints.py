"""SFT checkpoints made the way the original's tools make them, at tiny scale.

`xtuner_style_source()` is the tiny DeepGen as xtuner trains it in the SFT stage: a rank-4 LoRA
(random, α 8) on the VLM's attention, the LoRA and the DeepGen-only modules and the DiT trainable, and
a `state_dict()` that drops `lmm.` and `vae.` (the original model's filter), so DeepSpeed's `module`
entry lacks the LoRA, which only the ZeRO optimizer shards hold.

Run as a script, it saves that model through a real DeepSpeed engine (CPU, gloo, one rank) as
mmengine's DeepSpeed strategy does: `engine.save_checkpoint(work_dir, tag="iter_5.pth",
client_state={meta, message_hub, ...}, save_latest=False)`, with mmengine's real MessageHub state and
an object of a class the loader does not know; then writes mmengine's `last_checkpoint` file:

    python -m tests.trainer.sft_checkpoints {2,3} WORK_DIR
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model

from deepgen_trainer.model.deepgen import DeepGen
from deepgen_trainer.model.tiny import build_tiny

LORA_TARGETS = ["q_proj", "v_proj"]
TAG = "iter_5.pth"


class XtunerStyleDeepGen(DeepGen):
    """DeepGen whose state dict leaves out the VLM and the VAE, as the original SFT model's does."""

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        state = super().state_dict(*args, **kwargs)
        return {k: v for k, v in state.items() if not k.startswith(("lmm.", "vae."))}


def xtuner_style_source(seed: int = 0) -> DeepGen:
    """The tiny DeepGen with a random rank-4 LoRA on the VLM, trainable as in the SFT stage."""
    model = build_tiny(seed=seed)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS), model.lmm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data.normal_(std=0.5)
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name or not name.startswith(("lmm.", "vae.")))
    return model


@dataclass
class TrainingNote:
    """A client-state object of a class no loader knows (pickled as `__main__.TrainingNote`)."""

    step: int
    text: str


def save_with_deepspeed(stage: int, work_dir: Path) -> Path:
    import deepspeed
    from mmengine.logging import MessageHub

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no C++ build on CPU
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("LOCAL_RANK", "0")
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    model = xtuner_style_source()
    model.__class__ = XtunerStyleDeepGen
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    hub = MessageHub.get_instance("sft")
    hub.update_scalar("train/loss", 0.125)
    hub.update_info("iter", 5)
    client_state = {
        "meta": {"iter": 5, "epoch": 0, "seed": 0},
        "message_hub": hub.state_dict(),
        "note": TrainingNote(5, "made by the test"),
    }
    engine.save_checkpoint(str(work_dir), tag=TAG, client_state=client_state, save_latest=False)
    (work_dir / "last_checkpoint").write_text(str(work_dir / TAG))
    torch.distributed.destroy_process_group()
    return work_dir / TAG


if __name__ == "__main__":
    save_with_deepspeed(int(sys.argv[1]), Path(sys.argv[2]))
