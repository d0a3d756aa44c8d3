"""Few-step models converted and run through the reference executor, against diffusers: an LCM-LoRA by hub id
(from a Hugging Face cache filled here, offline) in a Unet with a batch-1 function for sampling without
guidance, the sd-turbo alias on a tiny model carrying a Turbo scheduler config, and an LCM Unet with a guidance
embedding, each sampling with what its package records."""
import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    EulerAncestralDiscreteScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    UNet2DConditionModel,
)
from safetensors.torch import save_file

from coreml_sd.converter.conversion import ConversionOptions, convert_model
from coreml_sd.converter.errors import ConversionError
from coreml_sd.converter.models.tiny import UNET_CONFIG
from coreml_sd.converter.sources.recommended import from_arguments
from coreml_sd.runtime import Pipeline
from coreml_sd.runtime.executor import ReferenceModel, psnr

PSNR_THRESHOLD_DB = 55.0  # float16 packages against float32 diffusers: measured 58.8-62.0 dB
PROMPT = "a photo of an astronaut riding a horse"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
RANK = 4


def fill_cache(root: Path, repo_id: str, folder: Path) -> None:
    """Make `folder` repository `repo_id`'s snapshot in the Hugging Face cache at `root`."""
    repository = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repository / "snapshots" / COMMIT)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text(COMMIT)


def offline_cache(monkeypatch, root: Path) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(root))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "runtime"))  # runtime_testing


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache: `hub_cache(repo_id, folder)` makes `folder` that repository's snapshot."""
    offline_cache(monkeypatch, tmp_path / "hub")
    return lambda repo_id, folder: fill_cache(tmp_path / "hub", repo_id, folder)


