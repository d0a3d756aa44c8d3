"""Any image size from fixed-size models: overlapping windows over a large latent, blended.

The Unet and the VAE of a package run only at the shape they were converted for. A larger latent is covered by
windows of exactly that shape, overlapping by a chosen amount; each model output is added into a canvas with
weights that fall off toward the window's edges, and the canvas is divided by the summed weights.

* Denoising (MultiDiffusion, Bar-Tal et al. 2023): at every step the Unet's noise predictions for all windows are
  blended and the scheduler steps once on the whole latent. For schedulers whose update is elementwise-affine in
  the noise prediction (all those the runtime ships), that equals stepping each window and blending the results,
  with a single scheduler state.
* VAE: latents are decoded in tiles blended in pixel space, images encoded in tiles blended in latent space.

A latent of exactly the model's shape is one window, whose output is returned untouched.
"""
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .contract import VAE_FACTOR

# (N, C, h, w) window-sized inputs, a timestep, the N windows' indices in the layout and the step's own inputs (a
# ControlNet's scales) -> (N, C, h, w) guided noise predictions, N >= 1
NoiseFunction = Callable[..., np.ndarray]


def axis_starts(length: int, window: int, overlap: int) -> list[int]:
    """Start offsets of the fewest windows that cover [0, length) with at least `overlap` shared, spread evenly
    (the last window ends at `length`)."""
    if not 0 <= overlap < window <= length:
        raise ValueError(f"need 0 <= overlap < window <= length, not {overlap}, {window}, {length}")
    count = math.ceil((length - overlap) / (window - overlap))
    if count == 1:
        return [0]
    return [round(index * (length - window) / (count - 1)) for index in range(count)]


@dataclass(frozen=True)
class Layout:
    """Windows of size `window` (height, width) over a `size` (height, width) grid, as (top, left) offsets."""

    size: tuple[int, int]
    window: tuple[int, int]
    overlap: int

    @property
    def windows(self) -> list[tuple[int, int]]:
        rows = axis_starts(self.size[0], self.window[0], self.overlap)
        columns = axis_starts(self.size[1], self.window[1], self.overlap)
        return [(top, left) for top in rows for left in columns]

    def scaled(self, factor: int) -> "Layout":
        """The same windows on a grid `factor` times finer (latent windows in pixels)."""
        return Layout((self.size[0] * factor, self.size[1] * factor),
                      (self.window[0] * factor, self.window[1] * factor),
                      self.overlap * factor)


def ramp(length: int, overlap: int, rise_at_start: bool, rise_at_end: bool) -> np.ndarray:
    """Weights along one side of a window: 1, except over `overlap` cells at each end that meets a neighbour,
    where they rise linearly from near 0 at the edge (where the model sees least context) to 1."""
    weights = np.ones(length, np.float32)
    rise = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
    if overlap and rise_at_start:
        weights[:overlap] = rise
    if overlap and rise_at_end:
        weights[length - overlap :] = np.minimum(weights[length - overlap :], rise[::-1])
    return weights


def feathered_weights(layout: Layout, top: int, left: int) -> np.ndarray:
    """(height, width) weights for the window at (top, left) that cross-fade it into its neighbours; at the
    grid's own edges, where it has none, they stay 1."""
    (height, width), (rows, columns) = layout.window, layout.size
    return np.outer(ramp(height, layout.overlap, top > 0, top + height < rows),
                    ramp(width, layout.overlap, left > 0, left + width < columns))


def uniform_weights(layout: Layout, top: int, left: int) -> np.ndarray:
    """Equal weights everywhere: the plain average of the windows (diffusers' StableDiffusionPanoramaPipeline)."""
    return np.ones(layout.window, np.float32)


Weights = Callable[[Layout, int, int], np.ndarray]


