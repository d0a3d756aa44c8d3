"""A catalogue file (TOML: an output root, models, variants) turned into packages and their component tasks.

Every model is converted in every variant; each (model, variant) is one package folder under the output
root, named `<model name>-<variant slug>`, and each of its components is one task with the memory it
reserves. Relative paths in the file (the output root, model folders and files, LoRAs, embeddings) are
taken from the catalogue file's own folder.
"""
import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from diffusers import AutoencoderKL

from .. import __version__
from ..conversion.options import (
    ConversionOptions,
    check_options,
    chosen_components,
    model_dimensions,
)
from ..conversion.settings import quantize_nbits
from ..errors import ConversionError
from ..sources import ModelSource, resolve
from ..sources.folders import empty_module
from .reservations import reserved_gib, size_ratio

# Each key, the ConversionOptions field it sets and the type it takes.
MODEL_KEYS = {"source": str, "name": str, "loras": list, "embeddings": list, "revision": str, "model_type": str,
              "prediction_type": str, "config": str, "vae": str}
VARIANT_KEYS = {"name": str, "attention_implementation": str, "height": int, "width": int, "quantize_nbits": int,
                "unet_batch_size": int, "components": list, "validate": bool}
PATH_KEYS = ("source", "config", "vae")  # may name a file or folder beside the catalogue
# A task whose process dies (killed, out of memory) runs again this many times (the catalogue's `retries`); an
# error the converter reports (bad weights, a failed validation) would only repeat, so it is not retried.
DEFAULT_RETRIES = 2


@dataclass
class PackagePlan:
    """One package folder of the catalogue: the conversion's options and, per component, the memory its task
    reserves (GiB), in the order the components are converted."""

    name: str
    options: ConversionOptions  # components=None: each task converts one of `memory_gib`'s
    memory_gib: dict[str, float]
    key: str  # changes when anything that makes the package changes: the entries, the local files' stamps
    model: dict = field(default_factory=dict)
    variant: dict = field(default_factory=dict)

    @property
    def folder(self) -> Path:
        return self.options.output

    def task_options(self, component: str) -> ConversionOptions:
        return replace(self.options, components=(component,))


@dataclass
class Catalogue:
    path: Path
    output: Path
    packages: list[PackagePlan]
    retries: int = DEFAULT_RETRIES

    @property
    def tasks(self) -> int:
        return sum(len(package.memory_gib) for package in self.packages)


def load_catalogue(path: Path) -> Catalogue:
    """Read and check the file, resolve every model (configurations only: no weights are read) and plan each
    package's tasks; anything wrong is one ConversionError naming the entry."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{path} does not exist: pass a catalogue .toml file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path} is not valid TOML ({error})") from None
    unknown = set(data) - {"output", "retries", "model", "variant"}
    if unknown:
        raise ConversionError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}: a catalogue has output, "
                              "retries, [[model]] and [[variant]]")
    retries = data.get("retries", DEFAULT_RETRIES)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ConversionError(f"{path}: retries must be a whole number, 0 or more (got {retries!r})")
    base = Path(path).resolve().parent
    if not isinstance(data.get("output"), str):
        raise ConversionError(f'{path}: no output: add e.g. output = "catalogue-out" (the root of the package folders)')
    output = base / data["output"]
    models = [checked(entry, MODEL_KEYS, f"{path}: [[model]] {number}", required="source")
              for number, entry in enumerate(entries(data, "model", path), 1)]
    variants = [checked(entry, VARIANT_KEYS, f"{path}: [[variant]] {number}")
                for number, entry in enumerate(entries(data, "variant", path), 1)]
    packages = []
    for number, model in enumerate(models, 1):
        model = anchored(model, base)
        where = f"{path}: [[model]] {number} ({model.get('name') or model['source']})"
        try:
            source = resolve(model["source"], model.get("revision"), model.get("model_type"),
                             model.get("prediction_type"), Path(model["config"]) if "config" in model else None)
            if "vae" in model:
                source.use_vae(model["vae"])
        except ConversionError as error:
            raise ConversionError(f"{where}: {error}") from None
        stamps, layouts = local_stamps(model), {}
        for variant in variants:
            packages.append(plan_package(source, model, variant, output, stamps, layouts, where))
    duplicates = sorted({p.name for p in packages if sum(q.name == p.name for q in packages) > 1})
    if duplicates:
        raise ConversionError(f"{path}: two packages would share the folder {duplicates[0]}: give the models or "
                              "variants distinct names (name = ...)")
    return Catalogue(Path(path), output, packages, retries)


def entries(data: dict, key: str, path: Path) -> list[dict]:
    found = data.get(key)
    if not isinstance(found, list) or not found or not all(isinstance(entry, dict) for entry in found):
        raise ConversionError(f"{path}: add at least one [[{key}]] table")
    return found


def checked(entry: dict, keys: dict[str, type], where: str, required: str | None = None) -> dict:
    unknown = set(entry) - set(keys)
    if unknown:
        raise ConversionError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}: use {', '.join(keys)}")
    if required and required not in entry:
        raise ConversionError(f"{where}: {required} is missing")
    for key, value in entry.items():
        if not isinstance(value, keys[key]) or (keys[key] is int and isinstance(value, bool)):
            raise ConversionError(f"{where}: {key} must be a {keys[key].__name__} (got {value!r})")
        if keys[key] is list and not all(isinstance(item, str) for item in value):
            raise ConversionError(f"{where}: {key} must be a list of strings (got {value!r})")
    return entry


def anchored(model: dict, base: Path) -> dict:
    """The model entry with its relative paths taken from the catalogue's folder (where they exist there)."""
    def anchor(value: str) -> str:
        path, sep, suffix = value, "", ""
        if not (base / value).exists() and ":" in value:  # PATH:SCALE, PATH:TOKEN
            path, sep, suffix = value.rpartition(":")
        candidate = base / Path(path).expanduser()
        return str(candidate) + sep + suffix if candidate.exists() else value

    model = dict(model)
    for key in PATH_KEYS:
        if key in model:
            model[key] = anchor(model[key])
    for key in ("loras", "embeddings"):
        model[key] = [anchor(value) for value in model.get(key, [])]
    return model


