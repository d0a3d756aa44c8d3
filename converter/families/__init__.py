"""Model families as data: the runtime's family contract (coreml_sd.runtime.contract: which components
generating needs, their I/O, the defaults that apply when a model does not say), extended with what each
component is built from and how a diffusers folder is recognised as one of the family.

The converter, validation and the docs read these tables; nothing else decides per family. A new family
is a new module here that builds a `Family` (often with `dataclasses.replace` from an existing one) and
an entry in `FAMILIES`.
"""
from collections.abc import Callable
from dataclasses import dataclass, field

from coreml_sd.runtime.contract import (
    LATENT_CHANNELS,
    ComponentSpec,
    FamilyContract,
    MinimumOS,
    ModelDimensions,
)
from coreml_sd.runtime.watermark import STABLE_DIFFUSION_V1, Watermark

# What a component is, for the Neural Engine rewrite and for validation's reference.
COMPONENT_KINDS = ("text_encoder", "unet", "vae_decoder", "vae_encoder", "safety_checker")


@dataclass(frozen=True)
class Component:
    """One package component: the Neural Engine module kind, the pipeline module it is built from, and
    its contract (a builder of the `ComponentSpec` for given dimensions)."""

    kind: str
    module: str  # the diffusers pipeline's attribute: "text_encoder", "text_encoder_2", "unet", "vae", "safety_checker"
    spec: Callable[[str, ModelDimensions], ComponentSpec]
    # Text encoders: which hidden states condition the Unet (the family contract's `hidden_layer`); -1 is the last
    # layer after the final layer norm (SD), -2 the penultimate layer's, without it (SDXL).
    hidden_layer: int = -1
    # Text encoders: pooled outputs through the model's text projection (CLIPTextModelWithProjection).
    projected: bool = False


@dataclass(frozen=True)
class Family:
    contract: FamilyContract
    description: str
    components: dict[str, Component]
    # The VAE's compute precision: float32 for VAEs whose activations overflow float16.
    vae_compute_precision: str = "float16"
    # transformers class of each text encoder module, as model_index.json names it.
    text_encoder_classes: dict[str, str] = field(default_factory=lambda: {"text_encoder": "CLIPTextModel"})
    # The invisible watermark the family's images carry (SD 1.x and 2.x: CompVis' `StableDiffusionV1`).
    watermark: Watermark = STABLE_DIFFUSION_V1
    # The Swift package's pipeline that loads the family's Resources/ bundle, and the OS versions it needs.
    swift_pipeline: str = "StableDiffusionPipeline"
    minimum_os: MinimumOS = MinimumOS(macos="13.1", ios="16.2")
    # Recognises the family from a folder's model_index.json and unet/config.json.
    matches: Callable[[dict, dict], bool] = lambda model_index, unet_config: True

    @property
    def name(self) -> str:
        return self.contract.name

    @property
    def default_components(self) -> tuple[str, ...]:
        """What a conversion writes unless told: what generating needs."""
        return self.contract.required_components

    def component(self, name: str) -> Component:
        if name not in self.components:
            raise ValueError(f"unknown component {name!r} for {self.description}; choose from "
                             f"{', '.join(self.components)}")
        return self.components[name]

    def spec(self, name: str, dims: ModelDimensions) -> ComponentSpec:
        return self.component(name).spec(name, dims)

    def conditioning(self, unet_config: dict, text_configs: dict[str, dict]) -> dict:
        """The `ModelDimensions` fields of the text conditioning, from the Unet's and the text encoders'
        configurations (`text_configs` by pipeline module): the Unet takes the text encoders' hidden states
        concatenated, and a `text_time` Unet also the projected encoder's pooled output and the time ids
        that fill the rest of its added embedding's input."""
        encoders = {name: c for name, c in self.components.items() if c.kind == "text_encoder"}
        widths = {}
        for name, component in encoders.items():
            config = text_configs[component.module]
            hidden = int(config["hidden_size"])
            widths[name] = (hidden, int(config["projection_dim"]) if component.projected else hidden)
        fields = {"text_width": sum(hidden for hidden, _ in widths.values())}
        if unet_config.get("in_channels", LATENT_CHANNELS) != LATENT_CHANNELS:  # an inpainting Unet: 9
            fields["unet_in_channels"] = int(unet_config["in_channels"])
        if unet_config.get("addition_embed_type") == "text_time":
            pooled = next(widths[name][1] for name, component in encoders.items() if component.projected)
            time_ids = ((unet_config["projection_class_embeddings_input_dim"] - pooled)
                        // unet_config["addition_time_embed_dim"])
            fields.update(pooled_width=pooled, time_ids_length=time_ids, text_encoders=widths)
        if unet_config.get("time_cond_proj_dim"):
            fields["guidance_embedding_width"] = int(unet_config["time_cond_proj_dim"])
        return fields

    def modules(self, components) -> set[str]:
        """The pipeline modules the given components are built from."""
        return {self.component(name).module for name in components}


def _families() -> tuple[Family, ...]:
    from .sd import SD
    from .sdxl import SDXL, SDXL_REFINER

    return (SDXL, SDXL_REFINER, SD)  # most specific first: the first that matches a folder is its family


FAMILIES = _families()


def family_by_name(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def detect_family(model_index: dict, unet_config: dict) -> Family:
    """The family of a diffusers folder, from its model_index.json and unet/config.json."""
    return next(family for family in FAMILIES if family.matches(model_index, unet_config))
