"""diffusers' `Transformer2DModel` and `BasicTransformerBlock` (SD v1/v2 configuration) in a chosen layout."""
import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, AttentionImplementation
from .layers import GroupNorm


class FeedForward(nn.Module):
    """diffusers' `FeedForward` with a GEGLU or GELU input projection."""

    def __init__(self, feed_forward: nn.Module, implementation: AttentionImplementation):
        super().__init__()
        activation = feed_forward.net[0]
        kind = type(activation).__name__
        if kind not in ("GEGLU", "GELU"):
            raise ValueError(f"feed-forward activation {kind} is not supported for conversion (GEGLU or GELU)")
        self.gated = kind == "GEGLU"
        self.approximate = getattr(activation, "approximate", "none")
        self.layout = implementation.layout
        self.proj_in = activation.proj
        self.proj_out = feed_forward.net[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden_states = self.layout.linear(x, self.proj_in)
        if self.gated:
            hidden_states, gate = hidden_states.chunk(2, dim=self.layout.channel_axis)
            hidden_states = hidden_states * F.gelu(gate)
        else:
            hidden_states = F.gelu(hidden_states, approximate=self.approximate)
        return self.layout.linear(hidden_states, self.proj_out)


class TransformerBlock(nn.Module):
    """`BasicTransformerBlock` with `norm_type="layer_norm"`: self-attention, cross-attention, feed-forward."""

    def __init__(self, block: nn.Module, implementation: AttentionImplementation):
        super().__init__()
        variant = block.only_cross_attention or block.double_self_attention or block.pos_embed is not None
        if block.norm_type != "layer_norm" or variant:
            raise ValueError("only SD-style transformer blocks (layer norm, self- then cross-attention) can be "
                             "converted")
        self.layout = implementation.layout
        self.norm1, self.norm2, self.norm3 = block.norm1, block.norm2, block.norm3
        self.attn1 = Attention(block.attn1, implementation)
        self.attn2 = Attention(block.attn2, implementation) if block.attn2 is not None else None
        self.ff = FeedForward(block.ff, implementation)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        layer_norm = self.layout.layer_norm
        hidden_states = hidden_states + self.attn1(layer_norm(hidden_states, self.norm1))
        if self.attn2 is not None:
            hidden_states = hidden_states + self.attn2(layer_norm(hidden_states, self.norm2), context)
        return hidden_states + self.ff(layer_norm(hidden_states, self.norm3))


class SpatialTransformer(nn.Module):
    """`Transformer2DModel` on continuous (B, C, H, W) inputs; `context` comes in the transformer's layout."""

    def __init__(self, transformer: nn.Module, implementation: AttentionImplementation):
        super().__init__()
        if not getattr(transformer, "is_input_continuous", False):
            raise ValueError("only Transformer2DModel on continuous (image) inputs can be converted")
        self.layout = implementation.layout
        self.use_linear_projection = transformer.use_linear_projection
        self.norm = GroupNorm(transformer.norm)
        self.proj_in = transformer.proj_in
        self.blocks = nn.ModuleList(TransformerBlock(block, implementation) for block in transformer.transformer_blocks)
        self.proj_out = transformer.proj_out

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        height, width = x.shape[2:]
        hidden_states = self.norm(x)
        if self.use_linear_projection:
            hidden_states = layout.linear(layout.from_image(hidden_states), self.proj_in)
        else:
            hidden_states = layout.from_image(self.proj_in(hidden_states))
        for block in self.blocks:
            hidden_states = block(hidden_states, context)
        if self.use_linear_projection:
            hidden_states = layout.to_image(layout.linear(hidden_states, self.proj_out), height, width)
        else:
            hidden_states = self.proj_out(layout.to_image(hidden_states, height, width))
        return hidden_states + x