def lcm_lora(unet: torch.nn.Module, path: Path) -> Path:
    """Shaped as latent-consistency/lcm-lora-sdv1-5: kohya keys with alphas over the Unet's attention, feed-forward
    and resnet convolutions, random (small) weights."""
    generator = torch.Generator().manual_seed(11)
    state = {}
    for name, layer in unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2")):
            weight = layer.weight
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(RANK, *weight.shape[1:], generator=generator) * 0.1
            state[f"{key}.lora_up.weight"] = torch.randn(weight.shape[0], RANK, *weight.shape[2:3] and (1, 1),
                                                         generator=generator) * 0.1
            state[f"{key}.alpha"] = torch.tensor(float(RANK))
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def lcm_package(tmp_path_factory, tiny_pipeline, tiny_variant):
    """The tiny package with an LCM-LoRA by hub id, its Unet (the one component the LoRA changes) with the batch-1
    function `unguided`; and the reference: diffusers' pipeline with the same LoRA fused, on the LCM scheduler."""
    tmp_path = tmp_path_factory.mktemp("lcm")
    (tmp_path / "lora").mkdir()
    lcm_lora(tiny_pipeline.unet, tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    fill_cache(tmp_path / "hub", "latent-consistency/lcm-lora-sdv1-5", tmp_path / "lora")
    with pytest.MonkeyPatch.context() as monkeypatch:
        offline_cache(monkeypatch, tmp_path / "hub")
        tiny_variant(ConversionOptions(model="tiny", output=tmp_path / "package",
                                       loras=("latent-consistency/lcm-lora-sdv1-5",), unguided_function=True), ["Unet"])
    reference = copy.deepcopy(tiny_pipeline)
    reference.load_lora_weights(str(tmp_path / "lora"))
    reference.fuse_lora()
    reference.unload_lora_weights()
    reference.scheduler = LCMScheduler.from_config(reference.scheduler.config)
    return tmp_path / "package", reference


def lcm_reference(reference, seed: int, guidance_scale: float):
    from coreml_sd.runtime.sampling import draw_noise

    from runtime_testing import latent_shape

    latents = torch.from_numpy(draw_noise(np.random.RandomState(seed), latent_shape(reference)))
    return reference(PROMPT, num_inference_steps=4, guidance_scale=guidance_scale, latents=latents,
                     generator=torch.Generator().manual_seed(seed), output_type="np").images[0]


def test_lcm_lora_by_hub_id_records_lcm_and_a_multifunction_unet(lcm_package):
    package, _ = lcm_package
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["recommended"] == {"scheduler": "lcm", "steps": 4, "guidance_scale": 1.0}
    assert manifest["adapters"][0]["id"] == "latent-consistency/lcm-lora-sdv1-5"
    unet = manifest["components"]["Unet"]
    assert manifest["unet_batch_size"] == 2 and unet["inputs"]["sample"]["shape"][0] == 2
    assert unet["unguided_function"] == "unguided" and unet["minimum_os"] == "macOS 15 / iOS 18"
    main, unguided = (ReferenceModel(package / "Unet.mlpackage", function_name=name) for name in (None, "unguided"))
    assert main.function_name == "main" and main.input_description["sample"][0][0] == 2
    assert unguided.input_description["sample"][0] == tuple(unet["functions"]["unguided"]["inputs"]["sample"]["shape"])
    with pytest.raises(ValueError, match="Unet.mlpackage has no function 'refiner'; it has main, unguided"):
        ReferenceModel(package / "Unet.mlpackage", function_name="refiner")
    # the weights are stored once: the package is about the size of the batch-2 Unet alone
    weights = sum(f.stat().st_size for f in (package / "Unet.mlpackage").rglob("*.bin"))
    assert weights < 1.2 * sum(p.numel() * 2 for p in lcm_package[1].unet.parameters())


def test_lcm_lora_samples_unguided_through_the_batch_1_function_as_diffusers(lcm_package, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "runtime"))
    from runtime_testing import pixels

    package, reference = lcm_package
    runtime = Pipeline.from_package(package, backend="reference")
    ours = runtime(PROMPT, seed=4, progress=False)
    assert "Steps: 4, Sampler: LCM, CFG scale: 1.0" in ours.parameters[0]
    assert runtime.unguided_unet.loaded  # the batch-1 function ran
    assert psnr(lcm_reference(reference, 4, 1.0), pixels(ours.images[0])) >= PSNR_THRESHOLD_DB
    # the same through the batch-2 function (a package without the batch-1 one)
    runtime.sampler.unguided_unet, runtime.sampler.unguided_batch_size = runtime.sampler.unet, 2
    batch_2 = runtime(PROMPT, seed=4, progress=False).images[0]
    assert psnr(pixels(ours.images[0]), pixels(batch_2)) >= PSNR_THRESHOLD_DB
    # LCM-LoRA's guidance 1-2 is classifier-free guidance, at batch 2
    guided = runtime(PROMPT, guidance_scale=1.5, seed=4, progress=False).images[0]
    assert psnr(lcm_reference(reference, 4, 1.5), pixels(guided)) >= PSNR_THRESHOLD_DB


