"""Inpainting through img2img's `mask`, with A1111's own client (`webuiapi`) against a real server: the PNGs equal
`coreml-generate --mask`'s with the same settings, byte for byte, and the pixels that A1111's feathered mask leaves
black are the init image's, exactly."""
import base64

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

webuiapi = pytest.importorskip("webuiapi")

PROMPT = "a blue circle"
BLUR = 4
SETTINGS = {"prompt": PROMPT, "denoising_strength": 1.0, "seed": 4, "steps": 3, "cfg_scale": 7.0,
            "sampler_name": "Euler", "mask_blur": BLUR, "inpainting_fill": 1}
CLI_SETTINGS = [PROMPT, "--model", "tiny", "--strength", "1.0", "--seed", "4", "--steps", "3", "--guidance-scale", "7",
                "--scheduler", "euler", "--mask-blur", str(BLUR)]
# (image side, the ellipse's box, inpaint_full_res, padding): "only masked" repairs a corner of a 256x256 image with
# the 128x128 package
CASES = {"whole picture": (128, (32, 40, 96, 104), False, 0), "only masked": (256, (170, 150, 220, 210), True, 16)}


@pytest.fixture
def api(server):
    return webuiapi.WebUIApi(baseurl=server.api)


def photo(side: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8))


def ellipse_mask(side: int, box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", (side, side))
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return mask


def feathered(mask: Image.Image, sigma: int = BLUR) -> np.ndarray:
    """A1111's mask feathering (processing.py): a Gaussian across, then down, each kernel 2*int(2.5*sigma+0.5)+1."""
    length = 2 * int(2.5 * sigma + 0.5) + 1
    return cv2.GaussianBlur(cv2.GaussianBlur(np.asarray(mask), (length, 1), sigma), (1, length), sigma)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


@pytest.mark.parametrize("case", CASES)
def test_inpainting_equals_coreml_generate_and_keeps_the_rest(api, generate_cli, tmp_path, case):
    side, box, full_res, padding = CASES[case]
    start, mask = photo(side), ellipse_mask(side, box)
    start.save(tmp_path / "start.png")
    mask.save(tmp_path / "mask.png")
    result = api.img2img(images=[start], mask_image=mask, inpaint_full_res=full_res, inpaint_full_res_padding=padding,
                         width=None, height=None, **SETTINGS)
    area = ["--inpaint-area", "masked", "--inpaint-padding", str(padding)] if full_res else []
    files = generate_cli(*CLI_SETTINGS, "--image", str(tmp_path / "start.png"), "--mask", str(tmp_path / "mask.png"),
                         *area)
    assert base64.b64decode(result.json["images"][0]) == files[4]  # pixels and parameters, byte for byte
    made = result.images[0]
    assert made.size == (side, side)
    blurred = feathered(mask)
    kept, redrawn = blurred == 0, blurred == 255
    assert kept.mean() > 0.5 and (pixels(made)[kept] == pixels(start)[kept]).all()
    # measured 81 (whole picture) and 80 (only masked) levels of 255 on the tiny model's random weights
    assert np.abs(pixels(made)[redrawn] - pixels(start)[redrawn]).mean() > 20
    infotext = result.info["infotexts"][0]
    assert f"Mask blur: {BLUR}" in infotext
    assert ("Inpaint area: Only masked, Masked area padding: 16" in infotext) == full_res


def test_inverting_the_mask_redraws_the_other_side(api):
    side, box, _, _ = CASES["whole picture"]
    start, mask = photo(side), ellipse_mask(side, box)
    result = api.img2img(images=[start], mask_image=mask, inpainting_mask_invert=1, inpaint_full_res=False,
                         width=side, height=side, **SETTINGS)
    made, around = pixels(result.images[0]), feathered(Image.eval(mask, lambda level: 255 - level))
    inside, outside = around == 0, around == 255  # the ellipse's core, and the picture away from it
    assert inside.sum() > 1000 and (made[inside] == pixels(start)[inside]).all()
    assert np.abs(made[outside] - pixels(start)[outside]).mean() > 20  # measured 71 levels


def test_a_mask_painted_on_a_clear_layer(api):
    """A1111 reads a mask with transparency by its alpha (a brush stroke): opaque is redrawn, whatever its colour."""
    side, box, _, _ = CASES["whole picture"]
    start, mask = photo(side), ellipse_mask(side, box)
    stroke = Image.new("RGBA", (side, side))  # black strokes: their grey levels would redraw nothing
    stroke.putalpha(mask)
    settings = {**SETTINGS, "images": [start], "inpaint_full_res": False, "width": side, "height": side}
    painted, grey = api.img2img(mask_image=stroke, **settings), api.img2img(mask_image=mask, **settings)
    assert painted.json["images"][0] == grey.json["images"][0]


def test_a_black_mask_returns_the_init_image(api):
    start = photo(128)
    result = api.img2img(images=[start], mask_image=Image.new("L", (128, 128)), width=128, height=128, **SETTINGS)
    assert (pixels(result.images[0]) == pixels(start)).all()
    assert "nothing to inpaint" in result.info["comments"]
