"""MIL resampling of the last two dims (coremltools `ops/defs/iOS15/image_resizing.py`, iOS 16's
half_pixel_centers and crop_resize pad_value, iOS 17's crop_resize boxes).

Bilinear ops are written as one rule: each output position i along an axis samples the input at a
real-valued grid point (clamped to [0, X_in - 1]), interpolating linearly between its two
neighbours; the ops differ only in how they place the grid points.
"""
import math

import torch
from coremltools import target

from ..registry import register


def _interpolate_axis(x: torch.Tensor, dim: int, grid: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of x along `dim` at the (float) positions `grid`."""
    size = x.shape[dim]
    grid = grid.clamp(0, size - 1)
    below = grid.floor().long()
    above = (below + 1).clamp(max=size - 1)
    weight = (grid - below).reshape((-1,) + (1,) * (x.dim() - 1 - dim % x.dim()))
    return x.index_select(dim, below) * (1 - weight) + x.index_select(dim, above) * weight


def _bilinear(x: torch.Tensor, grid_h: torch.Tensor, grid_w: torch.Tensor) -> torch.Tensor:
    return _interpolate_axis(_interpolate_axis(x, -2, grid_h), -1, grid_w)


def _positions(size: int, device: torch.device) -> torch.Tensor:
    return torch.arange(size, dtype=torch.float32, device=device)


def _align_corners_grid(size_in: int, size_out: int, device) -> torch.Tensor:
    """First and last grid points on the first and last input elements."""
    spacing = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    return _positions(size_out, device) * spacing


def _half_pixel_grid(size_in: int, size_out: int, device) -> torch.Tensor:
    """Pixel centres mapped onto pixel centres."""
    spacing = size_in / size_out
    return _positions(size_out, device) * spacing + 0.5 * spacing - 0.5


def _asymmetric_grid(size_in: int, size_out: int, device) -> torch.Tensor:
    """Output pixel corners mapped onto input pixel corners."""
    return _positions(size_out, device) * (size_in / size_out)


@register("upsample_bilinear", widen=True)
def upsample_bilinear(
    x: torch.Tensor,
    scale_factor_height: torch.Tensor | int = 1,
    scale_factor_width: torch.Tensor | int = 1,
    align_corners: bool = True,
    half_pixel_centers: bool | None = None,
) -> torch.Tensor:
    """Output size floor(X_in * scale). align_corners: grid i (X_in - 1) / (X_out - 1); otherwise, with
    half_pixel_centers (the default when not align_corners): (i + 0.5) X_in / X_out - 0.5; with
    neither: i X_in / X_out."""
    if half_pixel_centers is None:
        half_pixel_centers = not align_corners
    grids = []
    for size_in, scale in ((x.shape[-2], scale_factor_height), (x.shape[-1], scale_factor_width)):
        size_out = math.floor(size_in * float(scale))
        if align_corners:
            grids.append(_align_corners_grid(size_in, size_out, x.device))
        elif half_pixel_centers:
            grids.append(_half_pixel_grid(size_in, size_out, x.device))
        else:
            grids.append(_asymmetric_grid(size_in, size_out, x.device))
    return _bilinear(x, *grids)


def _sampling_grid(mode: str, size_in: int, size_out: int, device) -> torch.Tensor:
    """resize_bilinear's sampling modes, as the MIL reference defines their grid points."""
    if mode == "STRICT_ALIGN_CORNERS" or (mode == "ALIGN_CORNERS" and size_out > 1):
        return _align_corners_grid(size_in, size_out, device)
    if mode == "ALIGN_CORNERS":
        return torch.full((1,), (size_in - 1) / 2, device=device)
    if mode == "DEFAULT":
        spacing = (size_in - size_in / size_out) / (size_out - 1) if size_out > 1 else 0.0
        return _positions(size_out, device) * spacing
    if mode == "OFFSET_CORNERS":
        delta = max(1, size_in - 1) / size_out
        return 0.5 * delta + _positions(size_out, device) * delta
    if mode == "UNALIGN_CORNERS":
        return _half_pixel_grid(size_in, size_out, device)
    raise ValueError(f"sampling_mode {mode!r} is not a MIL sampling mode")


def _crop_grid(mode: str, start: float, end: float, size_out: int, device) -> torch.Tensor:
    """The grid resize_bilinear would place on the pixels [start, end] of one box side (a crop of
    end - start + 1 pixels; a box given end first samples it backwards), kept inside the box."""
    extent = end - start
    grid = _sampling_grid(mode, extent + 1, size_out, device)
    return start + grid.clamp(min(0.0, extent), max(0.0, extent))


def _box_corners(box: list[float], mode: str) -> tuple[float, float, float, float]:
    """A box in `box_coordinate_mode` as (h_start, w_start, h_end, w_end)."""
    if mode == "CORNERS_HEIGHT_FIRST":
        return tuple(box)
    if mode == "CORNERS_WIDTH_FIRST":
        w_start, h_start, w_end, h_end = box
        return h_start, w_start, h_end, w_end
    if mode == "CENTER_SIZE_HEIGHT_FIRST":
        h_center, w_center, height, width = box
    elif mode == "CENTER_SIZE_WIDTH_FIRST":
        w_center, h_center, width, height = box
    else:
        raise ValueError(f"crop_resize box_coordinate_mode {mode!r} is not a MIL box mode")
    return h_center - height / 2, w_center - width / 2, h_center + height / 2, w_center + width / 2


def _crop_and_resize(
    x: torch.Tensor,
    boxes: torch.Tensor,
    box_images: list[int],
    target_height: int,
    target_width: int,
    normalized_coordinates: bool,
    spatial_scale: float,
    box_coordinate_mode: str,
    sampling_mode: str,
    pad_value: float,
) -> torch.Tensor:
    """[N, C, target_height, target_width]: box n of `boxes` [N, 4] cut from image box_images[n] of
    x [B, C, H, W] and resampled bilinearly at the grid `sampling_mode` places between its corners.
    Coordinates are pixel positions (0 = centre of the first pixel), times spatial_scale, and with
    normalized_coordinates fractions of (H - 1, W - 1). Grid points outside the image read pad_value."""
    height, width = x.shape[-2:]
    scale = torch.tensor([height - 1, width - 1] * 2) if normalized_coordinates else torch.ones(4)
    crops = []
    for box, image in zip((boxes.float().cpu() * spatial_scale).tolist(), box_images):
        h_start, w_start, h_end, w_end = (torch.tensor(_box_corners(box, box_coordinate_mode)) * scale).tolist()
        rows = _crop_grid(sampling_mode, h_start, h_end, target_height, x.device)
        columns = _crop_grid(sampling_mode, w_start, w_end, target_width, x.device)
        inside = ((rows >= 0) & (rows <= height - 1))[:, None] & ((columns >= 0) & (columns <= width - 1))[None, :]
        crops.append(torch.where(inside, _bilinear(x[image], rows, columns), pad_value))
    return torch.stack(crops)


@register("crop_resize", since=target.iOS16, widen=True)
def crop_resize(
    x: torch.Tensor,
    roi: torch.Tensor,
    target_height: int = 1,
    target_width: int = 1,
    normalized_coordinates: bool = False,
    spatial_scale: torch.Tensor | float = 1.0,
    box_coordinate_mode: str = "CORNERS_HEIGHT_FIRST",
    sampling_mode: str = "DEFAULT",
    pad_value: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """roi [N, 1, 4, 1, 1] crops every box from every image: [N, B, C, target_height, target_width];
    roi [N, 1, 5, 1, 1] starts each box with the index of its image: [N, 1, C, target_height, target_width]
    (coremltools declares [N, B, ...] for this layout too: the two agree when B is 1).
    iOS 15's op is this one with pad_value 0."""
    roi = roi.reshape(roi.shape[0], -1)
    settings = (target_height, target_width, normalized_coordinates, float(spatial_scale), box_coordinate_mode,
                sampling_mode, float(pad_value))
    if roi.shape[1] == 5:
        images = roi[:, 0].round().long().tolist()
        return _crop_and_resize(x, roi[:, 1:], images, *settings).unsqueeze(1)
    every_image = [_crop_and_resize(x, roi, [image] * roi.shape[0], *settings) for image in range(x.shape[0])]
    return torch.stack(every_image, dim=1)


register("crop_resize", widen=True)(crop_resize)


@register("crop_resize", since=target.iOS17, widen=True)
def crop_resize_boxes(
    x: torch.Tensor,
    boxes: torch.Tensor,
    box_indices: torch.Tensor | None = None,
    target_height: int = 1,
    target_width: int = 1,
    normalized_coordinates: bool = False,
    spatial_scale: torch.Tensor | float = 1.0,
    box_coordinate_mode: str = "CORNERS_HEIGHT_FIRST",
    sampling_mode: str = "DEFAULT",
    pad_value: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """boxes [N, 4], box n cut from image box_indices[n] (default n): [N, C, target_height, target_width]."""
    images = list(range(boxes.shape[0])) if box_indices is None else box_indices.long().tolist()
    return _crop_and_resize(x, boxes, images, target_height, target_width, normalized_coordinates,
                            float(spatial_scale), box_coordinate_mode, sampling_mode, float(pad_value))


@register("resize_bilinear", widen=True)
def resize_bilinear(
    x: torch.Tensor, target_size_height: int = 1, target_size_width: int = 1, sampling_mode: str = "DEFAULT"
) -> torch.Tensor:
    grid_h = _sampling_grid(sampling_mode, x.shape[-2], target_size_height, x.device)
    grid_w = _sampling_grid(sampling_mode, x.shape[-1], target_size_width, x.device)
    return _bilinear(x, grid_h, grid_w)


def _nearest(x: torch.Tensor, size_h: int, size_w: int, step_h: float, step_w: float) -> torch.Tensor:
    """Output (i, j) copies input (floor(i step_h), floor(j step_w))."""
    rows = (_positions(size_h, x.device) * step_h).floor().long().clamp(max=x.shape[-2] - 1)
    columns = (_positions(size_w, x.device) * step_w).floor().long().clamp(max=x.shape[-1] - 1)
    return x.index_select(-2, rows).index_select(-1, columns)


@register("upsample_nearest_neighbor")
def upsample_nearest_neighbor(
    x: torch.Tensor, scale_factor_height: torch.Tensor | int = 1, scale_factor_width: torch.Tensor | int = 1
) -> torch.Tensor:
    """Output size X_out = floor(X_in * scale); output i copies input floor(i X_in / X_out), as
    resize_nearest_neighbor does (with a fractional scale, 1 / scale is not X_in / X_out)."""
    scale_h, scale_w = float(scale_factor_height), float(scale_factor_width)
    if scale_h.is_integer() and scale_w.is_integer():
        return x.repeat_interleave(int(scale_h), dim=-2).repeat_interleave(int(scale_w), dim=-1)
    size_h, size_w = math.floor(x.shape[-2] * scale_h), math.floor(x.shape[-1] * scale_w)
    return resize_nearest_neighbor(x, size_h, size_w)


@register("resize_nearest_neighbor")
def resize_nearest_neighbor(x: torch.Tensor, target_size_height: int, target_size_width: int) -> torch.Tensor:
    """Output i copies input floor(i X_in / X_out)."""
    return _nearest(
        x,
        target_size_height,
        target_size_width,
        x.shape[-2] / target_size_height,
        x.shape[-1] / target_size_width,
    )


@register("crop")
def crop(x: torch.Tensor, crop_height: list[int], crop_width: list[int]) -> torch.Tensor:
    """Remove crop_height (top, bottom) rows and crop_width (left, right) columns."""
    (top, bottom), (left, right) = crop_height, crop_width
    return x[..., top : x.shape[-2] - bottom, left : x.shape[-1] - right]


@register("resize", since=target.iOS17, widen=True)
def resize(
    x: torch.Tensor,
    shape: torch.Tensor,
    resized_dims: int,
    interpolation_mode: str = "LINEAR",
    sampling_mode: str = "DEFAULT",
) -> torch.Tensor:
    """Resize the last `resized_dims` dims of x to the last entries of `shape` (a 0 keeps x's size
    there), sampling each dim at the grid points resize_bilinear's `sampling_mode` places: LINEAR
    interpolates there, NEAREST_NEIGHBOR takes the input element nearest to each point."""
    sizes = shape.tolist()[len(shape) - resized_dims :]
    for offset, size in enumerate(sizes):
        dim = x.dim() - resized_dims + offset
        size_in = x.shape[dim]
        grid = _sampling_grid(sampling_mode, size_in, size or size_in, x.device)
        if interpolation_mode == "NEAREST_NEIGHBOR":
            x = x.index_select(dim, (grid + 0.5).floor().long().clamp(0, size_in - 1))
        else:
            x = _interpolate_axis(x, dim, grid)
    return x


def _pixel_coordinates(values: torch.Tensor, size: int, mode: str, align_corners: bool) -> torch.Tensor:
    """resample's coordinates along one axis as pixel positions (0 = centre of the first pixel)."""
    if mode == "unnormalized":
        return values
    if mode == "normalized_zero_to_one":
        values = 2 * values - 1
    elif mode != "normalized_minus_one_to_one":
        raise ValueError(f"resample coordinates_mode {mode!r} is not a MIL coordinates mode")
    return (values + 1) / 2 * (size - 1) if align_corners else ((values + 1) * size - 1) / 2


@register("resample", since=target.iOS15, widen=True)
def resample(
    x: torch.Tensor,
    coordinates: torch.Tensor,
    sampling_mode: str,
    padding_mode: str,
    padding_value: torch.Tensor,
    coordinates_mode: str,
    align_corners: bool,
) -> torch.Tensor:
    """x [B, C, H, W] sampled at coordinates [B, H_out, W_out, 2] ((w, h) pairs) by "bilinear" or
    "nearest"; points outside the image read `padding_value` ("constant"), the edge ("border"), or
    the image mirrored about its edge pixels' centres ("reflection") or about its edges
    ("symmetric"). PyTorch's grid_sample does the sampling on coordinates renormalised to its
    convention, whose reflection is about centres with align_corners and about edges without."""
    coordinates = coordinates.float()
    height, width = x.shape[-2:]
    columns = _pixel_coordinates(coordinates[..., 0], width, coordinates_mode, align_corners)
    rows = _pixel_coordinates(coordinates[..., 1], height, coordinates_mode, align_corners)
    centres = padding_mode != "symmetric"
    normalise = (lambda p, size: 2 * p / (size - 1) - 1) if centres else (lambda p, size: (2 * p + 1) / size - 1)
    grid = torch.stack([normalise(columns, width), normalise(rows, height)], dim=-1)
    torch_padding = {"constant": "zeros", "border": "border", "reflection": "reflection",
                     "symmetric": "reflection"}[padding_mode]
    value = float(padding_value) if padding_mode == "constant" else 0.0
    # grid_sample pads with zeros: sampling x - value and adding it back pads with `value`.
    sampled = torch.nn.functional.grid_sample(
        x.float() - value, grid, mode=sampling_mode, padding_mode=torch_padding, align_corners=centres
    )
    return sampled + value


@register("affine", since=target.iOS15, widen=True)
def affine(
    x: torch.Tensor,
    transform_matrix: torch.Tensor,
    output_height: int,
    output_width: int,
    sampling_mode: str,
    padding_mode: str,
    padding_value: torch.Tensor,
    coordinates_mode: str,
    align_corners: bool,
) -> torch.Tensor:
    """x [B, C, H, W] read at an [output_height, output_width] grid of points (x, y) spread over the coordinate
    range, each moved to (a0 x + a1 y + a2, b0 x + b1 y + b2) by its batch's row [a0, a1, a2, b0, b1, b2] of
    transform_matrix [B or 1, 6], then sampled as resample samples. MIL defines the op for
    "normalized_minus_one_to_one" coordinates only, where affine_grid's points are those of the definition."""
    if coordinates_mode != "normalized_minus_one_to_one":
        raise ValueError(f"affine coordinates_mode {coordinates_mode!r} is not one MIL defines")
    theta = transform_matrix.float().reshape(-1, 2, 3).expand(x.shape[0], 2, 3)
    grid = torch.nn.functional.affine_grid(theta, [x.shape[0], x.shape[1], output_height, output_width],
                                           align_corners=align_corners)
    return resample(x, grid, sampling_mode, padding_mode, padding_value, coordinates_mode, align_corners)
