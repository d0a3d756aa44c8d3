"""MIL's compressed constants (coremltools `ops/defs/iOS16/constexpr_ops.py`, `iOS18/compression.py`).

These ops decompress weights: they run once, in NumPy, when a package is loaded, and their outputs
become ordinary constants. Their inputs are NumPy arrays exactly as coremltools loads them: iOS 16
packs LUT indices and sparsity masks into bytes; iOS 18 holds sub-byte types unpacked, one element
per value.
"""
import math

import numpy as np
from coremltools import target

from ..registry import register

_LOAD_TIME = dict(load_time=True)


def _unpack_bits(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """`count` unsigned integers of nbits (at most 8) packed least significant bit first, byte by byte.

    Bytes are taken in groups that hold a whole number of values (3 bytes = 4 six-bit values), each
    group read as one little-endian integer and the values shifted out of it: a few passes over the
    data, where unpacking to single bits would take one per bit (37 s for SD's Unet at 6 bits)."""
    group_bits = math.lcm(nbits, 8)
    group_bytes, values_per_group = group_bits // 8, group_bits // nbits
    groups = -(-count // values_per_group)
    data = np.zeros(groups * group_bytes, dtype=np.uint8)
    available = min(packed.size, data.size)
    data[:available] = packed.reshape(-1)[:available]
    data = data.reshape(groups, group_bytes)
    words = np.zeros(groups, dtype=np.uint64)
    for byte in range(group_bytes):
        words |= data[:, byte].astype(np.uint64) << np.uint64(8 * byte)
    shifts = np.arange(values_per_group, dtype=np.uint64) * np.uint64(nbits)
    values = (words[:, None] >> shifts) & np.uint64((1 << nbits) - 1)
    return values.reshape(-1)[:count].astype(np.uint8)


def _along_axis(values: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """A scalar, or a vector shaped to broadcast along `axis` of a rank-`rank` array."""
    if values.size == 1:
        return values.reshape(())
    shape = [1] * rank
    shape[axis] = values.size
    return values.reshape(shape)


@register("constexpr_affine_dequantize", since=target.iOS16, **_LOAD_TIME)
def constexpr_affine_dequantize(
    quantized_data: np.ndarray, zero_point: np.ndarray, scale: np.ndarray, axis: int
) -> np.ndarray:
    """scale * (quantized_data - zero_point); scale and zero_point are scalars or vectors along `axis`."""
    rank = quantized_data.ndim
    zero_point = _along_axis(np.asarray(zero_point, dtype=np.float32), axis, rank)
    scale = np.asarray(scale)
    return (_along_axis(scale.astype(np.float32), axis, rank)
            * (quantized_data.astype(np.float32) - zero_point)).astype(scale.dtype)


@register("constexpr_lut_to_dense", since=target.iOS16, **_LOAD_TIME)
def constexpr_lut_to_dense_ios16(indices: np.ndarray, lut: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """Palettized weights: `indices` packs one log2(len(lut))-bit index per output element; each
    element is lut[index]."""
    shape = [int(s) for s in np.asarray(shape).reshape(-1)]
    nbits = int(math.log2(lut.size))
    return lut[_unpack_bits(indices, nbits, math.prod(shape))].reshape(shape)


@register("constexpr_sparse_to_dense", since=target.iOS16, **_LOAD_TIME)
def constexpr_sparse_to_dense_ios16(nonzero_data: np.ndarray, mask: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """`mask` packs one bit per output element (row-major, least significant bit first); set bits take
    the values of nonzero_data in order, the others are zero."""
    shape = [int(s) for s in np.asarray(shape).reshape(-1)]
    bits = np.unpackbits(mask.astype(np.uint8), bitorder="little")[: math.prod(shape)]
    dense = np.zeros(math.prod(shape), dtype=nonzero_data.dtype)
    dense[bits.astype(bool)] = nonzero_data
    return dense.reshape(shape)


@register("constexpr_cast", since=target.iOS16, **_LOAD_TIME)
def constexpr_cast(source_val: np.ndarray, output_dtype: str) -> np.ndarray:
    """A stored constant (fp16) converted to `output_dtype` (fp32)."""
    return source_val.astype({"fp16": np.float16, "fp32": np.float32}[output_dtype])


def _blockwise(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Blockwise parameters repeated so that each applies to its block of a `shape` array: along
    dim d, a block spans shape[d] / values.shape[d] elements."""
    for axis, (size, blocks) in enumerate(zip(shape, values.shape)):
        if blocks != size:
            values = np.repeat(values, size // blocks, axis=axis)
    return values


@register("constexpr_blockwise_shift_scale", since=target.iOS18, **_LOAD_TIME)
def constexpr_blockwise_shift_scale(data: np.ndarray, scale: np.ndarray,
                                    offset: np.ndarray | None = None) -> np.ndarray:
    """scale * (data - offset), scale and offset given per block (same rank as data)."""
    values = data.astype(np.float32)
    if offset is not None:
        values = values - _blockwise(offset.astype(np.float32), data.shape)
    return (values * _blockwise(scale.astype(np.float32), data.shape)).astype(scale.dtype)


@register("constexpr_lut_to_dense", since=target.iOS18, **_LOAD_TIME)
def constexpr_lut_to_dense(indices: np.ndarray, lut: np.ndarray, vector_axis: int | None = None) -> np.ndarray:
    """Per-block palettes: lut [*G, P, V] holds, for each block of indices (G[d] blocks along dim d),
    P entries of V values. Each index picks an entry of its block's palette; with V > 1 the entry's
    vector is laid out along `vector_axis`, which grows V-fold."""
    rank = indices.ndim
    palettes, vector_size = lut.shape[-2], lut.shape[-1]
    groups = lut.shape[:rank]
    # The flat palette number of every element, from its block coordinates.
    palette = np.zeros(indices.shape, dtype=np.int64)
    for axis, (size, count) in enumerate(zip(indices.shape, groups)):
        coordinate = np.arange(size) // (size // count)
        palette = palette * count + coordinate.reshape([-1 if d == axis else 1 for d in range(rank)])
    table = lut.reshape(-1, palettes, vector_size)
    values = table[palette, indices.astype(np.int64)]  # indices.shape + (V,)
    if vector_size == 1:
        return values[..., 0]
    axis = vector_axis % rank
    shape = list(indices.shape)
    shape[axis] *= vector_size
    return np.moveaxis(values, -1, axis + 1).reshape(shape)


@register("constexpr_sparse_to_dense", since=target.iOS18, **_LOAD_TIME)
def constexpr_sparse_to_dense(nonzero_data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Zeros shaped like `mask`, with the values of nonzero_data where the mask is 1 (row-major)."""
    dense = np.zeros(mask.shape, dtype=nonzero_data.dtype)
    dense[mask != 0] = nonzero_data
    return dense


@register("constexpr_lut_to_sparse", since=target.iOS18, **_LOAD_TIME)
def constexpr_lut_to_sparse(
    indices_mask: np.ndarray, indices_nonzero_data: np.ndarray, lut: np.ndarray, vector_axis: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Palettized sparse weights: the (mask, nonzero values) pair for constexpr_sparse_to_dense."""
    indices = constexpr_sparse_to_dense(indices_nonzero_data, indices_mask)
    dense = constexpr_lut_to_dense(indices, lut, vector_axis)
    mask = indices_mask
    if lut.shape[-1] > 1:
        mask = np.repeat(mask, lut.shape[-1], axis=vector_axis)
    return mask, dense[mask != 0]


@register("constexpr_sparse_blockwise_shift_scale", since=target.iOS18, **_LOAD_TIME)
def constexpr_sparse_blockwise_shift_scale(
    data_mask: np.ndarray, nonzero_data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Quantized sparse weights: the (mask, nonzero values) pair for constexpr_sparse_to_dense."""
    dense = constexpr_blockwise_shift_scale(constexpr_sparse_to_dense(nonzero_data, data_mask), scale, offset)
    return data_mask, dense[data_mask != 0]
