"""SD3 joint attention that ignores padded prompt tokens.

diffusers' `JointAttnProcessor2_0` attends over [image tokens, prompt tokens] without a mask, so the
pad tokens that batching adds to a shorter prompt take part in every DiT attention: a sample's
velocity then depends on the other prompts in its micro-batch. In GRPO that breaks the identity
"recomputed log-prob == rollout log-prob" whenever rollout and update batch samples differently.
`MaskedJointAttnProcessor` is the same computation with a key mask over the prompt part; with an
all-True mask (or none) it equals the stock processor.

The mask reaches the processor through `joint_attention_kwargs={"encoder_attention_mask": mask}`
of `SD3Transformer2DModel.forward`. The image-only second attention of SD3.5's dual-attention
blocks (`attn2`) receives the same kwargs and ignores the mask (it has no prompt tokens).
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention
from torch import Tensor
from torch.nn.functional import scaled_dot_product_attention


class MaskedJointAttnProcessor:
    """`JointAttnProcessor2_0` with an optional (B, L_text) bool key mask over the prompt tokens."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        encoder_attention_mask: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """hidden_states (B, N, D) image tokens; encoder_hidden_states (B, L, D) prompt tokens or None."""
        batch_size, num_image_tokens, _ = hidden_states.shape

        def heads(x: Tensor) -> Tensor:
            return x.view(batch_size, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (
            heads(attn.to_q(hidden_states)),
            heads(attn.to_k(hidden_states)),
            heads(attn.to_v(hidden_states)),
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        mask = None
        if encoder_hidden_states is not None:
            ctx_q = heads(attn.add_q_proj(encoder_hidden_states))
            ctx_k = heads(attn.add_k_proj(encoder_hidden_states))
            ctx_v = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                ctx_q = attn.norm_added_q(ctx_q)
            if attn.norm_added_k is not None:
                ctx_k = attn.norm_added_k(ctx_k)
            query = torch.cat([query, ctx_q], dim=2)
            key = torch.cat([key, ctx_k], dim=2)
            value = torch.cat([value, ctx_v], dim=2)
            if encoder_attention_mask is not None:
                image_keys = encoder_attention_mask.new_ones(batch_size, num_image_tokens)
                mask = torch.cat([image_keys, encoder_attention_mask.bool()], dim=1)[:, None, None, :]

        out = scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * out.shape[-1]).to(query.dtype)

        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        out, ctx = out[:, :num_image_tokens], out[:, num_image_tokens:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        return attn.to_out[1](attn.to_out[0](out)), ctx
