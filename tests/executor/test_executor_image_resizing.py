"""Resampling ops against the grid-point definitions of the MIL reference (float32 programs)."""
import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb

from executor_testing import random, run_mil

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def interpolate(x: np.ndarray, grid_h: np.ndarray, grid_w: np.ndarray) -> np.ndarray:
    """Bilinear sampling of the last two dims of x at the given (clamped) grid points."""

    def along(values, axis, grid):
        size = values.shape[axis]
        grid = np.clip(grid, 0, size - 1)
        low = np.floor(grid).astype(int)
        high = np.minimum(low + 1, size - 1)
        weight = grid - low
        shape = [1] * values.ndim
        shape[axis] = -1
        weight = weight.reshape(shape)
        return np.take(values, low, axis) * (1 - weight) + np.take(values, high, axis) * weight

    return along(along(x.astype(np.float64), -2, grid_h), -1, grid_w)


def grid(mode: str, size_in: int, size_out: int) -> np.ndarray:
    """Grid points, transcribed from the MIL reference of resize_bilinear / upsample_bilinear."""
    i = np.arange(size_out, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS", "align_corners"):
        if size_out == 1:
            return np.array([(size_in - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0])
        return i * (size_in - 1) / (size_out - 1)
    if mode == "DEFAULT":  # TensorFlow's legacy resize, i * size_in / size_out, also for a single output
        return i * (size_in - size_in / size_out) / (size_out - 1) if size_out > 1 else i
    if mode == "OFFSET_CORNERS":
        delta = max(1, size_in - 1) / size_out
        return 0.5 * delta + i * delta
    if mode in ("UNALIGN_CORNERS", "half_pixel"):
        spacing = size_in / size_out
        return i * spacing + 0.5 * spacing - 0.5
    if mode == "asymmetric":
        return i * size_in / size_out
    raise AssertionError(mode)


@pytest.mark.parametrize(
    "mode", ["STRICT_ALIGN_CORNERS", "ALIGN_CORNERS", "DEFAULT", "OFFSET_CORNERS", "UNALIGN_CORNERS"]
)
def test_resize_bilinear(tmp_path, mode):
    x = random((1, 2, 3, 4))

    def body(x):
        return (
            mb.resize_bilinear(x=x, target_size_height=5, target_size_width=7, sampling_mode=mode),
            mb.resize_bilinear(x=x, target_size_height=1, target_size_width=2, sampling_mode=mode),
        )

    larger, smaller = run_mil(body, dict(x=x), tmp_path)
    np.testing.assert_allclose(larger, interpolate(x, grid(mode, 3, 5), grid(mode, 4, 7)), **TOLERANCE)
    np.testing.assert_allclose(smaller, interpolate(x, grid(mode, 3, 1), grid(mode, 4, 2)), **TOLERANCE)


@pytest.mark.parametrize(
    "align_corners, half_pixel_centers, grid_mode",
    [(True, False, "align_corners"), (False, True, "half_pixel"), (False, False, "asymmetric")],
)
def test_upsample_bilinear(tmp_path, align_corners, half_pixel_centers, grid_mode):
    x = random((2, 3, 4))

    def body(x):
        return mb.upsample_bilinear(
            x=x,
            scale_factor_height=2.0,
            scale_factor_width=1.5,
            align_corners=align_corners,
            half_pixel_centers=half_pixel_centers,
        )

    (actual,) = run_mil(body, dict(x=x), tmp_path)
    np.testing.assert_allclose(actual, interpolate(x, grid(grid_mode, 3, 6), grid(grid_mode, 4, 6)), **TOLERANCE)


def test_nearest_neighbour(tmp_path):
    x = random((1, 2, 3, 4))

    def body(x):
        return (
            mb.upsample_nearest_neighbor(x=x, scale_factor_height=2, scale_factor_width=3),
            mb.upsample_nearest_neighbor(x=x, scale_factor_height=1.5, scale_factor_width=1.12),
            mb.resize_nearest_neighbor(x=x, target_size_height=5, target_size_width=2),
        )

    integer, fractional, resized = run_mil(body, dict(x=x), tmp_path, target=ct.target.iOS16)
    np.testing.assert_array_equal(integer, x.repeat(2, axis=2).repeat(3, axis=3))
    # Output i copies input floor(i X_in / X_out): width 4 scaled by 1.12 stays 4, each input once
    # (floor(i / 1.12) would repeat column 0 and drop column 3).
    rows, columns = (np.arange(4) * 3 / 4).astype(int), np.arange(4)
    np.testing.assert_array_equal(fractional, x[:, :, rows][:, :, :, columns])
    rows, columns = (np.arange(5) * 3 / 5).astype(int), (np.arange(2) * 4 / 2).astype(int)
    np.testing.assert_array_equal(resized, x[:, :, rows][:, :, :, columns])


def affine_reference(x: np.ndarray, matrix: np.ndarray, height: int, width: int) -> np.ndarray:
    """MIL's affine, written from its definition: output point (u, v), spread over [-1, 1] (-1 and 1 the centres
    of the first and last pixels), reads x at (a0 u + a1 v + a2, b0 u + b1 v + b2), bilinearly; points outside the
    image read zero."""
    batch, channels, rows, columns = x.shape
    output = np.zeros((batch, channels, height, width))

    def pixel(b, row, column):
        inside = 0 <= row < rows and 0 <= column < columns
        return x[b, :, row, column].astype(np.float64) if inside else np.zeros(channels)

    for b in range(batch):
        a0, a1, a2, b0, b1, b2 = matrix[b % len(matrix)].astype(np.float64)
        for i, v in enumerate(np.linspace(-1, 1, height)):
            for j, u in enumerate(np.linspace(-1, 1, width)):
                column = (a0 * u + a1 * v + a2 + 1) / 2 * (columns - 1)
                row = (b0 * u + b1 * v + b2 + 1) / 2 * (rows - 1)
                top, left = int(np.floor(row)), int(np.floor(column))
                dy, dx = row - top, column - left
                output[b, :, i, j] = (
                    (1 - dy) * (1 - dx) * pixel(b, top, left)
                    + (1 - dy) * dx * pixel(b, top, left + 1)
                    + dy * (1 - dx) * pixel(b, top + 1, left)
                    + dy * dx * pixel(b, top + 1, left + 1)
                )
    return output


@pytest.mark.parametrize("shared", [False, True])
def test_affine(tmp_path, shared):
    x = random((2, 3, 4, 5))
    # a rotation with scaling and a shift (some points fall outside the image), and a mirror image
    matrix = np.array([[0.8, -0.5, 0.1, 0.4, 0.9, -0.2], [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]], dtype=np.float32)
    matrix = matrix[:1] if shared else matrix

    def body(x, transform_matrix):
        return mb.affine(
            x=x,
            transform_matrix=transform_matrix,
            output_height=6,
            output_width=3,
            sampling_mode="bilinear",
            padding_mode="constant",
            padding_value=0.0,
            coordinates_mode="normalized_minus_one_to_one",
            align_corners=True,
        )

    (actual,) = run_mil(body, dict(x=x, transform_matrix=matrix), tmp_path)
    np.testing.assert_allclose(actual, affine_reference(x, matrix, 6, 3), **TOLERANCE)


def crop_resize_reference(image: np.ndarray, corners, mode: str, height: int, width: int, pad: float) -> np.ndarray:
    """One crop_resize box, written from the MIL definition: along each side the box [start, end] (pixel
    positions) is a crop of end - start + 1 pixels, sampled at resize_bilinear's grid for `mode` (kept
    inside the box); points outside the image read `pad`."""
    h_start, w_start, h_end, w_end = corners

    def side(start, end, size_out):
        extent = end - start
        return start + np.clip(grid(mode, extent + 1, size_out), min(0, extent), max(0, extent))

    rows, columns = side(h_start, h_end, height), side(w_start, w_end, width)
    crop = interpolate(image, rows, columns)
    inside = ((rows >= 0) & (rows <= image.shape[-2] - 1))[:, None] & (
        (columns >= 0) & (columns <= image.shape[-1] - 1)
    )
    return np.where(inside, crop, pad)


# (h_start, w_start, h_end, w_end) in pixels: inside, reaching past the bottom right, given end first, one pixel
CORNERS = np.array([[0.5, 1.0, 3.2, 4.6], [2.0, 3.5, 5.5, 7.0], [3.0, 4.0, 1.0, 0.2], [2.0, 2.0, 2.0, 2.0]])


@pytest.mark.parametrize(
    "mode", ["STRICT_ALIGN_CORNERS", "ALIGN_CORNERS", "DEFAULT", "OFFSET_CORNERS", "UNALIGN_CORNERS"]
)
def test_crop_resize_sampling_modes(tmp_path, mode):
    """iOS 17's op: boxes [N, 4], box n cut from image box_indices[n]."""
    x = random((2, 3, 5, 6))
    box_indices = np.array([1, 0, 1, 0], dtype=np.int32)

    def body(x):
        return mb.crop_resize(
            x=x,
            boxes=CORNERS.astype(np.float32),
            box_indices=box_indices,
            target_height=3,
            target_width=4,
            sampling_mode=mode,
            pad_value=-5.0,
        )

    (actual,) = run_mil(body, dict(x=x), tmp_path, target=ct.target.iOS17)
    expected = [crop_resize_reference(x[image], box, mode, 3, 4, -5.0) for image, box in zip(box_indices, CORNERS)]
    np.testing.assert_allclose(actual, np.stack(expected), **TOLERANCE)


def test_crop_resize_every_box_from_every_image(tmp_path):
    """iOS 15's op: a roi without image indices crops each box from each image; outside reads 0."""
    x = random((2, 3, 5, 6))
    roi = CORNERS.reshape(4, 1, 4, 1, 1).astype(np.float32)

    def body(x):
        return mb.crop_resize(x=x, roi=roi, target_height=2, target_width=3, sampling_mode="ALIGN_CORNERS")

    (actual,) = run_mil(body, dict(x=x), tmp_path, target=ct.target.iOS15)
    expected = [[crop_resize_reference(image, box, "ALIGN_CORNERS", 2, 3, 0.0) for image in x] for box in CORNERS]
    np.testing.assert_allclose(actual, np.array(expected), **TOLERANCE)


@pytest.mark.parametrize(
    "box_mode", ["CORNERS_HEIGHT_FIRST", "CORNERS_WIDTH_FIRST", "CENTER_SIZE_HEIGHT_FIRST", "CENTER_SIZE_WIDTH_FIRST"]
)
def test_crop_resize_box_modes(tmp_path, box_mode):
    """iOS 16's op with image indices in the roi, normalized coordinates times spatial_scale. (coremltools
    declares such a roi's output [N, B, C, H, W], the definition [N, 1, C, H, W]: one image agrees with both.)"""
    x = random((1, 3, 5, 6))
    scale = np.array([4.0, 5.0, 4.0, 5.0])  # (H - 1, W - 1): normalized coordinates are fractions of these
    spatial_scale = 0.5
    h_start, w_start, h_end, w_end = CORNERS.T
    layout = {
        "CORNERS_HEIGHT_FIRST": [h_start, w_start, h_end, w_end],
        "CORNERS_WIDTH_FIRST": [w_start, h_start, w_end, h_end],
        "CENTER_SIZE_HEIGHT_FIRST": [(h_start + h_end) / 2, (w_start + w_end) / 2, h_end - h_start, w_end - w_start],
        "CENTER_SIZE_WIDTH_FIRST": [(w_start + w_end) / 2, (h_start + h_end) / 2, w_end - w_start, h_end - h_start],
    }[box_mode]
    order = [1, 0, 3, 2] if "WIDTH_FIRST" in box_mode else [0, 1, 2, 3]
    boxes = np.stack(layout, axis=1) / scale[order] / spatial_scale
    roi = np.concatenate([np.zeros((4, 1)), boxes], axis=1).reshape(4, 1, 5, 1, 1).astype(np.float32)

    def body(x):
        return mb.crop_resize(
            x=x,
            roi=roi,
            target_height=4,
            target_width=2,
            normalized_coordinates=True,
            spatial_scale=spatial_scale,
            box_coordinate_mode=box_mode,
            sampling_mode="ALIGN_CORNERS",
            pad_value=3.0,
        )

    (actual,) = run_mil(body, dict(x=x), tmp_path)
    expected = [crop_resize_reference(x[0], box, "ALIGN_CORNERS", 4, 2, 3.0) for box in CORNERS]
    np.testing.assert_allclose(actual, np.stack(expected)[:, None], **TOLERANCE)
