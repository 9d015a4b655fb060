"""FLOPs of one DeepGen MR-GRPO training step per GPU, counted analytically, and the MFU formula
(``--log_tflops``; `benchmarks/flops.py` checks every count against torch's FlopCounterMode on the
real architectures and prints the table).

Only matrix products are counted (2·m·n·k per matmul, 2·out·C_in·k² per convolution): linear layers,
attention scores and values (4·L²·d per layer, full L×L: what SDPA with a padding mask computes),
and VAE convolutions. Norms, activations and the SDE step are elementwise and left out.

One step on one GPU:
- conditioning: Qwen2.5-VL text forward + SCB connector, once per prompt;
- rollout: `num_inference_steps` DiT forwards per image (two with CFG), VAE decode;
- update: the trained steps per image: DiT forward, backward (2× forward), the forward recomputed by
  gradient checkpointing (the transformer blocks), and the frozen reference DiT's forward (beta > 0);
- SFT-aux: one batch of image-caption pairs: VAE encode, VLM + connector per caption, DiT forward +
  backward + recompute.
Evaluation (every `--eval_freq` steps) is not part of a step and not counted.

MFU = model FLOPs per step / (step time × peak FLOP/s), model FLOPs excluding the recompute of
gradient checkpointing (PaLM's definition); with the recompute it is HFU (hardware FLOPs utilisation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

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

    @classmethod
    def from_model(cls, model: Any) -> DeepGenShape:
        """The shape of a built `DeepGen` (its DiT, VLM text model and VAE configs)."""
        dit_config, text, vae = model.transformer.config, model.lmm.config.text_config, model.vae.config
        dit = DitShape(**{k: _plain(dit_config[k]) for k in DitShape.__dataclass_fields__ if k in dit_config})
        vlm = VlmShape(**{k: getattr(text, k) for k in VlmShape.__dataclass_fields__})
        vae_shape = VaeShape(
            **{k: _plain(vae[k]) for k in VaeShape.__dataclass_fields__ if k in vae and vae[k] is not None}
        )
        return cls(dit, vlm, vae_shape, model.config)


def _plain(value: Any) -> Any:
    """Config lists as tuples (the shapes are frozen, hashable dataclasses)."""
    return tuple(value) if isinstance(value, list) else value


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
