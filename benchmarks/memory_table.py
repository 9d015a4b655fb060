"""`python benchmarks/memory_table.py`: GPU memory of the default training step, item by item, on 1 and on
8 GPUs, counted with torch on the meta device (nothing is allocated: DeepGen at its real size, as bench-gpu builds it).

Weights and optimizer state are the module's parameter bytes; ZeRO-2 partitions the float32 master weights,
the Adam moments and the float32 gradient accumulation over the ranks. Activations of one training
micro-batch are the bytes autograd saves for backward (`saved_tensors_hooks`, parameters left out) in the
DiT's forward with gradient checkpointing, plus one block recomputed in backward (SDPA on meta saves what
its math kernel saves, the attention matrix among it: an upper bound for flash). What meta cannot count,
and `make gpu-smoke` measures on a GPU: the VAE decode's working memory, the rollout's transient
activations, the CUDA context, NCCL buffers and the allocator's fragmentation.

Usage: python benchmarks/memory_table.py [--gpus 1,8] [--micro_batch 8] [--image_size 512]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `benchmarks.bench_gpu` when run as a script

from benchmarks.real_size import CLIP_TEXT_LAYERS, CLIP_VISION_LAYERS, build_deepgen, model_shape  # noqa: E402
from deepgen_trainer.model.deepgen import DeepGen  # noqa: E402

GIB = 2**30
META = torch.device("meta")
# CLIP ViT-L/14 (clip_sim): 123 M text + 304 M vision + projections.
CLIP_PARAMS = 427_616_513
PROMPT_TOKENS = 48  # a templated benchmark prompt, before the 128 think tokens
QWEN_VOCAB = 151_936  # Qwen2.5-VL's vocabulary: the model built here has the tiny tokenizer's (tied embeddings)
REDUCE_BUCKET = 500_000_000  # zero2.json's reduce_bucket_size (elements, bf16)


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def saved_activation_bytes(model: DeepGen, micro_batch: int, image_size: int, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward in one training forward of the DiT (parameters and their views left out)."""
    params = {id(p) for p in model.transformer.parameters()}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        base = t._base if t._base is not None else t
        if id(base) not in params and id(t) not in params:
            total += t.numel() * t.element_size()
        return t

    model.set_gradient_checkpointing(checkpointing)
    model.transformer.train()
    dit = model.transformer
    tokens = PROMPT_TOKENS + model.config.num_queries
    latents = torch.zeros((micro_batch, *model.latent_shape(image_size, image_size)), device=META)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dit(
            hidden_states=latents.to(dit.dtype),
            encoder_hidden_states=torch.zeros(micro_batch, tokens, dit.config.joint_attention_dim, device=META).to(
                dit.dtype
            ),
            pooled_projections=torch.zeros(micro_batch, dit.config.pooled_projection_dim, device=META).to(dit.dtype),
            timestep=torch.full((micro_batch,), 500.0, device=META),
            return_dict=False,
        )
    model.transformer.eval()
    return total


def items(model: DeepGen, world_size: int, micro_batch: int, image_size: int) -> list[tuple[str, float]]:
    """(item, GiB per GPU) of the default step (bf16, ZeRO-2, KL reference, CLIP, gradient checkpointing)."""
    trainable = sum(p.numel() for p in model.trainable_parameters())
    dit = parameter_bytes(model.transformer)
    visual = parameter_bytes(model.lmm.model.visual)
    frozen_rest = (
        sum(parameter_bytes(m) for m in (model.projector_1, model.connector, model.projector_2, model.projector_3))
        + model.meta_queries.numel() * model.meta_queries.element_size()
    )
    text = model.lmm.config.text_config
    vocab_extra = (QWEN_VOCAB - text.vocab_size) * text.hidden_size * 2
    checkpointed = saved_activation_bytes(model, micro_batch, image_size, checkpointing=True)
    full = saved_activation_bytes(model, micro_batch, image_size, checkpointing=False)
    one_block = full / model.transformer.config.num_layers
    return [
        ("DiT weights (bf16)", dit / GIB),
        ("KL reference DiT (bf16, --beta > 0)", dit / GIB),
        (
            "VLM text model (bf16; the vision tower stays on the CPU)",
            (parameter_bytes(model.lmm) - visual + vocab_extra) / GIB,
        ),
        ("SCB connector + projectors + think tokens (bf16)", frozen_rest / GIB),
        ("VAE (bf16)", parameter_bytes(model.vae) / GIB),
        ("CLIP ViT-L/14 for clip_sim (bf16)", CLIP_PARAMS * 2 / GIB),
        ("float32 master weights (ZeRO-2: 1/W)", trainable * 4 / world_size / GIB),
        ("Adam moments, float32 (ZeRO-2: 1/W)", trainable * 8 / world_size / GIB),
        ("float32 gradient accumulation (ZeRO-2: 1/W)", trainable * 4 / world_size / GIB),
        ("bf16 gradients in flight (one reduce bucket)", min(REDUCE_BUCKET, trainable) * 2 / GIB),
        (f"activations, {micro_batch} images (checkpointed block inputs)", checkpointed / GIB),
        ("activations, one block recomputed in backward", one_block / GIB),
    ]


def table(model: DeepGen, sizes: list[int], micro_batch: int, image_size: int) -> str:
    per_size = {w: items(model, w, micro_batch, image_size) for w in sizes}
    names = [name for name, _ in per_size[sizes[0]]]
    head = "| item | " + " | ".join(f"{w} GPU{'s' if w > 1 else ''} (GiB/GPU)" for w in sizes) + " |"
    lines = [head, "|---|" + "---:|" * len(sizes)]
    for i, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(f"{per_size[w][i][1]:.1f}" for w in sizes) + " |")
    totals = [sum(v for _, v in per_size[w]) for w in sizes]
    lines.append("| **total counted** | " + " | ".join(f"**{t:.1f}**" for t in totals) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", default="1,8", help="world sizes, comma-separated")
    parser.add_argument("--micro_batch", type=int, default=8, help="--atrain_micro_batch_size")
    parser.add_argument("--image_size", type=int, default=512)
    parser.add_argument("--depth", type=int, default=None, help="layers per stack (default: DeepGen's real depth)")
    args = parser.parse_args(argv)
    model = build_deepgen(model_shape(args.depth), args.depth, META, torch.bfloat16)
    out = table(model, [int(s) for s in args.gpus.split(",")], args.micro_batch, args.image_size)
    print(out)
    return out


assert (CLIP_TEXT_LAYERS, CLIP_VISION_LAYERS) == (12, 24)  # CLIP_PARAMS is ViT-L/14's

if __name__ == "__main__":
    main()
