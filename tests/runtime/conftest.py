"""Runtime fixtures: contract-shaped models computed by the tiny pipeline's own modules (tests/conftest.py
provides the tiny pipeline and its converted packages)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from coreml_sd.converter.families.sd import SD
from coreml_sd.converter.models.tiny import TEXT_WIDTH, clip_vocabulary_files
from coreml_sd.runtime.contract import ModelDimensions
from coreml_sd.runtime.package import Package

TINY_SIZE = 128


class ContractModel:
    """One component computed by the tiny pipeline's own float32 PyTorch modules, behind the package contract.

    It isolates the pipeline's logic (tokens, guidance, schedule, noise, layouts) from float16 numerics: with
    it, the runtime must reproduce diffusers to the last bit an 8-bit image can show.
    """

    def __init__(self, name: str, reference, unet_batch_size: int, size: int = TINY_SIZE):
        self.name, self.reference = name, reference
        dims = ModelDimensions(TEXT_WIDTH, size, size, unet_batch_size)
        self.input_description = {t.name: (t.shape, np.dtype(t.dtype)) for t in SD.spec(name, dims).inputs}

    @torch.no_grad()
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, (shape, dtype) in self.input_description.items():
            assert inputs[name].shape == shape and inputs[name].dtype == dtype, (
                name,
                inputs[name].shape,
                inputs[name].dtype,
            )
        x = {name: torch.from_numpy(value.astype(np.float32)) for name, value in inputs.items()}
        ref = self.reference
        if self.name == "TextEncoder":
            return {"last_hidden_state": ref.text_encoder(x["input_ids"].long()).last_hidden_state.numpy()}
        if self.name == "Unet":
            context = x["encoder_hidden_states"][:, :, 0, :].transpose(1, 2)
            return {"noise_pred": ref.unet(x["sample"], x["timestep"], context).sample.numpy()}
        if self.name == "VAEDecoder":
            return {"image": ref.vae.decode(x["z"]).sample.numpy()}
        return {"latent": ref.vae.quant_conv(ref.vae.encoder(x["x"])).numpy()}


@pytest.fixture(scope="session")
def contract_models(tiny_pipeline):
    def build(unet_batch_size: int = 2, size: int = TINY_SIZE) -> dict[str, ContractModel]:
        """The components at `size` x `size` pixels (the tiny model makes any multiple of 64)."""
        names = ("TextEncoder", "Unet", "VAEDecoder", "VAEEncoder")
        return {name: ContractModel(name, tiny_pipeline, unet_batch_size, size) for name in names}

    return build


@pytest.fixture(scope="session")
def package(tiny_pipeline) -> Package:
    """The tiny model's package description, for pipelines on `contract_models`."""
    vocab, merges = clip_vocabulary_files()
    return Package(
        path=Path("tiny"),
        name="tiny",
        components={},
        vocab_file=Path(vocab),
        merges_file=Path(merges),
        scheduler_config=dict(tiny_pipeline.scheduler.config),
        scaling_factor=tiny_pipeline.vae.config.scaling_factor,
        prediction_type="epsilon",
        attention_implementation="split_einsum",
    )


@pytest.fixture(scope="session")
def start_image() -> Image.Image:
    """A 128x128 image for image-to-image (noise: every pixel matters to the comparison)."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def tiny_package(tiny_packages):
    """The split-einsum tiny package folder (every component, the safety checker too)."""
    return tiny_packages("split_einsum")


@pytest.fixture(scope="session")
def tiny_runtime(tiny_package):
    """The runtime on the tiny package through the reference executor, loaded once for all tests."""
    from coreml_sd.runtime import Pipeline

    return Pipeline.from_package(tiny_package, backend="reference")


@pytest.fixture(scope="session")
def xl_base(tiny_xl_packages):
    """The runtime on the tiny-xl base package through the reference executor, loaded once for all tests."""
    from coreml_sd.runtime import Pipeline

    return Pipeline.from_package(tiny_xl_packages("tiny-xl"), backend="reference")
