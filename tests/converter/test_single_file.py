"""Single-file checkpoints (original LDM layout) convert offline to what the diffusers folder converts to,
and `.ckpt` pickles never run code."""
import os
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from coreml_sd.converter.conversion import ConversionOptions, convert_model
from coreml_sd.converter.conversion.validate import validation_inputs
from coreml_sd.converter.errors import ConversionError
from coreml_sd.converter.families.sd import SD
from coreml_sd.converter.sources import resolve
from coreml_sd.converter.sources.pickles import InertObject, load_checkpoint
from coreml_sd.runtime.contract import ModelDimensions
from coreml_sd.runtime.executor import ReferenceModel, psnr

from ldm_layout import ldm_state

SAME_PACKAGE_DB = 60.0
MODULES = {"TextEncoder": "text_encoder", "Unet": "unet", "VAEDecoder": "vae"}


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory, tiny_pipeline):
    folder = tmp_path_factory.mktemp("saved") / "tiny-sd"
    tiny_pipeline.save_pretrained(folder)
    return folder


def save_ckpt(state: dict, path, extra: dict | None = None) -> None:
    """A .ckpt as Lightning writes them: the weights under state_dict, beside the trainer's own objects."""
    torch.save({"state_dict": state, "global_step": 470000, **(extra or {})}, path)


def assert_modules_equal(source, tiny_pipeline, components, dtype=torch.float32):
    for component in components:
        module_name = MODULES[component]
        loaded = getattr(source.load(component, dtype), module_name).state_dict()
        expected = getattr(tiny_pipeline, module_name).state_dict()
        assert loaded.keys() == expected.keys(), component
        for name, tensor in expected.items():
            assert torch.equal(loaded[name], tensor.to(loaded[name].dtype)), f"{component} {name}"


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_gives_the_folders_modules(tmp_path, tiny_pipeline, saved_folder, suffix):
    path = tmp_path / f"model{suffix}"
    state = ldm_state(tiny_pipeline)
    save_file(state, str(path)) if suffix == ".safetensors" else save_ckpt(state, path)
    source = resolve(str(path), config_folder=saved_folder)
    assert (source.family, source.prediction_type, source.description["model_type"]) == (SD, "epsilon", "sd1")
    assert_modules_equal(source, tiny_pipeline, MODULES)


