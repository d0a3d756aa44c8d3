"""Inpainting by latent blending on an ordinary package: the redrawn region against diffusers'
StableDiffusionInpaintPipeline (4-channel Unet) on the same weights and NumPy-RNG numbers, the kept pixels equal to
the input image exactly, and the one-line refusals."""
import cv2
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionInpaintPipeline
from PIL import Image, ImageDraw

from coreml_sd.runtime import Pipeline
from coreml_sd.runtime.cli import main
from coreml_sd.runtime.executor import psnr
from coreml_sd.runtime.inpaint_stage import InpaintStage
from coreml_sd.runtime.inpainting import Inpainting, open_mask
from coreml_sd.runtime.sampling import draw_noise, sample_encoder_latents

from runtime_testing import DIFFUSERS_SCHEDULERS, PSNR_THRESHOLD_DB, latent_shape, pixels

PROMPT = "a blue circle"
STEPS = 4


@pytest.fixture(scope="module")
def runtime(tiny_controlnet_package):
    return Pipeline.from_package(tiny_controlnet_package, backend="reference")


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(np.random.default_rng(5).integers(0, 256, (128, 128, 3), dtype=np.uint8))


def circle_mask(size: int = 128) -> Image.Image:
    mask = Image.new("L", (size, size))
    ImageDraw.Draw(mask).ellipse((32, 40, 96, 104), fill=255)
    return mask


@torch.no_grad()
def diffusers_inpaint(reference, config: dict, image: Image.Image, mask: Image.Image, seed: int) -> np.ndarray:
    """diffusers' inpainting from the runtime's numbers for `seed`: its noise, then the VAE posterior's sample."""
    rng = np.random.RandomState(seed)
    noise = torch.from_numpy(draw_noise(rng, latent_shape(reference)))
    x = torch.from_numpy(np.asarray(image, np.float32).transpose(2, 0, 1)[None] / 127.5 - 1)
    moments = reference.vae.quant_conv(reference.vae.encoder(x)).numpy()
    image_latents = torch.from_numpy(sample_encoder_latents(moments, rng, reference.vae.config.scaling_factor))
    pipe = StableDiffusionInpaintPipeline(**{**reference.components,
                                             "scheduler": DIFFUSERS_SCHEDULERS["pndm"].from_config(config)})
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, image=image_latents, mask_image=mask, masked_image_latents=image_latents, height=128,
                width=128, strength=1.0, num_inference_steps=STEPS, latents=noise, output_type="np").images[0]


def test_blend_inpainting_matches_diffusers_and_keeps_the_rest(runtime, tiny_pipeline, photo):
    mask = circle_mask()
    ours = runtime(PROMPT, steps=STEPS, seed=3, image=photo, strength=1.0, inpainting=Inpainting(mask, blur=0),
                   progress=False).images[0]
    reference = diffusers_inpaint(tiny_pipeline, runtime.package.scheduler_config, photo, mask, 3)
    redrawn = np.asarray(mask) == 255
    figure = psnr(reference[redrawn], pixels(ours)[redrawn])
    print(f"redrawn region: {figure:.1f} dB against diffusers")
    assert figure >= PSNR_THRESHOLD_DB  # measured 55.4 dB (the blend carries float16 error across every step)
    assert (np.asarray(ours)[~redrawn] == np.asarray(photo)[~redrawn]).all()
    assert psnr(pixels(photo)[redrawn], pixels(ours)[redrawn]) < 30  # the circle was redrawn


def test_blurred_mask_keeps_every_pixel_it_leaves_black(runtime, photo, tmp_path):
    image = tmp_path / "photo.png"
    photo.save(image)
    mask = tmp_path / "mask.png"
    circle_mask().save(mask)
    output = tmp_path / "out.png"
    assert main([PROMPT, "--model", str(runtime.package.path), "--backend", "reference", "--steps", "2",
                 "--seed", "1", "--image", str(image), "--mask", str(mask), "-o", str(output)]) == 0
    result = np.asarray(Image.open(output).convert("RGB"))
    blurred = np.asarray(open_mask(str(mask), str(image), 4).blurred())
    kept = blurred == 0
    assert kept.sum() > 0.5 * kept.size and (blurred > 0).sum() > (np.asarray(circle_mask()) > 0).sum()
    assert (result[kept] == np.asarray(photo)[kept]).all()
    assert "Mask blur: 4" in Image.open(output).text["parameters"]


def test_transparency_serves_as_the_mask(photo):
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.eval(circle_mask(), lambda value: 255 - value))
    inpainting = open_mask(None, rgba, 0)
    assert (np.asarray(inpainting.mask) == np.asarray(circle_mask())).all()
    assert open_mask(None, photo, 4) is None


