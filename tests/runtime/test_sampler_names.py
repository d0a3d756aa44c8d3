"""Samplers by AUTOMATIC1111's names, as diffusers' documentation maps them; PNG parameters in the web UI's format,
read back with --from-png."""
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image, PngImagePlugin

from coreml_sd.converter.models.tiny import SCHEDULER_CONFIG
from coreml_sd.runtime.cli import main
from coreml_sd.runtime.errors import GenerationError
from coreml_sd.runtime.executor import psnr
from coreml_sd.runtime.infotext import parse_infotext
from coreml_sd.runtime.sampling import draw_noise
from coreml_sd.runtime.schedulers import build_scheduler

from runtime_testing import PSNR_THRESHOLD_DB, latent_shape, pixels

CONFIG = {"_class_name": "PNDMScheduler", **SCHEDULER_CONFIG}
KARRAS = {"use_karras_sigmas": True}
SDE = {"algorithm_type": "sde-dpmsolver++"}
# diffusers' documentation, "Schedulers" overview, the A1111/k-diffusion table (and PLMS: PNDM without its
# Runge-Kutta steps, diffusers' PNDMScheduler(skip_prk_steps=True)).
DIFFUSERS_TABLE = {
    "DPM++ 2M": (DPMSolverMultistepScheduler, {}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, KARRAS),
    "DPM++ 2M SDE": (DPMSolverMultistepScheduler, SDE),
    "DPM++ 2M SDE Karras": (DPMSolverMultistepScheduler, {**SDE, **KARRAS}),
    "DPM++ SDE": (DPMSolverSinglestepScheduler, {}),
    "DPM++ SDE Karras": (DPMSolverSinglestepScheduler, KARRAS),
    "DPM2": (KDPM2DiscreteScheduler, {}),
    "DPM2 Karras": (KDPM2DiscreteScheduler, KARRAS),
    "DPM2 a": (KDPM2AncestralDiscreteScheduler, {}),
    "DPM2 a Karras": (KDPM2AncestralDiscreteScheduler, KARRAS),
    "Euler": (EulerDiscreteScheduler, {}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "Heun": (HeunDiscreteScheduler, {}),
    "LMS": (LMSDiscreteScheduler, {}),
    "LMS Karras": (LMSDiscreteScheduler, KARRAS),
    "DDIM": (DDIMScheduler, {}),
    "PLMS": (PNDMScheduler, {"skip_prk_steps": True}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "LCM": (LCMScheduler, {}),
}


@pytest.mark.parametrize("name", DIFFUSERS_TABLE)
def test_a1111_names_build_diffusers_schedulers_as_documented(name):
    cls, options = DIFFUSERS_TABLE[name]
    scheduler = build_scheduler(name, CONFIG, "epsilon")
    assert isinstance(scheduler, cls)
    assert {key: scheduler.config[key] for key in options} == options
    expected = cls.from_config(CONFIG, **options)
    scheduler.set_timesteps(10)
    expected.set_timesteps(10)
    torch.testing.assert_close(scheduler.timesteps, expected.timesteps)


def test_names_are_read_in_any_case_and_karras_and_spacing_apply():
    assert isinstance(build_scheduler("euler a", CONFIG, "epsilon"), EulerAncestralDiscreteScheduler)
    assert isinstance(build_scheduler("dpm++_2m_karras", CONFIG, "epsilon"), DPMSolverMultistepScheduler)
    scheduler = build_scheduler("euler", CONFIG, "epsilon", timestep_spacing="trailing", karras=True)
    assert scheduler.config.use_karras_sigmas and scheduler.config.timestep_spacing == "trailing"
    with pytest.raises(GenerationError, match="has no Karras sigmas; drop --karras"):
        build_scheduler("DDIM", CONFIG, "epsilon", karras=True)
    with pytest.raises(GenerationError, match="spaces its timesteps its own way"):
        build_scheduler("DPM++ SDE", CONFIG, "epsilon", timestep_spacing="trailing")


def test_trailing_spacing_gives_diffusers_timesteps():
    ours = build_scheduler("ddim", CONFIG, "epsilon", timestep_spacing="trailing")
    reference = DDIMScheduler.from_config(CONFIG, timestep_spacing="trailing")
    ours.set_timesteps(4)
    reference.set_timesteps(4)
    assert ours.timesteps.tolist() == reference.timesteps.tolist() == [999, 749, 499, 249]


def test_dpm_2m_karras_matches_diffusers(tiny_runtime, tiny_pipeline):
    steps, seed, prompt = 5, 8, "a photo of an astronaut riding a horse"
    ours = tiny_runtime(prompt, steps=steps, scheduler="DPM++ 2M Karras", seed=seed, progress=False)
    scheduler = DPMSolverMultistepScheduler.from_config(tiny_runtime.package.scheduler_config, use_karras_sigmas=True)
    pipe = StableDiffusionPipeline(**{**tiny_pipeline.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        prompt, num_inference_steps=steps, guidance_scale=7.5, output_type="np",
        latents=torch.from_numpy(draw_noise(np.random.RandomState(seed), latent_shape(tiny_pipeline))),
    ).images[0]
    assert psnr(reference, pixels(ours.images[0])) >= PSNR_THRESHOLD_DB  # measured 58.3 dB
    assert "Sampler: DPM++ 2M Karras, CFG scale: 7.5" in ours.parameters[0]
    karras_euler = tiny_runtime(prompt, steps=1, scheduler="euler", karras=True, seed=seed, progress=False)
    assert "Sampler: Euler, Schedule type: Karras, CFG scale" in karras_euler.parameters[0]


# What the web UI (1.9) writes into a PNG, spelled out.
A1111_PARAMETERS = (
    "masterpiece, (red hair:1.3), [blurry]\nwide shot\n"
    "Negative prompt: lowres, bad anatomy\nworst quality\n"
    'Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 128x128, '
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Lora hashes: "detail: 3e5a, style: 9f1c", '
    'Version: v1.9.4'
)


def test_infotext_is_read_as_the_web_ui_reads_it():
    info = parse_infotext(A1111_PARAMETERS)
    assert info.prompt == "masterpiece, (red hair:1.3), [blurry]\nwide shot"
    assert info.negative_prompt == "lowres, bad anatomy\nworst quality"
    assert info.settings["Sampler"] == "DPM++ 2M" and info.settings["Size"] == "128x128"
    assert info.settings["Lora hashes"] == "detail: 3e5a, style: 9f1c"
    assert parse_infotext("just a prompt, Steps: 3").prompt == "just a prompt, Steps: 3"


def write_png(path, parameters: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)


def test_from_png_reproduces_an_a1111_pictures_settings(tiny_package, tmp_path, capsys):
    source, output = tmp_path / "a1111.png", tmp_path / "again.png"
    write_png(source, A1111_PARAMETERS)
    code = main(["--from-png", str(source), "--model", str(tiny_package), "--backend", "reference", "-o", str(output)])
    err = capsys.readouterr().err
    assert code == 0, err
    written = parse_infotext(Image.open(output).info["parameters"])
    assert (written.prompt, written.negative_prompt) == (parse_infotext(A1111_PARAMETERS).prompt,
                                                        parse_infotext(A1111_PARAMETERS).negative_prompt)
    settings = written.settings
    assert (settings["Steps"], settings["Sampler"], settings["CFG scale"], settings["Seed"], settings["Size"],
            settings["Clip skip"]) == ("3", "DPM++ 2M Karras", "6.5", "1234", "128x128", "2")
    # options given on the command line win, and a picture of ours reads back the same way
    code = main(["--from-png", str(output), "--model", str(tiny_package), "--backend", "reference", "--steps", "1",
                 "--seed", "7", "-o", str(tmp_path / "third.png")])
    assert code == 0
    third = parse_infotext(Image.open(tmp_path / "third.png").info["parameters"]).settings
    assert (third["Steps"], third["Seed"], third["Sampler"], third["CFG scale"], third["Clip skip"]) == (
        "1", "7", "DPM++ 2M Karras", "6.5", "2")


@pytest.mark.parametrize(("argv", "message"), [
    (["x", "--scheduler", "DPM fast"], "Error: unknown scheduler 'DPM fast'; choose from pndm, ddim,"),
    (["x", "--scheduler", "ddim", "--karras"], "Error: the ddim scheduler has no Karras sigmas; drop --karras"),
    ([], "Error: give a PROMPT, or --from-png FILE"),
])
def test_bad_sampler_options_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1


def test_from_png_with_no_parameters_or_an_unknown_sampler(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert main(["--from-png", str(tmp_path / "plain.png")]) == 1
    assert "carries no generation parameters" in capsys.readouterr().err
    write_png(tmp_path / "odd.png", "a cat\nSteps: 3, Sampler: DPM adaptive, CFG scale: 7, Seed: 1")
    assert main(["--from-png", str(tmp_path / "odd.png")]) == 1
    err = capsys.readouterr().err
    assert "the sampler 'DPM adaptive' has no scheduler here; pass --scheduler NAME" in err
    assert len(err.strip().splitlines()) == 1
