"""MIL gathers (coremltools `ops/defs/iOS15/scatter_gather.py`, `batch_dims` from iOS 16).

Indices may be negative (counted from the end of the indexed dim), as in NumPy.
"""
import math

import torch

from ..registry import register


def _wrapped(indices: torch.Tensor, size: int) -> torch.Tensor:
    indices = indices.long()
    return torch.where(indices < 0, indices + size, indices)


def _per_batch(function, x: torch.Tensor, indices: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """Apply `function(x_b, indices_b)` to each of the leading `batch_dims` positions, which x and
    indices share, and stack the results back into those dims."""
    batch_shape = x.shape[:batch_dims]
    flat_x = x.reshape((math.prod(batch_shape),) + x.shape[batch_dims:])
    flat_indices = indices.reshape((math.prod(batch_shape),) + indices.shape[batch_dims:])
    results = torch.stack([function(xb, ib) for xb, ib in zip(flat_x, flat_indices)])
    return results.reshape(batch_shape + results.shape[1:])


@register("gather")
def gather(
    x: torch.Tensor, indices: torch.Tensor, axis: int = 0, batch_dims: int = 0, validate_indices: bool = False
) -> torch.Tensor:
    """Take slices of x along `axis` at `indices`: the output shape is
    x.shape[:axis] + indices.shape[batch_dims:] + x.shape[axis + 1:] (tf.gather with batch_dims)."""
    axis %= x.dim()
    if batch_dims:
        return _per_batch(lambda xb, ib: gather(xb, ib, axis - batch_dims), x, indices, batch_dims)
    flat = _wrapped(indices, x.shape[axis]).reshape(-1)
    taken = torch.index_select(x, axis, flat)
    return taken.reshape(x.shape[:axis] + indices.shape + x.shape[axis + 1 :])


@register("gather_along_axis")
def gather_along_axis(
    x: torch.Tensor, indices: torch.Tensor, axis: int = 0, validate_indices: bool = False
) -> torch.Tensor:
    """output[..., i, ...] = x[..., indices[..., i, ...], ...] along `axis` (same rank as x)."""
    return torch.gather(x, axis, _wrapped(indices, x.shape[axis]))


@register("gather_nd")
def gather_nd(
    x: torch.Tensor, indices: torch.Tensor, batch_dims: int = 0, validate_indices: bool = False
) -> torch.Tensor:
    """indices [*K, r]: output[k] = x[indices[k, 0], ..., indices[k, r - 1]] (the trailing dims of x
    beyond r are kept); shape K + x.shape[batch_dims + r:]."""
    if batch_dims:
        return _per_batch(lambda xb, ib: gather_nd(xb, ib), x, indices, batch_dims)
    depth = indices.shape[-1]
    coordinates = tuple(_wrapped(indices[..., i], x.shape[i]) for i in range(depth))
    return x[coordinates]


# --- scatters: each finds the flat positions in `data` its updates go to, then applies `mode` ---


def _scatter_flat(data: torch.Tensor, positions: torch.Tensor, updates: torch.Tensor, mode: str) -> torch.Tensor:
    """data with updates combined into it at flat `positions` (shaped like updates): "update"
    replaces, "add" / "sub" / "mul" / "div" / "max" / "min" combine the element with each update
    sent to it."""
    result = data.reshape(-1).clone()
    positions, updates = positions.reshape(-1), updates.reshape(-1).to(data.dtype)
    if mode == "update":
        result[positions] = updates
    elif mode in ("add", "sub"):
        result.index_add_(0, positions, updates if mode == "add" else -updates)
    elif mode in ("mul", "max", "min"):
        result.index_reduce_(0, positions, updates, {"mul": "prod", "max": "amax", "min": "amin"}[mode])
    elif mode == "div":
        divisors = torch.ones_like(result).index_reduce_(0, positions, updates, "prod")
        result = result / divisors if data.is_floating_point() else torch.div(result, divisors, rounding_mode="floor")
    else:
        raise ValueError(f"scatter mode {mode!r} is not one of update, add, sub, mul, div, max, min")
    return result.reshape(data.shape)


def _flat_positions(data: torch.Tensor) -> torch.Tensor:
    return torch.arange(data.numel(), device=data.device).reshape(data.shape)


@register("scatter")
def scatter(
    data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, axis: int = 0, mode: str = "add", validate_indices: bool = False
) -> torch.Tensor:
    """output[..., indices[i], ...] = mode(data[..., indices[i], ...], updates[..., i, ...]) along `axis`."""
    positions = _flat_positions(data).index_select(axis, _wrapped(indices, data.shape[axis]).reshape(-1))
    return _scatter_flat(data, positions, updates, mode)


@register("scatter_along_axis")
def scatter_along_axis(
    data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, axis: int = 0, mode: str = "add", validate_indices: bool = False
) -> torch.Tensor:
    """The inverse of gather_along_axis: updates[..., i, ...] goes to data[..., indices[..., i, ...], ...]."""
    positions = torch.gather(_flat_positions(data), axis, _wrapped(indices, data.shape[axis]))
    return _scatter_flat(data, positions, updates, mode)


@register("scatter_nd")
def scatter_nd(
    data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, mode: str = "add", validate_indices: bool = False
) -> torch.Tensor:
    """The inverse of gather_nd: updates[k] goes to data[indices[k, 0], ..., indices[k, r - 1]]."""
    depth = indices.shape[-1]
    coordinates = tuple(_wrapped(indices[..., i], data.shape[i]) for i in range(depth))
    return _scatter_flat(data, _flat_positions(data)[coordinates], updates, mode)