@pytest.mark.parametrize(("case", "message"), [
    ("small-mask", "the mask is 64x64 but the image 128x128"),
    ("mask-only", "--mask needs the image it masks"),
    ("negative-blur", "--mask-blur must be at least 0"),
    ("negative-padding", "--inpaint-padding must be at least 0"),
])
def test_bad_inpainting_input_is_one_line(tiny_controlnet_package, photo, tmp_path, capsys, case, message):
    image, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    photo.save(image)
    circle_mask(64 if case == "small-mask" else 128).save(mask)
    arguments = {"small-mask": ["--image", str(image), "--mask", str(mask)], "mask-only": ["--mask", str(mask)],
                 "negative-blur": ["--image", str(image), "--mask", str(mask), "--mask-blur", "-1"],
                 "negative-padding": ["--image", str(image), "--mask", str(mask), "--inpaint-area", "masked",
                                      "--inpaint-padding", "-8"]}[case]
    output = tmp_path / "out"
    code = main([PROMPT, "--model", str(tiny_controlnet_package), "--backend", "reference", "--steps", "2",
                 "-o", str(output), *arguments])
    error = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert code != 0 and len(error) == 1 and message in error[0], error
    assert not output.exists() or not list(output.iterdir())


def test_black_mask_warns_and_returns_the_image(tiny_controlnet_package, photo, tmp_path, capsys):
    image, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    photo.save(image)
    Image.new("L", (128, 128)).save(mask)
    output = tmp_path / "out.png"
    assert main([PROMPT, "--model", str(tiny_controlnet_package), "--backend", "reference", "--steps", "2",
                 "--image", str(image), "--mask", str(mask), "-o", str(output)]) == 0
    assert "nothing to inpaint" in capsys.readouterr().err
    assert (np.asarray(Image.open(output).convert("RGB")) == np.asarray(photo)).all()


def test_inpainting_unet_matches_diffusers(tiny_inpainting_package, photo):
    """A 9-channel inpainting Unet (latents, mask, masked image's latents) against diffusers' inpainting pipeline
    on the same weights, fed the runtime's numbers: the noise, the image's sample, then the masked image's."""
    from coreml_sd.converter.models.tiny import build_tiny_inpainting_pipeline

    reference = build_tiny_inpainting_pipeline()
    runtime = Pipeline.from_package(tiny_inpainting_package, backend="reference")
    assert tuple(runtime.sampler.unet.input_description["sample"][0]) == (2, 9, 16, 16)  # the contract's row
    mask = circle_mask()
    ours = runtime(PROMPT, steps=STEPS, seed=8, image=photo, strength=1.0, inpainting=Inpainting(mask, blur=0),
                   progress=False).images[0]
    rng = np.random.RandomState(8)
    noise = torch.from_numpy(draw_noise(rng, (1, 4, 16, 16)))
    draw_noise(rng, (1, 4, 16, 16))  # the image's own sample, which a 9-channel Unet does not use
    masked = torch.from_numpy(Inpainting(mask, blur=0).masked_pixels(photo))
    with torch.no_grad():
        moments = reference.vae.quant_conv(reference.vae.encoder(masked)).numpy()
    masked_latents = torch.from_numpy(sample_encoder_latents(moments, rng, reference.vae.config.scaling_factor))
    pipe = StableDiffusionInpaintPipeline(**{**reference.components, "scheduler": DIFFUSERS_SCHEDULERS["pndm"]
                                             .from_config(runtime.package.scheduler_config)})
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(PROMPT, image=photo, mask_image=mask, masked_image_latents=masked_latents, height=128,
                    width=128, strength=1.0, num_inference_steps=STEPS, latents=noise, output_type="np").images[0]
    redrawn = np.asarray(mask) == 255
    figure = psnr(expected[redrawn], pixels(ours)[redrawn])
    print(f"9-channel inpainting, redrawn region: {figure:.1f} dB against diffusers")
    assert figure >= PSNR_THRESHOLD_DB  # measured 58.2 dB
    assert (np.asarray(ours)[~redrawn] == np.asarray(photo)[~redrawn]).all()


def test_inpainting_unet_needs_a_mask(tiny_inpainting_package, photo, tmp_path, capsys):
    code = main([PROMPT, "--model", str(tiny_inpainting_package), "--backend", "reference", "--steps", "2",
                 "-o", str(tmp_path / "out.png")])
    error = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert code != 0 and len(error) == 1 and "has an inpainting Unet: pass --image and --mask" in error[0], error


