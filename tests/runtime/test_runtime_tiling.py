"""Sizes beyond the package's: window layout, MultiDiffusion against diffusers' panorama pipeline, degenerate
cases, the Unet batch shared by windows, and seams of the tiled VAE."""
from functools import partial

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPanoramaPipeline
from PIL import Image

from coreml_sd.runtime import tiling
from coreml_sd.runtime.executor import psnr
from coreml_sd.runtime.pipeline import Pipeline
from coreml_sd.runtime.sampling import draw_noise
from coreml_sd.runtime.tiling import Layout, axis_starts
from coreml_sd.runtime.upscaling import Upscale
from runtime_testing import _with_scheduler, pixels

PROMPT = "a photo of an astronaut riding a horse"

PARITY_PSNR_DB = 40.0
SEAM_RATIO = 1.15
WINDOW = (16, 16)  # the tiny model's latent


def seam_ratio(image: Image.Image, layout: Layout) -> float:
    """Mean absolute difference between the pixel pairs that straddle the tiles' edges, over that of all other
    neighbouring pairs (horizontal and vertical); `layout` in latent pixels."""
    values = np.asarray(image, np.float64)
    across_columns = np.abs(np.diff(values, axis=1)).mean(axis=(0, 2))  # pair (x, x + 1) at index x
    across_rows = np.abs(np.diff(values, axis=0)).mean(axis=(1, 2))
    grid = layout.scaled(tiling.VAE_FACTOR)
    columns = sorted({edge - 1 for _, left in grid.windows for edge in (left, left + grid.window[1])} - {-1, grid.size[1] - 1})
    rows = sorted({edge - 1 for top, _ in grid.windows for edge in (top, top + grid.window[0])} - {-1, grid.size[0] - 1})
    borders = np.concatenate([across_columns[columns], across_rows[rows]])
    interior = np.concatenate([np.delete(across_columns, columns), np.delete(across_rows, rows)])
    return float(borders.mean() / interior.mean())


@pytest.mark.parametrize(("length", "window", "overlap"), [(16, 16, 4), (48, 16, 8), (40, 16, 4), (128, 64, 16), (23, 16, 0)])
def test_windows_cover_the_axis_evenly(length, window, overlap):
    starts = axis_starts(length, window, overlap)
    assert starts[0] == 0 and starts[-1] + window == length
    gaps = np.diff(starts)
    assert all(window - gap >= overlap for gap in gaps) and (len(gaps) == 0 or gaps.max() - gaps.min() <= 1)
    assert len(starts) == 1 or window + (len(starts) - 2) * (window - overlap) < length  # one fewer would not do


