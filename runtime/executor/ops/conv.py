"""MIL convolutions (coremltools `ops/defs/iOS15/conv.py`): conv and conv_transpose, 1-3 spatial dims.

Padding follows MIL's `pad_type`: "valid" (none), "custom" (`pad` holds before/after per spatial
dim), "same" (output size ceil(in / stride), odd total padding puts the extra element after) and
"same_lower" (the extra element before).
"""
import math

import torch
import torch.nn.functional as F

from ..registry import register

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def spatial_padding(
    pad_type: str,
    pad: list[int] | None,
    input_size: tuple[int, ...],
    kernel_size: tuple[int, ...],
    strides: list[int],
    dilations: list[int],
) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dimension, as MIL conv and pooling define it."""
    dims = len(kernel_size)
    if pad_type == "valid":
        return [(0, 0)] * dims
    if pad_type == "custom":
        pad = pad or [0] * 2 * dims
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(dims)]
    if pad_type in ("same", "same_lower"):
        result = []
        for size, kernel, stride, dilation in zip(input_size, kernel_size, strides, dilations):
            dilated_kernel = (kernel - 1) * dilation + 1
            total = max(0, (math.ceil(size / stride) - 1) * stride + dilated_kernel - size)
            smaller, larger = total // 2, total - total // 2
            result.append((smaller, larger) if pad_type == "same" else (larger, smaller))
        return result
    raise ValueError(f"pad_type {pad_type!r} is not one of valid, custom, same, same_lower")


def pad_spatial(x: torch.Tensor, padding: list[tuple[int, int]], value: float = 0.0) -> torch.Tensor:
    """Zero-pad (or `value`-pad) the trailing spatial dims of x; F.pad lists the last dim first."""
    flat = [amount for before_after in reversed(padding) for amount in before_after]
    return F.pad(x, flat, value=value) if any(flat) else x


@register("conv", widen=True)
def conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    strides: list[int] | None = None,
    pad_type: str = "valid",
    pad: list[int] | None = None,
    dilations: list[int] | None = None,
    groups: int = 1,
) -> torch.Tensor:
    """x [N, C_in, *D], weight [C_out, C_in / groups, *K], bias [C_out] -> [N, C_out, *D_out]."""
    dims = x.dim() - 2
    strides = strides or [1] * dims
    dilations = dilations or [1] * dims
    padding = spatial_padding(pad_type, pad, tuple(x.shape[2:]), tuple(weight.shape[2:]), strides, dilations)
    if (groups == 1 and all(k == 1 for k in weight.shape[2:]) and all(s == 1 for s in strides)
            and not any(map(any, padding))):
        return _pointwise(x, weight, bias)
    if all(before == after for before, after in padding):
        symmetric = [before for before, _ in padding]
    else:
        x, symmetric = pad_spatial(x, padding), [0] * dims
    return _CONV[dims](x, weight, bias, stride=strides, padding=symmetric, dilation=dilations, groups=groups)


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution as the matrix product it is, weight [C_out, C_in] @ x [N, C_in, D]: the
    Neural Engine layout expresses every linear layer this way, and PyTorch's matrix product runs
    these shapes about twice as fast as its convolution on the CPU."""
    matrix = weight.reshape(weight.shape[0], weight.shape[1]).expand(x.shape[0], -1, -1)
    columns = x.reshape(x.shape[0], x.shape[1], -1)
    if bias is None:
        result = torch.bmm(matrix, columns)
    else:
        result = torch.baddbmm(bias.reshape(1, -1, 1), matrix, columns)
    return result.reshape((x.shape[0], weight.shape[0]) + tuple(x.shape[2:]))


@register("conv_transpose", widen=True)
def conv_transpose(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    pad: list[int] | None = None,
    output_shape: list[int] | None = None,
    pad_type: str = "valid",
    strides: list[int] | None = None,
    dilations: list[int] | None = None,
    groups: int = 1,
) -> torch.Tensor:
    """x [N, C_in, *D], weight [C_in, C_out / groups, *K] -> [N, C_out, *D_out].

    The unpadded ("valid") transposed convolution has size (D - 1) stride + (K - 1) dilation + 1;
    `pad` crops it ("custom"), "same" crops it to D * stride, and `output_shape`, when given, fixes
    the output size, extending the end with zeros (plus bias) if it is larger.
    """
    dims = x.dim() - 2
    strides = strides or [1] * dims
    dilations = dilations or [1] * dims
    full = _CONV_TRANSPOSE[dims](x, weight, None, stride=strides, dilation=dilations, groups=groups)
    crops = []
    for i in range(dims):
        full_size = full.shape[2 + i]
        if pad_type == "same":
            excess = full_size - x.shape[2 + i] * strides[i]
            before, size = max(excess, 0) // 2, x.shape[2 + i] * strides[i]
        elif pad_type == "custom":
            pad_i = pad or [0] * 2 * dims
            before, size = pad_i[2 * i], full_size - pad_i[2 * i] - pad_i[2 * i + 1]
        else:
            before, size = 0, full_size
        if output_shape is not None:
            size = output_shape[2 + i]
        crops.append((before, size))
    # Negative F.pad amounts crop; positive ones extend with zeros.
    flat = []
    for i in reversed(range(dims)):
        before, size = crops[i]
        flat += [-before, before + size - full.shape[2 + i]]
    result = F.pad(full, flat) if any(flat) else full
    if bias is not None:
        result = result + bias.reshape((1, -1) + (1,) * dims)
    return result
