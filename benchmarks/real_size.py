"""DeepGen 1.0 at its real size with random weights, built in code: the model of `make bench-gpu`,
`make gpu-smoke` and the memory table (`benchmarks/memory_table.py`).

The shapes are those of benchmarks/flops.py (Qwen2.5-VL-3B with its vision tower, the SCB connector, the
SD3.5-Medium 2B MMDiT, the SD3 VAE; a byte-level BPE tokenizer built here), so nothing is downloaded and
the FLOP count matches what runs; `depth` keeps the real widths with that many layers in every stack.
`write_random_clip` writes a CLIP ViT-L/14 of random weights as the HF folder clip_sim loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

from benchmarks.flops import DeepGenShape, _mrope_section
from deepgen_trainer.model.deepgen import DeepGen
from deepgen_trainer.model.tiny import QWEN_SPECIAL_TOKENS, build_tiny_tokenizer
from deepgen_trainer.rewards.clip_sim import ClipSimReward, build_tiny_clip

# Qwen2.5-VL-3B's vision tower (its output width is the text model's) and CLIP ViT-L/14.
VISION_DEPTH, VISION_FULL_ATTENTION = 32, (7, 15, 23, 31)
CLIP_TEXT_LAYERS, CLIP_VISION_LAYERS = 12, 24


def model_shape(depth: int | None = None) -> DeepGenShape:
    """DeepGen 1.0's shapes (flops.py defaults), or the real widths with `depth` (>= 2) layers in every stack."""
    shape = DeepGenShape()
    if depth is None:
        return shape
    if depth < 2:
        raise SystemExit(f"--depth {depth}: the connector fuses VLM layers below the last one; pass --depth 2 or more")
    dit = dataclasses.replace(
        shape.dit,
        num_layers=depth,
        dual_attention_layers=tuple(i for i in shape.dit.dual_attention_layers if i < depth),
    )
    vlm = dataclasses.replace(shape.vlm, num_hidden_layers=depth)
    connector = dataclasses.replace(shape.deepgen.connector, num_hidden_layers=depth)
    deepgen = dataclasses.replace(
        # SCB fuses hidden states from the second-to-last layer down: at most depth - 1 of them.
        shape.deepgen,
        fused_layers=min(shape.deepgen.fused_layers, depth - 1),
        layer_stride=1,
        connector=connector,
    )
    return dataclasses.replace(shape, dit=dit, vlm=vlm, deepgen=deepgen)


@contextlib.contextmanager
def building_on(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules created inside get their parameters on `device` in `dtype` (random init there: no 20 GB
    float32 detour through host memory for the full model)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def build_deepgen(shape: DeepGenShape, depth: int | None, device: torch.device, dtype: torch.dtype) -> DeepGen:
    """DeepGen of `shape` with random weights, built on `device` in `dtype` (as `load_deepgen` loads it)."""
    tokenizer = build_tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    vlm = shape.vlm
    vision_depth = VISION_DEPTH if depth is None else depth
    lmm_config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": vlm.hidden_size,
            "intermediate_size": vlm.intermediate_size,
            "num_hidden_layers": vlm.num_hidden_layers,
            "num_attention_heads": vlm.num_attention_heads,
            "num_key_value_heads": vlm.num_key_value_heads,
            "max_position_embeddings": 32768,
            "max_window_layers": vlm.num_hidden_layers,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope_section(vlm)},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": vlm.hidden_size,
            "fullatt_block_indexes": [i for i in VISION_FULL_ATTENTION if i < vision_depth],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    lmm_config._attn_implementation = "sdpa"
    vae = shape.vae
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # float32 grid, CPU
    with building_on(device, dtype):
        lmm = Qwen2_5_VLForConditionalGeneration(lmm_config).eval()
        transformer = SD3Transformer2DModel(**shape.dit.kwargs())
        autoencoder = AutoencoderKL(**vae.kwargs(), scaling_factor=1.5305, shift_factor=0.0609).eval()
        return DeepGen(
            lmm,
            transformer,
            autoencoder,
            scheduler,
            tokenizer,
            shape.deepgen,
        )


def write_random_clip(path: Path, depth: int | None) -> Path:
    """A CLIP ViT-L/14 with random weights (`depth` layers per tower if given) as the HF folder
    `CLIP_MODEL_NAME_OR_PATH` points at; the tokenizer is the tiny CLIP's, built in code."""
    tokenizer = build_tiny_clip().tokenizer
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": CLIP_TEXT_LAYERS if depth is None else depth,
            "num_attention_heads": 12,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": CLIP_VISION_LAYERS if depth is None else depth,
            "num_attention_heads": 16,
            "image_size": 224,
            "patch_size": 14,
        },
        projection_dim=768,
    )
    ClipSimReward(CLIPModel(config), tokenizer, CLIPImageProcessorPil()).save_pretrained(path)
    return path
