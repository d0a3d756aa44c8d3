"""MIL ops that move elements without computing on them (coremltools
`ops/defs/iOS15/tensor_transformation.py`, with the iOS 16/17 revisions).

Negative axes count from the end, as in NumPy.
"""
import math

import torch

from ..registry import register


@register("reshape")
def reshape(x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """`shape` may hold one -1 (inferred) and 0s; a 0 copies the dim of x at the same position counted
    from the right, or is 1 if x has no such dim (iOS 17's rule, which equals iOS 15's whenever iOS 15
    allows 0, i.e. len(shape) == rank(x))."""
    target = shape.tolist()
    offset = len(target) - x.dim()
    for i, size in enumerate(target):
        if size == 0:
            target[i] = x.shape[i - offset] if i - offset >= 0 else 1
    return x.reshape(target)


@register("transpose")
def transpose(x: torch.Tensor, perm: list[int]) -> torch.Tensor:
    return x.permute(perm)


@register("squeeze")
def squeeze(x: torch.Tensor, axes: list[int] | None = None) -> torch.Tensor:
    """Remove the size-1 dims in `axes`, or all size-1 dims."""
    return torch.squeeze(x) if axes is None else torch.squeeze(x, dim=tuple(axes))


@register("expand_dims")
def expand_dims(x: torch.Tensor, axes: list[int]) -> torch.Tensor:
    """Insert size-1 dims so that they sit at `axes` of the output (negative axes count from the
    output's end)."""
    out_rank = x.dim() + len(axes)
    for axis in sorted(a % out_rank for a in axes):
        x = x.unsqueeze(axis)
    return x


@register("flatten2d")
def flatten2d(x: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """[prod(shape[:axis]), prod(shape[axis:])], the slices taken as Python's (a rank-1 x of size N
    gives [N, 1] for axis 1 and [1, N] for axis 0 or -1)."""
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


@register("reverse")
def reverse(x: torch.Tensor, axes: list[int] | None = None) -> torch.Tensor:
    """Reverse the order along `axes` (default: all)."""
    return torch.flip(x, dims=list(range(x.dim())) if axes is None else axes)


@register("slice_by_index")
def slice_by_index(
    x: torch.Tensor,
    begin: torch.Tensor,
    end: torch.Tensor,
    stride: list[int] | None = None,
    begin_mask: list[bool] | None = None,
    end_mask: list[bool] | None = None,
    squeeze_mask: list[bool] | None = None,
) -> torch.Tensor:
    """x[begin[0]:end[0]:stride[0], ...] with NumPy's rules (negative indices wrap, out-of-range
    ones clamp, negative strides walk backwards). A set begin_mask / end_mask entry drops that
    bound (the slice starts / ends at the array's edge); a set squeeze_mask entry indexes at
    begin instead of slicing, which removes the dim."""
    rank = x.dim()
    begin, end = begin.tolist(), end.tolist()
    stride = stride or [1] * rank
    begin_mask = begin_mask or [False] * rank
    end_mask = end_mask or [False] * rank
    squeeze_mask = squeeze_mask or [False] * rank
    index = []
    for i in range(rank):
        if squeeze_mask[i]:
            index.append(begin[i])
            continue
        start = None if begin_mask[i] else begin[i]
        stop = None if end_mask[i] else end[i]
        start, stop, step = slice(start, stop, stride[i]).indices(x.shape[i])
        if step > 0:
            index.append(slice(start, stop, step))
        else:
            index.append(torch.arange(start, stop, step, device=x.device))
    return _index(x, index)


def _index(x: torch.Tensor, index: list) -> torch.Tensor:
    """x[index] applied dim by dim, so that index tensors in several dims do not pair up."""
    dim = 0
    for item in index:
        if isinstance(item, int):
            x = x.select(dim, item)
        elif isinstance(item, slice):
            x = x[(slice(None),) * dim + (item,)]
            dim += 1
        else:
            x = x.index_select(dim, item)
            dim += 1
    return x


@register("slice_update")
def slice_update(
    x: torch.Tensor,
    update: torch.Tensor,
    begin: torch.Tensor,
    end: torch.Tensor,
    stride: list[int] | None = None,
    begin_mask: list[bool] | None = None,
    end_mask: list[bool] | None = None,
    squeeze_mask: list[bool] | None = None,
) -> torch.Tensor:
    """x with the slice that slice_by_index takes (same arguments) replaced by `update`."""
    positions = slice_by_index(
        torch.arange(x.numel(), device=x.device).reshape(x.shape), begin, end, stride, begin_mask, end_mask,
        squeeze_mask
    )
    result = x.reshape(-1).clone()
    result[positions.reshape(-1)] = update.reshape(-1).to(x.dtype)
    return result.reshape(x.shape)


@register("slice_by_size")
def slice_by_size(x: torch.Tensor, begin: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """x[begin[i] : begin[i] + size[i]] per dim; size -1 means to the end."""
    for dim, (start, length) in enumerate(zip(begin.tolist(), size.tolist())):
        start %= x.shape[dim]
        x = x.narrow(dim, start, x.shape[dim] - start if length == -1 else length)
    return x


@register("concat")
def concat(values: list[torch.Tensor], axis: int, interleave: bool = False) -> torch.Tensor:
    """Join along `axis`; with `interleave` (equal shapes), take one slice of each input in turn:
    [a0, b0, a1, b1, ...]."""
    if not interleave:
        return torch.cat(values, dim=axis)
    axis %= values[0].dim()
    stacked = torch.stack(values, dim=axis + 1)
    return stacked.flatten(axis, axis + 1)


@register("split")
def split(
    x: torch.Tensor, axis: int, num_splits: int | None = None, split_sizes: list[int] | None = None
) -> tuple[torch.Tensor, ...]:
    """Cut along `axis` into `split_sizes` pieces, or into `num_splits` equal pieces."""
    sizes = split_sizes if split_sizes is not None else x.shape[axis] // num_splits
    return tuple(torch.split(x, sizes, dim=axis))


@register("stack")
def stack(values: list[torch.Tensor], axis: int) -> torch.Tensor:
    """Join equal-shaped inputs along a new dim at `axis`."""
    return torch.stack(values, dim=axis)


@register("tile")
def tile(x: torch.Tensor, reps: torch.Tensor) -> torch.Tensor:
    """Repeat x reps[i] times along dim i (len(reps) == rank(x))."""
    return x.repeat(reps.tolist())


@register("pad")
def pad(x: torch.Tensor, pad: torch.Tensor, mode: str = "constant",
        constant_val: torch.Tensor | None = None) -> torch.Tensor:
    """`pad` holds (before, after) pairs for the last len(pad) / 2 dims, outermost first. "constant"
    fills with constant_val (default 0), "reflect" mirrors without repeating the edge, "replicate"
    repeats the edge."""
    amounts = pad.tolist()
    first = x.dim() - len(amounts) // 2
    if mode == "constant":
        value = 0.0 if constant_val is None else float(constant_val)
        flat = []
        for dim in reversed(range(first, x.dim())):
            flat += amounts[2 * (dim - first) : 2 * (dim - first) + 2]
        return torch.nn.functional.pad(x, flat, value=value)
    for dim in range(first, x.dim()):
        before, after = amounts[2 * (dim - first) : 2 * (dim - first) + 2]
        if before or after:
            positions = torch.arange(-before, x.shape[dim] + after, device=x.device)
            x = x.index_select(dim, _source_positions(positions, x.shape[dim], mode))
    return x


def _source_positions(positions: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """For each output position (relative to the unpadded start), the input element it copies."""
    if mode == "replicate":
        return positions.clamp(0, size - 1)
    if mode == "reflect":
        period = 2 * (size - 1)
        folded = positions.remainder(period) if period else torch.zeros_like(positions)
        return torch.where(folded < size, folded, period - folded)
    raise ValueError(f"pad mode {mode!r} is not one of constant, reflect, replicate")


@register("depth_to_space")
def depth_to_space(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[N, C*b*b, H, W] -> [N, C, H*b, W*b]; channel (i*b + j)*C + c goes to (h*b + i, w*b + j) of
    channel c (TensorFlow's layout, depth-column-row)."""
    n, channels, height, width = x.shape
    b = block_size
    x = x.reshape(n, b, b, channels // (b * b), height, width)
    return x.permute(0, 3, 4, 1, 5, 2).reshape(n, channels // (b * b), height * b, width * b)


@register("space_to_depth")
def space_to_depth(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """The inverse of depth_to_space: [N, C, H*b, W*b] -> [N, C*b*b, H, W]."""
    n, channels, height, width = x.shape
    b = block_size
    x = x.reshape(n, channels, height // b, b, width // b, b)
    return x.permute(0, 3, 5, 1, 2, 4).reshape(n, channels * b * b, height // b, width // b)


@register("pixel_shuffle")
def pixel_shuffle(x: torch.Tensor, upscale_factor: int) -> torch.Tensor:
    """[N, C*r*r, H, W] -> [N, C, H*r, W*r]; channel c*r*r + i*r + j goes to (h*r + i, w*r + j)
    (PyTorch's layout, column-row-depth)."""
    return torch.nn.functional.pixel_shuffle(x, upscale_factor)


@register("pixel_unshuffle")
def pixel_unshuffle(x: torch.Tensor, downscale_factor: int) -> torch.Tensor:
    """The inverse of pixel_shuffle."""
    return torch.nn.functional.pixel_unshuffle(x, downscale_factor)


@register("reshape_like")
def reshape_like(
    x: torch.Tensor, ref_tensors: list[torch.Tensor], begins: list, ends: list, end_masks: list
) -> torch.Tensor:
    """Reshape to the concatenation of ref_tensors[i].shape[begins[i]:ends[i]] (to the end where
    end_masks[i])."""
    shape = []
    for reference, begin, end, to_end in zip(ref_tensors, begins, ends, end_masks):
        shape += reference.shape[int(begin) :] if bool(to_end) else reference.shape[int(begin) : int(end)]
    return x.reshape(shape)


@register("sliding_windows")
def sliding_windows(x: torch.Tensor, axis: int, size: int, stride: int = 1) -> torch.Tensor:
    """All windows of `size` elements along `axis`, `stride` apart: the axis becomes
    [(d_axis - size) // stride + 1, size]."""
    axis %= x.dim()
    return torch.movedim(x.unfold(axis, size, stride), -1, axis + 1)


@register("space_to_batch")
def space_to_batch(x: torch.Tensor, block_shape: list[int], paddings: list[list[int]]) -> torch.Tensor:
    """[N, C, H, W] zero-padded, then each (b0 x b1) block spread over the batch: output batch
    (i b1 + j) N + n holds the elements at (h b0 + i, w b1 + j) of sample n (TensorFlow's order)."""
    (top, bottom), (left, right) = paddings
    x = torch.nn.functional.pad(x, [left, right, top, bottom])
    n, channels, height, width = x.shape
    b0, b1 = block_shape
    x = x.reshape(n, channels, height // b0, b0, width // b1, b1)
    return x.permute(3, 5, 0, 1, 2, 4).reshape(n * b0 * b1, channels, height // b0, width // b1)


@register("batch_to_space")
def batch_to_space(x: torch.Tensor, block_shape: list[int], crops: list[list[int]]) -> torch.Tensor:
    """The inverse of space_to_batch, then `crops` ((top, bottom), (left, right)) removed."""
    batch, channels, height, width = x.shape
    b0, b1 = block_shape
    n = batch // (b0 * b1)
    x = x.reshape(b0, b1, n, channels, height, width).permute(2, 3, 4, 0, 5, 1)
    x = x.reshape(n, channels, height * b0, width * b1)
    (top, bottom), (left, right) = crops
    return x[:, :, top : height * b0 - bottom, left : width * b1 - right]


@register("reverse_sequence")
def reverse_sequence(x: torch.Tensor, lengths: torch.Tensor, seq_axis: int = 0, batch_axis: int = 0) -> torch.Tensor:
    """For each position b along batch_axis, the first lengths[b] elements along seq_axis reversed."""
    rank = x.dim()
    def along(values, axis):
        return values.reshape([-1 if d == axis % rank else 1 for d in range(rank)])
    position = along(torch.arange(x.shape[seq_axis], device=x.device), seq_axis)
    length = along(lengths.long(), batch_axis)
    source = torch.where(position < length, length - 1 - position, position)
    return torch.gather(x, seq_axis, source.expand(x.shape))
