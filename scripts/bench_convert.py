"""Converter benchmark, printed as JSON: time and peak memory of converting each component.

Runs on a local diffusers folder with the full-size SD v1.4 architecture and random weights (fp32
safetensors, like the hub repo), built once and cached. Every conversion and every validation runs
`coreml-convert` (or the validation) in its own process; its peak RSS is the child's max RSS as the
kernel reports it (what `/usr/bin/time -v` prints), its stage peaks come from sampling /proc.

    python scripts/bench_convert.py                      # full size: targets enforced, exit 1 if one is missed
    python scripts/bench_convert.py --small              # the tiny configuration: a quick smoke run
    python scripts/bench_convert.py --baseline old.json  # also check the outputs against an earlier run
    python scripts/bench_convert.py --xl                 # SDXL base instead (2.57 B-parameter Unet; --small works too)
    python scripts/bench_convert.py --single-file        # only: the same model as one LDM-layout fp16 file

Besides each component on its own, it converts the TextEncoder and Unet with `--quantize-nbits 6`, and
runs one whole `coreml-convert` (the default components, validation on), whose peak with validation
is the one a user's machine must hold.

Full-size runs need several GB: wrap them in `flock /tmp/fullsize.lock ...`.
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measured_run import GIB, rss_bytes, run_measured  # noqa: E402, F401  (rss_bytes: bench_catalogue's)

CACHE = Path.home() / ".cache" / "coreml-sd" / "bench"
MAIN_IMPLEMENTATION = "split_einsum"
SINGLE_FILE_PEAK_FACTOR = 1.1  # a single file's conversion peak, at most this multiple of the folder's
QUANTIZE_NBITS = 6
QUANTIZED_UNET_SIZE_FRACTION = 0.4  # of the float16 package: 6 of 16 bits, plus the small weights
PSNR_TOLERANCE_DB = 0.5
MAX_RANK = 4
MAX_SPLIT_EINSUM_TRANSPOSES = 32
SCORES_FRACTION = {"split_einsum": 1 / 8, "split_einsum_v2": 1 / 64}  # of original's attention scores

SEED = 0
SHARD_BYTES = 2**30  # the random full-size weights are written a shard at a time, so that building stays lean


@dataclass(frozen=True)
class Variant:
    """One model family's benchmark: what it converts, and the targets."""

    name: str
    small_name: str
    components: tuple[str, ...]
    peak_rss_targets_gib: dict[str, float]
    total_wall_target_s: float
    whole_run_peak_target_gib: float  # one coreml-convert with validation (issue 31)
    quantized_components: tuple[str, ...]
    attention_implementations: tuple[str, ...]
    model_index: dict = field(default_factory=dict)


