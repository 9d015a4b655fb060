"""A tiny DeepGen built in code: the real classes with a few layers each, for tests and the CPU demo.

No hub access is needed: the tokenizer is a byte-level BPE trained here on a fixed corpus (with the
Qwen special tokens), and every model is initialised from a seed. Sizes: Qwen2.5-VL with 4 text
layers of width 64 (and a 1-block vision tower), SCB fusing 3 layers into a 2-layer width-32
encoder, 8 think tokens, a 2-layer SD3 DiT (one dual-attention block, like SD3.5) on 8×8 latents
with 4 channels, and an 8× AutoencoderKL: 64×64 images.

`save_tiny_pretrained` writes the same model as HF-format folders (an SD3-style folder with
transformer/ vae/ scheduler/ and a Qwen folder with the tokenizer) plus `TINY_CHECKPOINT_NAME`
holding the DeepGen-only weights, so `loading.load_deepgen` can be tested on the real loading path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from deepgen_trainer.model.connector import ConnectorConfig
from deepgen_trainer.model.deepgen import DEEPGEN_ONLY_PREFIXES, DeepGen, DeepGenConfig

TINY_IMAGE_SIZE = 64
TINY_CHECKPOINT_NAME = "deepgen_tiny.safetensors"

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_CORPUS = (
    "user\nGenerate an image: a photo of a red cat sitting on a blue mat",
    "assistant\nA sign that says OPEN in bold letters, a dog, a bicycle, two apples and a tree.",
    "A watercolor painting of mountains at sunset with a lake, birds and the text HELLO WORLD.",
)


def tiny_config() -> DeepGenConfig:
    """The DeepGen-only part of the tiny preset: 8 think tokens, 3 fused layers, 2-layer encoder."""
    return DeepGenConfig(
        num_queries=8,
        fused_layers=3,
        layer_stride=1,
        connector=ConnectorConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    )


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE (vocab ≤ 384) with the Qwen special tokens at ids 0..6; pad = <|endoftext|>."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    roles = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}  # Qwen2.5-VL's chat roles
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, padding_side="left", **roles)


def build_tiny(seed: int = 0) -> DeepGen:
    """A tiny random DeepGen in float32 on CPU; the same seed gives the same weights.

    Unlike the SFT initialisation (zero output projectors, i.e. zero conditioning), the tiny model's
    projectors are random so that tests see prompt-dependent conditioning.
    """
    tokenizer = build_tiny_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    lmm_config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "max_window_layers": 4,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    lmm_config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lmm = Qwen2_5_VLForConditionalGeneration(lmm_config).eval()
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=16,
            pooled_projection_dim=32,
            out_channels=4,
            pos_embed_max_size=16,
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=TINY_IMAGE_SIZE,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ).eval()
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        model = DeepGen(lmm, transformer, vae, scheduler, tokenizer, tiny_config())
        for proj in (model.projector_2, model.projector_3):
            torch.nn.init.normal_(proj.weight, std=0.2)
            torch.nn.init.normal_(proj.bias, std=0.02)
    return model


def save_tiny_pretrained(directory: str | Path, model: DeepGen | None = None, seed: int = 0) -> tuple[Path, Path]:
    """Write a tiny DeepGen (`model`, or `build_tiny(seed)`) as HF-format folders under `directory`.

    Layout: `sd3/{transformer,vae,scheduler}/` (diffusers), `qwen/` (transformers model + tokenizer)
    and `TINY_CHECKPOINT_NAME` (safetensors with the DeepGen-only weights: think tokens, projectors,
    connector), which is what `load_deepgen(..., checkpoint=...)` expects on top of the folders.

    Returns:
        (sd3_path, qwen_path).
    """
    directory = Path(directory)
    model = model if model is not None else build_tiny(seed)
    sd3_path, qwen_path = directory / "sd3", directory / "qwen"
    model.transformer.save_pretrained(sd3_path / "transformer")
    model.vae.save_pretrained(sd3_path / "vae")
    model.scheduler.save_pretrained(sd3_path / "scheduler")
    model.lmm.save_pretrained(qwen_path)
    model.tokenizer.save_pretrained(qwen_path)
    own = {k: v.contiguous() for k, v in model.state_dict().items() if k.startswith(DEEPGEN_ONLY_PREFIXES)}
    save_file(own, str(directory / TINY_CHECKPOINT_NAME))
    return sd3_path, qwen_path
