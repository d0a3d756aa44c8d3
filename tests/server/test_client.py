"""A1111's own client library, `webuiapi`, against a real `coreml-sd serve` on 127.0.0.1: what a Krita or
SillyTavern plugin does, and images equal to `coreml-generate`'s, byte for byte."""
import base64
import io
import json
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

from server_testing import red_share

webuiapi = pytest.importorskip("webuiapi")

PROMPT = "a watercolour lighthouse at dusk"
POLL_S = 0.05


@pytest.fixture
def api(server):
    client = webuiapi.WebUIApi(baseurl=server.api)
    yield client
    client.set_options({"sd_model_checkpoint": "tiny"})  # the next test finds the server as it started


def png(result, index: int = 0) -> bytes:
    return base64.b64decode(result.json["images"][index])


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_txt2img_equals_coreml_generate(api, generate_cli):
    result = api.txt2img(prompt=PROMPT, negative_prompt="fog", seed=7, steps=3, cfg_scale=6.0, sampler_name="DDIM",
                         width=128, height=128, n_iter=2)
    files = generate_cli(PROMPT, "--model", "tiny", "--negative-prompt", "fog", "--seed", "7", "--num-images", "2",
                         "--steps", "3", "--guidance-scale", "6", "--scheduler", "ddim")
    assert sorted(files) == result.info["all_seeds"] == [7, 8]
    for index, seed in enumerate((7, 8)):
        assert png(result, index) == files[seed]  # the same pixels and the same parameters text, byte for byte
        assert np.array_equal(pixels(result.images[index]), pixels(Image.open(io.BytesIO(files[seed]))))
        assert result.images[index].info["parameters"] == result.info["infotexts"][index]
    assert result.info["infotexts"][0] == f"{PROMPT}\nNegative prompt: fog\nSteps: 3, Sampler: DDIM, CFG scale: 6.0, " \
                                          "Seed: 7, Size: 128x128, Model: tiny"
    assert result.info["sampler_name"] == "DDIM" and result.info["sd_model_name"] == "tiny"
    assert result.parameters["prompt"] == PROMPT and result.parameters["n_iter"] == 2


def test_img2img_equals_coreml_generate(api, generate_cli, tmp_path):
    start = Image.fromarray(np.random.default_rng(3).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    start.save(tmp_path / "start.png")
    result = api.img2img(images=[start], prompt=PROMPT, denoising_strength=0.6, seed=2, steps=4, cfg_scale=7.5,
                         sampler_name="Euler", width=128, height=128)
    files = generate_cli(PROMPT, "--model", "tiny", "--image", str(tmp_path / "start.png"), "--strength", "0.6",
                         "--seed", "2", "--steps", "4", "--scheduler", "euler")
    assert png(result) == files[2]
    assert "Denoising strength: 0.6" in result.info["infotexts"][0]
    assert result.parameters["init_images"] is None  # A1111 echoes the inputs only with include_init_images


def test_clip_skip_setting_equals_coreml_generate(api, generate_cli):
    result = api.txt2img(prompt=PROMPT, seed=3, steps=2, cfg_scale=6.0, sampler_name="DDIM", width=128, height=128,
                         override_settings={"CLIP_stop_at_last_layers": 2})
    files = generate_cli(PROMPT, "--model", "tiny", "--seed", "3", "--steps", "2", "--guidance-scale", "6",
                         "--scheduler", "ddim", "--clip-skip", "2")
    assert png(result) == files[3]
    assert result.info["clip_skip"] == 2 and result.info["infotexts"][0].endswith(", Clip skip: 2")


def test_switching_the_model(api, generate_cli):
    assert api.util_get_model_names() == ["demo", "tiny"]
    assert api.get_options()["sd_model_checkpoint"] == "tiny"
    api.util_set_model("demo")
    assert api.get_options()["sd_model_checkpoint"] == "demo"
    result = api.txt2img(prompt="a red circle on a white background", seed=1, steps=8, cfg_scale=5.0,
                         sampler_name="DPM++ 2M", width=None, height=None)
    files = generate_cli("a red circle on a white background", "--model", "demo", "--seed", "1", "--steps", "8",
                         "--guidance-scale", "5", "--scheduler", "dpm++")
    assert png(result) == files[1] and result.images[0].size == (64, 64)
    assert red_share(result.images[0]) > 0.05  # the demo model draws what it is asked for


def test_a_request_can_name_its_model(api):
    result = api.txt2img(prompt="a blue star", seed=4, steps=2, width=None, height=None,
                         override_settings={"sd_model_checkpoint": "demo"})
    assert result.images[0].size == (64, 64) and result.info["sd_model_name"] == "demo"
    assert api.get_options()["sd_model_checkpoint"] == "tiny"  # the server's model stays


class Background:
    """A request on a thread, with /progress polled meanwhile."""

    def __init__(self, call, **keywords):
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, args=(call, keywords))
        self.thread.start()

    def _run(self, call, keywords):
        try:
            self.result = call(**keywords)
        except Exception as error:  # noqa: BLE001 - the test asserts on it in join()
            self.error = error

    def join(self):
        self.thread.join(120)
        assert self.error is None, self.error
        return self.result