def test_fp16_file_without_vae_and_text_encoder(tmp_path, tiny_pipeline, saved_folder):
    path = tmp_path / "unet-only.safetensors"
    save_file({k: v.half() for k, v in ldm_state(tiny_pipeline, vae=False, text_encoder=False).items()}, str(path))
    source = resolve(str(path), model_type="sd1", config_folder=saved_folder)
    assert source.absent_modules == {"vae", "text_encoder"}
    assert_modules_equal(source, tiny_pipeline, ["Unet"], torch.float16)
    with pytest.raises(ConversionError, match="holds no weights for VAEDecoder"):
        convert_model(ConversionOptions(model=str(path), model_type="sd1", config=saved_folder,
                                        components=("VAEDecoder",), output=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_single_file_package_matches_the_folders(tmp_path, tiny_pipeline, saved_folder, tiny_packages):
    path = tmp_path / "tiny-ldm.safetensors"
    save_file(ldm_state(tiny_pipeline), str(path))
    output = tmp_path / "from-single-file"
    convert_model(ConversionOptions(model=str(path), config=saved_folder, output=output, validate=False))
    folder_package = tiny_packages("split_einsum")
    dims = ModelDimensions(text_width=32, height=128, width=128, unet_batch_size=2)
    for component in SD.default_components:
        spec = SD.spec(component, dims)
        inputs = validation_inputs(spec, seed=3, latent_scaling_factor=0.18215)
        expected = ReferenceModel(folder_package / spec.file_name).predict(inputs)
        actual = ReferenceModel(output / spec.file_name).predict(inputs)
        for name in expected:
            assert psnr(expected[name], actual[name]) >= SAME_PACKAGE_DB, (component, name)


def test_model_type_is_inferred_and_refusals_are_one_line(tmp_path, tiny_pipeline):
    state = ldm_state(tiny_pipeline, vae=False, text_encoder=False)
    unknown_width = tmp_path / "unet.safetensors"
    save_file(state, str(unknown_width))
    with pytest.raises(ConversionError, match="pass --model-type"):
        resolve(str(unknown_width))
    image_conditioned = dict(state)  # InstructPix2Pix: latents and the image's latents (inpainting: 9 converts)
    first = "model.diffusion_model.input_blocks.0.0.weight"
    image_conditioned[first] = torch.zeros(state[first].shape[0], 8, *state[first].shape[2:])
    save_file(image_conditioned, str(tmp_path / "pix2pix.safetensors"))
    with pytest.raises(ConversionError, match="takes 8 input channels"):
        resolve(str(tmp_path / "pix2pix.safetensors"))
    save_file(
        {"conditioner.embedders.0.transformer.x": torch.zeros(1), first: state[first]}, str(tmp_path / "xl.safetensors")
    )
    with pytest.raises(ConversionError, match="SDXL"):
        resolve(str(tmp_path / "xl.safetensors"))


class WouldRunCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": WouldRunCode(marker)}, path)
    with pytest.raises(ConversionError, match=r"refusing to load evil\.ckpt: its pickle calls (posix|nt|os)\.system"):
        load_checkpoint(path)
    assert not marker.exists()
    # The same through the converter: one line, nothing written.
    with pytest.raises(ConversionError, match="refusing"):
        convert_model(ConversionOptions(model=str(path), output=tmp_path / "out"))
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_lightning_objects_load_as_inert_placeholders(tmp_path, monkeypatch):
    # A module that exists only while saving, as Lightning's does on the machine that trained the model.
    callbacks = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_path = "/trainer/last.ckpt"

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = callbacks.__name__, "ModelCheckpoint"
    callbacks.ModelCheckpoint = ModelCheckpoint
    for parent in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, callbacks.__name__, callbacks)
    path = tmp_path / "lightning.ckpt"
    weights = {"model.diffusion_model.out.2.bias": torch.arange(4.0)}
    save_ckpt(weights, path, {"callbacks": {ModelCheckpoint: {"best": 1.0}}, "trainer": ModelCheckpoint()})
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", callbacks.__name__):
        monkeypatch.delitem(sys.modules, name)

    loaded = load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["model.diffusion_model.out.2.bias"], torch.arange(4.0))
    assert isinstance(loaded["trainer"], InertObject) and loaded["global_step"] == 470000
    assert loaded["trainer"].state == {"best_model_path": "/trainer/last.ckpt"}
    assert not any(name.startswith("pytorch_lightning") for name in sys.modules)


def test_open_clip_checkpoint_is_sd2_and_its_prediction_type_follows_the_hints(tmp_path, tiny_pipeline, saved_folder):
    """SD 2.x files hold OpenCLIP's text tower (fused q/k/v, one layer more than SD reads): the same text
    encoder comes out; 768-v (v-prediction) unless the flag or SD 2.0-base's global_step say otherwise."""
    state = ldm_state(tiny_pipeline, open_clip=True)
    save_file(state, str(tmp_path / "sd2.safetensors"))
    source = resolve(str(tmp_path / "sd2.safetensors"), config_folder=saved_folder)
    assert (source.description["model_type"], source.prediction_type, source.pad_token) == (
        "sd2-v",
        "v_prediction",
        "!",
    )
    assert_modules_equal(source, tiny_pipeline, ["TextEncoder"])
    base = resolve(str(tmp_path / "sd2.safetensors"), prediction_type="epsilon", config_folder=saved_folder)
    assert (base.description["model_type"], base.scheduler_config["prediction_type"]) == ("sd2", "epsilon")
    torch.save({"state_dict": state, "global_step": 875000}, tmp_path / "sd2-base.ckpt")
    assert resolve(str(tmp_path / "sd2-base.ckpt"), config_folder=saved_folder).prediction_type == "epsilon"
