"""The ``clip_sim`` reward: text-image cosine similarity of CLIP's projected embeddings.

Both embeddings are L2-normalised and their dot product is returned as is (no logit scale, no
softmax), so a score lies in [−1, 1] and does not depend on the other samples of the batch. The
model is small (CLIP ViT-L/14 in production) and runs in-process on the training GPU, in inference
mode, from an HF folder (``CLIP_MODEL_NAME_OR_PATH``): ``CLIPModel`` + its tokenizer + its image
processor. `build_tiny_clip` makes a random model of the same classes, with a tokenizer built in
code, for tests and the CPU demo; `ClipSimReward.save_pretrained` writes it as an HF folder that
`ClipSimReward.from_pretrained` loads back through the same path as the real model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import pre_tokenizers
from torch import Tensor
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

Images = Tensor | Sequence[Image.Image]
"""uint8 (B, H, W, 3) RGB tensor (any device), or a sequence of B PIL images."""


class ClipSimReward:
    """CLIP text-image cosine, batched, without gradients.

    Image preprocessing is the model's own image processor (resize, centre crop, normalise) on the
    CPU, so scores match the reference CLIP pipeline; only the encoders run on ``device``.
    """

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: CLIPTokenizer,
        image_processor: CLIPImageProcessorPil,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> ClipSimReward:
        """Load model, tokenizer and image processor from a local HF folder (``CLIP_MODEL_NAME_OR_PATH``)."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is not a CLIP model folder (no config.json); set CLIP_MODEL_NAME_OR_PATH to a local "
                "copy of e.g. openai/clip-vit-large-patch14"
            )
        model = CLIPModel.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        # The PIL preprocessing (CLIP's own): the same scores whether or not torchvision is installed.
        image_processor = CLIPImageProcessorPil.from_pretrained(path)
        return cls(model, tokenizer, image_processor, device=device, batch_size=batch_size)

    def save_pretrained(self, path: str | Path) -> None:
        """Write model, tokenizer and image processor as an HF folder `from_pretrained` reads."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    @torch.inference_mode()
    def __call__(self, images: Images, prompts: Sequence[str]) -> Tensor:
        """Cosine of each image with its own prompt: (B,) float32 on the CPU, in [−1, 1].

        Args:
            images: uint8 (B, H, W, 3) RGB tensor or B PIL images.
            prompts: B strings (truncated to the text encoder's context length).
        """
        pil = _to_pil(images)
        if len(pil) != len(prompts):
            raise ValueError(f"got {len(pil)} images but {len(prompts)} prompts; pass one prompt per image")
        scores = [
            self._score_batch(pil[i : i + self.batch_size], list(prompts[i : i + self.batch_size]))
            for i in range(0, len(pil), self.batch_size)
        ]
        return torch.cat(scores) if scores else torch.zeros(0)

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> Tensor:
        text = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, self.model.dtype)
        text_emb = self.model.get_text_features(
            input_ids=text["input_ids"], attention_mask=text["attention_mask"]
        ).pooler_output
        image_emb = self.model.get_image_features(pixel_values=pixels).pooler_output
        # Normalise in fp32: bf16 norms of 768-d vectors are off by ~1e-2, more than score differences.
        text_emb = torch.nn.functional.normalize(text_emb.float(), dim=-1)
        image_emb = torch.nn.functional.normalize(image_emb.float(), dim=-1)
        return (text_emb * image_emb).sum(dim=-1).clamp(-1.0, 1.0).cpu()


def _to_pil(images: Images) -> list[Image.Image]:
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
            raise ValueError(
                f"images must be a uint8 (B, H, W, 3) tensor, got {images.dtype} of shape {tuple(images.shape)}"
            )
        array = images.cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(a)) for a in array]
    return [im if im.mode == "RGB" else im.convert("RGB") for im in images]


def build_tiny_clip(seed: int = 0, image_size: int = 32, device: str | torch.device = "cpu") -> ClipSimReward:
    """A random CLIP of the production classes (width 32, 2 layers per tower, patch 8) with a
    character-level CLIP BPE tokenizer built in code: no network, no files needed."""
    tokenizer = _tiny_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,  # the pooled token is the first EOS
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return ClipSimReward(model, tokenizer, image_processor, device=device)


def _tiny_tokenizer() -> CLIPTokenizer:
    """CLIP's byte-level BPE with no merges: every byte is a token (with and without the
    end-of-word marker), plus CLIP's start/end tokens; 514 ids, end-of-text the largest as in CLIP."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
