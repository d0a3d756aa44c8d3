"""Scaled dot-product attention in the three implementations a package can be converted with.

- `original`: diffusers' math on (B, S, C); all heads at once, scores of shape (B, heads, S_q, S_k).
- `split_einsum`: on (B, C, 1, S), one head at a time, so the largest tensor is one head's scores,
  (B, S_k, S_q), 1/heads of `original`'s. Written with batched matmuls rather than `torch.einsum`:
  `torch.export`'s default decompositions turn einsum into rank-5 permutes, while a `bmm` whose first
  operand is transposed becomes a single Core ML `matmul(transpose_x=True)`, with no transpose op.
- `split_einsum_v2`: as `split_einsum`, and the queries are also taken `query_chunk` at a time, so the
  scores are at most (B, S_k, query_chunk).
"""
from dataclasses import dataclass

import torch
from torch import nn

from .layers import CHANNELS_FIRST, TOKENS_LAST, GroupNorm, Layout, constant


def all_heads_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, scale: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, S_q, C), (B, S_k, C), (B, S_k, C) → (B, S_q, C); `mask` is added to the (B, heads, S_q, S_k) scores."""
    batch, query_length, channels = query.shape
    head_dim = channels // heads

    def split_heads(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch, -1, heads, head_dim).transpose(1, 2)

    scores = split_heads(query * constant(scale, query)) @ split_heads(key).transpose(2, 3)
    if mask is not None:
        scores = scores + mask
    weights = scores.softmax(dim=-1)
    attended = weights @ split_heads(value)
    return attended.transpose(1, 2).reshape(batch, query_length, channels)


def per_head_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, scale: float,
    query_chunk: int | None = None,
) -> torch.Tensor:
    """(B, C, 1, S_q), (B, C, 1, S_k), (B, C, 1, S_k) → (B, C, 1, S_q), one head (and query chunk) at a time.

    Dropping the unit axis keeps the memory as it is and leaves each head's channels on the axis the
    matmuls contract, so neither the scores (B, S_k, chunk) nor the output need a transpose.
    """
    batch, channels, _, query_length = query.shape
    queries = (query * constant(scale, query)).reshape(batch, channels, query_length).chunk(heads, dim=1)
    keys = key.reshape(batch, channels, -1).chunk(heads, dim=1)
    values = value.reshape(batch, channels, -1).chunk(heads, dim=1)
    chunked = query_chunk is not None and query_length > query_chunk
    attended_heads = []
    for head_query, head_key, head_value in zip(queries, keys, values):
        attended_chunks = []
        for query_part in head_query.split(query_chunk, dim=2) if chunked else (head_query,):
            scores = torch.bmm(head_key.transpose(1, 2), query_part)  # (B, S_k, chunk)
            attended_chunks.append(torch.bmm(head_value, scores.softmax(dim=1)))  # (B, head_dim, chunk)
        attended_heads.append(torch.cat(attended_chunks, dim=2) if chunked else attended_chunks[0])
    return torch.cat(attended_heads, dim=1).reshape(batch, channels, 1, query_length)


@dataclass(frozen=True)
class AttentionImplementation:
    name: str
    layout: Layout
    query_chunk: int | None = None

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int,
               scale: float) -> torch.Tensor:
        if self.layout is TOKENS_LAST:
            return all_heads_attention(query, key, value, heads, scale)
        return per_head_attention(query, key, value, heads, scale, self.query_chunk)


QUERY_CHUNK = 512
IMPLEMENTATIONS = {
    "split_einsum": AttentionImplementation("split_einsum", CHANNELS_FIRST),
    "split_einsum_v2": AttentionImplementation("split_einsum_v2", CHANNELS_FIRST, QUERY_CHUNK),
    "original": AttentionImplementation("original", TOKENS_LAST),
}


def implementation_by_name(name: str) -> AttentionImplementation:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; choose from {', '.join(IMPLEMENTATIONS)}")
    return IMPLEMENTATIONS[name]


class Attention(nn.Module):
    """diffusers' `Attention` (self- or cross-) on activations in `implementation.layout`.

    `context` holds the keys' and values' source in the same layout; None means self-attention.
    """

    def __init__(self, attention: nn.Module, implementation: AttentionImplementation):
        super().__init__()
        unsupported = [
            name for name in ("spatial_norm", "norm_q", "norm_k", "add_k_proj")
            if getattr(attention, name, None) is not None
        ] + (["norm_cross"] if getattr(attention, "norm_cross", False) else [])
        if unsupported:
            raise ValueError(f"attention with {', '.join(unsupported)} is not supported for conversion")
        self.implementation = implementation
        self.heads = attention.heads
        self.scale = attention.scale
        self.to_q = attention.to_q
        self.to_k = attention.to_k
        self.to_v = attention.to_v
        self.to_out = attention.to_out[0]

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        layout = self.implementation.layout
        context = hidden_states if context is None else context
        attended = self.implementation.attend(
            layout.linear(hidden_states, self.to_q),
            layout.linear(context, self.to_k),
            layout.linear(context, self.to_v),
            self.heads,
            self.scale,
        )
        return layout.linear(attended, self.to_out)


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block's attention: (B, C, H, W) in and out, group norm and residual included."""

    def __init__(self, attention: nn.Module, implementation: AttentionImplementation):
        super().__init__()
        self.group_norm = GroupNorm(attention.group_norm) if attention.group_norm is not None else None
        self.residual_connection = attention.residual_connection
        self.rescale_output_factor = attention.rescale_output_factor
        self.attention = Attention(attention, implementation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = self.attention.implementation.layout
        height, width = x.shape[2:]
        hidden_states = self.group_norm(x) if self.group_norm is not None else x
        hidden_states = layout.to_image(self.attention(layout.from_image(hidden_states)), height, width)
        if self.residual_connection:
            hidden_states = hidden_states + x
        return hidden_states * constant(1 / self.rescale_output_factor, hidden_states)
