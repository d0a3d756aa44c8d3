"""coreml-convert: convert a diffusers Stable Diffusion model into Core ML packages."""
import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from .errors import ConversionError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from .ane import ATTENTION_IMPLEMENTATIONS
    from .families import FAMILIES
    from .palettize import NBITS_CHOICES

    parser = argparse.ArgumentParser(
        prog="coreml-convert",
        description="Convert a Stable Diffusion model (alias, Hugging Face id or local diffusers folder) "
        "into Core ML packages for the Neural Engine, in packages/<name>/.",
    )
    parser.add_argument("--model", help="alias (see --list-models), Hugging Face id, local diffusers folder, or 'tiny'")
    parser.add_argument("--revision", help="Hugging Face revision (branch, tag or commit)")
    parser.add_argument("-o", "--output", type=Path, help="package folder (default: packages/<model name>)")
    families = "; ".join(f"{f.description}: {','.join(f.default_components)} of {','.join(f.components)}" for f in FAMILIES)
    parser.add_argument("--components", help=f"comma-separated (default: the model family's; {families})")
    parser.add_argument("--attention-implementation", default=ATTENTION_IMPLEMENTATIONS[0], choices=ATTENTION_IMPLEMENTATIONS,
                        help="split_einsum suits the Neural Engine, original the GPU (default: %(default)s)")
    parser.add_argument("--height", type=int, help="image height in pixels, a multiple of 64 (default: the model's)")
    parser.add_argument("--width", type=int, help="image width in pixels, a multiple of 64 (default: the model's)")
    parser.add_argument("--unet-batch-size", type=int, default=2, choices=(1, 2),
                        help="2 runs classifier-free guidance in one Unet call; 1 in two (default: %(default)s)")
    parser.add_argument("--quantize-nbits", type=int, choices=NBITS_CHOICES,
                        help="store the text encoders' and Unet's weights as 2^N-entry palettes "
                        "(at 6 bits they take 6/16 of their float16 size; default: float16)")
    parser.add_argument("--force", action="store_true", help="convert components again even if up to date")
    parser.add_argument("--no-validate", action="store_true",
                        help="skip checking each component against the original with the reference executor")
    parser.add_argument("--validate-only", type=Path, metavar="FOLDER",
                        help="check an existing package folder against its original model and print a table")
    parser.add_argument("--list-models", action="store_true", help="list the model aliases and exit")
    return parser.parse_args(argv)


def quiet_libraries() -> None:
    """The libraries warn at import about things that don't matter here (untested torch versions,
    missing macOS frameworks, optional image backends); the stage lines are the progress report."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_models:
        from .sources import list_models

        for name, origin in list_models():
            print(f"{name:<14} {origin}")
        return 0
    if args.validate_only:
        quiet_libraries()
        return validate_only(args.validate_only)
    if not args.model:
        print("error: --model is required (e.g. --model tiny, --model sd-v1-4; see --list-models)", file=sys.stderr)
        return 2
    quiet_libraries()
    from .conversion import ConversionOptions, convert_model

    options = ConversionOptions(
        model=args.model,
        output=args.output,
        revision=args.revision,
        components=None if args.components is None else tuple(c.strip() for c in args.components.split(",") if c.strip()),
        attention_implementation=args.attention_implementation,
        height=args.height,
        width=args.width,
        unet_batch_size=args.unet_batch_size,
        quantize_nbits=args.quantize_nbits,
        force=args.force,
        validate=not args.no_validate,
    )
    try:
        report = convert_model(options)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished components were kept, nothing half-written", file=sys.stderr)
        return 130
    print_summary(report)
    return 0


def validate_only(folder: Path) -> int:
    from .conversion import validate_package
    from .validate import PSNR_THRESHOLD_DB

    try:
        results = validate_package(folder)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{'component':<12} {'PSNR (dB)':>10} {'max abs error':>14}  result (threshold {PSNR_THRESHOLD_DB:.0f} dB)")
    failed = 0
    for component, result in results.items():
        passed = result["psnr_db"] >= PSNR_THRESHOLD_DB
        failed += not passed
        quantized = (f"  {result['quantize_nbits']}-bit palettes: {result['unquantized_psnr_db']:.1f} dB against the "
                     "unquantized original") if "quantize_nbits" in result else ""
        print(f"{component:<12} {result['psnr_db']:>10.1f} {result['max_abs_error']:>14.3g}  {'ok' if passed else 'FAILED'}{quantized}")
    return 1 if failed else 0


def print_summary(report) -> None:
    import json

    manifest = json.loads((report.folder / "manifest.json").read_text())
    print(f"{report.folder}: {manifest['attention_implementation']}, {manifest['width']}x{manifest['height']}")
    for name, entry in manifest["components"].items():
        size = sum(f.stat().st_size for f in (report.folder / entry["file"]).rglob("*") if f.is_file())
        inputs = ", ".join(f"{k} {tuple(v['shape'])} {v['dtype']}" for k, v in entry["inputs"].items())
        outputs = ", ".join(f"{k} {tuple(v['shape'])} {v['dtype']}" for k, v in entry["outputs"].items())
        print(f"  {entry['file']:<22} {size / 2**20:8.1f} MiB  {inputs} -> {outputs}")


if __name__ == "__main__":
    sys.exit(main())
