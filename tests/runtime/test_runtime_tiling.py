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

from runtime_testing import _with_scheduler, feather, pixels

PROMPT = "a photo of an astronaut riding a horse"

# float32 on both sides, latents after all steps: measured 100.3 dB (uniform weights, against diffusers' panorama
# pipeline) and 99.2 dB (feathered, against the NumPy MultiDiffusion); the wrong blend measures 36 dB
PARITY_PSNR_DB = 95.0
FEATHERED_PSNR_DB = 94.0
# The roughest overlap column or row against the roughest elsewhere: feathered tiles measure 0.38-0.66 (decode) and
# 0.86-0.88 (the tiny package's 3:1 panorama and 2x upscale); a hard cut inside each overlap measures 1.21 (3:1 decode).
SEAM_RATIO = 1.0
WINDOW = (16, 16)  # the tiny model's latent


def overlap_pairs(starts: list[int], window: int) -> list[int]:
    """Indices x of the neighbouring pairs (x, x + 1) that touch an overlap: from the pair across the later window's
    first edge to the pair across the earlier window's last edge."""
    return sorted({x for before, after in zip(starts, starts[1:]) for x in range(after - 1, before + window)})


def seam_ratio(image: Image.Image, layout: Layout) -> float:
    """The roughest column or row of neighbouring pixel pairs that touches an overlap (where a window's edge, or a
    hard cut anywhere inside the overlap, would show) over the roughest one outside the overlaps, each measured as
    its mean absolute difference; `layout` in latent pixels (tiles lie at 8 times the latent offsets)."""
    values = np.asarray(image, np.float64)
    across_columns = np.abs(np.diff(values, axis=1)).mean(axis=(0, 2))  # pair (x, x + 1) at index x
    across_rows = np.abs(np.diff(values, axis=0)).mean(axis=(1, 2))
    factor = tiling.VAE_FACTOR
    columns = overlap_pairs(sorted({left * factor for _, left in layout.windows}), layout.window[1] * factor)
    rows = overlap_pairs(sorted({top * factor for top, _ in layout.windows}), layout.window[0] * factor)
    seams = np.concatenate([across_columns[columns], across_rows[rows]])
    elsewhere = np.concatenate([np.delete(across_columns, columns), np.delete(across_rows, rows)])
    return float(seams.max() / elsewhere.max())