class Canvas:
    """Weighted sum of window outputs over a large (1, C, H, W) array, normalised on `result`."""

    def __init__(self, layout: Layout, channels: int, weights: Weights):
        self.layout, self.weights = layout, weights
        self.total = np.zeros((1, channels, *layout.size), np.float32)
        self.weight_sum = np.zeros(layout.size, np.float32)

    def add(self, tile: np.ndarray, top: int, left: int) -> None:
        weights = self.weights(self.layout, top, left)
        height, width = self.layout.window
        self.total[..., top : top + height, left : left + width] += tile * weights
        self.weight_sum[top : top + height, left : left + width] += weights

    def result(self) -> np.ndarray:
        return self.total / self.weight_sum


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def window_crops(image: np.ndarray, layout: Layout, indices: Iterable[int], factor: int = VAE_FACTOR) -> np.ndarray:
    """(1, C, factor H, factor W) pixels over a latent `layout` -> (N, C, factor h, factor w): the crops of the
    layout's windows at `indices`, at `factor` times their latent offsets (as the tiled VAE cuts its tiles)."""
    height, width = (side * factor for side in layout.window)
    windows = layout.windows
    return np.concatenate([image[..., top * factor : top * factor + height, left * factor : left * factor + width]
                           for top, left in (windows[index] for index in indices)])


class TiledNoise:
    """The noise prediction for (1, C, H, W) latents of `layout.size`: `guided_noise` on the layout's windows,
    `windows_per_call` at a time, told which windows they are (a ControlNet takes each window's crop of its control
    image), blended with `weights`. One window is `guided_noise` itself."""

    def __init__(self, guided_noise: NoiseFunction, layout: Layout, windows_per_call: int = 1,
                 weights: Weights = feathered_weights):
        self.guided_noise = guided_noise
        self.layout = layout
        self.windows = layout.windows
        self.windows_per_call = windows_per_call
        self.weights = weights

    def __call__(self, model_input: np.ndarray, t: float, *step_inputs: object) -> np.ndarray:
        if len(self.windows) == 1:
            return self.guided_noise(model_input, t, [0], *step_inputs)
        height, width = self.layout.window
        canvas = Canvas(self.layout, model_input.shape[1], self.weights)
        for batch in _batches(list(enumerate(self.windows)), self.windows_per_call):
            crops = np.concatenate([model_input[..., top : top + height, left : left + width]
                                    for _, (top, left) in batch])
            noises = self.guided_noise(crops, t, [index for index, _ in batch], *step_inputs)
            for (_, (top, left)), noise in zip(batch, noises):
                canvas.add(noise, top, left)
        return canvas.result()


def tiled_decode(decode: Callable[[np.ndarray], np.ndarray], latents: np.ndarray, window: tuple[int, int],
                 overlap: int) -> np.ndarray:
    """(1, C, H, W) latents -> (1, 3, 8H, 8W) image, decoding `window`-sized latent tiles that overlap by
    `overlap` latent pixels and cross-fading them in pixel space."""
    layout = Layout(latents.shape[-2:], window, overlap)
    if len(layout.windows) == 1:
        return decode(latents)
    pixels = layout.scaled(VAE_FACTOR)
    canvas = None
    for top, left in layout.windows:
        tile = decode(latents[..., top : top + window[0], left : left + window[1]])
        if canvas is None:
            canvas = Canvas(pixels, tile.shape[1], feathered_weights)
        canvas.add(tile, top * VAE_FACTOR, left * VAE_FACTOR)
    return canvas.result()


def tiled_encode(encode: Callable[[np.ndarray], np.ndarray], image: np.ndarray, window: tuple[int, int],
                 overlap: int) -> np.ndarray:
    """(1, 3, 8H, 8W) image -> (1, C, H, W) encoder output, encoding image tiles of `window` latent pixels
    (8x that in pixels) that overlap by `overlap` latent pixels and cross-fading them in latent space."""
    size = (image.shape[-2] // VAE_FACTOR, image.shape[-1] // VAE_FACTOR)
    layout = Layout(size, window, overlap)
    if len(layout.windows) == 1:
        return encode(image)
    height, width = window[0] * VAE_FACTOR, window[1] * VAE_FACTOR
    canvas = None
    for top, left in layout.windows:
        tile = encode(image[..., top * VAE_FACTOR : top * VAE_FACTOR + height,
                            left * VAE_FACTOR : left * VAE_FACTOR + width])
        if canvas is None:
            canvas = Canvas(layout, tile.shape[1], feathered_weights)
        canvas.add(tile, top, left)
    return canvas.result()
