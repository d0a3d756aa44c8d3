"""Ops that move, gather or generate elements, against NumPy indexing (results must match exactly)."""
import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from executor_testing import random, run_mil


def test_reshape_transpose_squeeze_expand_flatten_reverse(tmp_path):
    x = random((2, 1, 3, 4))
    def body(x):
        return (
            mb.reshape(x=x, shape=[1, 0, -1, 0]),  # 0 copies the dim at the same position
            mb.reshape(x=x, shape=[1, 0, 0, -1, 0]),  # iOS 17: 0s align with x's dims from the right...
            mb.reshape(x=mb.reshape(x=x, shape=[6, 4]), shape=[0, 0, -1, 0]),  # ...and are 1 beyond x's rank
            mb.transpose(x=x, perm=[3, 0, 2, 1]),
            mb.squeeze(x=x),
            mb.squeeze(x=x, axes=[-3]),
            mb.expand_dims(x=mb.squeeze(x=x), axes=[0, -2]),
            mb.flatten2d(x=x, axis=-2),
            mb.reverse(x=x, axes=[0, -1]),
            mb.reverse(x=x),
            mb.flatten2d(x=mb.reshape(x=x, shape=[24])),
            mb.flatten2d(x=mb.reshape(x=x, shape=[24]), axis=-1),
        )
    outputs = run_mil(body, dict(x=x), tmp_path, target=ct.target.iOS17)
    expected = [
        x.reshape(1, 1, -1, 4),
        x.reshape(1, 2, 1, 3, 4),
        x.reshape(1, 1, 6, 4),
        x.transpose(3, 0, 2, 1),
        x.squeeze(),
        x.squeeze(1),
        x.reshape(1, 2, 3, 1, 4),
        x.reshape(2, 12),
        x[::-1, :, :, ::-1],
        x[::-1, ::-1, ::-1, ::-1],
        x.reshape(24, 1),  # a rank-1 x: shape[:1] holds all of it, shape[1:] nothing
        x.reshape(1, 24),
    ]
    for index, (actual, wanted) in enumerate(zip(outputs, expected)):
        np.testing.assert_array_equal(actual, wanted, err_msg=f"output {index}")


def test_slice_by_index(tmp_path):
    x = random((4, 5, 6, 3))
    def body(x):
        return (
            mb.slice_by_index(x=x, begin=[1, -4, 0, 0], end=[3, -1, 6, 3], stride=[1, 2, 3, 1]),
            mb.slice_by_index(
                x=x,
                begin=[9, 1, 2, 0],
                end=[0, 4, 0, 0],
                begin_mask=[True, False, False, True],
                end_mask=[False, False, True, True],
            ),
            mb.slice_by_index(
                x=x, begin=[3, 4, -1, 0], end=[0, 0, 0, 3], stride=[-1, -2, -2, 1], end_mask=[True, False, False, False]
            ),
            mb.slice_by_index(x=x, begin=[2, 0, -1, 1], end=[3, 5, 0, 2], squeeze_mask=[True, False, True, False]),
            mb.slice_by_index(x=x, begin=[0, 0, 0, 0], end=[100, 5, 6, 3]),  # out-of-range ends clamp
            mb.slice_by_size(x=x, begin=[1, 2, 0, 1], size=[2, -1, 3, 2]),
        )

    outputs = run_mil(body, dict(x=x), tmp_path)
    expected = [
        x[1:3, -4:-1:2, 0:6:3, 0:3],
        x[:0, 1:4, 2:, :],
        x[3::-1, 4:0:-2, -1:0:-2, 0:3],
        x[2, 0:5, -1, 1:2],
        x[0:100],
        x[1:3, 2:, 0:3, 1:3],
    ]
    for index, (actual, wanted) in enumerate(zip(outputs, expected)):
        np.testing.assert_array_equal(actual, wanted, err_msg=f"output {index}")


