"""Bad requests to a real server: each is one clean 4xx in A1111's error shape with one sentence, nothing runs,
and the server goes on serving."""
import base64
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_of(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return b64(buffer.getvalue())


def png_bomb() -> str:
    """A 16 kB PNG that declares 10000x10000 pixels (100 megapixels) of black."""
    buffer = io.BytesIO()
    Image.new("1", (10000, 10000)).save(buffer, format="PNG", optimize=True)
    return b64(buffer.getvalue())


START = png_of(Image.fromarray(np.zeros((128, 128, 3), np.uint8)))
SMALL = png_of(Image.new("L", (64, 64), 255))
TXT2IMG, IMG2IMG = "/sdapi/v1/txt2img", "/sdapi/v1/img2img"
FAST = {"steps": 1, "width": 128, "height": 128}

# (name, method, path, JSON body or raw bytes (or what makes them), status, what the sentence must say)
CASES = [
    ("malformed JSON", "POST", TXT2IMG, b'{"prompt": "a cat",', 422, "not valid JSON"),
    ("a list for a body", "POST", TXT2IMG, b"[1, 2]", 422, "JSON object"),
    ("a word for steps", "POST", TXT2IMG, {"steps": "many"}, 422, "steps: input should be a valid integer"),
    ("a list for the prompt", "POST", TXT2IMG, {"prompt": ["a", "cat"]}, 422, "prompt: input should be a valid string"),
    ("negative steps", "POST", TXT2IMG, {"steps": -1}, 422, "steps must be between 1 and 1000, not -1"),
    ("a million steps", "POST", TXT2IMG, {"steps": 10**6}, 422, "steps must be between 1 and 1000, not 1000000"),
    ("10000x10000", "POST", TXT2IMG, {"width": 10000, "height": 10000}, 422,
     "width must be a multiple of 8 between 8 and 2048, not 10000"),
    ("a side not a multiple of 8", "POST", TXT2IMG, {"width": 130}, 422, "multiple of 8"),
    ("smaller than the package", "POST", TXT2IMG, {**FAST, "width": 64}, 422, "smaller than package"),
    ("100 images", "POST", TXT2IMG, {**FAST, "batch_size": 10, "n_iter": 10}, 422, "batch_size x n_iter"),
    ("a negative seed", "POST", TXT2IMG, {**FAST, "seed": -5}, 422, "seed must be -1 (random)"),
    ("an unknown sampler", "POST", TXT2IMG, {**FAST, "sampler_name": "DPM fast"}, 422,
     "sampler 'DPM fast' is not available"),
    ("an unknown schedule", "POST", TXT2IMG, {**FAST, "scheduler": "karras"}, 422, "scheduler 'karras'"),
    ("variation seeds", "POST", TXT2IMG, {**FAST, "subseed_strength": 0.5}, 422, "variation seeds"),
    ("a latent hires upscaler", "POST", TXT2IMG, {**FAST, "enable_hr": True, "hr_upscaler": "Latent"}, 422,
     "hr_upscaler 'Latent'"),
    ("an unknown model", "POST", TXT2IMG, {**FAST, "override_settings": {"sd_model_checkpoint": "sdxl"}}, 422,
     "model 'sdxl' not found"),
    ("clip skip 0", "POST", TXT2IMG, {**FAST, "override_settings": {"CLIP_stop_at_last_layers": 0}}, 422,
     "override_settings.CLIP_stop_at_last_layers must be a whole number of at least 1"),
    ("clip skip past the encoder", "POST", TXT2IMG, {**FAST, "override_settings": {"CLIP_stop_at_last_layers": 5}},
     422, "--clip-skip 5 is past the text encoder's depth"),
    ("a model name with ../", "POST", "/sdapi/v1/options", {"sd_model_checkpoint": "../tiny"}, 422,
     "model '../tiny' not found"),
    ("a model as an absolute path", "POST", "/sdapi/v1/options", {"sd_model_checkpoint": "/etc"}, 422,
     "model '/etc' not found"),
    ("no init image", "POST", IMG2IMG, {**FAST}, 422, "img2img needs init_images"),
    ("a non-base64 image", "POST", IMG2IMG, {**FAST, "init_images": ["not base64 at all!"]}, 422, "is not base64"),
    ("base64 of text", "POST", IMG2IMG, {**FAST, "init_images": [b64(b"hello, world")]}, 422, "not an image"),
    ("an image URL", "POST", IMG2IMG, {**FAST, "init_images": ["http://127.0.0.1:1/x.png"]}, 422, "fetches nothing"),
    ("a PNG bomb", "POST", IMG2IMG, lambda: {**FAST, "init_images": [png_bomb()]}, 422, "pixels"),
    ("a non-base64 mask", "POST", IMG2IMG, {**FAST, "init_images": [START], "mask": "not base64!"}, 422,
     "mask is not base64"),
    ("a mask of another size", "POST", IMG2IMG, {**FAST, "init_images": [START], "mask": SMALL}, 422,
     "mask is 64x64 but init_images[0] 128x128"),
    ("a negative mask blur", "POST", IMG2IMG, {**FAST, "init_images": [START], "mask": START, "mask_blur": -2}, 422,
     "mask_blur must be at least 0 pixels, not -2"),
    ("an unknown inpainting fill", "POST", IMG2IMG, {**FAST, "init_images": [START], "mask": START,
                                                     "inpainting_fill": 7}, 422, "inpainting_fill must be one of"),
    ("png-info of a non-PNG", "POST", "/sdapi/v1/png-info", {"image": b64(b"GIF89a....")}, 422, "not a PNG"),
    ("an oversized body", "POST", IMG2IMG, lambda: {"init_images": ["A" * (50 * 2**20)]}, 413, "over 24 MiB"),
    ("an unknown endpoint", "GET", "/sdapi/v1/train/embedding", None, 404, "no endpoint /sdapi/v1/train/embedding"),
    ("GET on a POST route", "GET", TXT2IMG, None, 405, "GET is not allowed on /sdapi/v1/txt2img; use POST"),
    ("POST on a GET route", "POST", "/sdapi/v1/progress", {}, 405, "use GET"),
]


@pytest.mark.parametrize("name, method, path, body, status, sentence", CASES, ids=[case[0] for case in CASES])
def test_bad_request_is_one_clean_4xx(server, name, method, path, body, status, sentence):
    body = body() if callable(body) else body
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    response = httpx.request(method, server.url + path, content=content, timeout=60,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text[:300]
    answer = response.json()
    assert set(answer) == {"error", "detail", "body", "errors"}  # A1111's shape
    assert sentence in answer["detail"] and "\n" not in answer["detail"], answer["detail"]


def test_the_server_goes_on_after_bad_requests(server):
    assert len(CASES) >= 15
    response = httpx.post(server.api + "/txt2img", json={**FAST, "seed": 3}, timeout=60)
    assert response.status_code == 200 and len(response.json()["images"]) == 1
    assert "Traceback" not in server.log_text()


def test_a_chunked_body_is_capped_while_it_arrives(server):
    """A body that declares no length is counted as it comes."""
    def chunks():
        for _ in range(30):
            yield b"A" * 2**20

    response = httpx.post(server.api + "/img2img", content=chunks(), timeout=60,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "over 24 MiB" in response.json()["detail"]
