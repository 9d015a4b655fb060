"""What reaches the DiT in bf16: the timestep stays float32, and an unpadded batch gets no attention mask
(so SDPA may take its flash kernel) with the same outputs as the masked path."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from deepgen_trainer.model.deepgen import Conditioning, DeepGen
from deepgen_trainer.model.tiny import TINY_IMAGE_SIZE, build_tiny

PROMPTS = ["a red cat", "a watercolor painting of mountains at sunset with a lake"]


@pytest.fixture(scope="module")
def bf16_model() -> DeepGen:
    return build_tiny(seed=0).to(torch.bfloat16)


def latents(model: DeepGen, batch: int) -> torch.Tensor:
    shape = model.latent_shape(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))


def dit_kwargs(model: DeepGen, call) -> dict:
    """The keyword arguments of the DiT's forward during `call()`."""
    seen: list[dict] = []
    handle = model.transformer.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            call()
    finally:
        handle.remove()
    [kwargs] = seen
    return kwargs


def test_bf16_dit_gets_float32_timesteps_of_the_default_grid(bf16_model: DeepGen) -> None:
    sigmas = bf16_model.sigmas(50)[:-1]  # the default 50-step grid, the deterministic last step left out
    cond = bf16_model.encode_prompts(PROMPTS[:1]).repeat_interleave(len(sigmas))
    kwargs = dit_kwargs(bf16_model, lambda: bf16_model.velocity(latents(bf16_model, len(sigmas)), sigmas, cond))
    timestep = kwargs["timestep"]
    assert timestep.dtype == torch.float32
    assert torch.equal(timestep, sigmas * 1000.0)
    # What the bf16 cast did before: 28 of the 50 timesteps moved by more than 0.5, the worst by 1.94.
    moved = ((sigmas * 1000.0).to(torch.bfloat16).float() - sigmas * 1000.0).abs()
    assert int((moved > 0.5).sum()) == 28
    assert moved.max().item() == pytest.approx(1.94, abs=0.01)


def test_unpadded_batch_reaches_the_attention_without_a_mask(bf16_model: DeepGen) -> None:
    x = latents(bf16_model, 2)
    same_length = bf16_model.encode_prompts(PROMPTS[:1]).repeat_interleave(2)
    assert same_length.mask.all()
    kwargs = dit_kwargs(bf16_model, lambda: bf16_model.velocity(x, 0.7, same_length))
    assert kwargs["joint_attention_kwargs"]["encoder_attention_mask"] is None
    padded = bf16_model.encode_prompts(PROMPTS)
    assert not padded.mask.all()
    kwargs = dit_kwargs(bf16_model, lambda: bf16_model.velocity(x, 0.7, padded))
    assert torch.equal(kwargs["joint_attention_kwargs"]["encoder_attention_mask"], padded.mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_true_mask_and_no_mask_give_equal_outputs(dtype: torch.dtype) -> None:
    model = build_tiny(seed=0).to(dtype)
    cond = model.encode_prompts(PROMPTS[:1]).repeat_interleave(2)
    x = latents(model, 2).to(dtype)
    sigma = torch.full((2,), 0.7)

    def dit(mask: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            return model.transformer(
                hidden_states=x,
                encoder_hidden_states=cond.prompt_embeds.to(dtype),
                pooled_projections=cond.pooled.to(dtype),
                timestep=sigma * 1000.0,
                joint_attention_kwargs={"encoder_attention_mask": mask},
                return_dict=False,
            )[0]

    masked, unmasked = dit(cond.mask), dit(None)
    assert_close(unmasked, masked, rtol=0, atol=0) if dtype == torch.float32 else assert_close(unmasked, masked)
    # ... and through the model: the velocity of an unpadded batch is the masked computation's.
    assert_close(model.velocity(x.float(), sigma, cond).to(dtype), masked)


def test_padded_rows_still_match_their_unpadded_velocity(bf16_model: DeepGen) -> None:
    # The mask still applies where there is padding: a short prompt batched with a long one.
    x = latents(bf16_model, 2)
    both = bf16_model.encode_prompts(PROMPTS)
    alone = Conditioning.cat([bf16_model.encode_prompts(PROMPTS[:1])])
    with torch.no_grad():
        v_both = bf16_model.velocity(x, 0.5, both)
        v_alone = bf16_model.velocity(x[:1], 0.5, alone)
    assert_close(v_both[:1], v_alone, rtol=0.02, atol=0.02)