def test_concat_split_stack_tile(tmp_path):
    a, b = random((2, 3, 4), seed=1), random((2, 3, 4), seed=2)

    def body(a, b):
        return (
            (
                mb.concat(values=(a, b, a), axis=-2),
                mb.concat(values=(a, b), axis=1, interleave=True),
                mb.stack(values=(a, b), axis=1),
                mb.tile(x=a, reps=[2, 1, 3]),
            )
            + tuple(mb.split(x=a, num_splits=2, axis=-1))
            + tuple(mb.split(x=b, split_sizes=[1, 2], axis=1))
        )

    outputs = run_mil(body, dict(a=a, b=b), tmp_path)
    interleaved = np.stack([a, b], axis=2).reshape(2, 6, 4)  # a[:, 0], b[:, 0], a[:, 1], ...
    expected = [
        np.concatenate([a, b, a], axis=-2),
        interleaved,
        np.stack([a, b], axis=1),
        np.tile(a, (2, 1, 3)),
        a[..., :2],
        a[..., 2:],
        b[:, :1],
        b[:, 1:],
    ]
    for index, (actual, wanted) in enumerate(zip(outputs, expected)):
        np.testing.assert_array_equal(actual, wanted, err_msg=f"output {index}")


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate"])
def test_pad(tmp_path, mode):
    x = random((2, 3, 4, 5))
    extra = dict(constant_val=1.5) if mode == "constant" else {}

    def body(x):
        return (
            mb.pad(x=x, pad=[1, 2, 0, 3], mode=mode, **extra),
            mb.pad(x=x, pad=[0, 0, 2, 1, 3, 0], mode=mode, **extra),
        )

    last_two, last_three = run_mil(body, dict(x=x), tmp_path)
    numpy_mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}[mode]
    numpy_extra = dict(constant_values=1.5) if mode == "constant" else {}
    np.testing.assert_array_equal(last_two, np.pad(x, [(0, 0), (0, 0), (1, 2), (0, 3)], mode=numpy_mode, **numpy_extra))
    np.testing.assert_array_equal(
        last_three, np.pad(x, [(0, 0), (0, 0), (2, 1), (3, 0)], mode=numpy_mode, **numpy_extra)
    )


def test_gathers(tmp_path):
    x = random((3, 4, 5))
    indices = np.array([[2, -1], [0, 1]], np.int32)
    along = np.random.default_rng(1).integers(-5, 5, (3, 4, 2)).astype(np.int32)
    nd = np.array([[[0, 1], [2, -1]], [[1, 0], [-3, 3]]], np.int32)
    batch_indices = np.array([[1, 0], [3, 3], [0, 2]], np.int32)

    def body(x, indices, along, nd, batch_indices):
        return (
            mb.gather(x=x, indices=indices, axis=1),
            mb.gather(x=x, indices=indices, axis=-1),
            mb.gather(x=x, indices=batch_indices, axis=1, batch_dims=1),
            mb.gather_along_axis(x=x, indices=along, axis=2),
            mb.gather_nd(x=x, indices=nd),
            mb.gather_nd(x=x, indices=mb.expand_dims(x=batch_indices, axes=[-1]), batch_dims=1),
        )

    inputs = dict(x=x, indices=indices, along=along, nd=nd, batch_indices=batch_indices)
    outputs = run_mil(body, inputs, tmp_path)
    expected = [
        x[:, indices],
        x[:, :, indices],
        np.stack([x[b][batch_indices[b]] for b in range(3)]),
        np.take_along_axis(x, along % 5, axis=2),
        x[nd[..., 0], nd[..., 1]],
        np.stack([x[b][batch_indices[b]] for b in range(3)]),
    ]
    for index, (actual, wanted) in enumerate(zip(outputs, expected)):
        np.testing.assert_array_equal(actual, wanted, err_msg=f"output {index}")