def wait_for(api, condition, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        progress = api.get_progress()
        if condition(progress):
            return progress
        time.sleep(POLL_S)
    raise AssertionError(f"no such progress within {timeout_s} s: {progress}")


def test_progress_during_a_generation(api):
    running = Background(api.txt2img, prompt=PROMPT, seed=5, steps=30, sampler_name="DDIM", width=128, height=128)
    seen = []
    first = wait_for(api, lambda p: p["state"]["sampling_step"] >= 1 and p["state"]["job_count"] == 1)
    while running.thread.is_alive():
        seen.append(api.get_progress())
        time.sleep(POLL_S)
    result = running.join()
    assert len(result.images) == 1
    steps = [p["state"]["sampling_step"] for p in [first, *seen] if p["state"]["job_count"]]
    assert steps == sorted(steps) and first["state"]["sampling_steps"] == 30
    fractions = [p["progress"] for p in [first, *seen] if p["state"]["job_count"]]
    assert fractions == sorted(fractions) and 0 < fractions[0] <= 1
    preview = Image.open(io.BytesIO(base64.b64decode(first["current_image"])))
    assert preview.size == (16, 16)  # one pixel per latent pixel of a 128x128 image
    assert api.get_progress()["state"]["job_count"] == 0  # idle again


def latest_preview_error(api, **request) -> tuple[float, object]:
    """Run a request while polling; how far its latest preview is from the finished image, each preview pixel
    against the mean colour of its 8x8 block (0-255)."""
    running = Background(api.txt2img, **request)
    latest = (0, None)
    while running.thread.is_alive():
        progress = api.get_progress()
        if progress["state"]["job_count"] and progress["current_image"]:
            latest = max(latest, (progress["state"]["sampling_step"], progress["current_image"]), key=lambda p: p[0])
        time.sleep(0.02)
    result = running.join()
    preview = pixels(Image.open(io.BytesIO(base64.b64decode(latest[1])))).astype(float)
    blocks = pixels(result.images[0]).astype(float).reshape(8, 8, 8, 8, 3).mean(axis=(1, 3))
    return float(np.abs(preview - blocks).mean()), result


def test_the_preview_learns_each_models_colours(api, packages_root):
    """SD v1's latent colours mean nothing to the demo model's VAE; after one image the preview uses a fit to the
    demo model's own latents and pixels."""
    # the demo model under a name this server has drawn nothing with (other tests share the server)
    fresh = shutil.copytree(packages_root / "demo", packages_root / f"demo-{time.monotonic_ns()}")
    try:
        request = {"prompt": "a red circle on a white background", "seed": 1, "steps": 40, "cfg_scale": 5.0,
                   "sampler_name": "DPM++ 2M", "width": None, "height": None,
                   "override_settings": {"sd_model_checkpoint": fresh.name}}
        first, _ = latest_preview_error(api, **request)
        second, result = latest_preview_error(api, **request)
    finally:
        api.set_options({"sd_model_checkpoint": "tiny"})
        shutil.rmtree(fresh)
    assert result.images[0].size == (64, 64)
    assert second < 30 < first, (first, second)  # measured at step 40 of 40: 144 with SD v1's colours, 6.7 after


def test_interrupt_keeps_the_image_so_far_and_serves_the_next(api):
    running = Background(api.txt2img, prompt=PROMPT, seed=9, steps=400, n_iter=3, width=128, height=128)
    wait_for(api, lambda p: p["state"]["sampling_step"] >= 2)
    api.interrupt()
    interrupted = running.join()
    assert len(interrupted.images) == 1  # the image in progress, decoded as it was; the other two never started
    after = api.txt2img(prompt=PROMPT, seed=9, steps=2, width=128, height=128)
    assert len(after.images) == 1 and after.info["all_seeds"] == [9]


def test_skip_ends_the_current_image_only(api):
    running = Background(api.txt2img, prompt=PROMPT, seed=11, steps=300, n_iter=2, sampler_name="DDIM", width=128,
                         height=128)
    wait_for(api, lambda p: p["state"]["sampling_step"] >= 2 and p["state"]["job_no"] == 0)
    api.skip()
    wait_for(api, lambda p: p["state"]["job_no"] == 1 and p["state"]["sampling_step"] >= 1)
    api.interrupt()  # the second image need not run its 300 steps either
    result = running.join()
    assert len(result.images) == 2 and result.info["all_seeds"] == [11, 12]


def test_png_info_reads_the_settings_back(api):
    made = api.txt2img(prompt="a castle, at night", negative_prompt="blurry", seed=12, steps=2, cfg_scale=4.5,
                       sampler_name="Euler a", width=128, height=128)
    answer = api.png_info(made.images[0])
    assert answer.info == made.info["infotexts"][0]
    parameters = answer.json["parameters"]
    assert parameters["Prompt"] == "a castle, at night" and parameters["Negative prompt"] == "blurry"
    assert (parameters["Steps"], parameters["Sampler"], parameters["CFG scale"], parameters["Seed"]) == \
           ("2", "Euler a", "4.5", "12")
    assert (parameters["Size-1"], parameters["Size-2"], parameters["Model"]) == ("128", "128", "tiny")
    # what png-info reads back makes the same image again, A1111's "send to txt2img"
    again = api.txt2img(prompt=parameters["Prompt"], negative_prompt=parameters["Negative prompt"],
                        seed=int(parameters["Seed"]), steps=int(parameters["Steps"]),
                        cfg_scale=float(parameters["CFG scale"]), sampler_name=parameters["Sampler"],
                        width=int(parameters["Size-1"]), height=int(parameters["Size-2"]))
    assert png(again) == png(made)


def test_listings(api, server):
    names = [sampler["name"] for sampler in api.get_samplers()]
    assert {"Euler a", "Euler", "LMS", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "PLMS", "UniPC"} <= set(names)
    assert [schedule["name"] for schedule in api.get_schedulers()] == ["automatic"]
    models = api.get_sd_models()
    assert [model["title"] for model in models] == ["demo", "tiny"]
    assert api.get_loras() == []  # neither package was converted with a LoRA
    info = json.loads(json.dumps(api.get_options()))
    assert info["sd_model_checkpoint"] == "tiny"
