"""`convert_model`: a model source to a package folder, one component at a time (load, palettize, rewrite for the
Neural Engine, trace, convert, save, validate, install)."""
import errno
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch

from coreml_sd.runtime.contract import (
    TOKENIZER_FILES,
    UNET,
    ComponentSpec,
    ModelDimensions,
    chunk_names,
)
from coreml_sd.runtime.memory import release_memory

from ..adapters.embeddings import Embedding
from ..adapters.lora import Lora
from ..ane import component_module
from ..bundle import write_bundle
from ..chunks import install_chunks
from ..compression import QUANTIZED_KINDS
from ..compression import recipe as recipes
from ..compression.linear import quantize_parts
from ..compression.mixed_bit import ANALYSIS_FILE, analysed_recipe
from ..compression.palettize import palettize_parts
from ..controlnets import CONTROLLED_UNET
from ..controlnets import prepare as prepare_controlnets
from ..errors import ConversionError
from ..families import Component
from ..package_folder import PackageFolder
from ..sources import ModelSource, resolve
from ..sources.recommended import recommendation
from .clip_skip import clip_skip_layers, text_encoder_record
from .convert import describe, to_mil_program, to_ml_program, trace
from .metadata import model_licence, model_version, user_metadata
from .multifunction import (
    combine_functions,
    component_functions,
    converted_model,
    manifest_entry,
)
from .options import (
    ComponentOptions,
    ConversionOptions,
    check_guidance_embedding,
    check_options,
    chosen_components,
    model_dimensions,
)
from .settings import (
    FLOAT32_COMPUTE_UNITS,
    component_settings,
    compute_precision,
    deployment_target,
    installed_names,
    quantize_nbits,
)
from .validate import PSNR_THRESHOLD_DB, validate, validation_inputs


@dataclass
class ConversionReport:
    folder: Path
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    bundle: Path | None = None  # Resources/, with --bundle-resources


@contextmanager
def stage(report: ConversionReport, component: str, name: str):
    """Time one stage and print a progress line for it; a failure inside becomes one clear line."""
    start = time.perf_counter()
    try:
        yield
    except (ConversionError, KeyboardInterrupt):
        raise
    except MemoryError:
        raise ConversionError(f"{component}: {name} ran out of memory; close other programs and run again "
                              "(finished components are kept)") from None
    except Exception as error:
        message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        if is_write_failure(error):
            message = (f"could not write its files ({message}); free disk space where the package and the "
                       f"temporary folder {tempfile.gettempdir()} are, and run again")
        raise ConversionError(f"{component}: {name} failed: {message}") from error
    seconds = time.perf_counter() - start
    report.seconds.setdefault(component, {})[name] = round(seconds, 2)
    print(f"{component:<11} {name:<8} {seconds:6.1f} s", file=sys.stderr, flush=True)


