"""`convert_model`: a model source to a package folder, one component at a time."""
import errno
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from . import __version__
from .ane import ATTENTION_IMPLEMENTATIONS
from .chunks import CHUNK_COUNT, chunk_names, install_chunks
from .families.contract import ComponentSpec, ModelDimensions
from .metadata import model_licence, model_version, user_metadata
from .errors import ConversionError
from coreml_sd.runtime.memory import release_memory
from .package import PackageFolder
from .families import Component
from .palettize import NBITS_CHOICES, QUANTIZED_KINDS
from .sources import ModelSource, resolve

RESOLUTION_STEP = 64
# Where a float32-compute component runs well: the Neural Engine computes in float16 only.
FLOAT32_COMPUTE_UNITS = "CPU_AND_GPU"
UNET_KINDS = ("unet", "controlled_unet")  # what --unet-batch-size and --chunk-unet apply to


@dataclass
class ConversionOptions:
    model: str
    output: Path | None = None
    revision: str | None = None
    model_type: str | None = None  # single files: what the checkpoint is (default: inferred from its tensors)
    prediction_type: str | None = None  # single files: epsilon or v_prediction (default: the checkpoint's hints)
    config: Path | None = None  # single files: a diffusers folder whose configs to use instead of the shipped ones
    loras: tuple[str, ...] = ()  # PATH[:SCALE], merged into the Unet and text encoder
    controlnets: tuple[str, ...] = ()  # folders or Hugging Face ids: controlnet/<Name> packages and a ControlledUnet
    embeddings: tuple[str, ...] = ()  # PATH[:TOKEN], textual-inversion embeddings
    components: tuple[str, ...] | None = None  # None: the model family's default components
    attention_implementation: str = "split_einsum"
    height: int | None = None
    width: int | None = None
    unet_batch_size: int = 2
    quantize_nbits: int | None = None  # palettize the TextEncoder's and Unet's weights to this many bits
    safety_checker: str | None = None  # the SafetyChecker from this folder or id instead of the model's own
    vae: str | None = None  # another VAE (folder or Hugging Face id) in place of the model's own
    force: bool = False
    validate: bool = True
    validation_seed: int = 0
    chunk_unet: bool = False  # the Unet as two packages, UnetChunk1 and UnetChunk2 (see chunks.py)
    bundle_resources: bool = False  # also write Resources/ as the Swift package loads it (see bundle.py)
    verbose: bool = False  # show coremltools' own progress bars


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


