"""The analytic FLOP model of benchmarks/flops.py: each part against torch's FlopCounterMode on small
real modules (meta device), and the step total's bookkeeping."""

from __future__ import annotations

import dataclasses

import pytest

from benchmarks.flops import (
    DeepGenShape,
    DitShape,
    StepShape,
    VaeShape,
    VlmShape,
    check_against_flop_counter,
    dit_forward_flops,
    model_flops,
    step_flops,
    utilisation,
)
from deepgen_trainer.config import TrainConfig
from deepgen_trainer.model.connector import ConnectorConfig
from deepgen_trainer.model.deepgen import DeepGenConfig

# The tiny DeepGen of deepgen_trainer.model.tiny (one dual-attention block of two), and a variant with three
# plain MMDiT blocks, wider heads and a caption projection from a wider joint dim.
TINY = DeepGenShape(
    dit=DitShape(
        in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=8,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, dual_attention_layers=(0,),
        sample_size=8, pos_embed_max_size=16,
    ),
    vlm=VlmShape(
        num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
    ),
    vae=VaeShape(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4),
    deepgen=DeepGenConfig(
        num_queries=8, fused_layers=3, layer_stride=1,
        connector=ConnectorConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    ),
)  # fmt: skip
PLAIN = dataclasses.replace(
    TINY,
    dit=dataclasses.replace(
        TINY.dit, num_layers=3, num_attention_heads=3, attention_head_dim=16, caption_projection_dim=48,
        joint_attention_dim=40, dual_attention_layers=(), qk_norm=None,
    ),
    vae=dataclasses.replace(TINY.vae, block_out_channels=(8, 16, 16, 32), layers_per_block=2, use_quant_conv=True),
)  # fmt: skip


@pytest.mark.parametrize(
    ("shape", "step"),
    [
        (TINY, StepShape(image_height=64, image_width=64, prompt_tokens=5)),
        (TINY, StepShape(image_height=96, image_width=64, prompt_tokens=1)),
        (PLAIN, StepShape(image_height=64, image_width=128, prompt_tokens=12)),
    ],
)
def test_every_analytic_count_equals_the_flop_counter_on_the_real_modules(shape: DeepGenShape, step: StepShape):
    for part, analytic, counted in check_against_flop_counter(step, shape):
        assert analytic == pytest.approx(counted, rel=0.01), part


def test_dit_forward_hand_count_of_one_plain_block():
    # One block that is also the last (context_pre_only), width d = 4, patch 1, 1 channel, N = 2 image
    # tokens, L = 3 text tokens, joint dim 5, pooled 6:
    #   embed  = patch 2·2·1·4 + timestep 2·(256·4 + 16) + pooled 2·(6·4 + 16) + context 2·3·5·4 = 16 + 2080 + 80 + 120
    #   adaLN  = 2·4·24 (image, 6d) + 2·4·8 (text, continuous 2d) = 192 + 64
    #   image  = 2·2·16·12 = 768 (q, k, v, out, MLP 8d²); text = 2·3·16·3 = 288 (q, k, v only)
    #   joint  = 4·(2 + 3)²·4 = 400; output = 2·4·8 + 2·2·4·1 = 64 + 16
    shape = DitShape(
        patch_size=1, in_channels=1, out_channels=1, num_layers=1, num_attention_heads=1, attention_head_dim=4,
        joint_attention_dim=5, caption_projection_dim=4, pooled_projection_dim=6, dual_attention_layers=(),
    )  # fmt: skip
    parts = dit_forward_flops(shape, image_tokens=2, text_tokens=3)
    assert parts["embed"] == 16 + 2080 + 80 + 120
    assert parts["blocks: adaLN"] == 192 + 64
    assert parts["blocks: image linears"] == 768
    assert parts["blocks: text linears"] == 288
    assert parts["blocks: joint attention"] == 400
    assert parts["blocks: image attention (attn2)"] == 0
    assert parts["output"] == 80


def test_the_step_total_is_the_sum_of_its_parts():
    step = StepShape()
    parts = step_flops(step)
    recompute = parts["update: recompute (checkpointing)"] + parts["sft: recompute (checkpointing)"]
    assert model_flops(parts) == sum(parts.values()) - recompute
    fwd = sum(dit_forward_flops(DitShape(), 1024, 32 + 128).values())
    assert parts["rollout: DiT forward"] == 50 * 32 * fwd
    assert parts["update: DiT forward"] == parts["update: reference DiT forward"] == 30 * 32 * fwd
    assert parts["update: DiT backward"] == 2 * parts["update: DiT forward"]
    assert 0 < parts["update: recompute (checkpointing)"] < parts["update: DiT forward"]


IMAGE_PARTS = (
    "rollout: DiT forward",
    "rollout: VAE decode",
    "update: DiT forward",
    "update: DiT backward",
    "update: recompute (checkpointing)",
    "update: reference DiT forward",
)


def test_doubling_the_images_per_prompt_doubles_the_image_parts_only():
    one, two = step_flops(StepShape(rollout_n=8)), step_flops(StepShape(rollout_n=16))
    for name in one:
        expected = 2 * one[name] if name in IMAGE_PARTS else one[name]
        assert two[name] == expected, name


def test_doubling_the_prompts_also_doubles_their_conditioning():
    one, two = step_flops(StepShape(prompts=4)), step_flops(StepShape(prompts=8))
    for name in one:
        expected = 2 * one[name] if name in IMAGE_PARTS or name.startswith("conditioning") else one[name]
        assert two[name] == expected, name


def test_switches_remove_or_double_their_parts():
    base = step_flops(StepShape())
    assert step_flops(StepShape(beta=0.0))["update: reference DiT forward"] == 0
    no_ckpt = step_flops(StepShape(gradient_checkpointing=False))
    assert no_ckpt["update: recompute (checkpointing)"] == no_ckpt["sft: recompute (checkpointing)"] == 0
    assert all(v == 0 for k, v in step_flops(StepShape(sftaux_batch=0)).items() if k.startswith("sft"))
    guided = step_flops(StepShape(cfg_scale=4.0))
    for name in (*IMAGE_PARTS[2:], "rollout: DiT forward"):
        assert guided[name] == 2 * base[name], name


def test_the_default_step_is_the_trainer_default_config():
    assert StepShape.from_train_config(TrainConfig()) == StepShape()
    assert StepShape.from_train_config(TrainConfig(), sftaux=False).sftaux_batch == 0


def test_utilisation_is_flops_over_time_times_peak():
    assert utilisation(989e12 * 10, 20.0, 989e12) == pytest.approx(0.5)
