"""MIL reductions (coremltools `ops/defs/iOS15/reduction.py`).

`axes` defaults to all dims; `keep_dims` (default False) keeps reduced dims with size 1. Sums and
means accumulate in float32; max and min are exact in any precision.
"""
import torch

from ..registry import register


def _dims(x: torch.Tensor, axes: list[int] | None) -> list[int]:
    return list(range(x.dim())) if axes is None else axes


@register("reduce_max")
def reduce_max(x: torch.Tensor, axes: list[int] | None = None, keep_dims: bool = False) -> torch.Tensor:
    return torch.amax(x, dim=_dims(x, axes), keepdim=keep_dims)


@register("reduce_min")
def reduce_min(x: torch.Tensor, axes: list[int] | None = None, keep_dims: bool = False) -> torch.Tensor:
    return torch.amin(x, dim=_dims(x, axes), keepdim=keep_dims)


@register("reduce_prod", widen=True)
def reduce_prod(x: torch.Tensor, axes: list[int] | None = None, keep_dims: bool = False) -> torch.Tensor:
    # torch.prod takes a single dim: reduce the highest first so the others keep their index.
    for dim in sorted((d % x.dim() for d in _dims(x, axes)), reverse=True):
        x = torch.prod(x, dim=dim, keepdim=keep_dims)
    return x


@register("reduce_sum", widen=True)
def reduce_sum(x: torch.Tensor, axes: list[int] | None = None, keep_dims: bool = False) -> torch.Tensor:
    return torch.sum(x, dim=_dims(x, axes), keepdim=keep_dims)


@register("reduce_mean", widen=True)
def reduce_mean(x: torch.Tensor, axes: list[int] | None = None, keep_dims: bool = False) -> torch.Tensor:
    return torch.mean(x, dim=_dims(x, axes), keepdim=keep_dims)


@register("reduce_sum_square", widen=True)
def reduce_sum_square(x: torch.Tensor, axes: list[int] | None = None, keep_dims: bool = False) -> torch.Tensor:
    """sum(x^2)."""
    return torch.sum(x * x, dim=_dims(x, axes), keepdim=keep_dims)


@register("reduce_l1_norm", widen=True)
def reduce_l1_norm(x: torch.Tensor, axes: list[int] | None = None, keep_dims: bool = False) -> torch.Tensor:
    """sum(|x|)."""
    return torch.sum(torch.abs(x), dim=_dims(x, axes), keepdim=keep_dims)


@register("reduce_l2_norm", widen=True)
def reduce_l2_norm(x: torch.Tensor, axes: list[int] | None = None, keep_dims: bool = False) -> torch.Tensor:
    """sqrt(sum(x^2))."""
    return torch.sqrt(torch.sum(x * x, dim=_dims(x, axes), keepdim=keep_dims))


@register("reduce_log_sum", widen=True)
def reduce_log_sum(x: torch.Tensor, axes: list[int] | None = None, keep_dims: bool = False) -> torch.Tensor:
    """log(sum(x))."""
    return torch.log(torch.sum(x, dim=_dims(x, axes), keepdim=keep_dims))


@register("reduce_log_sum_exp", widen=True)
def reduce_log_sum_exp(x: torch.Tensor, axes: list[int] | None = None, keep_dims: bool = False) -> torch.Tensor:
    """log(sum(exp(x))), evaluated stably."""
    return torch.logsumexp(x, dim=_dims(x, axes), keepdim=keep_dims)


@register("reduce_argmax")
def reduce_argmax(x: torch.Tensor, axis: int = -1, keep_dims: bool = False,
                  output_dtype: str = "int32") -> torch.Tensor:
    """Index of the first maximum along `axis`."""
    return torch.argmax(x, dim=axis, keepdim=keep_dims)


@register("reduce_argmin")
def reduce_argmin(x: torch.Tensor, axis: int = -1, keep_dims: bool = False,
                  output_dtype: str = "int32") -> torch.Tensor:
    """Index of the first minimum along `axis`."""
    return torch.argmin(x, dim=axis, keepdim=keep_dims)