def check_options(options: ConversionOptions) -> None:
    """The checks that need no model, so that bad options fail before anything loads."""
    if options.components is not None and not options.components:
        raise ConversionError("no components given: pass --components with at least one")
    if options.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ConversionError(f"unknown attention implementation {options.attention_implementation!r}: choose from {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    for side in ("height", "width"):
        value = getattr(options, side)
        if value is not None and (value <= 0 or value % RESOLUTION_STEP):
            raise ConversionError(f"--{side} {value} is not a positive multiple of {RESOLUTION_STEP}")
    if options.unet_batch_size not in (1, 2):
        raise ConversionError(f"--unet-batch-size must be 1 or 2 (got {options.unet_batch_size})")
    if options.quantize_nbits is not None and options.quantize_nbits not in NBITS_CHOICES:
        raise ConversionError(f"--quantize-nbits must be one of {', '.join(map(str, NBITS_CHOICES))} (got {options.quantize_nbits})")


def chosen_components(source: ModelSource, options: ConversionOptions) -> tuple[str, ...]:
    """The components asked for, or the family's defaults that the source holds weights for."""
    family = source.family
    if options.components is None:
        present = tuple(c for c in family.default_components if family.component(c).module not in source.absent_modules)
        for component in sorted(set(family.default_components) - set(present)):
            print(f"{component:<11} left out: {source.name} holds no {family.component(component).module} weights",
                  file=sys.stderr)
        if not present:
            raise ConversionError(f"{source.name} holds none of the weights of {', '.join(family.default_components)}")
        return present
    unknown = [c for c in options.components if c not in family.components]
    if unknown:
        raise ConversionError(f"unknown component(s) {', '.join(unknown)} for {family.description}: "
                              f"choose from {', '.join(family.components)}")
    absent = [c for c in options.components if family.component(c).module in source.absent_modules]
    if absent:
        raise ConversionError(f"{source.name} holds no weights for {', '.join(absent)}: leave {'it' if len(absent) == 1 else 'them'} "
                              "out of --components")
    return options.components


def model_dimensions(source: ModelSource, options: ConversionOptions) -> ModelDimensions:
    default = source.sample_size * 8
    return ModelDimensions(
        height=options.height or default,
        width=options.width or default,
        unet_batch_size=options.unet_batch_size,
        **source.conditioning,
    )


def compute_precision(source: ModelSource, component: str, options: ConversionOptions) -> str:
    """float16, but the model's or its family's VAE precision for its own VAE (SDXL's overflows float16, the demo
    model's encoder loses too much in it); a VAE swapped in
    with --vae is taken to be made for float16 (validation refuses it if it overflows)."""
    if source.family.component(component).kind.startswith("vae") and not options.vae:
        return source.vae_compute_precision or source.family.defaults.vae_compute_precision
    return "float16"


def component_settings(component: str, source: ModelSource, dims: ModelDimensions, options: ConversionOptions) -> dict:
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
        if options.chunk_unet:
            settings.update(chunks=CHUNK_COUNT)
    elif kind == "safety_checker":
        settings.update(safety_checker=source.safety_checker)
    elif kind != "text_encoder":
        settings.update(attention_implementation=options.attention_implementation)
    if quantize_nbits(source.family.component(component), options.quantize_nbits):
        settings.update(quantize_nbits=options.quantize_nbits)
    if compute_precision(source, component, options) != "float16":
        settings.update(compute_precision=compute_precision(source, component, options))
    adapters = source.adapter_settings(source.family.component(component).module)
    if adapters:
        settings.update(adapters=adapters)
    return settings


def installed_names(source: ModelSource, component: str, options: ConversionOptions) -> tuple[str, ...]:
    """The packages a component is installed as: itself, or a Unet's chunks."""
    if options.chunk_unet and source.family.component(component).kind in UNET_KINDS:
        return chunk_names(component)
    return (component,)


def quantize_nbits(component: Component, nbits: int | None) -> int | None:
    """The palette size a component's weights get: the VAE's stay float16."""
    return nbits if component.kind in QUANTIZED_KINDS else None


def convert_model(options: ConversionOptions) -> ConversionReport:
    check_options(options)
    source = resolve(options.model, options.revision, options.model_type, options.prediction_type, options.config)
    if options.vae:
        source.use_vae(options.vae)
    source.adapters = load_adapters(options.loras, options.embeddings)
    dims = model_dimensions(source, options)
    controlnet_sources = []
    if options.controlnets:
        from .controlnets import CONTROLLED_UNET, prepare

        controlnet_sources, dims = prepare(options.controlnets, source, dims)
    components = chosen_components(source, options)
    if options.controlnets and CONTROLLED_UNET not in components:
        components = (*components, CONTROLLED_UNET)
    source.check_adapters(list(components))
    source.safety_checker = options.safety_checker
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
    work = [(source, component) for component in components]
    work += [(controlnet, controlnet.family.default_components[0]) for controlnet in controlnet_sources]
    with folder.lock():
        try:
            folder.prepare(header, force=options.force)
            install_tokenizer_files(folder, source)
            for component_source, component in work:
                settings = component_settings(component, component_source, dims, options)
                names = installed_names(component_source, component, options)
                if all(folder.is_current(name, settings) for name in names) and not options.force:
                    print(f"{component:<11} up to date (pass --force to convert again)", file=sys.stderr)
                    report.skipped.append(component)
                    continue
                convert_component(folder, component_source, component, dims, options, settings, report)
                report.converted.append(component)
            folder.write_manifest()
        except BaseException:
            folder.discard_if_empty()
            raise
        if options.bundle_resources:
            from .bundle import write_bundle

            report.bundle = write_bundle(folder.path, source.family)
    return report


def load_adapters(loras: tuple[str, ...], embeddings: tuple[str, ...]) -> list:
    """LoRAs and embeddings from their command-line arguments, read (and checked) before anything converts."""
    from .adapters.embeddings import Embedding
    from .adapters.lora import Lora

    adapters = [Lora.from_argument(argument) for argument in loras]
    return adapters + Embedding.from_arguments(embeddings)


def install_tokenizer_files(folder: PackageFolder, source: ModelSource) -> None:
    staging = folder.staging_folder()
    try:
        source.write_tokenizer_files(staging)
        for name in ("vocab.json", "merges.txt"):
            (staging / name).replace(folder.path / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def convert_component(folder: PackageFolder, source: ModelSource, component: str, dims: ModelDimensions,
                      options: ConversionOptions, settings: dict, report: ConversionReport) -> None:
    from .ane import component_module
    from .convert import describe, to_mil_program, to_ml_program, trace
    from .palettize import palettize_parts
    from .validate import PSNR_THRESHOLD_DB, validate, validation_inputs

    spec = source.family.spec(component, dims)
    nbits = quantize_nbits(source.family.component(component), options.quantize_nbits)
    precision = compute_precision(source, component, options)
    staging = folder.staging_folder()
    try:
        with stage(report, component, "load"):
            # A float32 program keeps float32 weights: its constants are what it computes with.
            parts = source.load(component, torch.float32 if precision == "float32" else torch.float16)
        feature_extractor = parts.feature_extractor
        palettized = None
        if nbits:
            with stage(report, component, "palettize"):
                palettized = palettize_parts(parts, nbits)
        with stage(report, component, "rewrite"):
            module = component_module(parts, source.family.component(component), options.attention_implementation)
        with stage(report, component, "trace"):
            program = trace(module, spec)
            del module, parts
            release_memory()
        with stage(report, component, "convert"):
            mil_program = to_mil_program(program, spec, precision, options.verbose)
            del program
            release_memory()
            model = to_ml_program(mil_program, nbits, options.verbose)
            del mil_program
            release_memory()
        kind = source.family.component(component).kind
        version, licence = model_version(source), model_licence(source)
        metadata = user_metadata(source, options.attention_implementation, nbits)

        def describe_package(model, package_spec: ComponentSpec) -> None:
            describe(model, package_spec, kind, version, licence, metadata)

        with stage(report, component, "save"):
            describe_package(model, spec)
            staged = staging / spec.file_name
            staged.parent.mkdir(parents=True, exist_ok=True)  # controlnet/<Name>.mlpackage
            model.save(str(staged))
            del model
            release_memory()
        validation = None
        if options.validate:
            with stage(report, component, "validate"):
                validation = validate(staged, source.family.component(component), spec,
                                      lambda: source.load(component, torch.float32),
                                      options.validation_seed, source.latent_scaling_factor, nbits)
            print_validation(component, validation)
            if validation["non_finite_outputs"]:
                raise ConversionError(overflow_message(component, source.family.component(component), precision))
            if not validation["psnr_db"] >= PSNR_THRESHOLD_DB:
                original = "the diffusers original" + (" with the same palettes" if nbits else "")
                raise ConversionError(
                    f"{component}: PSNR {validation['psnr_db']:.1f} dB against {original} is below "
                    f"{PSNR_THRESHOLD_DB:.0f} dB, so it was not installed (--no-validate installs it anyway)")
        entry = dict(spec.to_json(), settings=settings, validation=validation)
        if feature_extractor is not None:
            entry["feature_extractor"] = feature_extractor  # the runtime prepares the checker's input with it
        if precision == "float32":
            entry.update(compute_precision=precision, compute_units=FLOAT32_COMPUTE_UNITS)
        if palettized is not None:
            entry["palettized_parameters"] = palettized
        if component in installed_names(source, component, options):
            folder.install(staged, component, entry)
            replaced = chunk_names(component)
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
    print(f"{component:<11} PSNR {validation['psnr_db']:.1f} dB, max abs error {validation['max_abs_error']:.3g} "
          f"against {original}", file=sys.stderr)
    if "quantize_nbits" in validation:
        print(f"{component:<11} PSNR {validation['unquantized_psnr_db']:.1f} dB against the unquantized original "
              "(what palettization costs)", file=sys.stderr)


def source_of(manifest: dict) -> ModelSource:
    """Resolve the model a package was converted from, as its manifest records it, with its adapters."""
    recorded = manifest["source"]
    if "path" in recorded:
        source = resolve(recorded["path"], model_type=recorded.get("model_type"),
                         prediction_type=recorded.get("prediction_type"), config_folder=recorded.get("config"))
    elif "id" in recorded:
        source = resolve(recorded["id"], recorded.get("revision"))
    else:
        source = resolve(recorded["model"])
    adapters = manifest.get("adapters", [])
    source.adapters = load_adapters(tuple(f"{a['path']}:{a['scale']}" for a in adapters if "lora" in a),
                                    tuple(f"{a['path']}:{a['tokens'][0]}" for a in adapters if "embedding" in a))
    for adapter, entry in zip(source.adapters, [a for a in adapters if "lora" in a] + [a for a in adapters if "embedding" in a]):
        if adapter.digest != entry["sha256"]:
            raise ConversionError(f"{adapter.path} changed since the package was converted (SHA-256 differs): convert again")
    return source


def installed_components(manifest: dict) -> dict[str, tuple[str, ...]]:
    """Each component of a manifest and the entries it is installed as: itself, or its chunks in order."""
    installed: dict[str, tuple[str, ...]] = {}
    for name, entry in manifest["components"].items():
        component = entry.get("chunk_of", name)
        installed[component] = installed.get(component, ()) + (name,)
    return installed


def validate_package(path: Path, seed: int = 0) -> dict[str, dict]:
    """Check every component of an existing package folder again (its files' hashes first) and record the results."""
    from coreml_sd.runtime.integrity import check_files

    from .validate import validate

    folder = PackageFolder(path)
    if folder.manifest is None:
        raise ConversionError(f"{path} has no manifest.json: is it a package folder written by coreml-convert?")
    manifest = folder.manifest
    for entry in manifest["components"].values():
        check_files(folder.path, entry["file"], entry.get("files", {}), hashes=True)
    source = source_of(manifest)
    source.safety_checker = manifest["components"].get("SafetyChecker", {}).get("settings", {}).get("safety_checker")
    dims = ModelDimensions.from_manifest(manifest)
    results, report = {}, ConversionReport(folder.path)
    with folder.lock():
        for component, names in installed_components(manifest).items():
            packages = tuple(folder.path / manifest["components"][name]["file"] for name in names)
            for package in packages:
                if not package.is_dir():
                    raise ConversionError(f"{package} is missing: convert it again with coreml-convert")
            settings = manifest["components"][names[0]].get("settings", {})
            with stage(report, component, "validate"):
                results[component] = validate(packages if len(packages) > 1 else packages[0],
                                              source.family.component(component),
                                              source.family.spec(component, dims),
                                              lambda c=component: source.load(c, torch.float32), seed,
                                              source.latent_scaling_factor, settings.get("quantize_nbits"))
            for name in names:
                manifest["components"][name]["validation"] = results[component]
            folder.write_manifest()
    return results
