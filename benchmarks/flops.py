"""FLOPs of one DeepGen MR-GRPO training step per GPU (the analytic count lives in
`deepgen_trainer.observe.flops`, which `--log_tflops` uses), checked against torch's FlopCounterMode
on the real architectures, and the MFU table.

Only matrix products are counted (2·m·n·k per matmul, 2·out·C_in·k² per convolution): linear layers,
attention scores and values (4·L²·d per layer, full L×L: what SDPA with a padding mask computes),
and VAE convolutions. Norms, activations and the SDE step are elementwise and left out (as
`torch.utils.flop_counter.FlopCounterMode` does, which `check_against_flop_counter` uses to verify
every analytic count on the real architectures instantiated on the meta device).

One default step on one GPU (`TrainConfig` defaults; SFT-aux on, as `make train` runs it):
- conditioning: Qwen2.5-VL-3B text forward + SCB connector, once per prompt (4 prompts);
- rollout: 50 DiT forwards per image (32 images, cfg_scale 0: one forward per step), VAE decode;
- update: 30 = int(50·0.6) trained steps per image: DiT forward, backward (2× forward), the forward
  recomputed by gradient checkpointing (the transformer blocks), and the frozen reference DiT's
  forward (beta > 0);
- SFT-aux: one batch of 32 image-caption pairs: VAE encode, VLM + connector per caption, DiT
  forward + backward + recompute.
Evaluation (every `--eval_freq` steps) is not part of a step and not counted.

MFU = model FLOPs per step / (step time × peak FLOP/s), model FLOPs excluding the recompute of
gradient checkpointing (PaLM's definition); with the recompute it is HFU (hardware FLOPs utilisation).

Usage: `python benchmarks/flops.py [--step_time 53.3] [--peak_tflops 989] [--prompt_tokens 32]`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from deepgen_trainer.config import TrainConfig
from deepgen_trainer.observe.flops import (
    H100_BF16_DENSE_TFLOPS,
    TIMESTEP_CHANNELS,
    DeepGenShape,
    DitShape,
    StepShape,
    VaeShape,
    VlmShape,
    blocks_flops,
    connector_forward_flops,
    dit_forward_flops,
    model_flops,
    step_flops,
    tokens,
    utilisation,
    vae_decode_flops,
    vae_encode_flops,
    vlm_forward_flops,
)

__all__ = [
    "H100_BF16_DENSE_TFLOPS",
    "TIMESTEP_CHANNELS",
    "DeepGenShape",
    "DitShape",
    "StepShape",
    "VaeShape",
    "VlmShape",
    "blocks_flops",
    "check_against_flop_counter",
    "connector_forward_flops",
    "counted_flops",
    "dit_forward_flops",
    "model_flops",
    "step_flops",
    "tokens",
    "utilisation",
    "vae_decode_flops",
    "vae_encode_flops",
    "vlm_forward_flops",
]


# ----------------------------------------------------------------------------------------- cross-check


def counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs of `fn()` as `FlopCounterMode` counts them (works on meta tensors: nothing is computed)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def check_against_flop_counter(step: StepShape, model: DeepGenShape | None = None) -> list[tuple[str, int, int]]:
    """(part, analytic, counted) for one DiT forward, VLM forward, connector, VAE encode and decode:
    the real modules with the given configs built on the meta device and run through `FlopCounterMode`.
    The DiT runs as DeepGen runs it (`MaskedJointAttnProcessor`, a padding mask)."""
    model = model or DeepGenShape()
    n_img, n_txt = tokens(model, step)
    h, w = step.image_height, step.image_width
    with torch.device("meta"):
        return [
            ("DiT forward", sum(dit_forward_flops(model.dit, n_img, n_txt).values()), _count_dit(model, step, n_txt)),
            ("VLM forward", vlm_forward_flops(model.vlm, n_txt), _count_vlm(model.vlm, n_txt)),
            (
                "connector",
                connector_forward_flops(model.deepgen, model.vlm.hidden_size, model.dit, n_txt),
                _count_connector(model, n_txt),
            ),
            ("VAE encode", vae_encode_flops(model.vae, h, w), _count_vae(model.vae, h, w, encode=True)),
            ("VAE decode", vae_decode_flops(model.vae, h, w), _count_vae(model.vae, h, w, encode=False)),
        ]


def _count_dit(model: DeepGenShape, step: StepShape, n_txt: int) -> int:
    from diffusers import SD3Transformer2DModel

    from deepgen_trainer.model.joint_attention import MaskedJointAttnProcessor

    dit = SD3Transformer2DModel(**model.dit.kwargs())
    dit.set_attn_processor(MaskedJointAttnProcessor())
    f = model.vae.factor
    inputs = {
        "hidden_states": torch.randn(1, model.dit.in_channels, step.image_height // f, step.image_width // f),
        "encoder_hidden_states": torch.randn(1, n_txt, model.dit.joint_attention_dim),
        "pooled_projections": torch.randn(1, model.dit.pooled_projection_dim),
        "timestep": torch.ones(1),
        "joint_attention_kwargs": {"encoder_attention_mask": torch.ones(1, n_txt, dtype=torch.bool)},
        "return_dict": False,
    }
    return counted_flops(lambda: dit(**inputs))


def _count_vlm(vlm: VlmShape, n_txt: int) -> int:
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLTextModel

    text_config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": vlm.hidden_size,
            "intermediate_size": vlm.intermediate_size,
            "num_hidden_layers": vlm.num_hidden_layers,
            "num_attention_heads": vlm.num_attention_heads,
            "num_key_value_heads": vlm.num_key_value_heads,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope_section(vlm)},
        }
    ).text_config
    text_config._attn_implementation = "sdpa"
    qwen = Qwen2_5_VLTextModel(text_config)
    # No attention mask: transformers inspects mask values, which meta tensors do not have. A padding
    # mask costs the same matmuls (SDPA computes all L×L scores either way).
    embeds = torch.randn(1, n_txt, vlm.hidden_size)
    positions = torch.arange(n_txt)[None, None].expand(3, 1, n_txt)
    return counted_flops(lambda: qwen(inputs_embeds=embeds, position_ids=positions, use_cache=False))


def _count_connector(model: DeepGenShape, n_txt: int) -> int:
    from deepgen_trainer.model.connector import ConnectorEncoder

    c = model.deepgen.connector
    d_in = model.deepgen.fused_layers * model.vlm.hidden_size
    projector_1 = torch.nn.Linear(d_in, c.hidden_size)
    encoder = ConnectorEncoder(c)
    projector_3 = torch.nn.Linear(c.hidden_size, model.dit.joint_attention_dim)
    projector_2 = torch.nn.Linear(c.hidden_size, model.dit.pooled_projection_dim)
    stacked, mask = torch.randn(1, n_txt, d_in), torch.ones(1, n_txt, dtype=torch.bool)

    def connector() -> None:
        x = encoder(projector_1(stacked), mask)
        projector_3(x), projector_2(x.mean(1))

    return counted_flops(connector)


def _count_vae(vae: VaeShape, height: int, width: int, encode: bool) -> int:
    from diffusers import AutoencoderKL

    autoencoder = AutoencoderKL(**vae.kwargs())
    if encode:
        image = torch.randn(1, vae.in_channels, height, width)
        return counted_flops(lambda: autoencoder.encode(image))
    z = torch.randn(1, vae.latent_channels, height // vae.factor, width // vae.factor)
    return counted_flops(lambda: autoencoder.decode(z))


def _mrope_section(vlm: VlmShape) -> list[int]:
    """M-RoPE's (temporal, height, width) split of head_dim / 2 rotary pairs: [16, 24, 24] for head_dim 128."""
    half = vlm.hidden_size // vlm.num_attention_heads // 2
    spatial = half * 3 // 8
    return [half - 2 * spatial, spatial, spatial]