def test_band_part_cumsum_fill_one_hot_range(tmp_path):
    x = random((2, 4, 5))
    labels = np.array([[0, 3], [2, 1]], np.int32)

    def body(x, labels):
        return (
            mb.band_part(x=x, lower=1, upper=2),
            mb.band_part(x=x, lower=0),
            mb.cumsum(x=x, axis=-1),
            mb.cumsum(x=x, axis=1, exclusive=True, reverse=True),
            mb.add(x=mb.fill(shape=[2, 3], value=2.5), y=mb.reduce_sum(x=x)),
            mb.fill_like(ref_tensor=x, value=-1.0),
            mb.one_hot(indices=labels, one_hot_vector_size=4, axis=1, on_value=5.0, off_value=-1.0),
            mb.add(x=mb.range_1d(start=2.0, end=5.0, step=0.5), y=mb.reduce_sum(x=x)),
            mb.shape(x=x),
            mb.identity(x=x),
        )

    outputs = run_mil(body, dict(x=x, labels=labels), tmp_path)
    i, j = np.arange(4)[:, None], np.arange(5)[None, :]
    reversed_cumsum = np.flip(np.cumsum(np.flip(x, 1), 1), 1)
    one_hot = np.where(np.arange(4)[None, :, None] == labels[:, None, :], 5.0, -1.0)
    expected = [
        np.where((i - j <= 1) & (j - i <= 2), x, 0),
        np.where(i - j <= 0, x, 0),
        np.cumsum(x, -1),
        reversed_cumsum - x,
        np.full((2, 3), 2.5) + x.sum(),
        np.full(x.shape, -1.0),
        one_hot,
        np.arange(2.0, 5.0, 0.5) + x.sum(),
        np.array(x.shape),
        x,
    ]
    for index, (actual, wanted) in enumerate(zip(outputs, expected)):
        np.testing.assert_allclose(actual, wanted, rtol=1e-6, atol=1e-6, err_msg=f"output {index}")


def test_topk_and_argsort(tmp_path):
    x = np.round(random((3, 6), seed=3, low=0, high=4))  # ties: stable order by index

    def body(x):
        return (
            tuple(mb.topk(x=x, k=3, axis=-1))
            + tuple(mb.topk(x=x, k=2, axis=0, ascending=True))
            + (
                mb.argsort(x=x, axis=-1),
                mb.argsort(x=x, axis=0, ascending=True),
            )
        )

    top_values, top_indices, bottom_values, bottom_indices, descending, ascending = run_mil(body, dict(x=x), tmp_path)
    order = np.argsort(-x, axis=-1, kind="stable")
    np.testing.assert_array_equal(top_values, np.take_along_axis(x, order[:, :3], -1))
    np.testing.assert_array_equal(np.take_along_axis(x, top_indices, -1), top_values)
    np.testing.assert_array_equal(bottom_values, np.sort(x, axis=0)[:2])
    np.testing.assert_array_equal(np.take_along_axis(x, bottom_indices, 0), bottom_values)
    np.testing.assert_array_equal(descending, order)
    np.testing.assert_array_equal(ascending, np.argsort(x, axis=0, kind="stable"))


def test_depth_space_and_pixel_shuffles(tmp_path):
    x = random((2, 8, 3, 2))

    def body(x):
        return (
            mb.depth_to_space(x=x, block_size=2),
            mb.space_to_depth(x=mb.depth_to_space(x=x, block_size=2), block_size=2),
            mb.pixel_shuffle(x=x, upscale_factor=2),
            mb.pixel_unshuffle(x=mb.pixel_shuffle(x=x, upscale_factor=2), downscale_factor=np.uint32(2)),
        )

    depth_to_space, round_trip, shuffled, unshuffled = run_mil(body, dict(x=x), tmp_path)
    # TensorFlow's depth_to_space: channel (i * 2 + j) * C + c lands at (2h + i, 2w + j) of channel c.
    dcr = x.reshape(2, 2, 2, 2, 3, 2).transpose(0, 3, 4, 1, 5, 2).reshape(2, 2, 6, 4)
    # PyTorch's pixel_shuffle: channel c * 4 + i * 2 + j.
    crd = x.reshape(2, 2, 2, 2, 3, 2).transpose(0, 1, 4, 2, 5, 3).reshape(2, 2, 6, 4)
    np.testing.assert_array_equal(depth_to_space, dcr)
    np.testing.assert_array_equal(round_trip, x)
    np.testing.assert_array_equal(shuffled, crd)
    np.testing.assert_array_equal(unshuffled, x)
