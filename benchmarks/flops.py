"""FLOPs of one DeepGen MR-GRPO training step per GPU, counted analytically, and the MFU formula.

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
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from deepgen_trainer.config import TrainConfig
from deepgen_trainer.model.connector import ConnectorConfig
from deepgen_trainer.model.deepgen import DeepGenConfig

H100_BF16_DENSE_TFLOPS = 989.0
# The timestep is embedded as 256 sinusoidal channels before SD3's TimestepEmbedding MLP.
TIMESTEP_CHANNELS = 256


# ----------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class DitShape:
    """`SD3Transformer2DModel` hyper-parameters. Defaults: stabilityai/stable-diffusion-3.5-medium."""

    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 24
    num_attention_heads: int = 24
    attention_head_dim: int = 64
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1536
    pooled_projection_dim: int = 2048
    dual_attention_layers: tuple[int, ...] = tuple(range(13))
    qk_norm: str | None = "rms_norm"
    sample_size: int = 128
    pos_embed_max_size: int = 384

    @property
    def width(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def kwargs(self) -> dict:
        """Keyword arguments of `SD3Transformer2DModel`."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class VlmShape:
    """The Qwen2.5-VL text model. Defaults: Qwen2.5-VL-3B-Instruct (head_dim = hidden / heads = 128)."""

    num_hidden_layers: int = 36
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_attention_heads: int = 16
    num_key_value_heads: int = 2


@dataclass(frozen=True)
class VaeShape:
    """`AutoencoderKL` hyper-parameters. Defaults: SD3's VAE (no quant convs, attention in the mid block)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 16
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False

    @property
    def factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def kwargs(self) -> dict[str, Any]:
        """`AutoencoderKL` arguments of this shape (group norms sized to fit narrow test widths)."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "down_block_types": ("DownEncoderBlock2D",) * len(self.block_out_channels),
            "up_block_types": ("UpDecoderBlock2D",) * len(self.block_out_channels),
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "norm_num_groups": math.gcd(32, *self.block_out_channels),
            "use_quant_conv": self.use_quant_conv,
            "use_post_quant_conv": self.use_post_quant_conv,
        }


@dataclass(frozen=True)
class DeepGenShape:
    """Every part of DeepGen 1.0 that does matmuls; `deepgen` holds the think tokens and the connector."""

    dit: DitShape = field(default_factory=DitShape)
    vlm: VlmShape = field(default_factory=VlmShape)
    vae: VaeShape = field(default_factory=VaeShape)
    deepgen: DeepGenConfig = field(default_factory=DeepGenConfig)


@dataclass(frozen=True)
class StepShape:
    """What one training step does on one GPU. Defaults equal `TrainConfig()`'s (see `from_train_config`).

    prompt_tokens: tokens of a templated prompt (or SFT caption), padded to the batch's longest,
        before the think tokens are appended.
    """

    prompts: int = 4
    rollout_n: int = 8
    num_inference_steps: int = 50
    num_train_timesteps: int = 30
    image_height: int = 512
    image_width: int = 512
    cfg_scale: float = 0.0
    beta: float = 5e-7
    gradient_checkpointing: bool = True
    sftaux_batch: int = 32
    prompt_tokens: int = 32

    @property
    def images(self) -> int:
        return self.prompts * self.rollout_n

    @classmethod
    def from_train_config(cls, cfg: TrainConfig, sftaux: bool = True, prompt_tokens: int = 32) -> StepShape:
        """The step of a run with `cfg` on one GPU; ``sftaux`` whether an SFT-aux dataset is configured
        (the SFT batch is `--atrain_micro_batch_size` images, as `train.sft_auxiliary_loss` draws)."""
        return cls(
            prompts=cfg.prompts_per_rank_for(1),
            rollout_n=cfg.rollout_n,
            num_inference_steps=cfg.num_inference_steps,
            num_train_timesteps=cfg.num_train_timesteps,
            image_height=cfg.image_height,
            image_width=cfg.image_width,
            cfg_scale=cfg.cfg_scale,
            beta=cfg.beta,
            gradient_checkpointing=cfg.gradient_checkpointing,
            sftaux_batch=cfg.atrain_micro_batch_size if sftaux and cfg.sftaux_coef > 0 else 0,
            prompt_tokens=prompt_tokens,
        )


# ----------------------------------------------------------------------------------------- per forward


