"""Stable Diffusion's invisible watermark in generated images, read back with invisible-watermark's own decoder.

The images are the runtime's, at pipeline sizes (the tiny model behind the contract, in PyTorch, so that a
512x512 image costs seconds). Figures that are properties of the method (PSNR, JPEG survival) are printed by
scripts/bench_watermark.py.
"""
import logging

import numpy as np
import pytest
from imwatermark import WatermarkDecoder
from PIL import Image

from coreml_sd.runtime import watermark
from coreml_sd.runtime.cli import watermark_main
from coreml_sd.runtime.pipeline import Pipeline

PROMPT = "a photo of an astronaut riding a horse"
MESSAGE = b"StableDiffusionV1"
CHANCE_SIGMAS = 4  # unmarked images match half the bits, give or take this many standard deviations


def generate(package, contract_models, size: int, marked: bool):
    pipe = Pipeline(package, contract_models(size=size), backend="pytorch", compute_unit="ALL")
    return pipe(PROMPT, steps=5, seed=1, watermark=marked, progress=False)


@pytest.fixture(scope="module")
def images_512(package, contract_models):
    """(watermarked, unwatermarked) results for one seed at 512x512."""
    return generate(package, contract_models, 512, True), generate(package, contract_models, 512, False)


def bgr(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


def test_512_image_decodes_to_the_exact_bytes(images_512):
    marked, _ = images_512
    assert WatermarkDecoder("bytes", 8 * len(MESSAGE)).decode(bgr(marked.images[0]), "dwtDct") == MESSAGE
    assert "Watermark" not in marked.parameters[0]


def test_unwatermarked_image_matches_by_chance_only(images_512, tmp_path, capsys):
    _, plain = images_512
    length = len(watermark.STABLE_DIFFUSION_V1.bits)
    matched = watermark.matched_bits(plain.images[0], watermark.STABLE_DIFFUSION_V1)
    assert abs(matched - length / 2) <= CHANCE_SIGMAS * np.sqrt(length) / 2
    assert "Watermark: off" in plain.parameters[0]
    marked, _ = images_512
    for name, result in (("marked", marked), ("plain", plain)):
        result.images[0].save(tmp_path / f"{name}.png")
    assert watermark_main([str(tmp_path / "marked.png"), str(tmp_path / "plain.png")]) == 0
    marked_line, plain_line = capsys.readouterr().out.splitlines()
    assert (
        marked_line == f"{tmp_path / 'marked.png'}: watermark (136/136 bits of StableDiffusionV1 matched; 68 by chance)"
    )
    assert plain_line.startswith(f"{tmp_path / 'plain.png'}: no watermark (")


def test_256_image_carries_it(package, contract_models, capsys):
    image = generate(package, contract_models, 256, True).images[0]
    matched = watermark.matched_bits(image, watermark.STABLE_DIFFUSION_V1)
    with capsys.disabled():
        print(f"\n256x256: {matched}/136 bits matched")
    assert matched >= watermark.PRESENT_FRACTION * 136


def test_sdxl_message_round_trips(images_512):
    _, plain = images_512
    marked = watermark.apply(plain.images[0], watermark.STABLE_DIFFUSION_XL)
    bits = WatermarkDecoder("bits", 48).decode(bgr(marked), "dwtDct")
    assert int("".join(str(int(bit)) for bit in bits), 2) == 0b101100111110110010010000011110111011000110011110


def test_small_images_are_saved_without_it_and_said_once(tiny_runtime, caplog, tmp_path, capsys):
    with caplog.at_level(logging.WARNING, logger="coreml_sd.runtime"):
        result = tiny_runtime(PROMPT, steps=1, scheduler="ddim", seed=3, num_images=2, progress=False)
    assert [r.getMessage() for r in caplog.records if "watermark" in r.getMessage()] == [
        "128x128 images are too small for the invisible watermark (256x256 at least): saved without it"
    ]
    assert "Watermark" not in result.parameters[0]
    result.images[0].save(tmp_path / "small.png")
    assert watermark_main([str(tmp_path / "small.png"), str(tmp_path / "missing.png")]) == 1
    captured = capsys.readouterr()
    assert "128x128 is too small to carry the watermark" in captured.out
    assert captured.err.startswith("Error: no image at")