def test_only_masked_repairs_a_large_image_with_a_small_package(tiny_controlnet_package, tmp_path):
    """A 256x256 image, a mask in one corner, a 128x128 package: the box around the mask is generated and pasted
    back; the result has the image's size, and every pixel the blurred mask leaves black is the image's."""
    big = Image.fromarray(np.random.default_rng(9).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    mask = Image.new("L", (256, 256))
    ImageDraw.Draw(mask).ellipse((170, 150, 220, 210), fill=255)
    image, mask_file, output = tmp_path / "big.png", tmp_path / "mask.png", tmp_path / "out.png"
    big.save(image)
    mask.save(mask_file)
    assert main([PROMPT, "--model", str(tiny_controlnet_package), "--backend", "reference", "--steps", "2",
                 "--seed", "2", "--image", str(image), "--mask", str(mask_file), "--inpaint-area", "masked",
                 "--no-watermark", "-o", str(output)]) == 0
    result = Image.open(output)
    assert result.size == (256, 256)
    assert "Inpaint area: Only masked, Masked area padding: 32" in result.text["parameters"]
    ours, original = np.asarray(result.convert("RGB")), np.asarray(big)
    blurred = np.asarray(open_mask(mask, big, 4).blurred())
    assert (ours[blurred == 0] == original[blurred == 0]).all()
    assert psnr(pixels(big)[blurred == 255], pixels(result.convert("RGB"))[blurred == 255]) < 30  # redrawn


def test_only_masked_with_an_empty_mask_is_one_line(tiny_controlnet_package, photo, tmp_path, capsys):
    image, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    photo.save(image)
    Image.new("L", (128, 128)).save(mask)
    output = tmp_path / "out"
    code = main([PROMPT, "--model", str(tiny_controlnet_package), "--backend", "reference", "--steps", "2",
                 "--image", str(image), "--mask", str(mask), "--inpaint-area", "masked", "-o", str(output)])
    error = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("Error")]
    assert code != 0 and len(error) == 1 and "--inpaint-area masked needs a mask with white in it" in error[0]
    assert not output.exists() or not list(output.iterdir())


def a1111_feathered(mask: Image.Image, sigma: int) -> np.ndarray:
    """A1111's mask feathering (processing.py): a Gaussian across, then down, each kernel 2*int(2.5*sigma+0.5)+1."""
    length = 2 * int(2.5 * sigma + 0.5) + 1
    return cv2.GaussianBlur(cv2.GaussianBlur(np.asarray(mask), (length, 1), sigma), (1, length), sigma)


@pytest.mark.parametrize("area", ["whole picture", "only masked"])
def test_the_result_goes_back_once_through_a1111s_overlay(area):
    """The composite, against A1111's overlay computed here: only masked pastes the generated crop into its box and
    blends it over the image through the feathered mask, once (a second blend inside the crop thinned the edge);
    the whole picture blends through the feathered mask doubled. A solid blue stands in for the generated picture."""
    big = Image.fromarray(np.random.default_rng(4).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    mask = Image.new("L", (256, 256))
    ImageDraw.Draw(mask).ellipse((170, 150, 220, 210), fill=255)
    only_masked = area == "only masked"
    stage = InpaintStage.prepare(Inpainting(mask, 6, padding=16 if only_masked else None), big, (128, 128))
    result = np.asarray(stage.finish(Image.new("RGB", (128, 128), (0, 0, 255)))).astype(float)
    original, feathered = np.asarray(big).astype(float), a1111_feathered(mask, 6)
    alpha = feathered / 255
    if only_masked:
        left, top, right, bottom = stage.area.box
        ys, xs = np.nonzero(alpha)
        assert right - left == bottom - top and left <= xs.min() - 16 and right >= xs.max() + 17
        assert stage.source.size == (128, 128) and np.asarray(stage.redraw.mask).max() == 255
    else:
        original = np.asarray(big.resize((128, 128), Image.Resampling.LANCZOS)).astype(float)
        # A1111 brings the feathered mask to the generation's size with Pillow's Lanczos, then doubles it
        scaled = np.asarray(Image.fromarray(feathered).resize((128, 128), Image.Resampling.LANCZOS))
        alpha = np.minimum(2 * scaled.astype(float), 255) / 255
    expected = np.array([0, 0, 255]) * alpha[..., None] + original * (1 - alpha[..., None])
    error = np.abs(result - expected)
    print(f"{area}: largest difference {error.max():.2f} levels")
    assert error.max() <= 1.01  # measured 0.5: rounding
