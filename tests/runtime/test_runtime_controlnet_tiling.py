"""ControlNets at sizes beyond the package's: the tiny ControlNet package through the reference executor against
MultiDiffusion with ControlNet written out on diffusers' float32 modules (each window's ControlNet given its crop of
the control image, as ControlNet tile upscaling needs), and the hires pass (`--upscale`) with a ControlNet."""
import hashlib
import shutil

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionControlNetPipeline
from PIL import Image, ImageDraw

from coreml_sd.converter.conversion import ConversionOptions, convert_model
from coreml_sd.converter.models.tiny_controlnet import build_tiny_controlnet
from coreml_sd.runtime import Pipeline
from coreml_sd.runtime.cli import main
from coreml_sd.runtime.control import ControlRequest
from coreml_sd.runtime.executor import psnr
from coreml_sd.runtime.sampling import draw_noise
from coreml_sd.runtime.tiling import Layout

from runtime_testing import PSNR_THRESHOLD_DB, feather, pixels

PROMPT = "a red circle on a blue background"
WINDOW = 16  # the tiny package's latent side
# The tiny ControlNets' conditioning embeddings keep diffusers' default initialisation, whose seven convolutions shrink
# the control image's signal: black and noise control images change their residuals by 0.01%. Drawn with this gain
# (variance kept through SiLU), they change them by 22%, so that which part of the picture a window sees shows.
EMBEDDING_GAIN = 1.7


def regional_map(width: int, height: int) -> Image.Image:
    """An outline map whose parts differ from place to place: a column of circles on the left, boxes on the right."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for row in range(0, height, 40):
        draw.ellipse((8, row + 4, 40, row + 36), outline="white", width=3)
    for left in range(width // 2, width - 24, 36):
        draw.rectangle((left, 20, left + 28, height - 20), outline="white", width=2)
    return image


def blend(grid: tuple[int, int], windows: list[tuple[int, int]], window: int, overlap: int, tile) -> np.ndarray:
    """MultiDiffusion's average over `windows` of a (rows, columns) grid: tile(top, left) weighted by its feather."""
    total, weight_sum = None, np.zeros(grid)
    for top, left in windows:
        value = tile(top, left)
        weights = np.outer(feather(window, overlap, top > 0, top + window < grid[0]),
                           feather(window, overlap, left > 0, left + window < grid[1]))
        total = np.zeros((*value.shape[:-2], *grid)) if total is None else total
        total[..., top : top + window, left : left + window] += value * weights
        weight_sum[top : top + window, left : left + window] += weights
    return total / weight_sum


