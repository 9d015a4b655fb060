"""deepgen_trainer.model.deepgen on the tiny preset: conditioning, velocity and CFG, freezing, VAE, sigma grid."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from deepgen_trainer.model.deepgen import NEGATIVE_PROMPT, Conditioning, DeepGen, to_uint8
from deepgen_trainer.model.tiny import TINY_IMAGE_SIZE, build_tiny

SHORT = "a red cat"
LONG = "a watercolor painting of mountains at sunset with a lake, birds and the text HELLO WORLD"


@pytest.fixture(scope="module")
def model() -> DeepGen:
    return build_tiny(seed=0)


def latents(model: DeepGen, batch: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *model.latent_shape(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), generator=generator)


def test_build_tiny_is_deterministic(model: DeepGen) -> None:
    other = build_tiny(seed=0)
    for (name, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(
        build_tiny(seed=1).transformer.pos_embed.proj.weight, model.transformer.pos_embed.proj.weight
    )


def test_conditioning_does_not_depend_on_batch_padding(model: DeepGen) -> None:
    alone = model.encode_prompts([SHORT])
    batched = model.encode_prompts([SHORT, LONG, LONG + " again"])
    length = alone.prompt_embeds.shape[1]
    pad = batched.prompt_embeds.shape[1] - length
    assert pad > 0, "the long prompt must force padding of the short one"
    # Left padding: the short prompt's real tokens are the last `length` positions of its row.
    assert not batched.mask[0, :pad].any()
    assert batched.mask[0, pad:].all()
    assert_close(batched.prompt_embeds[0, pad:], alone.prompt_embeds[0])
    assert_close(batched.pooled[0], alone.pooled[0])
    assert torch.count_nonzero(batched.prompt_embeds[0, :pad]) == 0
    # The DiT masks the pads too, so the sample's velocity is the same in either batch.
    x = latents(model, 3)
    with torch.no_grad():
        v_batched = model.velocity(x, 0.6, batched)
        v_alone = model.velocity(x[:1], 0.6, alone)
    assert_close(v_batched[:1], v_alone, rtol=1e-5, atol=1e-5)


def test_conditioning_depends_on_prompt_and_includes_think_tokens(model: DeepGen) -> None:
    cond = model.encode_prompts([SHORT, LONG, NEGATIVE_PROMPT])
    assert cond.prompt_embeds.shape[0] == 3
    assert cond.prompt_embeds.shape[2] == model.transformer.config.joint_attention_dim
    assert cond.pooled.shape == (3, model.transformer.config.pooled_projection_dim)
    assert cond.mask.dtype == torch.bool
    assert cond.mask[:, -model.config.num_queries :].all()
    assert not torch.allclose(cond.pooled[0], cond.pooled[1])
    assert torch.isfinite(cond.prompt_embeds).all()


def test_conditioning_cat_left_pads_and_repeats() -> None:
    a = Conditioning(torch.ones(1, 2, 3), torch.ones(1, 4), torch.ones(1, 2, dtype=torch.bool))
    b = Conditioning(torch.full((2, 3, 3), 2.0), torch.full((2, 4), 2.0), torch.ones(2, 3, dtype=torch.bool))
    both = Conditioning.cat([a, b])
    assert both.prompt_embeds.shape == (3, 3, 3)
    assert both.mask.tolist()[0] == [False, True, True]
    assert torch.equal(both.prompt_embeds[0, 0], torch.zeros(3))
    grouped = a.repeat_interleave(4)
    assert len(grouped) == 4
    assert len(both[1]) == 1


def test_velocity_shapes_and_per_sample_sigma(model: DeepGen) -> None:
    cond = model.encode_prompts([SHORT, LONG])
    x = latents(model, 2)
    with torch.no_grad():
        v = model.velocity(x, torch.tensor([0.9, 0.3]), cond)
        v_first = model.velocity(x[:1], 0.9, cond[0])
    assert v.shape == x.shape
    assert v.dtype == x.dtype
    assert_close(v[:1], v_first, rtol=1e-5, atol=1e-5)
    # One conditioning row broadcasts over the batch (a GRPO group sharing one prompt).
    with torch.no_grad():
        v_shared = model.velocity(x, 0.5, cond[0])
        v_repeated = model.velocity(x, 0.5, cond[0].repeat_interleave(2))
    assert_close(v_shared, v_repeated)


def test_dit_timestep_is_sigma_times_1000(model: DeepGen) -> None:
    seen: list[torch.Tensor] = []
    handle = model.transformer.register_forward_pre_hook(
        lambda _module, _args, kwargs: seen.append(kwargs["timestep"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model.velocity(latents(model, 2), torch.tensor([0.25, 1.0]), model.encode_prompts([SHORT, LONG]))
    finally:
        handle.remove()
    assert_close(seen[0], torch.tensor([250.0, 1000.0]))


def test_cfg_scale_zero_is_the_conditional_velocity(model: DeepGen) -> None:
    cond, uncond = model.encode_prompts([LONG, SHORT]), model.encode_prompts([NEGATIVE_PROMPT])
    x = latents(model, 2)
    with torch.no_grad():
        assert_close(model.velocity(x, 0.4, cond, cfg_scale=0.0, uncond=uncond), model.velocity(x, 0.4, cond))


def test_cfg_matches_the_formula_on_two_separate_calls(model: DeepGen) -> None:
    cond, uncond = model.encode_prompts([LONG, SHORT]), model.encode_prompts([NEGATIVE_PROMPT])
    x, scale = latents(model, 2), 4.0
    with torch.no_grad():
        v_c = model.velocity(x, 0.7, cond)
        v_u = model.velocity(x, 0.7, uncond)
        guided = model.velocity(x, 0.7, cond, cfg_scale=scale, uncond=uncond)
    assert_close(guided, v_u + scale * (v_c - v_u), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(guided, v_c)


def test_cfg_argument_errors(model: DeepGen) -> None:
    cond, x = model.encode_prompts([SHORT]), latents(model, 1)
    with pytest.raises(ValueError, match="needs uncond"):
        model.velocity(x, 0.5, cond, cfg_scale=2.0)
    with pytest.raises(ValueError, match=">= 0"):
        model.velocity(x, 0.5, cond, cfg_scale=-1.0, uncond=cond)
    with pytest.raises(ValueError, match="rows"):
        model.velocity(latents(model, 3), 0.5, model.encode_prompts([SHORT, LONG]))


def test_only_the_dit_is_trainable_and_receives_gradients(model: DeepGen) -> None:
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(name.startswith("transformer.") for name in trainable)
    frozen_dit = {name for name, p in model.transformer.named_parameters() if not p.requires_grad}
    last = len(model.transformer.transformer_blocks) - 1  # context_pre_only: its context queries are unused
    assert frozen_dit == {
        f"transformer_blocks.{last}.attn.{name}"
        for name in ("add_q_proj.weight", "add_q_proj.bias", "norm_added_q.weight")
    }
    assert {id(p) for p in model.trainable_parameters()} == {
        id(p) for p in model.transformer.parameters() if p.requires_grad
    }

    model.zero_grad(set_to_none=True)
    cond = model.encode_prompts([SHORT, LONG])
    model.velocity(latents(model, 2), 0.5, cond).square().mean().backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trainable  # every trainable parameter gets a gradient, nothing else does
    model.zero_grad(set_to_none=True)


def test_gradient_checkpointing_gives_the_same_gradients(model: DeepGen) -> None:
    cond, x = model.encode_prompts([SHORT]), latents(model, 1)
    model.train()
    grads = []
    for enabled in (False, True):
        model.set_gradient_checkpointing(enabled)
        model.zero_grad(set_to_none=True)
        model.velocity(x, 0.5, cond).square().mean().backward()
        grads.append(model.transformer.pos_embed.proj.weight.grad.clone())
    model.set_gradient_checkpointing(False)
    model.eval()
    model.zero_grad(set_to_none=True)
    assert_close(grads[0], grads[1])


def test_train_mode_keeps_frozen_parts_in_eval(model: DeepGen) -> None:
    model.train()
    try:
        assert model.transformer.training
        assert not model.lmm.training
        assert not model.connector.training
        assert not model.vae.training
    finally:
        model.eval()
    assert not model.transformer.training


def test_decode_and_encode_shapes(model: DeepGen) -> None:
    x = latents(model, 2)
    images = model.decode(x)
    assert images.shape == (2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    assert images.dtype == torch.float32
    assert images.min() >= 0
    assert images.max() <= 1
    z = model.encode_images(images, generator=torch.Generator().manual_seed(0))
    assert z.shape == x.shape
    assert z.dtype == torch.float32
    as_bytes = to_uint8(images)
    assert as_bytes.shape == (2, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)
    assert as_bytes.dtype == torch.uint8


def test_latent_shape(model: DeepGen) -> None:
    assert model.latent_shape(64, 128) == (4, 8, 16)
    with pytest.raises(ValueError, match="multiples of 16"):
        model.latent_shape(72, 64)


def test_sigmas_grid(model: DeepGen) -> None:
    assert model.sigmas(1).tolist() == [1.0, 0.0]
    sigmas = model.sigmas(10)
    assert sigmas.shape == (11,)
    assert sigmas.dtype == torch.float32
    assert sigmas[0] == 1.0
    assert sigmas[-1] == 0.0
    assert (sigmas[1:] < sigmas[:-1]).all()
    # Shift 3 maps the uniform grid u to σ = 3u / (1 + 2u): the midpoints sit above u.
    u = torch.linspace(1.0, float(sigmas[-2]) / (3 - 2 * float(sigmas[-2])), 10)
    assert_close(sigmas[:-1], 3 * u / (1 + 2 * u))
