"""Per component: the settings its package depends on (a rerun with equal settings skips it), its compute
precision, its palettes, and the packages it is installed as."""
from coreml_sd.runtime.contract import ModelDimensions, chunk_names

from .. import __version__
from ..compression import BASE_TARGET, GROUPED_TARGET, QUANTIZED_KINDS
from ..families import Component
from ..sources import ModelSource
from .multifunction import TOKEN_FUNCTION_KINDS
from .options import ComponentOptions

# Where a float32-compute component runs well: the Neural Engine computes in float16 only.
FLOAT32_COMPUTE_UNITS = "CPU_AND_GPU"
UNET_KINDS = ("unet", "controlled_unet")  # what --unet-batch-size and --chunk-unet apply to


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
    if kind in UNET_KINDS:
        settings.update(attention_implementation=options.attention_implementation, unet_batch_size=dims.unet_batch_size)
        if options.unguided_function:
            settings.update(unguided_function=True)
        if options.shared_controlled_unet and kind == "unet":
            settings.update(shared_controlled_unet=True)
        if options.chunk_unet:
            settings.update(chunks=len(chunk_names(component)))
    elif kind == "safety_checker":
        settings.update(safety_checker=source.safety_checker)
    elif kind == "text_encoder":
        if dims.clip_skip_layers > 1:
            settings.update(clip_skip_layers=dims.clip_skip_layers)
    else:
        settings.update(attention_implementation=options.attention_implementation)
    if options.max_prompt_chunks > 1 and kind in TOKEN_FUNCTION_KINDS:
        settings.update(max_prompt_chunks=options.max_prompt_chunks)
    if quantize_nbits(source.family.component(component), options.quantize_nbits):
        settings.update(quantize_nbits=options.quantize_nbits)
    if options.quantize_recipe and kind == "unet":
        settings.update(quantize_recipe=options.quantize_recipe.settings())
    if options.quantize_bits is not None and kind == "unet":  # the analysis is seeded: the same model, the same recipe
        settings.update(quantize_bits=options.quantize_bits)
    if options.quantize_group and settings.get("quantize_nbits"):
        settings.update(quantize_group=options.quantize_group)
    if options.quantize_linear and kind in QUANTIZED_KINDS:
        settings.update(quantize_linear=options.quantize_linear.settings())
    target = deployment_target(source.family.component(component), options)
    if target > BASE_TARGET:
        settings.update(minimum_deployment_target=f"iOS{target}")
    precision = compute_precision(source, component, options.vae_swapped)
    if precision != "float16":
        settings.update(compute_precision=precision)
    adapters = source.adapter_settings(source.family.component(component).module)
    if adapters:
        settings.update(adapters=adapters)
    return settings


def installed_names(source: ModelSource, component: str, chunk_unet: bool) -> tuple[str, ...]:
    """The packages a component is installed as: itself, or a Unet's chunks."""
    if chunk_unet and source.family.component(component).kind in UNET_KINDS:
        return chunk_names(component)
    return (component,)


def quantize_nbits(component: Component, nbits: int | None) -> int | None:
    """The palette size a component's weights get: the VAE's stay float16."""
    return nbits if component.kind in QUANTIZED_KINDS else None


def deployment_target(component: Component, options: ComponentOptions) -> int:
    """The iOS version a component's package needs: the one asked for, or what its compression needs if more
    (grouped palettes, int4 and scales per block are iOS 18 / macOS 15 ops)."""
    target = options.min_target
    if component.kind in QUANTIZED_KINDS:
        if options.quantize_group and options.quantize_nbits:
            target = max(target, GROUPED_TARGET)
        if options.quantize_linear:
            target = max(target, options.quantize_linear.minimum_target())
    return target
