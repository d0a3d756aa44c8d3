"""Per component: the settings its package depends on (a rerun with equal settings skips it), its compute
precision, its palettes, and the packages it is installed as."""
from coreml_sd.runtime.contract import ModelDimensions, chunk_names

from .. import __version__
from ..compression import QUANTIZED_KINDS
from ..families import Component
from ..sources import ModelSource
from .options import ComponentOptions

# Where a float32-compute component runs well: the Neural Engine computes in float16 only.
FLOAT32_COMPUTE_UNITS = "CPU_AND_GPU"


def compute_precision(source: ModelSource, component: str, vae_swapped: bool) -> str:
    """float16, but the model's or its family's VAE precision for its own VAE (SDXL's overflows float16, the demo
    model's encoder loses too much in it); a VAE swapped in
    with --vae is taken to be made for float16 (validation refuses it if it overflows)."""
    if source.family.component(component).kind.startswith("vae") and not vae_swapped:
        return source.vae_compute_precision or source.family.vae_compute_precision
    return "float16"


def component_settings(component: str, source: ModelSource, dims: ModelDimensions, options: ComponentOptions) -> dict:
    """Everything a component's package depends on; a rerun with equal settings skips it."""
    settings = {
        "converter_version": __version__,
        "source": source.description,
        "height": dims.height,
        "width": dims.width,
    }
    kind = source.family.component(component).kind
    if kind == "unet":
        settings.update(attention_implementation=options.attention_implementation, unet_batch_size=dims.unet_batch_size)
        if options.chunk_unet:
            settings.update(chunks=len(chunk_names(component)))
    elif kind == "safety_checker":
        settings.update(safety_checker=source.safety_checker)
    elif kind != "text_encoder":
        settings.update(attention_implementation=options.attention_implementation)
    if quantize_nbits(source.family.component(component), options.quantize_nbits):
        settings.update(quantize_nbits=options.quantize_nbits)
    precision = compute_precision(source, component, options.vae_swapped)
    if precision != "float16":
        settings.update(compute_precision=precision)
    adapters = source.adapter_settings(source.family.component(component).module)
    if adapters:
        settings.update(adapters=adapters)
    return settings


def installed_names(source: ModelSource, component: str, chunk_unet: bool) -> tuple[str, ...]:
    """The packages a component is installed as: itself, or a Unet's chunks."""
    if chunk_unet and source.family.component(component).kind == "unet":
        return chunk_names(component)
    return (component,)


def quantize_nbits(component: Component, nbits: int | None) -> int | None:
    """The palette size a component's weights get: the VAE's stay float16."""
    return nbits if component.kind in QUANTIZED_KINDS else None
