"""The packages' input/output contract, as data: names, shapes and dtypes per component.

These are the names and layouts of Apple's StableDiffusion Swift package, so that a Swift app can
load the packages as they are.
"""
from dataclasses import asdict, dataclass

COMPONENTS = ("TextEncoder", "Unet", "VAEDecoder", "VAEEncoder")
DEFAULT_COMPONENTS = ("TextEncoder", "Unet", "VAEDecoder")
TEXT_LENGTH = 77
LATENT_CHANNELS = 4
VAE_FACTOR = 8


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # "float16" or "float32"

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def file_name(self) -> str:
        return f"{self.name}.mlpackage"

    def to_json(self) -> dict:
        return {
            "file": self.file_name,
            "inputs": {t.name: t.to_json() for t in self.inputs},
            "outputs": {t.name: t.to_json() for t in self.outputs},
        }


@dataclass(frozen=True)
class ModelDimensions:
    """What the contract needs to know about a model and the chosen resolution."""

    text_width: int
    height: int
    width: int
    unet_batch_size: int = 2

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // VAE_FACTOR, self.width // VAE_FACTOR

    def as_dict(self) -> dict:
        return asdict(self)


def component_spec(name: str, dims: ModelDimensions) -> ComponentSpec:
    h, w = dims.latent_size
    b = dims.unet_batch_size
    specs = {
        "TextEncoder": ComponentSpec(
            "TextEncoder",
            inputs=(TensorSpec("input_ids", (1, TEXT_LENGTH), "float32"),),
            outputs=(
                TensorSpec("last_hidden_state", (1, TEXT_LENGTH, dims.text_width), "float32"),
                TensorSpec("pooled_outputs", (1, dims.text_width), "float32"),
            ),
        ),
        "Unet": ComponentSpec(
            "Unet",
            inputs=(
                TensorSpec("sample", (b, LATENT_CHANNELS, h, w), "float16"),
                TensorSpec("timestep", (b,), "float16"),
                TensorSpec("encoder_hidden_states", (b, dims.text_width, 1, TEXT_LENGTH), "float16"),
            ),
            outputs=(TensorSpec("noise_pred", (b, LATENT_CHANNELS, h, w), "float32"),),
        ),
        "VAEDecoder": ComponentSpec(
            "VAEDecoder",
            inputs=(TensorSpec("z", (1, LATENT_CHANNELS, h, w), "float16"),),
            outputs=(TensorSpec("image", (1, 3, dims.height, dims.width), "float32"),),
        ),
        "VAEEncoder": ComponentSpec(
            "VAEEncoder",
            inputs=(TensorSpec("x", (1, 3, dims.height, dims.width), "float16"),),
            outputs=(TensorSpec("latent", (1, 2 * LATENT_CHANNELS, h, w), "float32"),),
        ),
    }
    if name not in specs:
        raise ValueError(f"unknown component {name!r}; choose from {', '.join(COMPONENTS)}")
    return specs[name]