def is_write_failure(error: Exception) -> bool:
    """A full disk (or quota, or file size limit); coremltools' C++ weight writer reports it only in words."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    return "FileWriter" in str(error)


def convert_model(options: ConversionOptions) -> ConversionReport:
    check_options(options)
    source = resolve(options.model, options.revision, options.model_type, options.prediction_type, options.config)
    if options.vae:
        source.use_vae(options.vae)
    source.adapters = load_adapters(options.loras, options.embeddings)
    check_guidance_embedding(source, options.guidance_embedding)
    recommended = recommendation(source.description.get("id") or source.description.get("model"),
                                 source.scheduler_config, options.guidance_embedding,
                                 [adapter.hub_id for adapter in source.adapters if getattr(adapter, "hub_id", None)],
                                 options.recommend)
    source.scheduler_config = recommended.applied_to(source.scheduler_config)
    # a multifunction Unet serves unguided sampling from its batch-1 function; an LCM Unet with its guidance
    # embedding never runs classifier-free guidance
    unguided = (recommended.unguided and not options.unguided_function) or options.guidance_embedding
    dims = model_dimensions(source, options.height, options.width, options.unet_batch_size, unguided)
    controlnet_sources = []
    if options.controlnets:  # the family gains the ControlledUnet here
        controlnet_sources, dims = prepare_controlnets(options.controlnets, source, dims)
    components = chosen_components(source, options.components)
    if options.controlnets:
        components = with_controlled_unet(components, options.shared_controlled_unet)
    dims = replace(dims, clip_skip_layers=clip_skip_layers(source, components, options.clip_skip_layers))
    source.check_adapters(list(components))
    source.safety_checker = options.safety_checker
    component_options = options.component_options()
    check_recipe(source, components, component_options.quantize_recipe)
    folder = PackageFolder(options.output or Path("packages") / source.name)
    report = ConversionReport(folder=folder.path)
    source.description["files"] = source.file_hashes(list(components))
    header = {
        "source": {k: v for k, v in source.description.items() if k != "files"},
        "family": source.family.name,
        "attention_implementation": options.attention_implementation,
        **dims.as_dict(),
        "scheduler": source.scheduler_config,
        "latent_scaling_factor": source.latent_scaling_factor,
        "prediction_type": source.prediction_type,
        "watermark": source.family.watermark.to_manifest(),
        "pad_token": source.pad_token,
        "adapters": [entry for adapter in source.adapters for entry in adapter.describe()],
    }
    if source.force_zeros_for_empty_prompt is not None:
        header["force_zeros_for_empty_prompt"] = source.force_zeros_for_empty_prompt
    if recommended.to_manifest():
        header["recommended"] = recommended.to_manifest()
    work = [(source, component) for component in components]
    work += [(controlnet, next(iter(controlnet.family.components))) for controlnet in controlnet_sources]
    with folder.lock():
        try:
            folder.prepare(header, force=options.force)
            install_tokenizer_files(folder, source)
            for component_source, component in work:
                settings = component_settings(component, component_source, dims, component_options)
                names = installed_names(component_source, component, options.chunk_unet)
                if all(folder.is_current(name, settings) for name in names) and not options.force:
                    print(f"{component:<11} up to date (pass --force to convert again)", file=sys.stderr)
                    report.skipped.append(component)
                    continue
                convert_component(folder, component_source, component, dims,
                                  with_analysed_recipe(component_options, component_source, component, dims, folder,
                                                       report),
                                  settings, report)
                report.converted.append(component)
            folder.write_manifest()
        except BaseException:
            folder.discard_if_empty()
            raise
        if options.bundle_resources:
            report.bundle = write_bundle(folder.path, source.family)
    return report


def with_controlled_unet(components: tuple[str, ...], shared: bool) -> tuple[str, ...]:
    """The components with the ControlledUnet that ControlNets need: a package of its own (Apple's layout), or
    functions of the Unet's package (`shared`), which then converts in its place."""
    if not shared:
        return components if CONTROLLED_UNET in components else (*components, CONTROLLED_UNET)
    components = tuple(component for component in components if component != CONTROLLED_UNET)
    return components if UNET in components else (*components, UNET)


def check_recipe(source: ModelSource, components: tuple[str, ...], recipe: recipes.Recipe | None) -> None:
    """Refuse, before anything converts, a recipe naming layers the model's Unet lacks."""
    for component in components:
        kind = source.family.component(component)
        if recipe and kind.kind == "unet":
            recipes.recipe_layers(source.reader.empty(kind.module), recipe)


def with_analysed_recipe(options: ComponentOptions, source: ModelSource, component: str, dims: ModelDimensions,
                         folder: PackageFolder, report: ConversionReport) -> ComponentOptions:
    """--quantize-bits: the Unet's options with the recipe the mixed-bit analysis makes at that average (run only
    when the Unet converts), its file written into the package folder."""
    if options.quantize_bits is None or source.family.component(component).kind != "unet":
        return options
    with stage(report, component, "analyse"):
        text, recipe = analysed_recipe(source, options.quantize_bits, dims.height, dims.width)
        folder.write_text(ANALYSIS_FILE, text)
        release_memory()  # the float32 Unet the analysis ran on
    print(f"{component:<11} recipe {recipe.name} of {ANALYSIS_FILE}", file=sys.stderr)
    return replace(options, quantize_recipe=recipe)


def load_adapters(loras: tuple[str, ...], embeddings: tuple[str, ...]) -> list:
    """LoRAs and embeddings from their command-line arguments, read (and checked) before anything converts."""
    adapters = [Lora.from_argument(argument) for argument in loras]
    return adapters + Embedding.from_arguments(embeddings)


def install_tokenizer_files(folder: PackageFolder, source: ModelSource) -> None:
    staging = folder.staging_folder()
    try:
        source.write_tokenizer_files(staging)
        for name in TOKENIZER_FILES:
            (staging / name).replace(folder.path / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def convert_component(folder: PackageFolder, source: ModelSource, component: str, dims: ModelDimensions,
                      options: ComponentOptions, settings: dict, report: ConversionReport) -> None:
    spec = source.family.spec(component, dims)
    nbits = quantize_nbits(source.family.component(component), options.quantize_nbits)
    kind = source.family.component(component)
    recipe = options.quantize_recipe if kind.kind == "unet" else None
    linear = options.quantize_linear if kind.kind in QUANTIZED_KINDS else None
    group = options.quantize_group if nbits else None
    target = deployment_target(kind, options)
    precision = compute_precision(source, component, options.vae_swapped)
    staging = folder.staging_folder()
    try:
        with stage(report, component, "load"):
            # A float32 program keeps float32 weights: its constants are what it computes with.
            parts = source.load(component, torch.float32 if precision == "float32" else torch.float16)
        feature_extractor = parts.feature_extractor
        text_encoder = (text_encoder_record(getattr(parts, kind.module), kind, dims.clip_skip_layers)
                        if kind.kind == "text_encoder" else {})
        palettized, recipe_entry = None, None
        if nbits:
            with stage(report, component, "palettize"):
                palettized = palettize_parts(parts, nbits, group)
        elif linear:
            with stage(report, component, "quantize"):
                palettized = quantize_parts(parts, linear)
        elif recipe:
            with stage(report, component, "palettize"):
                recipe_entry = recipes.describe(getattr(parts, source.family.component(component).module), recipe)
                palettized = recipes.apply_recipe(getattr(parts, source.family.component(component).module), recipe)
        with stage(report, component, "rewrite"):
            module = component_module(parts, kind, options.attention_implementation, dims.clip_skip_layers)
        with stage(report, component, "trace"):
            program = trace(module, spec)
            del module, parts
            release_memory()
        with stage(report, component, "convert"):
            mil_program = to_mil_program(program, spec, precision, options.verbose, target)
            del program
            release_memory()
            model = to_ml_program(mil_program, nbits, options.verbose, palettized_layers=recipe is not None,
                                  group=group, linear=linear, target=target)
            del mil_program
            release_memory()
        version, licence = model_version(source), model_licence(source)
        metadata = user_metadata(source, options.attention_implementation, nbits, recipe)

        def describe_package(model, package_spec: ComponentSpec) -> None:
            describe(model, package_spec, kind.kind, version, licence, metadata)

        with stage(report, component, "save"):
            describe_package(model, spec)
            staged = staging / spec.file_name
            staged.parent.mkdir(parents=True, exist_ok=True)  # controlnet/<Name>.mlpackage
            model.save(str(staged))
            del model
            release_memory()
        functions = component_functions(kind.kind, dims, options.unguided_function, options.max_prompt_chunks,
                                        options.shared_controlled_unet)
        if functions:
            with stage(report, component, "functions"):
                models = {function.name: converted_model(source, function.component(component),
                                                         function.spec(source, component),
                                                         precision, nbits, options.attention_implementation,
                                                         options.verbose, target)
                          for function in functions}
                combine_functions(staged, models, lambda combined: describe_package(combined, spec), staging,
                                  options.verbose)
                del models
                release_memory()
        validation = None
        if options.validate:
            with stage(report, component, "validate"):
                validation = validate(staged, source.family.component(component), spec,
                                      lambda: source.load(component, torch.float32),
                                      options.validation_seed, source.latent_scaling_factor, nbits, recipe,
                                      group, linear)
                for function in functions:
                    computed = function.component(component)
                    checked = validate(staged, source.family.component(computed), function.spec(source, component),
                                       lambda: source.load(computed, torch.float32), options.validation_seed,
                                       source.latent_scaling_factor, nbits, function_name=function.name)
                    validation.setdefault("functions", {})[function.name] = checked
            print_validation(component, validation)
            checked = [validation, *validation.get("functions", {}).values()]
            if any(result["non_finite_outputs"] for result in checked):
                raise ConversionError(overflow_message(component, source.family.component(component), precision))
            worst = min(result["psnr_db"] for result in checked)
            if not worst >= PSNR_THRESHOLD_DB:
                original = "the diffusers original" + (" with the same compression" if nbits or recipe or linear
                                                       else "")
                raise ConversionError(
                    f"{component}: PSNR {worst:.1f} dB against {original} is below "
                    f"{PSNR_THRESHOLD_DB:.0f} dB, so it was not installed (--no-validate installs it anyway)")
        entry = dict(spec.to_json(), settings=settings, validation=validation, **text_encoder)
        if functions:
            entry.update(manifest_entry(functions, source, component, options.max_prompt_chunks))
        if feature_extractor is not None:
            entry["feature_extractor"] = feature_extractor  # the runtime prepares the checker's input with it
        if precision == "float32":
            entry.update(compute_precision=precision, compute_units=FLOAT32_COMPUTE_UNITS)
        if palettized is not None:
            entry["quantized_parameters" if linear else "palettized_parameters"] = palettized
        if recipe_entry is not None:
            entry["quantize_recipe"] = recipe_entry
        if component in installed_names(source, component, options.chunk_unet):
            folder.install(staged, component, entry)
            replaced = chunk_names(component)
            if any(function.computes == CONTROLLED_UNET for function in functions):
                replaced += (CONTROLLED_UNET, *chunk_names(CONTROLLED_UNET))  # Apple's second package, before
        else:
            install_chunks(folder, staged, spec, entry, describe_package,
                           validation_inputs(spec, options.validation_seed, source.latent_scaling_factor)
                           if options.validate else None, partial(stage, report, component))
            replaced = (component,)
        for name in replaced:
            folder.remove(name)  # the Unet as it was installed before: whole, or in chunks
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def overflow_message(component: str, kind: Component, precision: str) -> str:
    advice = "convert it with float32 compute"
    if kind.kind.startswith("vae"):
        advice = ("convert the model's own VAE, which an SDXL model's converts with float32 compute (drop --vae), "
                  "or pass --vae with a VAE made for float16 (e.g. madebyollin/sdxl-vae-fp16-fix)")
    return (f"{component}: its {precision} outputs hold inf/NaN (the activations overflow {precision}), "
            f"so it was not installed: {advice}")


def print_validation(component: str, validation: dict) -> None:
    original = "the diffusers original in float32"
    if "quantize_nbits" in validation:
        original += f" with the same {validation['quantize_nbits']}-bit palettes"
    elif "quantize_recipe" in validation:
        original += f" with the same palettes (recipe {validation['quantize_recipe']})"
    elif "quantize_linear" in validation:
        original += f" with the same {validation['quantize_linear']['dtype']} weights"
    print(f"{component:<11} PSNR {validation['psnr_db']:.1f} dB, max abs error {validation['max_abs_error']:.3g} "
          f"against {original}", file=sys.stderr)
    if "unquantized_psnr_db" in validation:
        print(f"{component:<11} PSNR {validation['unquantized_psnr_db']:.1f} dB against the unquantized original "
              "(what compression costs)", file=sys.stderr)
    for name, result in validation.get("functions", {}).items():
        print(f"{component:<11} function {name}: PSNR {result['psnr_db']:.1f} dB, max abs error "
              f"{result['max_abs_error']:.3g}", file=sys.stderr)
