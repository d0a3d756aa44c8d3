"""MIL activation quantization (coremltools `ops/defs/iOS17/quantization_ops.py`).

`scale` and `zero_point` are scalars or vectors along `axis`; zero_point defaults to 0.
"""
import torch
from coremltools import target

from ..registry import register

_RANGES = {"int8": (-128, 127), "uint8": (0, 255)}


def _along_axis(values: torch.Tensor | list | int, axis: int | None, x: torch.Tensor) -> torch.Tensor:
    values = torch.as_tensor(values, device=x.device)
    if values.dim() == 0 or axis is None:
        return values
    return values.reshape([-1 if d == axis % x.dim() else 1 for d in range(x.dim())])


@register("quantize", since=target.iOS17)
def quantize(
    input: torch.Tensor,
    scale: torch.Tensor,
    output_dtype: str,
    zero_point: torch.Tensor | list | int = 0,
    axis: int | None = None,
) -> torch.Tensor:
    """clip(round(input / scale) + zero_point) to output_dtype's range; halves round to even."""
    low, high = _RANGES[output_dtype]
    scaled = torch.round(input.float() / _along_axis(scale, axis, input).float())
    return torch.clamp(scaled + _along_axis(zero_point, axis, input), low, high)


@register("dequantize", since=target.iOS17)
def dequantize(
    input: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | list | int = 0, axis: int | None = None
) -> torch.Tensor:
    """scale * (input - zero_point)."""
    shifted = input.float() - _along_axis(zero_point, axis, input).float()
    return _along_axis(scale, axis, input).float() * shifted
