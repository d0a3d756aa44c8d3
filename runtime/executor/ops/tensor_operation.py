"""MIL ops that create or rearrange tensors by rule (coremltools `ops/defs/iOS15/tensor_operation.py`)."""
import torch

from ..registry import register


@register("band_part")
def band_part(x: torch.Tensor, lower: int = -1, upper: int = -1) -> torch.Tensor:
    """Zero the elements of the innermost matrices outside the band i - j <= lower, j - i <= upper
    (a negative bound keeps that whole triangle)."""
    rows, columns = x.shape[-2:]
    i = torch.arange(rows, device=x.device).reshape(-1, 1)
    j = torch.arange(columns, device=x.device).reshape(1, -1)
    keep = torch.ones(rows, columns, dtype=torch.bool, device=x.device)
    if lower >= 0:
        keep &= i - j <= lower
    if upper >= 0:
        keep &= j - i <= upper
    return torch.where(keep, x, torch.zeros_like(x))


@register("cumsum", widen=True)
def cumsum(x: torch.Tensor, axis: int = 0, exclusive: bool = False, reverse: bool = False) -> torch.Tensor:
    """Running sum along `axis`; `exclusive` leaves out the current element, `reverse` runs from
    the end."""
    if reverse:
        x = torch.flip(x, dims=[axis])
    result = torch.cumsum(x, dim=axis)
    if exclusive:
        result = result - x
    return torch.flip(result, dims=[axis]) if reverse else result


@register("fill")
def fill(shape: torch.Tensor, value: torch.Tensor | int | bool = 0.0) -> torch.Tensor:
    """A tensor of `shape` holding `value` everywhere."""
    return torch.full(shape.tolist(), _scalar(value), device=shape.device)


@register("fill_like")
def fill_like(ref_tensor: torch.Tensor, value: torch.Tensor | int | bool = 0.0) -> torch.Tensor:
    """A tensor shaped like `ref_tensor` holding `value` everywhere."""
    return torch.full(ref_tensor.shape, _scalar(value), device=ref_tensor.device)


def _scalar(value):
    return value.item() if isinstance(value, torch.Tensor) else value


@register("range_1d")
def range_1d(end: torch.Tensor, start: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """[start, start + step, ...) up to `end`, as numpy.arange."""
    return torch.arange(start.item(), end.item(), step.item(), device=end.device)


@register("shape")
def shape(x: torch.Tensor) -> torch.Tensor:
    """The shape of x as an int32 vector."""
    return torch.tensor(x.shape, dtype=torch.int32, device=x.device)


@register("one_hot")
def one_hot(
    indices: torch.Tensor,
    one_hot_vector_size: torch.Tensor,
    axis: int = -1,
    on_value: torch.Tensor | int = 1,
    off_value: torch.Tensor | int = 0,
) -> torch.Tensor:
    """A new dim at `axis` of size one_hot_vector_size: on_value at each index, off_value elsewhere."""
    size = int(one_hot_vector_size)
    hot = torch.nn.functional.one_hot(indices.long(), size)
    result = torch.where(hot.bool(), torch.as_tensor(_scalar(on_value)), torch.as_tensor(_scalar(off_value)))
    return torch.movedim(result, -1, axis % result.dim())


@register("topk")
def topk(
    x: torch.Tensor,
    k: int = 1,
    axis: int = -1,
    ascending: bool = False,
    sort: bool = True,
    return_indices: bool = True,
    output_indices_dtype: str = "int32",
) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """The k largest (or smallest, `ascending`) values along `axis`, best first, and their indices
    unless return_indices is False."""
    values, indices = torch.topk(x, k, dim=axis, largest=not ascending, sorted=True)
    return (values, indices) if return_indices else values


@register("argsort")
def argsort(x: torch.Tensor, axis: int = -1, ascending: bool = False) -> torch.Tensor:
    """Indices that sort x along `axis` (descending unless `ascending`), ties in input order."""
    return torch.argsort(x, dim=axis, descending=not ascending, stable=True)


@register("non_zero")
def non_zero(x: torch.Tensor) -> torch.Tensor:
    """[N, rank(x)]: the coordinates of the N non-zero elements, in row-major order."""
    return torch.nonzero(x)
