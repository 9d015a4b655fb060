"""Build a tiny random Qwen2-VL model folder offline, for a real vLLM server in tests.

Run with the vLLM virtual environment (it has torch, transformers and tokenizers):

    .venv-vllm/bin/python tests/judges/tiny_qwen2vl.py OUT_DIR

The folder is what vLLM loads for `Qwen2VLForConditionalGeneration`: config.json, model.safetensors (seeded
random weights, float32, about 0.4 M parameters), a byte-level BPE tokenizer with the Qwen special tokens,
the Qwen2-VL chat template, the image and video processor configs and a generation config. Nothing is
downloaded. The weights are random, so answers are noise unless a request constrains them
(`"structured_outputs": {"regex": ...}`); that is enough to test the adapters' transport, parsing and
error handling against the real server.

Sizes are chosen for vLLM's CPU backend: text head_dim 32 (CPU attention supports 32, 64, 80, ...),
mrope sections summing to head_dim / 2, vision head_dim 32; images are resized to at most 112 x 112
pixels, i.e. at most 16 image tokens each, so a two-image judge prompt is mostly text.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AddedToken,
    GenerationConfig,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

SEED = 0
BPE_VOCAB_SIZE = 640  # 256 byte symbols + merges learned from CORPUS
PATCH = 14
MERGE = 2
MIN_PIXELS = (PATCH * MERGE) ** 2 * 4  # 56 x 56: 4 image tokens
MAX_PIXELS = (PATCH * MERGE) ** 2 * 16  # 112 x 112: 16 image tokens

# Qwen2's pre-tokenizer split (tokenization_qwen2.PRETOKENIZE_REGEX).
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Special tokens in Qwen2-VL's order (there they start at id 151643; here right after the BPE vocabulary).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen/Qwen2-VL-7B-Instruct's chat template.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the BPE merges are learned from: the words judge prompts and answers use, so prompts of a few
# thousand characters stay well inside the context. Any text works; this one is fixed for determinism.
CORPUS = """
You are a helpful assistant. You are given a text caption and two generated images based on that caption.
Your task is to evaluate and compare these images based on two key criteria: alignment with the caption,
and overall image quality, including coherence, style, aesthetics, detail and realism.
Please analyze each image step by step and provide the reasoning process before the final answer.
<think> The first image shows the object described in the prompt. The second image does not. </think>
<answer>Image 1 is better</answer> <answer>Image 2 is better</answer>
Alignment Score (1-5): 4. Coherence Score (1-5): 3. Style Score (1-5): 5. Final Score: 4.
<analysis> The image matches the prompt in color, count, position and text rendering. </analysis>
<score>[1, 0, 1, 1]</score> Testpoints: Attribute - Color, Entity - Count, Layout - Position, Text - Rendering.
Testpoint Description: whether the generated image correctly shows the attributes, actions, relations,
logical reasoning, grammar, world knowledge, style and layout that the prompt asks for.
A photo of a red cat sitting on a blue chair next to a window, with the words "Hello World" on a sign.
The quick brown fox jumps over the lazy dog. 0123456789 the of and to in is it that for on with as was.
"""


def build_tokenizer() -> Qwen2Tokenizer:
    """A byte-level BPE like Qwen2's (same split regex, NFC, byte-level), with the Qwen special tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([CORPUS] * 4, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(state["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)

    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    for token in SPECIAL_TOKENS:
        if tokenizer.convert_tokens_to_ids(token) != vocab[token]:
            raise RuntimeError(
                f"special token {token} got id {tokenizer.convert_tokens_to_ids(token)}, not {vocab[token]}"
            )
    return tokenizer


def build_config(tokenizer: Qwen2Tokenizer) -> Qwen2VLConfig:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,  # head_dim 32: the smallest head size vLLM's CPU attention supports
        "num_key_value_heads": 1,
        "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": False,
    }
    vision_config = {
        "depth": 2,
        "embed_dim": 64,
        "num_heads": 2,
        "mlp_ratio": 2,
        "hidden_size": 64,  # merger output = text hidden size
        "in_channels": 3,
        "patch_size": PATCH,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": 2,
    }
    return Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )


def build(out_dir: Path) -> None:
    """Write the model folder to out_dir (created; existing files are overwritten)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    tokenizer = build_tokenizer()
    config = build_config(tokenizer)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
    model.save_pretrained(out_dir)

    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(size=size, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)

    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=eos,
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
    ).save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    logging.getLogger(__name__).info(
        "tiny Qwen2-VL: %d parameters, vocab %d, written to %s", n_params, len(tokenizer), out_dir
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="model folder to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build(args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