def test_the_core_ml_backend_loads_the_unguided_function_by_name(lcm_package, monkeypatch, tmp_path):
    """Through the Core ML adapter (coremltools' CompiledMLModel stood in for by the executor), as the executor."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "runtime"))
    from coreml_sd.runtime import backends

    from coreml_standin import Compiler, core_ml_standin

    monkeypatch.setattr(backends, "core_ml_functions", core_ml_standin(Compiler()))
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path / "cache"))
    package, _ = lcm_package
    settings = {"seed": 4, "steps": 2, "progress": False}
    image = Pipeline.from_package(package, backend="reference")(PROMPT, **settings).images[0]
    core_ml = Pipeline.from_package(package, backend="coreml")
    assert np.array_equal(np.asarray(core_ml(PROMPT, **settings).images[0]), np.asarray(image))
    assert core_ml.unguided_unet._model._model.function_name == "unguided"
    assert core_ml.unguided_unet.input_description["sample"][0][0] == 1


def test_sd_turbo_alias_converts_at_batch_1_and_samples_one_step_without_guidance(tmp_path, tiny_pipeline,
                                                                                    hub_cache):
    from runtime_testing import diffusers_txt2img, pixels

    turbo = copy.deepcopy(tiny_pipeline)
    turbo.scheduler = EulerAncestralDiscreteScheduler.from_config(turbo.scheduler.config, timestep_spacing="trailing")
    turbo.save_pretrained(tmp_path / "turbo")
    hub_cache("stabilityai/sd-turbo", tmp_path / "turbo")
    output = tmp_path / "package"
    convert_model(ConversionOptions(model="sd-turbo", output=output, validate=False,
                                    components=("TextEncoder", "Unet", "VAEDecoder")))
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["recommended"] == {"steps": 1, "guidance_scale": 0.0}
    assert manifest["unet_batch_size"] == 1
    assert manifest["components"]["Unet"]["inputs"]["sample"]["shape"][0] == 1

    runtime = Pipeline.from_package(output, backend="reference")
    ours = runtime(PROMPT, seed=6, progress=False)
    assert "Steps: 1, Sampler: Euler a, CFG scale: 0.0" in ours.parameters[0]
    expected = diffusers_txt2img(turbo, runtime.package.scheduler_config, PROMPT, "", "euler-a", 1, seed=6,
                                 guidance_scale=0.0)
    assert psnr(expected, pixels(ours.images[0])) >= PSNR_THRESHOLD_DB


def test_recommend_arguments_and_their_mistakes():
    recorded = from_arguments(("scheduler=tcd", "steps=2", "guidance-scale=0"))
    assert recorded.to_manifest() == {"scheduler": "tcd", "steps": 2, "guidance_scale": 0.0}
    for argument, reason in (("steps=many", "not a number"), ("steps=0", "it must be at least 1"),
                             ("sampler=lcm", "NAME is scheduler, steps or guidance-scale"),
                             ("scheduler=heun", "choose from pndm")):
        with pytest.raises(ConversionError, match=f"^--recommend {argument}: {reason}"):
            from_arguments((argument,))


def test_a_lora_id_missing_from_an_offline_cache_is_one_line(tmp_path, hub_cache):
    line = (r"^cannot reach the Hugging Face hub to download --lora latent-consistency/lcm-lora-sdxl "
            r"\(pytorch_lora_weights\.safetensors\), and it is not in the local cache")
    with pytest.raises(ConversionError, match=line):
        convert_model(ConversionOptions(model="tiny", output=tmp_path / "out",
                                        loras=("latent-consistency/lcm-lora-sdxl",)))
    assert not (tmp_path / "out").exists()


def test_an_lcm_unet_with_a_guidance_embedding_samples_as_diffusers_lcm_pipeline(tmp_path, tiny_pipeline, hub_cache):
    """An LCM checkpoint (LCMScheduler, time_cond_proj_dim): converted only when asked, at batch 1, with
    `timestep_cond`; guidance 8 goes into the embedding, as diffusers' LatentConsistencyModelPipeline."""
    from coreml_sd.runtime.sampling import draw_noise

    from runtime_testing import latent_shape, pixels

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        unet = UNet2DConditionModel(**UNET_CONFIG, time_cond_proj_dim=16).eval()
    lcm = LatentConsistencyModelPipeline(
        vae=tiny_pipeline.vae, text_encoder=tiny_pipeline.text_encoder, tokenizer=tiny_pipeline.tokenizer, unet=unet,
        scheduler=LCMScheduler.from_config(tiny_pipeline.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    lcm.set_progress_bar_config(disable=True)
    lcm.save_pretrained(tmp_path / "lcm")
    with pytest.raises(ConversionError, match="takes LCM's guidance embedding .*: pass --guidance-embedding"):
        convert_model(ConversionOptions(model=str(tmp_path / "lcm"), output=tmp_path / "refused"))
    output = tmp_path / "package"
    convert_model(ConversionOptions(model=str(tmp_path / "lcm"), output=output, guidance_embedding=True,
                                    components=("TextEncoder", "Unet", "VAEDecoder"), validate=False))
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["recommended"] == {"scheduler": "lcm", "steps": 4, "guidance_scale": 8.5}
    assert manifest["components"]["Unet"]["inputs"]["timestep_cond"]["shape"] == [1, 16]

    ours = Pipeline.from_package(output, backend="reference")(PROMPT, guidance_scale=8.0, seed=2, progress=False)
    latents = torch.from_numpy(draw_noise(np.random.RandomState(2), latent_shape(lcm)))
    expected = lcm(PROMPT, num_inference_steps=4, guidance_scale=8.0, latents=latents,
                   generator=torch.Generator().manual_seed(2), output_type="np").images[0]
    assert psnr(expected, pixels(ours.images[0])) >= PSNR_THRESHOLD_DB
