"""Normalizations and projections rewritten for the Neural Engine, sharing the weights of the originals.

Two activation layouts appear in the rewritten transformers:
- `TOKENS_LAST` (B, S, C), diffusers' own, where a Linear is a Linear and LayerNorm is over the last axis;
- `CHANNELS_FIRST` (B, C, 1, S), the Neural Engine's native 4-D layout, where a Linear is a 1x1
  convolution and LayerNorm reduces over the channel axis, so no transpose is ever needed.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def constant(value: float, like: torch.Tensor) -> torch.Tensor:
    """`value` as a 0-d tensor of `like`'s dtype.

    coremltools promotes (float16 tensor op Python float) to float32, after which a float16-weight
    convolution meets float32 activations and the conversion fails; a typed constant keeps the dtype.
    (For the same reason divisions are written as products: coremltools converts `div` in float32.)
    """
    return torch.full((), value, dtype=like.dtype, device=like.device)


def channel_affine(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """`x * weight + bias` per channel of a (B, C, H, W) tensor, as a depthwise 1x1 convolution.

    Written as `mul` and `add`, coremltools fuses it into a batch_norm whose statistics it creates in
    float32, which fails against float16 weights.
    """
    if weight is None:  # a norm without affine parameters (so without bias too)
        return x
    channels = x.shape[1]
    return F.conv2d(x, weight.view(channels, 1, 1, 1), bias, groups=channels)


class GroupNorm(nn.Module):
    """`torch.nn.GroupNorm` on (B, C, H, W) that never leaves rank 4.

    Core ML's own group-norm lowering goes through a rank-5 (B, G, C/G, H, W) tensor. Here the groups are
    formed as (B, G, C/G * H, W): the same memory, the last (contiguous) axis untouched, then the
    statistics are reduced over the two trailing axes.
    """

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.num_groups = norm.num_groups
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        grouped = x.reshape(batch, self.num_groups, (channels // self.num_groups) * height, width)
        mean = grouped.mean(dim=(2, 3), keepdim=True)
        centered = grouped - mean
        variance = (centered * centered).mean(dim=(2, 3), keepdim=True)
        normalized = centered * torch.rsqrt(variance + constant(self.eps, variance))
        return channel_affine(normalized.reshape(batch, channels, height, width), self.weight, self.bias)


@dataclass(frozen=True)
class Layout:
    """Where the channels of a transformer's activations live, and the ops that follow from it."""

    name: str
    channel_axis: int

    def linear(self, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        if self.channel_axis == -1:
            return linear(x)
        return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)

    def layer_norm(self, x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
        """`norm` over the channel axis, written out in both layouts: coremltools' lowering of
        `native_layer_norm` mixes a float32 epsilon into float16 graphs."""
        axis = self.channel_axis
        mean = x.mean(dim=axis, keepdim=True)
        centered = x - mean
        variance = (centered * centered).mean(dim=axis, keepdim=True)
        normalized = centered * torch.rsqrt(variance + constant(norm.eps, variance))
        if axis == 1:
            return channel_affine(normalized, norm.weight, norm.bias)
        if norm.weight is not None:
            normalized = normalized * norm.weight
        if norm.bias is not None:
            normalized = normalized + norm.bias
        return normalized

    def from_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → this layout."""
        batch, channels, height, width = x.shape
        if self.channel_axis == -1:
            return x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        return x.reshape(batch, channels, 1, height * width)

    def to_image(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """This layout → (B, C, H, W)."""
        if self.channel_axis == -1:
            batch, _, channels = x.shape
            return x.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        return x.reshape(x.shape[0], x.shape[1], height, width)


TOKENS_LAST = Layout("tokens_last", channel_axis=-1)
CHANNELS_FIRST = Layout("channels_first", channel_axis=1)