def dit_forward_flops(dit: DitShape, image_tokens: int, text_tokens: int) -> dict[str, int]:
    """Matmul FLOPs of one sample through the MMDiT, by part. ``blocks`` parts are what gradient
    checkpointing recomputes (diffusers checkpoints each `JointTransformerBlock`)."""
    d, n, length = dit.width, image_tokens, text_tokens
    if dit.caption_projection_dim != d:
        raise ValueError(f"caption_projection_dim {dit.caption_projection_dim} must equal the DiT width {d}")
    embed = (
        2 * n * dit.in_channels * dit.patch_size**2 * d  # patch embedding (a p×p stride-p convolution)
        + 2 * (TIMESTEP_CHANNELS * d + d * d)  # timestep MLP
        + 2 * (dit.pooled_projection_dim * d + d * d)  # pooled text MLP
        + 2 * length * dit.joint_attention_dim * d  # context_embedder
    )
    adaln = image = text = joint = dual = 0
    for i in range(dit.num_layers):
        last = i == dit.num_layers - 1  # context_pre_only: no text output projection, no text MLP
        is_dual = i in dit.dual_attention_layers
        adaln += 2 * d * (9 if is_dual else 6) * d + 2 * d * (2 if last else 6) * d
        image += 2 * n * d * d * (3 + 1 + 8)  # q, k, v, out; MLP d → 4d → d
        text += 2 * length * d * d * (3 if last else 3 + 1 + 8)
        joint += 4 * (n + length) ** 2 * d  # scores and values over the joint sequence
        if is_dual:  # SD3.5's image-only second attention
            dual += 2 * n * d * d * 4 + 4 * n * n * d
    output = 2 * d * 2 * d + 2 * n * d * dit.patch_size**2 * dit.out_channels  # norm_out, proj_out
    return {
        "embed": embed,
        "blocks: adaLN": adaln,
        "blocks: image linears": image,
        "blocks: text linears": text,
        "blocks: joint attention": joint,
        "blocks: image attention (attn2)": dual,
        "output": output,
    }


def blocks_flops(parts: dict[str, int]) -> int:
    return sum(v for k, v in parts.items() if k.startswith("blocks"))


def vlm_forward_flops(vlm: VlmShape, tokens: int) -> int:
    """Matmul FLOPs of one sequence through the Qwen2.5-VL text model (no LM head: DeepGen reads hidden states)."""
    h, head_dim = vlm.hidden_size, vlm.hidden_size // vlm.num_attention_heads
    kv = vlm.num_key_value_heads * head_dim
    linear = 2 * tokens * h * (h + 2 * kv + h) + 3 * 2 * tokens * h * vlm.intermediate_size  # q, k, v, o; SwiGLU
    return vlm.num_hidden_layers * (linear + 4 * tokens * tokens * h)


def connector_forward_flops(config: DeepGenConfig, d_vlm: int, dit: DitShape, tokens: int) -> int:
    """Matmul FLOPs of one sequence through the SCB connector: projector_1, the encoder, projector_3
    per token and projector_2 on the mean."""
    c: ConnectorConfig = config.connector
    d = c.hidden_size
    layer = 2 * tokens * d * d * 4 + 4 * tokens * tokens * d + 2 * 2 * tokens * d * c.intermediate_size
    return (
        2 * tokens * config.fused_layers * d_vlm * d
        + c.num_hidden_layers * layer
        + 2 * tokens * d * dit.joint_attention_dim
        + 2 * d * dit.pooled_projection_dim
    )


def _conv(h: int, w: int, c_in: int, c_out: int, k: int = 3) -> int:
    return 2 * h * w * c_in * c_out * k * k


def _resnet(h: int, w: int, c_in: int, c_out: int) -> int:
    shortcut = _conv(h, w, c_in, c_out, 1) if c_in != c_out else 0
    return _conv(h, w, c_in, c_out) + _conv(h, w, c_out, c_out) + shortcut


def _vae_mid_block(h: int, w: int, c: int) -> int:
    tokens = h * w  # one single-head self-attention over every latent position
    return 2 * _resnet(h, w, c, c) + 2 * tokens * c * c * 4 + 4 * tokens * tokens * c


