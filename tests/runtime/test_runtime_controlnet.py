"""ControlNets at generation time: the tiny package's ControlNets and ControlledUnet through the reference executor
against diffusers' StableDiffusionControlNetPipeline on the same weights and the same NumPy-RNG latents; the control
image's preprocessing, the PNG parameters and the one-line refusals."""
import hashlib

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionControlNetPipeline
from PIL import Image, ImageDraw

from coreml_sd.converter.controlnets import controlnet_name
from coreml_sd.runtime import Pipeline
from coreml_sd.runtime.cli import main
from coreml_sd.runtime.control import ControlRequest, canny_edges, control_image_input
from coreml_sd.runtime.executor import psnr
from coreml_sd.runtime.sampling import draw_noise

from runtime_testing import DIFFUSERS_SCHEDULERS, PSNR_THRESHOLD_DB, latent_shape, pixels

PROMPT = "a red circle on a blue background"
STEPS = 4


def control_map(seed: int, size: int = 128) -> Image.Image:
    """An outline map as ControlNets take them: white lines on black, of a random ellipse and rectangle."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    x0, y0 = rng.integers(0, size // 2, 2)
    draw.ellipse((x0, y0, x0 + size // 3, y0 + size // 3), outline="white", width=3)
    left, top = rng.integers(0, size // 2, 2)
    draw.rectangle((left, top, left + size // 2, top + size // 3), outline="white", width=2)
    return image


@pytest.fixture(scope="module")
def controlled_runtime(tiny_controlnet_package):
    return Pipeline.from_package(tiny_controlnet_package, backend="reference")


@pytest.fixture(scope="module")
def originals(tiny_controlnets):
    return {controlnet_name(str(folder)): model for folder, model in tiny_controlnets.items()}


def diffusers_controlnet(reference, originals, config: dict, requests: list[tuple[str, float, Image.Image]],
                         seed: int, scheduler: str = "pndm", start: float = 0.0, end: float = 1.0) -> np.ndarray:
    """diffusers' ControlNet pipeline on the tiny modules, from the runtime's initial noise for `seed`."""
    nets = [originals[name] for name, _, _ in requests]
    pipe = StableDiffusionControlNetPipeline(
        **{k: v for k, v in reference.components.items() if k not in ("image_encoder",)},
        controlnet=nets if len(nets) > 1 else nets[0])
    pipe.scheduler = DIFFUSERS_SCHEDULERS[scheduler].from_config(config)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.from_numpy(draw_noise(np.random.RandomState(seed), latent_shape(reference)))
    images = [image for _, _, image in requests]
    scales = [scale for _, scale, _ in requests]
    return pipe(PROMPT, image=images if len(nets) > 1 else images[0], num_inference_steps=STEPS, height=128,
                width=128, latents=latents, generator=torch.Generator().manual_seed(seed), output_type="np",
                controlnet_conditioning_scale=scales if len(nets) > 1 else scales[0],
                control_guidance_start=start, control_guidance_end=end).images[0]


@pytest.mark.parametrize(("requests", "start", "end", "scheduler"), [
    ([("TinyCanny", 1.0)], 0.0, 1.0, "pndm"),
    ([("TinyCanny", 0.7), ("TinyDepth", 1.2)], 0.0, 1.0, "pndm"),
    ([("TinyDepth", 1.0)], 0.25, 0.75, "euler"),
])
def test_controlnet_matches_diffusers(controlled_runtime, tiny_pipeline, originals, requests, start, end, scheduler):
    maps = [control_map(index) for index in range(len(requests))]
    controls = [ControlRequest(name, scale, image, "") for (name, scale), image in zip(requests, maps)]
    ours = controlled_runtime(PROMPT, steps=STEPS, seed=7, scheduler=scheduler, controls=controls,
                              control_start=start, control_end=end, progress=False)
    config = controlled_runtime.package.scheduler_config
    reference = diffusers_controlnet(tiny_pipeline, originals, config,
                                     [(name, scale, image) for (name, scale), image in zip(requests, maps)], 7,
                                     scheduler, start, end)
    plain = controlled_runtime(PROMPT, steps=STEPS, seed=7, scheduler=scheduler, progress=False)
    figure = psnr(reference, pixels(ours.images[0]))
    print(f"{requests} start {start} end {end}: {figure:.1f} dB against diffusers, "
          f"{psnr(reference, pixels(plain.images[0])):.1f} dB without the ControlNets")
    assert figure >= PSNR_THRESHOLD_DB  # measured 58.4, 58.3 and 57.4 dB
    # the ControlNets changed the image (without them: 30.6, 28.8 and, acting on 2 of 4 steps, 46.4 dB)
    assert psnr(reference, pixels(plain.images[0])) < figure - 5


def test_cli_records_controlnets_and_preprocesses(tiny_controlnet_package, tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(photo)
    output = tmp_path / "out.png"
    code = main([PROMPT, "--model", str(tiny_controlnet_package), "--backend", "reference", "--steps", "2",
                 "--seed", "1", "--controlnet", "TinyCanny:0.5", "--control-image", str(photo),
                 "--control-preprocess", "canny:50:150", "-o", str(output)])
    assert code == 0
    parameters = Image.open(output).text["parameters"]
    digest = hashlib.sha256(photo.read_bytes()).hexdigest()
    recorded = f'"Model: TinyCanny, Weight: 0.5, Guidance Start: 0, Guidance End: 1, Image SHA-256: {digest}"'
    assert f"ControlNet 0: {recorded}" in parameters


def test_canny_preprocessing_is_opencvs():
    import cv2

    picture = Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    edges = np.asarray(canny_edges(picture, (100, 200)))
    expected = cv2.Canny(np.asarray(picture), 100, 200)
    assert edges.shape == (64, 64, 3) and (edges == expected[..., None]).all() and expected.any()


@pytest.mark.parametrize(("arguments", "message"), [
    (["--controlnet", "TinyCanny"], "1 --controlnet but 0 --control-image"),
    (["--controlnet", "Absent", "--control-image", "IMAGE"],
     "has no ControlNet 'Absent' (it holds TinyCanny, TinyDepth)"),
    (["--controlnet", "TinyCanny:strong", "--control-image", "IMAGE"], "is not a number"),
    (["--controlnet", "TinyCanny", "--control-image", "IMAGE", "--control-start", "0.8", "--control-end", "0.2"],
     "must satisfy 0 <= start < end <= 1"),
    (["--controlnet", "TinyCanny", "--control-image", "IMAGE", "--control-preprocess", "sobel"], "pass canny"),
])
def test_bad_control_input_is_one_line(tiny_controlnet_package, tmp_path, capsys, arguments, message):
    image = tmp_path / "map.png"
    control_map(0).save(image)
    output = tmp_path / "out"
    arguments = [str(image) if argument == "IMAGE" else argument for argument in arguments]
    code = main([PROMPT, "--model", str(tiny_controlnet_package), "--backend", "reference", "--steps", "2",
                 "-o", str(output), *arguments])
    error = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert code != 0 and len(error) == 1 and message in error[0], error
    assert not list(output.glob("*.png")) if output.exists() else True


def test_transparent_control_pixels_follow_apples_rule():
    """Apple's planarRGBShapedArray: RGB / 255, and -1 in every channel where alpha is 0 (how the Swift package
    feeds an inpainting ControlNet the pixels to redraw)."""
    rng = np.random.default_rng(6)
    rgba = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((64, 64)) < 0.3, 0, rng.integers(1, 256, (64, 64)))
    ours = control_image_input(Image.fromarray(rgba, "RGBA"), (64, 64))
    planar = rgba[..., :3].astype(np.float32).transpose(2, 0, 1) / 255
    expected = np.where(rgba[..., 3][None] == 0, -1.0, planar)
    assert ours.shape == (1, 3, 64, 64) and (ours == expected[None]).all() and (ours == -1).any()


@pytest.fixture(scope="module")
def xl_controlnet(tiny_xl_pipeline, tiny_xl_variant, tmp_path_factory):
    """The tiny-xl base with a tiny SDXL ControlNet (XlEdges; time_ids and text_embeds among its inputs), converted
    once without validation (the tests compare with diffusers): (runtime, float32 ControlNet)."""
    from coreml_sd.converter.conversion import ConversionOptions
    from coreml_sd.converter.models.tiny_controlnet import save_tiny_controlnet

    root = tmp_path_factory.mktemp("xl-controlnet")
    controlnet = save_tiny_controlnet(tiny_xl_pipeline.unet, 3, root / "xl-edges")
    tiny_xl_variant(ConversionOptions(model="tiny-xl", output=root / "package", controlnets=(str(root / "xl-edges"),),
                                      validate=False), ["ControlledUnet", "controlnet/XlEdges"])
    return Pipeline.from_package(root / "package", backend="reference"), controlnet


def xl_controlnet_pipeline(tiny_xl_pipeline, controlnet, scheduler_config: dict):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline

    components = {k: v for k, v in tiny_xl_pipeline.components.items() if k in (
        "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet")}
    pipe = StableDiffusionXLControlNetPipeline(**components, controlnet=controlnet, add_watermarker=False,
                                               scheduler=EulerDiscreteScheduler.from_config(scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_controlnet_matches_diffusers(tiny_xl_pipeline, xl_controlnet):
    """An SDXL ControlNet against diffusers' StableDiffusionXLControlNetPipeline on the tiny-xl weights and the same
    NumPy-RNG latents."""
    runtime, controlnet = xl_controlnet
    image = control_map(5)
    ours = runtime(PROMPT, steps=3, seed=5, controls=[ControlRequest("XlEdges", 0.8, image, "")], progress=False)
    pipe = xl_controlnet_pipeline(tiny_xl_pipeline, controlnet, runtime.package.scheduler_config)
    latents = torch.from_numpy(draw_noise(np.random.RandomState(5), (1, 4, 16, 16)))
    reference = pipe(PROMPT, image=image, num_inference_steps=3, height=128, width=128, latents=latents,
                     guidance_scale=7.5, controlnet_conditioning_scale=0.8, output_type="np").images[0]
    figure = psnr(reference, pixels(ours.images[0]))
    print(f"SDXL ControlNet: {figure:.1f} dB against diffusers")
    assert figure >= PSNR_THRESHOLD_DB  # measured 58.0 dB


def test_sdxl_controlnet_steers_the_base_before_the_refiner(tiny_xl_pipeline, tiny_xl_refiner_pipeline,
                                                            tiny_xl_packages, xl_controlnet):
    """With a refiner, the ControlNet steers the base's steps only (the refiner has none), its start and end
    fractions of the whole schedule: diffusers' StableDiffusionXLControlNetPipeline with denoising_end, then its
    refiner with denoising_start, as diffusers users run them. The base's part is the ControlNet run's own."""
    from diffusers import EulerDiscreteScheduler

    runtime, controlnet = xl_controlnet
    refiner = Pipeline.from_package(tiny_xl_packages("tiny-xl-refiner"), backend="reference")
    steps, seed, start, end = 4, 6, 0.75, 0.5
    image = control_map(6)
    controls = [ControlRequest("XlEdges", 1.0, image, "")]
    handed_over, unrefined = [], []
    ours = runtime(PROMPT, steps=steps, seed=seed, controls=controls, control_end=end, refiner=refiner,
                   refiner_start=start, progress=False,
                   on_step=lambda done, total, latents: handed_over.append(latents) if done == total else None)
    runtime(PROMPT, steps=steps, seed=seed, controls=controls, control_end=end, progress=False, output_type="latent",
            on_step=lambda done, total, latents: unrefined.append(latents))
    assert torch.equal(handed_over[0], unrefined[round(steps * start) - 1])
    latents = torch.from_numpy(draw_noise(np.random.RandomState(seed), (1, 4, 16, 16)))
    base_latents = xl_controlnet_pipeline(tiny_xl_pipeline, controlnet, runtime.package.scheduler_config)(
        PROMPT, image=image, num_inference_steps=steps, height=128, width=128, latents=latents, guidance_scale=7.5,
        control_guidance_end=end, denoising_end=start, output_type="latent").images
    tiny_xl_refiner_pipeline.scheduler = EulerDiscreteScheduler.from_config(refiner.package.scheduler_config)
    reference = tiny_xl_refiner_pipeline(PROMPT, image=base_latents, num_inference_steps=steps, denoising_start=start,
                                         guidance_scale=7.5, output_type="np").images[0]
    figure = psnr(reference, pixels(ours.images[0]))
    print(f"SDXL ControlNet and refiner: {figure:.1f} dB against diffusers")
    assert figure >= PSNR_THRESHOLD_DB  # measured 58.2 dB
    assert "ControlNet 0: \"Model: XlEdges, Weight: 1, Guidance Start: 0, Guidance End: 0.5" in ours.parameters[0]
    assert f"Refiner: {refiner.package.name}, Refiner start: {start}" in ours.parameters[0]
