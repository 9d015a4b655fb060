"""DeepGen 1.0 as the RL trainer sees it: prompts → conditioning → DiT velocity → images.

`DeepGen` holds the submodules under the DeepGen SFT model's attribute names, so its
`state_dict()` keys are the SFT checkpoint's keys (see `loading.py` for older layouts):

- `lmm`: Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`), frozen, optionally with a frozen LoRA;
- `meta_queries`: (num_queries, d_vlm) learnable "think token" embeddings appended to every prompt;
- `projector_1`, `connector`, `projector_2`, `projector_3`: the SCB connector (`connector.py`);
- `transformer`: the SD3 DiT (`SD3Transformer2DModel`), the only trainable part in RL;
- `vae`: `AutoencoderKL` (scaling and shift from its config: 1.5305 / 0.0609 for SD3.5);
- `scheduler` (sigma grid only) and `tokenizer` are not modules and carry no weights.

Flow matching convention: x_σ = (1 − σ)·x0 + σ·ε, velocity v = ε − x0, DiT timestep = 1000·σ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import Tensor, nn
from torch.nn.functional import pad
from transformers import PreTrainedTokenizerBase, Qwen2_5_VLForConditionalGeneration

from deepgen_trainer.model.connector import ConnectorConfig, ConnectorEncoder, masked_mean, select_layers
from deepgen_trainer.model.joint_attention import MaskedJointAttnProcessor

PROMPT_TEMPLATE = "<|im_start|>user\nGenerate an image: {prompt}<|im_end|>\n<|im_start|>assistant\n"
NEGATIVE_PROMPT = ""
# State-dict prefixes of the weights that only the DeepGen checkpoint has (not the HF folders).
DEEPGEN_ONLY_PREFIXES = ("meta_queries", "projector_1.", "projector_2.", "projector_3.", "connector.")


@dataclass(frozen=True)
class DeepGenConfig:
    """The parts of DeepGen not described by the HF folders. Defaults are DeepGen 1.0's.

    num_queries: think tokens appended to every prompt (128).
    fused_layers / layer_stride: SCB layer selection, see `connector.select_layers` (6 every 6).
    connector: the encoder's shape.
    prompt_template: `{prompt}` is replaced by the prompt text.
    """

    num_queries: int = 128
    fused_layers: int = 6
    layer_stride: int = 6
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    prompt_template: str = PROMPT_TEMPLATE

    def __post_init__(self) -> None:
        if self.num_queries < 1:
            raise ValueError(f"num_queries={self.num_queries} must be >= 1 (the think tokens)")
        if "{prompt}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{prompt}'")


@dataclass
class Conditioning:
    """DiT conditioning of a batch of prompts.

    prompt_embeds: (B, L, joint_attention_dim), the DiT's encoder_hidden_states; padded positions are 0.
    pooled: (B, pooled_projection_dim), the DiT's pooled_projections.
    mask: (B, L) bool, True for real tokens (prompt tokens and think tokens), False for left padding.
    Dtype: the connector's dtype.
    """

    prompt_embeds: Tensor
    pooled: Tensor
    mask: Tensor

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def __getitem__(self, index: int | slice | Tensor) -> Conditioning:
        """Rows `index` (keeps the batch axis for an int)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Conditioning(self.prompt_embeds[index], self.pooled[index], self.mask[index])

    def repeat_interleave(self, repeats: int) -> Conditioning:
        """Each row `repeats` times in a row (one prompt → a GRPO group)."""
        return Conditioning(
            self.prompt_embeds.repeat_interleave(repeats, dim=0),
            self.pooled.repeat_interleave(repeats, dim=0),
            self.mask.repeat_interleave(repeats, dim=0),
        )

    def to(self, device: torch.device | str) -> Conditioning:
        return Conditioning(self.prompt_embeds.to(device), self.pooled.to(device), self.mask.to(device))

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """Concatenate batches, left-padding shorter sequences (zeros, mask False) to the longest."""
        length = max(p.prompt_embeds.shape[1] for p in parts)
        embeds, masks = [], []
        for p in parts:
            extra = length - p.prompt_embeds.shape[1]
            embeds.append(pad(p.prompt_embeds, (0, 0, extra, 0)))
            masks.append(pad(p.mask, (extra, 0), value=False))
        return Conditioning(torch.cat(embeds), torch.cat([p.pooled for p in parts]), torch.cat(masks))