def test_blending_keeps_what_all_windows_agree_on():
    layout = Layout((40, 56), WINDOW, 4)
    field = np.random.default_rng(0).standard_normal((1, 3, 40, 56)).astype(np.float32)
    canvas = tiling.Canvas(layout, 3, tiling.feathered_weights)
    for top, left in layout.windows:
        canvas.add(field[..., top : top + 16, left : left + 16], top, left)
    np.testing.assert_allclose(canvas.result(), field, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def pipe(package, contract_models) -> Pipeline:
    return Pipeline(package, contract_models(unet_batch_size=2), backend="pytorch", compute_unit="ALL")


def test_wide_txt2img_matches_diffusers_panorama(pipe, package, tiny_pipeline, monkeypatch):
    """MultiDiffusion with diffusers' views (window 16, stride 8 latent pixels over a 3:1 latent), its uniform
    weights, DDIM and the same initial latents: the blended-prediction step equals its per-window steps."""
    steps, seed, width = 6, 5, 384
    monkeypatch.setattr(pipe.sampler, "window_weights", tiling.uniform_weights)
    ours = pipe(PROMPT, negative_prompt="blurry", steps=steps, scheduler="ddim", seed=seed, width=width, height=128,
                overlap=64, output_type="latent", progress=False).images[0]

    panorama = _with_scheduler(StableDiffusionPanoramaPipeline, tiny_pipeline, "ddim", package.scheduler_config)
    # StableDiffusionPipeline corrects these settings of SD v1 scheduler configs when it loads; the panorama
    # pipeline does not, and its DDIM would clip latents to [-1, 1]
    panorama.scheduler = DDIMScheduler.from_config(panorama.scheduler.config, clip_sample=False, steps_offset=1)
    panorama.get_views = partial(panorama.get_views, window_size=WINDOW[0], stride=8)
    assert panorama.get_views(128, width) == [(0, 16, left, left + 16) for left in axis_starts(48, 16, 8)]
    latents = torch.from_numpy(draw_noise(np.random.RandomState(seed), (1, 4, 16, width // 8)))
    reference = panorama(PROMPT, negative_prompt="blurry", height=128, width=width, num_inference_steps=steps,
                         latents=latents, output_type="latent").images
    assert psnr(reference.numpy(), ours.numpy()) >= PARITY_PSNR_DB


def test_windows_share_a_larger_unet_batch(pipe, package, contract_models):
    """A batch-4 Unet takes two windows (with their unconditional halves) per call: half the calls, same latents."""
    wide = Pipeline(package, contract_models(unet_batch_size=4), backend="pytorch", compute_unit="ALL")
    calls = []
    predict = wide.models["Unet"].predict
    wide.models["Unet"].predict = lambda inputs: calls.append(1) or predict(inputs)
    settings = dict(steps=2, scheduler="ddim", seed=1, width=320, height=128, output_type="latent", progress=False)
    assert len(Layout((16, 40), WINDOW, 4).windows) == 3
    ours = wide(PROMPT, **settings).images[0]
    assert len(calls) == 2 * 2  # ceil(3 windows / 2) calls per step
    np.testing.assert_allclose(ours.numpy(), pipe(PROMPT, **settings).images[0].numpy(), rtol=1e-4, atol=1e-5)


def test_package_size_is_the_ordinary_txt2img(pipe):
    settings = dict(steps=3, scheduler="euler-a", seed=2, progress=False)
    sized = pipe(PROMPT, width=128, height=128, overlap=64, **settings)
    ordinary = pipe(PROMPT, **settings)
    np.testing.assert_array_equal(np.asarray(sized.images[0]), np.asarray(ordinary.images[0]))
    assert sized.parameters == ordinary.parameters


def test_upscale_1_is_the_ordinary_img2img(pipe, start_image):
    settings = dict(steps=6, scheduler="pndm", seed=3, image=start_image, progress=False)
    upscaled = pipe(PROMPT, upscale=Upscale(1, strength=0.6), **settings)
    ordinary = pipe(PROMPT, strength=0.6, **settings)
    np.testing.assert_array_equal(np.asarray(upscaled.images[0]), np.asarray(ordinary.images[0]))
    assert "Denoising strength: 0.6, Hires upscale: 1, Hires steps: 6, Hires upscaler: Lanczos" in upscaled.parameters[0]


def smooth_latent(height: int, width: int) -> np.ndarray:
    """A few slow plane waves per channel: an image with no edges of its own, at SD's latent scale."""
    rng = np.random.default_rng(0)
    rows, columns = np.mgrid[0:height, 0:width] / 16
    latent = np.zeros((1, 4, height, width), np.float32)
    for channel in range(4):
        for _ in range(3):
            frequency_y, frequency_x, phase = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0, 2 * np.pi)
            latent[0, channel] += np.sin(2 * np.pi * (frequency_y * rows + frequency_x * columns) + phase)
    return latent


@pytest.mark.parametrize("size", [(32, 32), (16, 48)], ids=["2x", "3:1"])
def test_tiled_decode_leaves_no_seam(pipe, size):
    decoder = pipe.models["VAEDecoder"]
    dtype = decoder.input_description["z"][1]
    tiled = tiling.tiled_decode(lambda z: decoder.predict({"z": z.astype(dtype)})["image"], smooth_latent(*size), WINDOW, 4)
    image = Image.fromarray((np.clip(tiled[0].transpose(1, 2, 0) / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8))
    assert seam_ratio(image, Layout(size, WINDOW, 4)) <= SEAM_RATIO


@pytest.fixture(scope="module")
def tiny_package_results(tiny_runtime, start_image):
    """A 3:1 panorama and a 2x hires upscale from the tiny package, through the reference executor."""
    panorama = tiny_runtime(PROMPT, steps=4, scheduler="ddim", seed=4, width=384, height=128, progress=False)
    upscaled = tiny_runtime(PROMPT, steps=4, scheduler="ddim", seed=4, upscale=Upscale(2, strength=0.5), progress=False)
    return {"3:1": (panorama, (16, 48)), "2x": (upscaled, (32, 32))}


@pytest.mark.parametrize("case", ["3:1", "2x"])
def test_tiny_package_large_images(tiny_package_results, case, tiny_runtime):
    result, latent_size = tiny_package_results[case]
    image = result.images[0]
    assert image.size == (latent_size[1] * 8, latent_size[0] * 8)
    assert np.isfinite(pixels(image)).all() and np.asarray(image).std() > 1
    assert seam_ratio(image, Layout(latent_size, WINDOW, 4)) <= SEAM_RATIO
    expected = f"Size: {image.size[0]}x{image.size[1]}, Model: {tiny_runtime.package.name}"
    assert expected in result.parameters[0] and "Tile overlap: 32" in result.parameters[0]
    if case == "2x":
        assert "First pass size: 128x128, Hires upscale: 2, Hires steps: 4, Hires upscaler: Lanczos" in result.parameters[0]


def test_upscaling_a_users_image_is_tiled_img2img_of_its_enlargement(pipe, start_image):
    """`--image photo.png --upscale 2` = the photo enlarged with Lanczos, then image-to-image at the large size
    (tiled windows) with the upscale's strength."""
    settings = dict(steps=4, scheduler="ddim", seed=5, progress=False)
    upscaled = pipe(PROMPT, image=start_image, upscale=Upscale(2, strength=0.5), **settings)
    enlarged = start_image.resize((256, 256), Image.Resampling.LANCZOS)
    large_img2img = pipe(PROMPT, image=enlarged, strength=0.5, width=256, height=256, **settings)
    assert upscaled.images[0].size == (256, 256)
    np.testing.assert_array_equal(np.asarray(upscaled.images[0]), np.asarray(large_img2img.images[0]))