# ----------------------------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt_tokens", type=int, default=32, help="templated prompt tokens before the think tokens")
    parser.add_argument("--peak_tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="accelerator peak (bf16)")
    parser.add_argument("--step_time", type=float, default=None, help="a measured step time (s) to turn into MFU")
    parser.add_argument("--no-sftaux", dest="sftaux", action="store_false", help="a run without the SFT-aux loss")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the FlopCounterMode check")
    args = parser.parse_args()

    step = StepShape.from_train_config(TrainConfig(), sftaux=args.sftaux, prompt_tokens=args.prompt_tokens)
    shape = DeepGenShape()
    n_img, n_txt = tokens(shape, step)
    parts = step_flops(step, shape)
    total, useful = sum(parts.values()), model_flops(parts)
    dit = dit_forward_flops(shape.dit, n_img, n_txt)
    print(
        f"default step per GPU: {step.prompts} prompts x {step.rollout_n} = {step.images} images of "
        f"{step.image_height}x{step.image_width}, {step.num_inference_steps} rollout steps, "
        f"{step.num_train_timesteps} trained, cfg_scale {step.cfg_scale:g}, beta {step.beta:g}, "
        f"checkpointing {'on' if step.gradient_checkpointing else 'off'}, SFT-aux batch {step.sftaux_batch}"
    )
    print(f"DiT tokens: {n_img} image + {n_txt} text ({step.prompt_tokens} prompt + {shape.deepgen.num_queries} think)")
    print(f"\none DiT forward per image: {sum(dit.values()) / 1e12:.3f} TFLOP")
    for name, value in dit.items():
        print(f"  {name:<34} {value / 1e9:10.1f} GFLOP {value / sum(dit.values()):7.1%}")

    if args.check:
        print("\nanalytic vs torch FlopCounterMode (real configs on the meta device):")
        print(f"  {'part':<14} {'analytic TFLOP':>15} {'counted TFLOP':>14} {'ratio':>8}")
        for name, analytic, counted in check_against_flop_counter(step, shape):
            print(f"  {name:<14} {analytic / 1e12:15.4f} {counted / 1e12:14.4f} {analytic / counted:8.4f}")
            if abs(analytic / counted - 1) > 0.02:
                raise SystemExit(f"{name}: the analytic count is off by more than 2% from FlopCounterMode")

    print(f"\nFLOPs of one step per GPU ({step.images} images):")
    print(f"  {'part':<36} {'PFLOP':>9} {'share':>7}")
    for name, value in parts.items():
        print(f"  {name:<36} {value / 1e15:9.3f} {value / total:7.1%}")
    print(f"  {'total (hardware FLOPs, HFU)':<36} {total / 1e15:9.3f}")
    print(f"  {'model FLOPs (MFU: no recompute)':<36} {useful / 1e15:9.3f}")
    print(f"  per image: {total / step.images / 1e12:.1f} TFLOP (model {useful / step.images / 1e12:.1f} TFLOP)")

    peak = args.peak_tflops * 1e12
    print(f"\nMFU = model FLOPs per step / (step time x peak); peak {args.peak_tflops:g} TFLOP/s (H100 bf16 dense):")
    print(f"  step time at 100% MFU: {useful / peak:.1f} s ({step.images / (useful / peak):.2f} images/s/GPU)")
    target = 0.6  # DESIGN §7: images/s/GPU on an H100 for a full default step
    target_time = step.images / target
    print(
        f"  at the {target} images/s/GPU target ({target_time:.1f} s/step): "
        f"MFU {utilisation(useful, target_time, peak):.1%}, HFU {utilisation(total, target_time, peak):.1%}"
    )
    if args.step_time:
        print(
            f"  measured {args.step_time:.1f} s/step: MFU {utilisation(useful, args.step_time, peak):.1%}, "
            f"HFU {utilisation(total, args.step_time, peak):.1%}"
        )


if __name__ == "__main__":
    main()