@torch.no_grad()
def controlled_multidiffusion(reference, controlnet, config: dict, control_image: Image.Image, size: tuple[int, int],
                              steps: int, seed: int, scale: float, guidance: float, overlap: int,
                              whole_map_per_window: bool = False):
    """MultiDiffusion with one ControlNet on diffusers' modules: at each Euler step, every window's guided noise (the
    ControlNet on the window's crop of the control image, resized to the whole size by diffusers' control image
    processor, then the Unet with its residuals) weighted by the feather and averaged; the latents decoded in
    feathered VAE tiles. With `whole_map_per_window`, each window gets the whole control image resized to it."""
    pipe = StableDiffusionControlNetPipeline(**{k: v for k, v in reference.components.items() if k != "image_encoder"},
                                             controlnet=controlnet)
    positive, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    context = torch.cat([negative, positive])
    width, height = size
    pixel_window = WINDOW * 8
    if whole_map_per_window:
        control = pipe.prepare_image(control_image, pixel_window, pixel_window, 1, 1, "cpu", torch.float32, True)
    else:
        control = pipe.prepare_image(control_image, width, height, 1, 1, "cpu", torch.float32, True)
    scheduler = EulerDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    grid = (height // 8, width // 8)
    windows = Layout(grid, (WINDOW, WINDOW), overlap).windows
    latents = torch.from_numpy(draw_noise(np.random.RandomState(seed), (1, 4, *grid))) * scheduler.init_noise_sigma

    def guided_noise(model_input: torch.Tensor, t, top: int, left: int) -> np.ndarray:
        view = model_input[..., top : top + WINDOW, left : left + WINDOW].repeat(2, 1, 1, 1)
        crop = control if whole_map_per_window else \
            control[..., top * 8 : top * 8 + pixel_window, left * 8 : left * 8 + pixel_window]
        down, mid = controlnet(view, t, context, controlnet_cond=crop, conditioning_scale=scale, return_dict=False)
        unconditional, conditional = reference.unet(view, t, context, down_block_additional_residuals=down,
                                                    mid_block_additional_residual=mid).sample.numpy()
        return unconditional + guidance * (conditional - unconditional)

    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        noise = blend(grid, windows, WINDOW, overlap, lambda top, left: guided_noise(model_input, t, top, left))
        latents = scheduler.step(torch.from_numpy(noise.astype(np.float32)), t, latents).prev_sample
    z = latents / reference.vae.config.scaling_factor
    decoded = blend((height, width), [(top * 8, left * 8) for top, left in windows], pixel_window, overlap * 8,
                    lambda top, left: reference.vae.decode(z[..., top // 8 : top // 8 + WINDOW,
                                                              left // 8 : left // 8 + WINDOW]).sample.numpy())
    return np.clip(decoded[0].transpose(1, 2, 0) / 2 + 0.5, 0, 1)


@pytest.fixture(scope="module")
def seeing_controlnet(tiny_pipeline, tiny_controlnet_package, tmp_path_factory):
    """A tiny ControlNet whose residuals depend on its control image, added to a copy of the tiny ControlNet package
    (only it converts; validation off, as the test compares with diffusers itself): (package, float32 original)."""
    controlnet = build_tiny_controlnet(tiny_pipeline.unet, 3)
    embedding = controlnet.controlnet_cond_embedding
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for convolution in (embedding.conv_in, *embedding.blocks):
            weight = convolution.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * EMBEDDING_GAIN / weight[0].numel() ** 0.5)
    root = tmp_path_factory.mktemp("seeing-controlnet")
    controlnet.save_pretrained(root / "tiny-tile", safe_serialization=True)
    package = root / "package"
    shutil.copytree(tiny_controlnet_package, package)
    report = convert_model(ConversionOptions(model="tiny", output=package, controlnets=(str(root / "tiny-tile"),),
                                             components=("TextEncoder", "Unet", "VAEDecoder", "VAEEncoder"),
                                             validate=False))
    assert report.converted == ["controlnet/TinyTile"], report
    return package, controlnet


@pytest.fixture(scope="module")
def controlled_runtime(seeing_controlnet):
    return Pipeline.from_package(seeing_controlnet[0], backend="reference")


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_tiled_controlnet_matches_multidiffusion_with_window_crops(controlled_runtime, tiny_pipeline,
                                                                  seeing_controlnet, guidance):
    """A 2:1 image in three windows: each window's ControlNet sees its own crop of the control image. Guided, each
    Unet call takes one window's pair of rows; unguided, two windows (the last call's second place a repeat)."""
    size, steps, seed, scale = (256, 128), 3, 11, 1.0
    controlnet = seeing_controlnet[1]
    control_image = regional_map(*size)
    ours = controlled_runtime(PROMPT, steps=steps, seed=seed, scheduler="euler", guidance_scale=guidance,
                              width=size[0], height=size[1], progress=False,
                              controls=[ControlRequest("TinyTile", scale, control_image, "")])
    overlap = controlled_runtime.default_overlap // 8
    assert len(Layout((16, 32), (WINDOW, WINDOW), overlap).windows) == 3
    config = controlled_runtime.package.scheduler_config
    reference = controlled_multidiffusion(tiny_pipeline, controlnet, config, control_image, size, steps, seed, scale,
                                          guidance, overlap)
    squeezed = controlled_multidiffusion(tiny_pipeline, controlnet, config, control_image, size, steps, seed, scale,
                                         guidance, overlap, whole_map_per_window=True)
    figure = psnr(reference, pixels(ours.images[0]))
    squeezed_figure = psnr(squeezed, pixels(ours.images[0]))
    print(f"tiled ControlNet, guidance {guidance}: {figure:.1f} dB against MultiDiffusion with window crops, "
          f"{squeezed_figure:.1f} dB against the whole map in each window")
    assert figure >= PSNR_THRESHOLD_DB  # measured 57.7 dB guided, 58.8 dB unguided
    assert squeezed_figure < figure - 5  # measured 47.1 and 50.4 dB: the crops matter
    assert 'ControlNet 0: "Model: TinyTile, Weight: 1' in ours.parameters[0]


def test_upscale_with_a_controlnet_records_it(tiny_controlnet_package, tmp_path):
    """The hires pass with a ControlNet (the control image at the hires size, cut into its windows): it runs and
    the PNG parameters record the ControlNet beside the hires settings."""
    control = tmp_path / "map.png"
    regional_map(128, 128).save(control)
    output = tmp_path / "out.png"
    code = main([PROMPT, "--model", str(tiny_controlnet_package), "--backend", "reference", "--steps", "2",
                 "--seed", "3", "--upscale", "2", "--upscale-strength", "0.5", "--controlnet", "TinyCanny:0.8",
                 "--control-image", str(control), "-o", str(output)])
    assert code == 0
    image = Image.open(output)
    digest = hashlib.sha256(control.read_bytes()).hexdigest()
    assert image.size == (256, 256) and np.asarray(image).std() > 1
    parameters = image.text["parameters"]
    assert "Hires upscale: 2" in parameters and "First pass size: 128x128" in parameters
    assert (f'ControlNet 0: "Model: TinyCanny, Weight: 0.8, Guidance Start: 0, Guidance End: 1, '
            f'Image SHA-256: {digest}"') in parameters