@pytest.mark.parametrize(
    ("length", "window", "overlap"), [(16, 16, 4), (48, 16, 8), (40, 16, 4), (128, 64, 16), (23, 16, 0)]
)
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
    ours = pipe(
        PROMPT,
        negative_prompt="blurry",
        steps=steps,
        scheduler="ddim",
        seed=seed,
        width=width,
        height=128,
        overlap=64,
        output_type="latent",
        progress=False,
    ).images[0]

    panorama = _with_scheduler(StableDiffusionPanoramaPipeline, tiny_pipeline, "ddim", package.scheduler_config)
    # StableDiffusionPipeline corrects these settings of SD v1 scheduler configs when it loads; the panorama
    # pipeline does not, and its DDIM would clip latents to [-1, 1]
    panorama.scheduler = DDIMScheduler.from_config(panorama.scheduler.config, clip_sample=False, steps_offset=1)
    panorama.get_views = partial(panorama.get_views, window_size=WINDOW[0], stride=8)
    assert panorama.get_views(128, width) == [(0, 16, left, left + 16) for left in axis_starts(48, 16, 8)]
    latents = torch.from_numpy(draw_noise(np.random.RandomState(seed), (1, 4, 16, width // 8)))
    reference = panorama(
        PROMPT,
        negative_prompt="blurry",
        height=128,
        width=width,
        num_inference_steps=steps,
        latents=latents,
        output_type="latent",
    ).images
    assert psnr(reference.numpy(), ours.numpy()) >= PARITY_PSNR_DB


@torch.no_grad()
def numpy_multidiffusion(
    reference,
    config: dict,
    prompt: str,
    negative_prompt: str,
    steps: int,
    latents: np.ndarray,
    windows: list[tuple[int, int]],
    overlap: int,
    guidance_scale: float = 7.5,
) -> np.ndarray:
    """MultiDiffusion written out in NumPy on diffusers' modules: at each DDIM step, every window's guided noise
    prediction (the float32 Unet on [unconditional, conditional]) is weighted by the feather and averaged."""
    positive, negative = reference.encode_prompt(prompt, "cpu", 1, True, negative_prompt=negative_prompt)
    context = torch.cat([negative, positive])
    scheduler = DDIMScheduler.from_config(config, clip_sample=False, steps_offset=1)
    scheduler.set_timesteps(steps)
    (height, width), (rows, columns) = WINDOW, latents.shape[-2:]
    latents = torch.from_numpy(latents)
    for t in scheduler.timesteps:
        total, weight_sum = np.zeros(latents.shape), np.zeros((rows, columns))
        for top, left in windows:
            view = latents[..., top : top + height, left : left + width]
            unconditional, conditional = reference.unet(torch.cat([view, view]), t, context).sample.numpy()
            noise = unconditional + guidance_scale * (conditional - unconditional)
            weights = np.outer(
                feather(height, overlap, top > 0, top + height < rows),
                feather(width, overlap, left > 0, left + width < columns),
            )
            total[..., top : top + height, left : left + width] += noise * weights
            weight_sum[top : top + height, left : left + width] += weights
        noise = torch.from_numpy((total / weight_sum).astype(np.float32))
        latents = scheduler.step(noise, t, latents).prev_sample
    return latents.numpy()


def test_feathered_txt2img_matches_numpy_multidiffusion(pipe, package, tiny_pipeline):
    """The shipped blend (feathered windows, 2 latent rows x 3 columns over a 24x40 latent) against MultiDiffusion
    written out above with the same initial latents."""
    steps, seed, height, width = 4, 6, 192, 320
    layout = Layout((height // 8, width // 8), WINDOW, 4)
    assert len(layout.windows) == 2 * 3
    ours = (
        pipe(
            PROMPT,
            negative_prompt="blurry",
            steps=steps,
            scheduler="ddim",
            seed=seed,
            width=width,
            height=height,
            overlap=32,
            output_type="latent",
            progress=False,
        )
        .images[0]
        .numpy()
    )
    latents = draw_noise(np.random.RandomState(seed), (1, 4, *layout.size))
    reference = numpy_multidiffusion(
        tiny_pipeline, package.scheduler_config, PROMPT, "blurry", steps, latents, layout.windows, layout.overlap
    )
    assert psnr(reference, ours) >= FEATHERED_PSNR_DB


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
    # float32 sums in another order for another batch size: ulps of the largest values apart, through two steps of
    # the Unet (measured: 0 here, 1.24e-5 on another machine, where the largest latent is 6.9)
    expected = pipe(PROMPT, **settings).images[0].numpy()
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


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
    assert (
        "Denoising strength: 0.6, Hires upscale: 1, Hires steps: 6, Hires upscaler: Lanczos" in upscaled.parameters[0]
    )


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
    tiled = tiling.tiled_decode(
        lambda z: decoder.predict({"z": z.astype(dtype)})["image"], smooth_latent(*size), WINDOW, 4
    )
    assert seam_ratio(as_image(tiled), Layout(size, WINDOW, 4)) <= SEAM_RATIO


def hard_cut_weights(layout: Layout, top: int, left: int) -> np.ndarray:
    """Each window owns the near half of every overlap outright: tiles stitched with a hard cut."""

    def side(length: int, before: bool, after: bool) -> np.ndarray:
        weights = np.ones(length, np.float32)
        weights[: layout.overlap // 2 if before else 0] = 0
        weights[length - (layout.overlap // 2 if after else 0) :] = 0
        return weights

    (height, width), (rows, columns) = layout.window, layout.size
    return np.outer(side(height, top > 0, top + height < rows), side(width, left > 0, left + width < columns)) + 1e-6


def test_seam_ratio_sees_a_hard_cut_inside_the_overlaps(pipe, monkeypatch):
    decoder = pipe.models["VAEDecoder"]
    dtype = decoder.input_description["z"][1]
    monkeypatch.setattr(tiling, "feathered_weights", hard_cut_weights)
    tiled = tiling.tiled_decode(
        lambda z: decoder.predict({"z": z.astype(dtype)})["image"], smooth_latent(16, 48), WINDOW, 4
    )
    assert seam_ratio(as_image(tiled), Layout((16, 48), WINDOW, 4)) > SEAM_RATIO


def as_image(decoded: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(decoded[0].transpose(1, 2, 0) / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8))


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
        assert (
            "First pass size: 128x128, Hires upscale: 2, Hires steps: 4, Hires upscaler: Lanczos"
            in result.parameters[0]
        )


def test_upscaling_a_users_image_is_tiled_img2img_of_its_enlargement(pipe, start_image):
    """`--image photo.png --upscale 2` = the photo enlarged with Lanczos, then image-to-image at the large size
    (tiled windows) with the upscale's strength."""
    settings = dict(steps=4, scheduler="ddim", seed=5, progress=False)
    upscaled = pipe(PROMPT, image=start_image, upscale=Upscale(2, strength=0.5), **settings)
    enlarged = start_image.resize((256, 256), Image.Resampling.LANCZOS)
    large_img2img = pipe(PROMPT, image=enlarged, strength=0.5, width=256, height=256, **settings)
    assert upscaled.images[0].size == (256, 256)
    np.testing.assert_array_equal(np.asarray(upscaled.images[0]), np.asarray(large_img2img.images[0]))
