"""MIL gathers (coremltools `ops/defs/iOS15/scatter_gather.py`, `batch_dims` from iOS 16).

Indices may be negative (counted from the end of the indexed dim), as in NumPy. From iOS 17 every
gather and scatter takes `validate_indices`: when true, any index outside [0, size) (negative ones
included) fails the prediction, as Core ML raises. When false, the MIL reference leaves out-of-range
behaviour undefined (memory safe): gathers still count negative indices from the end, and iOS 17
scatters drop the updates whose indices fall outside [0, size), leaving those elements as they were.
"""
import math

import torch
from coremltools import target

from ..registry import register


def _wrapped(indices: torch.Tensor, size: int, validate: bool = False) -> torch.Tensor:
    """Gather indices: negative ones count from the end, unless `validate` makes them fail."""
    if validate:
        _in_range(indices, size, validate)
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
        return _per_batch(lambda xb, ib: gather(xb, ib, axis - batch_dims, 0, validate_indices), x, indices, batch_dims)
    flat = _wrapped(indices, x.shape[axis], validate_indices).reshape(-1)
    taken = torch.index_select(x, axis, flat)
    return taken.reshape(x.shape[:axis] + indices.shape + x.shape[axis + 1 :])


@register("gather_along_axis")
def gather_along_axis(
    x: torch.Tensor, indices: torch.Tensor, axis: int = 0, validate_indices: bool = False
) -> torch.Tensor:
    """output[..., i, ...] = x[..., indices[..., i, ...], ...] along `axis` (same rank as x)."""
    return torch.gather(x, axis, _wrapped(indices, x.shape[axis], validate_indices))


@register("gather_nd")
def gather_nd(
    x: torch.Tensor, indices: torch.Tensor, batch_dims: int = 0, validate_indices: bool = False
) -> torch.Tensor:
    """indices [*K, r]: output[k] = x[indices[k, 0], ..., indices[k, r - 1]] (the trailing dims of x
    beyond r are kept); shape K + x.shape[batch_dims + r:]."""
    if batch_dims:
        return _per_batch(lambda xb, ib: gather_nd(xb, ib, 0, validate_indices), x, indices, batch_dims)
    depth = indices.shape[-1]
    coordinates = tuple(_wrapped(indices[..., i], x.shape[i], validate_indices) for i in range(depth))
    return x[coordinates]


# --- scatters: each finds the flat positions in `data` its updates go to, then applies `mode` ---


def _scatter_flat(data: torch.Tensor, positions: torch.Tensor, updates: torch.Tensor, mode: str,
                  keep: torch.Tensor | None = None) -> torch.Tensor:
    """data with updates combined into it at flat `positions` (shaped like updates, as `keep` is: only
    where it is true, when given): "update" replaces, "add" / "sub" / "mul" / "div" / "max" / "min" combine
    the element with each update sent to it."""
    result = data.reshape(-1).clone()
    positions, updates = positions.reshape(-1), updates.reshape(-1).to(data.dtype)
    if keep is not None:
        keep = keep.reshape(-1)
        positions, updates = positions[keep], updates[keep]
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


def _in_range(indices: torch.Tensor, size: int, validate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """iOS 17 scatter indices: (indices with those outside [0, size) replaced by 0, where they are
    inside); with `validate`, any outside fails."""
    indices = indices.long()
    inside = (indices >= 0) & (indices < size)
    if validate and not bool(inside.all()):
        raise IndexError(f"index {int(indices[~inside][0])} is out of bounds [0, {size}) and validate_indices is set")
    return torch.where(inside, indices, 0), inside


def _scatter_positions(data: torch.Tensor, indices: torch.Tensor, axis: int) -> torch.Tensor:
    """Flat positions of `data` for slices along `axis` at 1-D `indices` (shaped like the updates)."""
    return _flat_positions(data).index_select(axis, indices.reshape(-1))


def _kept_slices(inside: torch.Tensor, updates: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * updates.dim()
    shape[axis] = -1
    return inside.reshape(shape).expand(updates.shape)


@register("scatter")
def scatter(
    data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, axis: int = 0, mode: str = "add",
    validate_indices: bool = False
) -> torch.Tensor:
    """output[..., indices[i], ...] = mode(data[..., indices[i], ...], updates[..., i, ...]) along `axis`."""
    positions = _scatter_positions(data, _wrapped(indices, data.shape[axis]), axis)
    return _scatter_flat(data, positions, updates, mode)


@register("scatter", since=target.iOS17)
def scatter_without_negative_indices(
    data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, axis: int = 0, mode: str = "add",
    validate_indices: bool = False
) -> torch.Tensor:
    indices, inside = _in_range(indices, data.shape[axis], validate_indices)
    positions = _scatter_positions(data, indices, axis)
    return _scatter_flat(data, positions, updates, mode, _kept_slices(inside, updates, axis % data.dim()))


@register("scatter_along_axis")
def scatter_along_axis(
    data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, axis: int = 0, mode: str = "add",
    validate_indices: bool = False
) -> torch.Tensor:
    """The inverse of gather_along_axis: updates[..., i, ...] goes to data[..., indices[..., i, ...], ...]."""
    positions = torch.gather(_flat_positions(data), axis, _wrapped(indices, data.shape[axis]))
    return _scatter_flat(data, positions, updates, mode)


@register("scatter_along_axis", since=target.iOS17)
def scatter_along_axis_without_negative_indices(
    data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, axis: int = 0, mode: str = "add",
    validate_indices: bool = False
) -> torch.Tensor:
    indices, inside = _in_range(indices, data.shape[axis], validate_indices)
    positions = torch.gather(_flat_positions(data), axis, indices)
    return _scatter_flat(data, positions, updates, mode, inside)


@register("scatter_nd")
def scatter_nd(
    data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, mode: str = "add", validate_indices: bool = False
) -> torch.Tensor:
    """The inverse of gather_nd: updates[k] goes to data[indices[k, 0], ..., indices[k, r - 1]]."""
    depth = indices.shape[-1]
    coordinates = tuple(_wrapped(indices[..., i], data.shape[i]) for i in range(depth))
    return _scatter_flat(data, _flat_positions(data)[coordinates], updates, mode)


@register("scatter_nd", since=target.iOS17)
def scatter_nd_without_negative_indices(
    data: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor, mode: str = "add", validate_indices: bool = False
) -> torch.Tensor:
    depth = indices.shape[-1]
    checked = [_in_range(indices[..., i], data.shape[i], validate_indices) for i in range(depth)]
    inside = torch.stack([kept for _, kept in checked]).all(dim=0)  # [*K]: every coordinate inside
    positions = _flat_positions(data)[tuple(coordinate for coordinate, _ in checked)]
    kept = inside.reshape(inside.shape + (1,) * (positions.dim() - inside.dim())).expand(positions.shape)
    return _scatter_flat(data, positions, updates, mode, kept)