def vae_encode_flops(vae: VaeShape, height: int, width: int) -> int:
    """Conv + attention FLOPs of encoding one height×width image (diffusers `Encoder`, double_z)."""
    h, w, channels = height, width, vae.block_out_channels
    total = _conv(h, w, vae.in_channels, channels[0])
    c_in = channels[0]
    for i, c_out in enumerate(channels):
        for j in range(vae.layers_per_block):
            total += _resnet(h, w, c_in if j == 0 else c_out, c_out)
        c_in = c_out
        if i < len(channels) - 1:  # stride-2 3×3 convolution
            h, w = h // 2, w // 2
            total += _conv(h, w, c_out, c_out)
    total += _vae_mid_block(h, w, channels[-1]) + _conv(h, w, channels[-1], 2 * vae.latent_channels)
    if vae.use_quant_conv:
        total += _conv(h, w, 2 * vae.latent_channels, 2 * vae.latent_channels, 1)
    return total


def vae_decode_flops(vae: VaeShape, height: int, width: int) -> int:
    """Conv + attention FLOPs of decoding the latents of one height×width image (diffusers `Decoder`)."""
    h, w = height // vae.factor, width // vae.factor
    channels = vae.block_out_channels[::-1]
    total = _conv(h, w, vae.latent_channels, vae.latent_channels, 1) if vae.use_post_quant_conv else 0
    total += _conv(h, w, vae.latent_channels, channels[0]) + _vae_mid_block(h, w, channels[0])
    c_in = channels[0]
    for i, c_out in enumerate(channels):
        for j in range(vae.layers_per_block + 1):
            total += _resnet(h, w, c_in if j == 0 else c_out, c_out)
        c_in = c_out
        if i < len(channels) - 1:  # nearest ×2, then a 3×3 convolution
            h, w = h * 2, w * 2
            total += _conv(h, w, c_out, c_out)
    return total + _conv(h, w, channels[-1], vae.out_channels)


# ----------------------------------------------------------------------------------------- one step


def tokens(model: DeepGenShape, step: StepShape) -> tuple[int, int]:
    """(image tokens, text tokens) of one DiT forward."""
    patch = model.vae.factor * model.dit.patch_size
    return (step.image_height // patch) * (step.image_width // patch), step.prompt_tokens + model.deepgen.num_queries


def step_flops(step: StepShape, model: DeepGenShape | None = None) -> dict[str, int]:
    """FLOPs of one training step on one GPU, by phase and part; the step's total is the sum."""
    model = model or DeepGenShape()
    n_img, n_txt = tokens(model, step)
    dit = dit_forward_flops(model.dit, n_img, n_txt)
    fwd, blocks = sum(dit.values()), blocks_flops(dit)
    guided = 2 if step.cfg_scale > 0 else 1  # CFG batches the negative prompt into the same DiT call
    conditioning = (
        vlm_forward_flops(model.vlm, n_txt),
        connector_forward_flops(model.deepgen, model.vlm.hidden_size, model.dit, n_txt),
    )
    trained = step.num_train_timesteps * step.images * guided
    sft = step.sftaux_batch
    recompute = blocks if step.gradient_checkpointing else 0
    return {
        "conditioning: VLM forward": step.prompts * conditioning[0],
        "conditioning: connector": step.prompts * conditioning[1],
        "rollout: DiT forward": step.num_inference_steps * step.images * guided * fwd,
        "rollout: VAE decode": step.images * vae_decode_flops(model.vae, step.image_height, step.image_width),
        "update: DiT forward": trained * fwd,
        "update: DiT backward": trained * 2 * fwd,
        "update: recompute (checkpointing)": trained * recompute,
        "update: reference DiT forward": trained * fwd if step.beta > 0 else 0,
        "sft: VAE encode": sft * vae_encode_flops(model.vae, step.image_height, step.image_width),
        "sft: VLM + connector": sft * sum(conditioning),
        "sft: DiT forward + backward": sft * 3 * fwd,
        "sft: recompute (checkpointing)": sft * recompute,
    }


def model_flops(parts: dict[str, int]) -> int:
    """FLOPs that count for MFU: everything except gradient checkpointing's recompute."""
    return sum(v for k, v in parts.items() if "recompute" not in k)


def utilisation(flops: float, step_time_s: float, peak_flops: float) -> float:
    """MFU (or HFU, given hardware FLOPs) = FLOPs per step / (step time × peak FLOP/s)."""
    return flops / (step_time_s * peak_flops)


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
