"""MIL pooling (coremltools `ops/defs/iOS15/pool.py`), 1-3 spatial dims, padding as for conv."""
import math

import torch
import torch.nn.functional as F

from ..registry import register
from .conv import pad_spatial, spatial_padding

_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _window_padding(x, kernel_sizes, strides, pad_type, pad):
    dims = x.dim() - 2
    strides = strides or [1] * dims
    padding = spatial_padding(pad_type, pad, tuple(x.shape[2:]), tuple(kernel_sizes), strides, [1] * dims)
    return strides, padding


@register("avg_pool", widen=True)
def avg_pool(
    x: torch.Tensor,
    kernel_sizes: list[int],
    pad_type: str,
    strides: list[int] | None = None,
    pad: list[int] | None = None,
    exclude_padding_from_average: bool = False,
    ceil_mode: bool = False,
) -> torch.Tensor:
    """Window means; padded positions count as zeros unless exclude_padding_from_average, which
    divides by the number of real elements in the window."""
    dims = x.dim() - 2
    strides, padding = _window_padding(x, kernel_sizes, strides, pad_type, pad)
    pool = _AVG[dims]
    if ceil_mode:  # MIL requires symmetric padding here, which PyTorch takes directly
        symmetric = [before for before, _ in padding]
        return pool(x, kernel_sizes, strides, symmetric, ceil_mode=True,
                    count_include_pad=not exclude_padding_from_average)
    means = pool(pad_spatial(x, padding), kernel_sizes, strides)
    if not exclude_padding_from_average:
        return means
    # The window mean over zero padding, divided by the fraction of the window that is real input.
    real_fraction = pool(pad_spatial(torch.ones_like(x[:1, :1]), padding), kernel_sizes, strides)
    return means / real_fraction


@register("max_pool")
def max_pool(
    x: torch.Tensor,
    kernel_sizes: list[int],
    pad_type: str,
    strides: list[int] | None = None,
    pad: list[int] | None = None,
    ceil_mode: bool = False,
) -> torch.Tensor:
    """Window maxima; padded positions never win."""
    dims = x.dim() - 2
    strides, padding = _window_padding(x, kernel_sizes, strides, pad_type, pad)
    if ceil_mode:
        return _MAX[dims](x, kernel_sizes, strides, [before for before, _ in padding], ceil_mode=True)
    return _MAX[dims](pad_spatial(x, padding, value=float("-inf")), kernel_sizes, strides)


@register("l2_pool", widen=True)
def l2_pool(
    x: torch.Tensor,
    kernel_sizes: list[int],
    pad_type: str,
    strides: list[int] | None = None,
    pad: list[int] | None = None,
    ceil_mode: bool = False,
) -> torch.Tensor:
    """sqrt of the window sums of squares (padding adds nothing)."""
    return torch.sqrt(avg_pool(x * x, kernel_sizes, pad_type, strides, pad, False, ceil_mode) * math.prod(kernel_sizes))