SD = Variant(
    name="sd-v1-4",
    small_name="tiny",
    components=("TextEncoder", "Unet", "VAEDecoder"),
    peak_rss_targets_gib={"TextEncoder": 1.5, "Unet": 4.3, "VAEDecoder": 2.0},
    total_wall_target_s=121.0,
    whole_run_peak_target_gib=2.5,
    quantized_components=("TextEncoder", "Unet"),
    attention_implementations=("split_einsum", "split_einsum_v2", "original"),
    model_index={
        "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None], "safety_checker": [None, None],
        "requires_safety_checker": False, "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    },
)
XL = Variant(
    name="sdxl-base",
    small_name="tiny-xl",
    components=("TextEncoder", "TextEncoder2", "Unet", "VAEDecoder"),
    peak_rss_targets_gib={"TextEncoder2": 2.5, "Unet": 7.5, "VAEDecoder": 2.0},  # Unet: 1.5x its float16 weights
    total_wall_target_s=480.0,
    whole_run_peak_target_gib=6.0,
    quantized_components=("Unet",),
    attention_implementations=("split_einsum",),
    model_index={
        "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    },
)
VARIANTS = {"sd": SD, "xl": XL}


def model_configs(variant: Variant, small: bool) -> dict:
    if variant is XL:
        if small:
            from coreml_sd.converter.models import tiny_xl

            return {"unet": tiny_xl.UNET_CONFIG, "vae": tiny_xl.XL_VAE_CONFIG,
                    "text_encoder": tiny_xl.TEXT_ENCODER_CONFIG, "text_encoder_2": tiny_xl.TEXT_ENCODER_2_CONFIG}
        from coreml_sd.converter.models import sdxl_base

        return {"unet": sdxl_base.SDXL_UNET_CONFIG, "vae": sdxl_base.SDXL_VAE_CONFIG,
                "text_encoder": sdxl_base.SDXL_TEXT_ENCODER_CONFIG,
                "text_encoder_2": sdxl_base.SDXL_TEXT_ENCODER_2_CONFIG}
    if small:
        from coreml_sd.converter.models.tiny import TEXT_ENCODER_CONFIG, UNET_CONFIG, VAE_CONFIG

        return {"unet": UNET_CONFIG, "vae": VAE_CONFIG, "text_encoder": TEXT_ENCODER_CONFIG}
    from coreml_sd.converter.models.sd_v1_4 import SD_TEXT_ENCODER_CONFIG, SD_UNET_CONFIG, SD_VAE_CONFIG

    return {"unet": SD_UNET_CONFIG, "vae": SD_VAE_CONFIG, "text_encoder": SD_TEXT_ENCODER_CONFIG}


def random_state(module, generator, names: list[str]) -> dict:
    """Random float32 weights for a module built on the meta device, as PyTorch initializes them (uniform in
    ±1/sqrt(fan-in) for matrices and kernels, ones for norm scales, zeros for biases), one tensor at a time."""
    import torch

    state = {}
    metas = module.state_dict()
    for name in names:
        meta = metas[name]
        if not meta.is_floating_point():
            state[name] = torch.arange(meta.shape[-1]).expand(meta.shape).to(meta.dtype).clone()
        elif meta.ndim >= 2:
            bound = meta[0].numel() ** -0.5
            state[name] = torch.empty(meta.shape).uniform_(-bound, bound, generator=generator)
        else:
            state[name] = (torch.ones if name.endswith("weight") else torch.zeros)(meta.shape)
    return state


def save_sharded(module, generator, folder: Path, weights_name: str) -> None:
    """Random weights in ~1 GiB safetensors shards with a diffusers/transformers index, as the hub's large repos
    hold them; a shard's tensors are made when it is written, so building holds one shard at a time."""
    from safetensors.torch import save_file

    shards, current, size = [], [], 0
    for name, meta in module.state_dict().items():
        nbytes = meta.numel() * meta.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    stem, suffix = weights_name.rsplit(".", 1)
    weight_map, total = {}, 0
    for index, shard_names in enumerate(shards, 1):
        shard = random_state(module, generator, shard_names)
        file = f"{stem}-{index:05d}-of-{len(shards):05d}.{suffix}" if len(shards) > 1 else weights_name
        save_file(shard, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(t.nbytes for t in shard.values())
        del shard
    if len(shards) > 1:
        (folder / f"{weights_name}.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                       "weight_map": weight_map}))


def build_random_modules(folder: Path, variant: Variant, configs: dict) -> None:
    """Each module built on the meta device and its random weights written a shard at a time: SDXL's Unet
    alone would take 10 GB in float32."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    generator = torch.Generator().manual_seed(SEED)
    for name, config in configs.items():
        if name.startswith("text_encoder"):
            text_config = transformers.CLIPTextConfig(**config)
            with torch.device("meta"):
                module = getattr(transformers, variant.model_index[name][1])(text_config)
            text_config.save_pretrained(folder / name)
            save_sharded(module, generator, folder / name, "model.safetensors")
        else:
            with torch.device("meta"):
                module = (UNet2DConditionModel if name == "unet" else AutoencoderKL)(**config)
            module.save_config(folder / name)
            save_sharded(module, generator, folder / name, "diffusion_pytorch_model.safetensors")


def build_model_folder(folder: Path, variant: Variant, small: bool) -> None:
    """Random float32 weights in a diffusers folder (as the hub holds them), one module at a time (each saved,
    then released)."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel

    from coreml_sd.converter.models import tiny, tiny_xl

    configs = model_configs(variant, small)
    if variant is XL:
        build_random_modules(folder, variant, configs)
        EulerDiscreteScheduler(**tiny_xl.SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
        for subfolder, tokenizer in zip(("tokenizer", "tokenizer_2"), tiny_xl.build_tokenizers()):
            tokenizer.save_pretrained(folder / subfolder)
    else:
        torch.manual_seed(SEED)
        builders = {
            "text_encoder": lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**configs["text_encoder"])),
            "vae": lambda: AutoencoderKL(**configs["vae"]),
            "unet": lambda: UNet2DConditionModel(**configs["unet"]),
        }
        for name, build in builders.items():
            build().save_pretrained(folder / name, safe_serialization=True)
        PNDMScheduler(**tiny.SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
        tiny.build_tokenizer().save_pretrained(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps(variant.model_index, indent=2) + "\n")


def model_folder(variant: Variant, small: bool, cache: Path) -> Path:
    """The cached folder for these configurations, built in a child process when missing."""
    configs = model_configs(variant, small)
    key = hashlib.sha256(json.dumps([configs, SEED], sort_keys=True, default=list).encode()).hexdigest()[:12]
    folder = cache / f"{variant.small_name if small else variant.name}-random-{key}"
    if not folder.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache))
        try:
            argv = [sys.executable, __file__, "--build-folder", str(staging)] + (["--small"] if small else []) + \
                (["--xl"] if variant is XL else [])
            subprocess.run(argv, check=True)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def build_single_file(folder: Path, path: Path) -> None:
    """The diffusers folder's weights as one fp16 .safetensors in the original LDM layout, as model sites
    publish checkpoints (the layout is the tests' inverse of diffusers' single-file key conversion)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "converter"))
    from ldm_layout import ldm_state

    class Modules:  # what ldm_state reads: a pipeline's three modules
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float16)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float16)
        text_encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", torch_dtype=torch.float16)

    save_file(ldm_state(Modules), str(path))


def single_file(folder: Path, cache: Path) -> Path:
    path = cache / f"{folder.name}-ldm-fp16.safetensors"
    if not path.is_file():
        staging = path.with_name(".partial-" + path.name)
        subprocess.run([sys.executable, __file__, "--build-single-file", str(folder), str(staging)], check=True)
        staging.rename(path)
    return path


def weights_digest(package: Path) -> str:
    """SHA-256 of a package's weight file: equal digests are the same weights."""
    return hashlib.sha256((package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").read_bytes()).hexdigest()


def single_file_runs(variant: Variant, folder: Path, cache: Path, output: Path, small: bool) -> dict:
    """Each component converted from the diffusers folder and from the same weights as one LDM-layout fp16
    .safetensors file (with the shipped SD 1.x configs, offline): peak RSS, wall, and whether the packages
    hold the same weights."""
    path = single_file(folder, cache)
    # The tiny configuration is no published architecture: its configs come from the folder, as --config.
    configs = {"folder": (), "single_file": ("--config", str(folder)) if small else ()}
    runs = {"file": str(path), "file_gib": round(path.stat().st_size / GIB, 2), "components": {}}
    for component in variant.components:
        figures = runs["components"][component] = {}
        for kind, model in (("folder", folder), ("single_file", path)):
            print(f"converting {component} from the {kind.replace('_', ' ')}", file=sys.stderr, flush=True)
            target = output / kind
            result = convert(model, target, component, MAIN_IMPLEMENTATION, extra=configs[kind])
            figures[kind] = {"peak_rss_gib": result["peak_rss_gib"], "wall_s": result["wall_s"],
                             "cpu_s": result["cpu_s"], "weights_sha256": weights_digest(Path(result["package"]))}
        figures["peak_ratio"] = round(figures["single_file"]["peak_rss_gib"] / figures["folder"]["peak_rss_gib"], 3)
        figures["same_weights"] = figures["single_file"]["weights_sha256"] == figures["folder"]["weights_sha256"]
    runs["checks"] = checks = []
    for component, figures in runs["components"].items():
        check(checks, f"{component} single-file / folder conversion peak RSS", figures["peak_ratio"],
              f"<= {SINGLE_FILE_PEAK_FACTOR}", figures["peak_ratio"] <= SINGLE_FILE_PEAK_FACTOR)
        check(checks, f"{component} single-file package weights equal the folder's", figures["same_weights"], True,
              figures["same_weights"])
    return runs


def package_mib(package: Path) -> float:
    return round(sum(f.stat().st_size for f in package.rglob("*") if f.is_file()) / 2**20, 1)


def program_figures(packages: list[Path]) -> list[dict]:
    """program_stats of each package, in one child process, so the benchmark never holds their weights."""
    argv = [sys.executable, __file__, "--program-stats", *map(str, packages)]
    stdout = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(stdout.strip().splitlines()[-1])


def convert(folder: Path, output: Path, component: str, attention_implementation: str,
            quantize_nbits: int | None = None, extra: tuple[str, ...] = ()) -> dict:
    quantize = ["--quantize-nbits", str(quantize_nbits)] if quantize_nbits else []
    quantize += extra
    result = run_measured([
        sys.executable, "-m", "coreml_sd.converter.cli", "--model", str(folder), "--components", component,
        "--attention-implementation", attention_implementation, "--no-validate", "--force", "-o", str(output),
        *quantize,
    ])
    del result["stdout"]
    manifest = json.loads((output / "manifest.json").read_text())
    entry = manifest["components"][component]
    package = output / entry["file"]
    result.update(package=str(package), package_mib=package_mib(package),
                  io={"inputs": entry["inputs"], "outputs": entry["outputs"]})
    return result


def validate(output: Path, component: str) -> dict:
    result = run_measured([sys.executable, __file__, "--validate-component", component, str(output)])
    figures = json.loads(result.pop("stdout").strip().splitlines()[-1])
    del result["stages"]
    return dict(result, **{k: v for k, v in figures.items() if k != "seed"})


def whole_run(folder: Path, output: Path) -> dict:
    """One coreml-convert of the default components with validation, as a user runs it."""
    result = run_measured([sys.executable, "-m", "coreml_sd.converter.cli", "--model", str(folder),
                           "--force", "-o", str(output)])
    del result["stdout"], result["stages"]
    return result


def validate_component(folder: Path, component: str) -> dict:
    """One component of a package folder against its diffusers original, as coreml-convert validates it."""
    import torch

    from coreml_sd.converter.conversion.validate import validate as validate_package
    from coreml_sd.converter.conversion.validate_only import source_of
    from coreml_sd.runtime.contract import ModelDimensions

    manifest = json.loads((folder / "manifest.json").read_text())
    source = source_of(manifest)
    spec = source.family.spec(component, ModelDimensions.from_manifest(manifest))
    nbits = manifest["components"][component]["settings"].get("quantize_nbits")
    return validate_package(folder / spec.file_name, source.family.component(component), spec,
                            lambda: source.load(component, torch.float32),
                            0, source.latent_scaling_factor, nbits)


def check(checks: list, name: str, value, target, met: bool) -> None:
    checks.append({"name": name, "value": value, "target": target, "met": bool(met)})


def evaluate(report: dict, baseline: dict | None) -> list[dict]:
    variant = VARIANTS[report["variant"]]
    checks = []
    main_runs = report["conversion"][MAIN_IMPLEMENTATION]
    for component, target in variant.peak_rss_targets_gib.items():
        check(checks, f"{component} conversion peak RSS (GiB)", main_runs[component]["peak_rss_gib"], f"<= {target}",
              main_runs[component]["peak_rss_gib"] <= target)
    check(checks, "conversion wall time, all components (s)", report["conversion_wall_s"],
          f"<= {variant.total_wall_target_s}", report["conversion_wall_s"] <= variant.total_wall_target_s)
    limit = variant.whole_run_peak_target_gib
    check(checks, "whole run with validation, peak RSS (GiB)", report["whole_run"]["peak_rss_gib"], f"<= {limit}",
          report["whole_run"]["peak_rss_gib"] <= limit)
    for component, figures in report["validation"].items():
        check(checks, f"{component} PSNR (dB)", figures["psnr_db"], f">= {report['psnr_threshold_db']}",
              figures["psnr_db"] >= report["psnr_threshold_db"])
    for component, figures in report["quantized"]["conversion"].items():
        target = variant.peak_rss_targets_gib[component]
        check(checks, f"{component} {QUANTIZE_NBITS}-bit conversion peak RSS (GiB)", figures["peak_rss_gib"],
              f"<= {target}", figures["peak_rss_gib"] <= target)
        validation = report["quantized"]["validation"][component]
        check(checks, f"{component} {QUANTIZE_NBITS}-bit PSNR against the same palettes (dB)", validation["psnr_db"],
              f">= {report['psnr_threshold_db']}", validation["psnr_db"] >= report["psnr_threshold_db"])
    limit = round(QUANTIZED_UNET_SIZE_FRACTION * main_runs["Unet"]["package_mib"], 1)
    size = report["quantized"]["conversion"]["Unet"]["package_mib"]
    check(checks, f"Unet {QUANTIZE_NBITS}-bit package (MiB)", size, f"<= {limit}", size <= limit)
    scores = {name: runs["Unet"]["program"]["largest_attention_scores"]["elements"]
              for name, runs in report["conversion"].items()}
    for name, fraction in SCORES_FRACTION.items():
        if name not in scores or "original" not in scores:  # a variant that converts split_einsum only
            continue
        limit = int(scores["original"] * fraction)
        check(checks, f"Unet {name} largest attention scores (elements)", scores[name], f"<= {limit}",
              scores[name] <= limit)
    transposes = main_runs["Unet"]["program"]["transposes"]
    check(checks, "Unet split_einsum transposes", transposes, f"<= {MAX_SPLIT_EINSUM_TRANSPOSES}",
          transposes <= MAX_SPLIT_EINSUM_TRANSPOSES)
    for name, runs in report["conversion"].items():
        for component, figures in runs.items():
            rank = figures["program"]["max_rank"]
            check(checks, f"{component} {name} max rank", rank, f"<= {MAX_RANK}", rank <= MAX_RANK)
    if baseline is not None:
        for name, runs in report["conversion"].items():
            for component, figures in runs.items():
                before = baseline["conversion"].get(name, {}).get(component)
                if before is None:
                    continue
                check(checks, f"{component} {name} I/O as in the baseline", figures["io"], before["io"],
                      figures["io"] == before["io"])
                check(checks, f"{component} {name} op counts as in the baseline", figures["program"]["op_counts"],
                      before["program"]["op_counts"], figures["program"]["op_counts"] == before["program"]["op_counts"])
        for component, figures in report["validation"].items():
            before = baseline["validation"].get(component)
            if before is not None:
                change = round(figures["psnr_db"] - before["psnr_db"], 2)
                check(checks, f"{component} PSNR change from the baseline (dB)", change,
                      f"within +-{PSNR_TOLERANCE_DB}", abs(change) <= PSNR_TOLERANCE_DB)
    return checks


def benchmark(variant: Variant, small: bool, cache: Path, output: Path, baseline: dict | None) -> dict:
    from coreml_sd.converter.conversion.validate import PSNR_THRESHOLD_DB

    folder = model_folder(variant, small, cache)
    report = {
        "variant": next(key for key, value in VARIANTS.items() if value is variant),
        "size": "small" if small else "full",
        "model_folder": str(folder),
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
        "conversion": {},
    }
    for implementation in variant.attention_implementations:
        components = variant.components if implementation == MAIN_IMPLEMENTATION else ("Unet",)
        runs = report["conversion"][implementation] = {}
        for component in components:
            print(f"converting {component} ({implementation})", file=sys.stderr, flush=True)
            runs[component] = convert(folder, output / implementation, component, implementation)
    converted = [figures for runs in report["conversion"].values() for figures in runs.values()]
    for figures, program in zip(converted, program_figures([Path(f.pop("package")) for f in converted])):
        figures["program"] = program
    main_runs = report["conversion"][MAIN_IMPLEMENTATION]
    report["conversion_wall_s"] = round(sum(main_runs[c]["wall_s"] for c in variant.components), 1)
    report["psnr_threshold_db"] = PSNR_THRESHOLD_DB
    report["validation"] = {}
    for component in variant.components:
        print(f"validating {component} ({MAIN_IMPLEMENTATION})", file=sys.stderr, flush=True)
        report["validation"][component] = validate(output / MAIN_IMPLEMENTATION, component)
    report["validation_wall_s"] = round(sum(v["wall_s"] for v in report["validation"].values()), 1)
    for component, figures in report["validation"].items():
        figures["peak_ratio_to_conversion"] = round(figures["peak_rss_gib"] / main_runs[component]["peak_rss_gib"], 2)
    report["quantized"] = quantized_runs(variant, folder, output / f"{MAIN_IMPLEMENTATION}-{QUANTIZE_NBITS}-bit")
    print("converting and validating the default components in one coreml-convert run", file=sys.stderr, flush=True)
    report["whole_run"] = whole_run(folder, output / "whole-run")
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report["checks"] = evaluate(report, baseline)
    report["targets_enforced"] = not small
    report["all_targets_met"] = all(c["met"] for c in report["checks"])
    return report


def quantized_runs(variant: Variant, folder: Path, output: Path) -> dict:
    """The palettized components: conversion, program figures and validation, as for float16."""
    runs = {"nbits": QUANTIZE_NBITS, "conversion": {}, "validation": {}}
    for component in variant.quantized_components:
        print(f"converting {component} ({MAIN_IMPLEMENTATION}, {QUANTIZE_NBITS}-bit)", file=sys.stderr, flush=True)
        runs["conversion"][component] = convert(folder, output, component, MAIN_IMPLEMENTATION, QUANTIZE_NBITS)
    converted = list(runs["conversion"].values())
    for figures, program in zip(converted, program_figures([Path(f.pop("package")) for f in converted])):
        figures["program"] = program
    for component in variant.quantized_components:
        print(f"validating {component} ({MAIN_IMPLEMENTATION}, {QUANTIZE_NBITS}-bit)", file=sys.stderr, flush=True)
        runs["validation"][component] = validate(output, component)
    return runs


def print_checks(checks: list[dict]) -> None:
    for c in checks:
        value = c["value"] if not isinstance(c["value"], dict) else "(see JSON)"
        target = c["target"] if not isinstance(c["target"], dict) else "(baseline)"
        print(f"{'ok ' if c['met'] else 'MISSED'} {c['name']:<58} {value!s:>10}  target {target}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the tiny configuration (targets not enforced)")
    parser.add_argument("--xl", action="store_true", help="SDXL base instead of SD v1.4")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the random-weight model folders are kept "
                        "(default: %(default)s)")
    parser.add_argument("--output", type=Path, help="keep the converted packages here (default: a temporary folder)")
    parser.add_argument("--baseline", type=Path, help="an earlier run's JSON: I/O, op counts and PSNR must match it")
    parser.add_argument("--single-file", action="store_true",
                        help="only compare converting from one LDM-layout fp16 .safetensors with the folder")
    parser.add_argument("--build-folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--build-single-file", type=Path, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--validate-component", nargs=2, metavar=("COMPONENT", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--program-stats", type=Path, nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    variant = XL if args.xl else SD
    from coreml_sd.converter.quiet import quiet_libraries

    quiet_libraries()
    if args.build_folder:
        build_model_folder(args.build_folder, variant, args.small)
        return 0
    if args.build_single_file:
        build_single_file(*args.build_single_file)
        return 0
    if args.validate_component:
        component, folder = args.validate_component
        print(json.dumps(validate_component(Path(folder), component)))
        return 0
    if args.program_stats:
        from coreml_sd.converter.conversion.program_stats import program_stats

        print(json.dumps([program_stats(path) for path in args.program_stats]))
        return 0
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    with tempfile.TemporaryDirectory(prefix="bench-convert-") as temporary:
        output = args.output or Path(temporary)
        if args.single_file:
            report = {"size": "small" if args.small else "full", "load_average_before": list(os.getloadavg()),
                      **single_file_runs(variant, model_folder(variant, args.small, args.cache), args.cache, output,
                                         args.small),
                      "targets_enforced": not args.small}
            report["load_average_after"] = list(os.getloadavg())
            report["all_targets_met"] = all(c["met"] for c in report["checks"])
        else:
            report = benchmark(variant, args.small, args.cache, output, baseline)
    print_checks(report["checks"])
    print(json.dumps(report, indent=2))
    return 0 if report["all_targets_met"] or args.small else 1


if __name__ == "__main__":
    sys.exit(main())
