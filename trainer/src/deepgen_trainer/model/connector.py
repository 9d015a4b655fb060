"""SCB (Stacked Channel Bridging) connector: VLM hidden states → DiT conditioning.

The bridge, as in DeepGen 1.0:

1. take the VLM hidden states of N layers (every `stride`-th layer counting down from the
   second-to-last, see `select_layers`) and concatenate them on the channel axis: (B, L, N·d_vlm);
2. `projector_1`: Linear N·d_vlm → d (the connector width);
3. `ConnectorEncoder`: a bidirectional (non-causal) pre-LayerNorm transformer encoder of width d;
4. `projector_3`: per-token Linear d → joint_attention_dim (the DiT's encoder_hidden_states);
   `projector_2`: Linear of the masked sequence mean d → pooled_projection_dim (pooled_projections).

The projectors live on `DeepGen` itself (their checkpoint keys are top-level `projector_{1,2,3}.*`
in the SFT model); this module holds the encoder, its config and the masking helpers.

Padding is masked, in the encoder attention (padded keys get no weight) and in the mean (padded
positions are excluded). The reference ran the encoder without a mask and took a plain mean, so a
prompt's conditioning depended on how many pad tokens its batch added; this one does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.functional import gelu, scaled_dot_product_attention
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class ConnectorConfig:
    """Shape of the connector encoder. Defaults are DeepGen 1.0's (hidden 2048, 6 layers, 32 heads)."""

    hidden_size: int = 2048
    intermediate_size: int = 11946
    num_hidden_layers: int = 6
    num_attention_heads: int = 32
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"connector hidden_size={self.hidden_size} must be divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_hidden_layers < 0:
            raise ValueError(f"connector num_hidden_layers={self.num_hidden_layers} must be >= 0")


def select_layers(num_hidden_layers: int, count: int, stride: int) -> list[int]:
    """Indices into a transformers `hidden_states` tuple (entry 0 = embeddings, entry i = layer i's output).

    The layers are `num_hidden_layers − 1 − stride·k` for k = 0..count−1, in that (descending) order,
    which is the order the SFT model concatenated them in. DeepGen 1.0 (36 layers, count 6, stride 6):
    [35, 29, 23, 17, 11, 5].
    """
    if count < 1 or stride < 1:
        raise ValueError(f"fused layer count ({count}) and stride ({stride}) must both be >= 1")
    layers = [num_hidden_layers - 1 - stride * k for k in range(count)]
    if layers[-1] < 1:
        raise ValueError(
            f"cannot fuse {count} layers with stride {stride} from a {num_hidden_layers}-layer VLM "
            f"(the lowest would be hidden state {layers[-1]}); lower the count or the stride"
        )
    return layers


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over the sequence of the unmasked positions.

    Args:
        x: (B, L, D) any float dtype.
        mask: (B, L) bool, True for real tokens. Every row needs at least one True.

    Returns:
        (B, D) in x's dtype; the sum is taken in float32 so bf16 inputs do not lose the small terms.
    """
    weights = mask.to(torch.float32).unsqueeze(-1)
    total = (x.to(torch.float32) * weights).sum(dim=1)
    return (total / weights.sum(dim=1).clamp(min=1.0)).to(x.dtype)


class ConnectorAttention(nn.Module):
    """Bidirectional multi-head self-attention with a key padding mask."""

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: Tensor, key_mask: Tensor | None) -> Tensor:
        """(B, L, d) → (B, L, d); `key_mask` (B, L) bool, True where a token may be attended to."""
        b, length, d = hidden_states.shape

        def heads(x: Tensor) -> Tensor:
            return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = (
            heads(self.q_proj(hidden_states)),
            heads(self.k_proj(hidden_states)),
            heads(self.v_proj(hidden_states)),
        )
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, length, d))


class ConnectorMLP(nn.Module):
    """fc1 → GELU (tanh approximation, the SFT model's `gelu_pytorch_tanh`) → fc2."""

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(gelu(self.fc1(x), approximate="tanh"))


class ConnectorEncoderLayer(nn.Module):
    """Pre-LayerNorm encoder layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = ConnectorAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ConnectorMLP(config)

    def forward(self, hidden_states: Tensor, key_mask: Tensor | None) -> Tensor:
        hidden_states = hidden_states + self.self_attn(self.layer_norm1(hidden_states), key_mask)
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class ConnectorEncoder(nn.Module):
    """Stack of `ConnectorEncoderLayer`s. Checkpoint keys: `layers.{i}.{self_attn,mlp,layer_norm1,layer_norm2}.*`."""

    def __init__(self, config: ConnectorConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([ConnectorEncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False
        self.apply(_init_weights)

    def forward(self, hidden_states: Tensor, mask: Tensor | None = None) -> Tensor:
        """Encode a sequence bidirectionally.

        Args:
            hidden_states: (B, L, hidden_size), the encoder's dtype.
            mask: (B, L) bool, True for real tokens; None attends everywhere. Rows of padded queries
                still get outputs (they attend to the real tokens); callers ignore them.

        Returns:
            (B, L, hidden_size) in the input dtype.
        """
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden_states = checkpoint(layer, hidden_states, mask, use_reentrant=False)
            else:
                hidden_states = layer(hidden_states, mask)
        return hidden_states


def _init_weights(module: nn.Module) -> None:
    """Xavier-uniform projections with zero biases, unit LayerNorms (the SFT model's encoder init)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
