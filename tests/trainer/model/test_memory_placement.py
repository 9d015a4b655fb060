"""What keeps the default step's memory down: the VAE decodes and encodes `vae_batch_size` images per call,
and the VLM's vision tower (never used by text prompts) stays on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from deepgen_trainer.config import ConfigError, parse_args
from deepgen_trainer.model.deepgen import DeepGen
from deepgen_trainer.model.tiny import TINY_IMAGE_SIZE, build_tiny


@pytest.fixture(scope="module")
def model() -> DeepGen:
    return build_tiny(seed=0)


def vae_batches(model: DeepGen, method: str, call) -> list[int]:
    sizes: list[int] = []
    original = getattr(model.vae, method)

    def counting(x, *args, **kwargs):
        sizes.append(x.shape[0])
        return original(x, *args, **kwargs)

    setattr(model.vae, method, counting)
    try:
        call()
    finally:
        delattr(model.vae, method)  # back to the class's method
    return sizes


def test_decode_and_encode_in_chunks_of_vae_batch_size(model: DeepGen) -> None:
    latents = torch.randn(
        5, *model.latent_shape(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), generator=torch.Generator().manual_seed(0)
    )
    model.vae_batch_size = 32
    whole = model.decode(latents)
    model.vae_batch_size = 2
    try:
        chunked: list[torch.Tensor] = []
        assert vae_batches(model, "decode", lambda: chunked.append(model.decode(latents))) == [2, 2, 1]
        assert_close(chunked[0], whole)  # the VAE decodes each image on its own: chunks change nothing
        encoded: list[torch.Tensor] = []
        call = lambda: encoded.append(model.encode_images(whole, torch.Generator().manual_seed(1)))  # noqa: E731
        assert vae_batches(model, "encode", call) == [2, 2, 1]
        assert encoded[0].shape == latents.shape
    finally:
        model.vae_batch_size = 8


def test_vae_batch_size_flag() -> None:
    assert parse_args(["--model", "tiny"], environ={}).vae_batch_size == 8
    with pytest.raises(ConfigError, match="--vae_batch_size must be >= 1"):
        parse_args(["--model", "tiny", "--vae_batch_size", "0"], environ={})


def test_place_keeps_the_vision_tower_on_the_cpu() -> None:
    model = build_tiny(seed=0).place("meta")  # the meta device stands in for the GPU: nothing is allocated
    visual = model.lmm.model.visual
    assert {p.device.type for p in visual.parameters()} == {"cpu"}
    others = [p for name, p in model.named_parameters() if ".visual." not in f".{name}"]
    assert {p.device.type for p in others} == {"meta"}
    assert model.device.type == "meta"
    # A model built on the accelerator (as bench-gpu builds it) gets its vision tower moved to the CPU.
    built_elsewhere = build_tiny(seed=0)
    visual = built_elsewhere.lmm.model.visual
    moves: list[object] = []
    visual.to = lambda device: moves.append(device) or visual  # records where `place` sends it
    built_elsewhere.place("cpu")
    assert moves == ["cpu"]


def test_text_prompts_encode_with_the_vision_tower_elsewhere() -> None:
    model = build_tiny(seed=0)
    before = model.encode_prompts(["a red cat"]).prompt_embeds
    model.lmm.model.visual.to(torch.float64)  # a stand-in for "not where the text model is": it is never used
    assert_close(model.encode_prompts(["a red cat"]).prompt_embeds, before)