def local_stamps(model: dict) -> list:
    """Size and modification time of every local file the model entry reads, for the package key."""
    paths = [model.get(key) for key in PATH_KEYS] + [v.rpartition(":")[0] or v
                                                     for v in model["loras"] + model["embeddings"]]
    stamps = []
    for value in filter(None, paths):
        path = Path(value).expanduser()
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
        stamps += [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return stamps


def plan_package(source: ModelSource, model: dict, variant: dict, output: Path, stamps: list, layouts: dict,
                 where: str) -> PackagePlan:
    """`layouts`: the model's modules on the meta device, kept from one variant to the next."""
    options = ConversionOptions(
        model=model["source"], revision=model.get("revision"), model_type=model.get("model_type"),
        prediction_type=model.get("prediction_type"), config=Path(model["config"]) if "config" in model else None,
        loras=tuple(model["loras"]), embeddings=tuple(model["embeddings"]), vae=model.get("vae"),
        components=tuple(variant["components"]) if "components" in variant else None,
        attention_implementation=variant.get("attention_implementation", "split_einsum"),
        height=variant.get("height"), width=variant.get("width"),
        unet_batch_size=variant.get("unet_batch_size", 2), quantize_nbits=variant.get("quantize_nbits"),
        validate=variant.get("validate", True),
    )
    try:
        check_options(options)
        components = chosen_components(source, options.components)
    except ConversionError as error:
        raise ConversionError(f"{where}, variant {variant_slug(variant, options)}: {error}") from None
    dims = model_dimensions(source, options.height, options.width, options.unet_batch_size)
    name = f"{model.get('name') or source.name}-{variant_slug(variant, options, dims.width, dims.height)}"
    options.output = output / name
    memory = {}
    for component in components:
        kind = source.family.component(component)
        if kind.module not in layouts:
            layouts[kind.module] = module_layout(source, kind.module)
        ratio = size_ratio(kind.kind, layouts[kind.module], dims.height, dims.width)
        memory[component] = reserved_gib(kind.kind, ratio, options.validate,
                                         quantize_nbits(kind, options.quantize_nbits) is not None)
    key = hashlib.sha256(json.dumps([__version__, model, variant, list(components), stamps],
                                    sort_keys=True).encode()).hexdigest()
    return PackagePlan(name, options, memory, key, model, variant)


def variant_slug(variant: dict, options: ConversionOptions, width: int | None = None, height: int | None = None) -> str:
    """`split_einsum`, `original-6bit-512x768`: the attention implementation, the palette bits, and the size when
    the variant sets one (width x height); a variant's own `name` instead when it has one."""
    if "name" in variant:
        return variant["name"]
    slug = options.attention_implementation
    if options.quantize_nbits:
        slug += f"-{options.quantize_nbits}bit"
    if options.height or options.width:
        slug += f"-{width or options.width}x{height or options.height}"
    return slug


def module_layout(source: ModelSource, module_name: str):
    """The module on the meta device (shapes, no weights), the VAE from --vae's folder when it replaces the model's."""
    if module_name == "safety_checker":
        return None
    if module_name == "vae" and source.vae_folder is not None:

        return empty_module(AutoencoderKL, AutoencoderKL.load_config(source.vae_folder))
    return source.reader.empty(module_name)