class DeepGen(nn.Module):
    """The DeepGen 1.0 text-to-image model (see the module docstring for the parts).

    Build it with `loading.load_deepgen` (HF folders + checkpoint) or `tiny.build_tiny` (tests).
    After construction everything is frozen except `transformer`.
    """

    def __init__(
        self,
        lmm: Qwen2_5_VLForConditionalGeneration,
        transformer: SD3Transformer2DModel,
        vae: AutoencoderKL,
        scheduler: FlowMatchEulerDiscreteScheduler,
        tokenizer: PreTrainedTokenizerBase,
        config: DeepGenConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config = config or DeepGenConfig()
        self.lmm = lmm
        self.transformer = transformer
        self.vae = vae
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.vae_batch_size = 8  # images per VAE call (`--vae_batch_size`)

        text_config = lmm.config.text_config
        d_vlm = text_config.hidden_size
        self.layer_ids = select_layers(text_config.num_hidden_layers, config.fused_layers, config.layer_stride)
        d = config.connector.hidden_size
        dtype = lmm.dtype
        self.meta_queries = nn.Parameter(torch.randn(config.num_queries, d_vlm) / math.sqrt(d_vlm))
        self.projector_1 = nn.Linear(d_vlm * config.fused_layers, d)
        self.connector = ConnectorEncoder(config.connector)
        self.projector_2 = nn.Linear(d, transformer.config.pooled_projection_dim)
        self.projector_3 = nn.Linear(d, transformer.config.joint_attention_dim)
        # The SFT model starts its output projectors at zero; real weights come from the checkpoint.
        for proj in (self.projector_2, self.projector_3):
            nn.init.zeros_(proj.weight)
            nn.init.zeros_(proj.bias)
        for module in (self.projector_1, self.connector, self.projector_2, self.projector_3):
            module.to(dtype)
        self.meta_queries.data = self.meta_queries.data.to(dtype)

        self.transformer.set_attn_processor(MaskedJointAttnProcessor())
        self.freeze()

    # ----------------------------------------------------------------- parameters and modes
    def freeze(self) -> None:
        """Freeze everything (VLM and its LoRA, think tokens, connector, VAE) except the DiT, and the
        DiT parameters that cannot affect its output: the last block is `context_pre_only`, so the
        context queries it computes (add_q_proj, norm_added_q) feed outputs it discards. Their
        gradient is always zero; frozen, they carry no optimizer state."""
        self.requires_grad_(False)
        self.transformer.requires_grad_(True)
        for block in self.transformer.transformer_blocks:
            if block.context_pre_only:
                for module in (block.attn.add_q_proj, block.attn.norm_added_q):
                    if module is not None:
                        module.requires_grad_(False)

    def deepgen_only_state(self) -> dict[str, Tensor]:
        """The weights only a DeepGen checkpoint has (think tokens, projectors, connector), SFT key names."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(DEEPGEN_ONLY_PREFIXES)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the RL optimizer updates: the DiT's."""
        return [p for p in self.transformer.parameters() if p.requires_grad]

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute DiT activations in backward (the frozen parts run without grad anyway)."""
        if enabled:
            self.transformer.enable_gradient_checkpointing()
        else:
            self.transformer.disable_gradient_checkpointing()

    def train(self, mode: bool = True) -> DeepGen:
        """Only the DiT follows `mode`; the frozen parts always run in eval mode."""
        super().train(False)
        self.transformer.train(mode)
        return self

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    # ----------------------------------------------------------------- conditioning
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Prompts → DiT conditioning, through the frozen VLM and the connector (no grad).

        Each prompt is wrapped in `config.prompt_template`, tokenized, left-padded to the batch's
        longest and followed by the `num_queries` think-token embeddings. The VLM runs once with
        `output_hidden_states`; the selected layers go through the SCB connector with the padding
        masked, so a prompt's conditioning does not depend on the rest of its batch. The negative
        prompt of CFG is `NEGATIVE_PROMPT` ("") through this same path.

        Returns:
            `Conditioning` with L = longest tokenized prompt + num_queries.
        """
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        texts = [self.config.prompt_template.format(prompt=p) for p in prompts]
        tokens = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
        device = self.lmm.get_input_embeddings().weight.device  # not lmm.device: the vision tower is on the CPU
        input_ids = tokens.input_ids.to(device)
        text_mask = tokens.attention_mask.to(device).bool()
        batch = input_ids.shape[0]

        embeds = self.lmm.get_input_embeddings()(input_ids)
        queries = self.meta_queries.to(embeds.dtype)[None].expand(batch, -1, -1)
        embeds = torch.cat([embeds, queries], dim=1)
        mask = torch.cat([text_mask, text_mask.new_ones(batch, self.config.num_queries)], dim=1)
        # Text-only M-RoPE: the three position streams are equal and count real tokens only, so left
        # padding does not shift positions (what get_rope_index gives for text without images).
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.lmm.model(
            inputs_embeds=embeds,
            attention_mask=mask.long(),
            position_ids=positions[None].expand(3, -1, -1),
            output_hidden_states=True,
            use_cache=False,
            return_dict=True,
        )
        stacked = torch.cat([out.hidden_states[i] for i in self.layer_ids], dim=-1)
        return self.bridge(stacked, mask)

    def bridge(self, stacked: Tensor, mask: Tensor) -> Conditioning:
        """The SCB connector on already stacked VLM hidden states.

        Args:
            stacked: (B, L, fused_layers·d_vlm), the selected layers concatenated on channels.
            mask: (B, L) bool, True for real tokens.
        """
        dtype = self.projector_1.weight.dtype
        # Fully masked rows of the VLM (left padding) may hold garbage or NaN; zero them first.
        x = torch.where(mask[..., None], stacked.to(dtype), 0.0)
        x = self.connector(self.projector_1(x), mask)
        prompt_embeds = torch.where(mask[..., None], self.projector_3(x), 0.0)
        pooled = self.projector_2(masked_mean(x, mask))
        return Conditioning(prompt_embeds=prompt_embeds, pooled=pooled, mask=mask)

    # ----------------------------------------------------------------- DiT
    def velocity(
        self,
        latents: Tensor,
        sigma: float | Tensor,
        cond: Conditioning,
        cfg_scale: float = 0.0,
        uncond: Conditioning | None = None,
        dit: SD3Transformer2DModel | None = None,
    ) -> Tensor:
        """Flow-matching velocity v = ε − x0 predicted by the DiT (with grad if the caller wants it).

        Args:
            latents: (B, C, h, w) x_σ, any float dtype (cast to the DiT's dtype for the call).
            sigma: a float or (B,) tensor of noise levels in [0, 1]; the DiT sees timestep 1000·σ.
            cond: conditioning with B rows (or 1 row, broadcast).
            cfg_scale: 0 → the conditional velocity only. > 0 → classifier-free guidance
                v = v_u + s·(v_c − v_u), with cond and uncond batched into one DiT call.
            uncond: conditioning of the negative prompt, B rows or 1 (broadcast); needed when cfg_scale > 0.
            dit: another DiT of the same shape to run instead of `transformer` (the frozen KL reference).

        Returns:
            (B, C, h, w) in latents' dtype.
        """
        batch = latents.shape[0]
        sigma_t = torch.as_tensor(sigma, device=latents.device, dtype=torch.float32).reshape(-1).expand(batch)
        cond = _broadcast(cond, batch, "cond")
        if cfg_scale > 0:
            if uncond is None:
                raise ValueError(f"cfg_scale={cfg_scale} needs uncond (encode_prompts([NEGATIVE_PROMPT]))")
            both = Conditioning.cat([cond, _broadcast(uncond, batch, "uncond")])
            v = self._dit(torch.cat([latents, latents]), torch.cat([sigma_t, sigma_t]), both, dit)
            v_c, v_u = v.chunk(2)
            v = v_u + cfg_scale * (v_c - v_u)
        elif cfg_scale == 0:
            v = self._dit(latents, sigma_t, cond, dit)
        else:
            raise ValueError(f"cfg_scale={cfg_scale} must be >= 0 (0 turns guidance off)")
        return v.to(latents.dtype)

    def _dit(self, latents: Tensor, sigma: Tensor, cond: Conditioning, dit: SD3Transformer2DModel | None) -> Tensor:
        dit = self.transformer if dit is None else dit
        dtype = dit.dtype
        # No mask when no row is padded: the masked and unmasked attention are then equal, and SDPA only
        # takes its flash kernel without a mask.
        mask = None if bool(cond.mask.all()) else cond.mask
        return dit(
            hidden_states=latents.to(dtype),
            encoder_hidden_states=cond.prompt_embeds.to(dtype),
            pooled_projections=cond.pooled.to(dtype),
            # float32, as diffusers' SD3 pipeline passes it: the sinusoidal embedding is computed from it
            # in float32 and cast to the DiT's dtype after. A bf16 timestep moves 28 of the 50 default
            # grid's values by more than 0.5 (up to 1.94), turning the fast channels' phase.
            timestep=(sigma * 1000.0).float(),
            joint_attention_kwargs={"encoder_attention_mask": mask},
            return_dict=False,
        )[0]

    # ----------------------------------------------------------------- VAE and schedule
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, height/f, width/f) of the latents of a height×width image, f the VAE factor (8)."""
        multiple = self.vae_scale_factor * self.transformer.config.patch_size
        if height % multiple or width % multiple:
            raise ValueError(f"image height={height} and width={width} must be multiples of {multiple}")
        f = self.vae_scale_factor
        return self.transformer.config.in_channels, height // f, width // f

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, C, h, w) → images (B, 3, f·h, f·w) float32 in [0, 1] (see `to_uint8`), `vae_batch_size`
        images per VAE call (its activations grow with the batch: ~12 GiB for 32 images at 512², ~3 for 8)."""
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
        parts = [self.vae.decode(chunk, return_dict=False)[0].float() for chunk in z.split(self.vae_batch_size)]
        return ((torch.cat(parts) + 1.0) / 2.0).clamp(0.0, 1.0)

    @torch.no_grad()
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, 3, H, W) float in [0, 1] → latents (B, C, H/f, W/f) float32, sampled from the posterior,
        `vae_batch_size` images per VAE call (the chunks draw from `generator` in order)."""
        x = (images.to(self.vae.device, self.vae.dtype) * 2.0 - 1.0).clamp(-1.0, 1.0)
        parts = [
            self.vae.encode(chunk, return_dict=False)[0].sample(generator) for chunk in x.split(self.vae_batch_size)
        ]
        z = torch.cat(parts)
        return ((z - self.vae.config.shift_factor) * self.vae.config.scaling_factor).float()

    def place(self, device: torch.device | str) -> DeepGen:
        """Move the model to `device`, except the VLM's vision tower (0.67 B parameters at DeepGen's size):
        prompts are text only, so it never runs; it stays on the CPU. Returns self."""
        visual = getattr(self.lmm.model, "visual", None)
        self.lmm.model.visual = None  # out of the way of `to`: it never passes through the GPU
        try:
            self.to(device)
        finally:
            # Back on the CPU also when it was built elsewhere (bench-gpu builds the model on the GPU).
            self.lmm.model.visual = visual.to("cpu") if visual is not None else None
        return self

    def sigmas(self, num_inference_steps: int) -> Tensor:
        """The shifted flow-matching grid (num_inference_steps + 1,) float32 from 1 down to 0 (last entry 0)."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be >= 1")
        self.scheduler.set_timesteps(num_inference_steps, device="cpu")
        return self.scheduler.sigmas.to(torch.float32).clone()


def to_uint8(images: Tensor) -> Tensor:
    """Float images (B, 3, H, W) in [0, 1] → uint8 (B, H, W, 3) on CPU (what the reward services take)."""
    return (images.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def _broadcast(cond: Conditioning, batch: int, name: str) -> Conditioning:
    if len(cond) == batch:
        return cond
    if len(cond) == 1:
        return cond.repeat_interleave(batch)
    raise ValueError(f"{name} has {len(cond)} rows; the latents have {batch} (pass {batch} rows or 1)")
