"""`coreml-generate "prompt"`: images from a converted package, written as PNGs with their settings."""
import argparse
import contextlib
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

from . import images
from .backends import BACKENDS, COMPUTE_UNITS
from .errors import GenerationError
from .package import PACKAGES_ENV
from .pipeline import Pipeline, check_options, random_seed
from .schedulers import SCHEDULERS

DEFAULT_OUTPUT = Path("outputs")
OTHER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of argparse's usage block
        self.exit(2, f"error: {message} (see coreml-generate --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="coreml-generate", description=__doc__)
    parser.add_argument("prompt", help="what the image shows")
    parser.add_argument("--negative-prompt", default="", help="what it should not show (default: none)")
    parser.add_argument(
        "--model",
        help=f"package name under ./packages (or ${PACKAGES_ENV}) or a package folder; "
        "may be left out when there is only one package",
    )
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default: 7.5)")
    parser.add_argument(
        "--scheduler", help=f"{', '.join(SCHEDULERS)} (default: the package's own, else pndm)"
    )
    parser.add_argument("--seed", type=int, help="random seed (default: a random one, printed)")
    parser.add_argument("--image", help="start from this image (image-to-image)")
    parser.add_argument(
        "--strength", type=float, help="with --image: how much to change it, 0 to 1 (default: 0.8)"
    )
    parser.add_argument("--num-images", type=int, default=1, help="images from consecutive seeds (default: 1)")
    parser.add_argument("--height", type=int, help="must match the package (default: the package's)")
    parser.add_argument("--width", type=int, help="must match the package (default: the package's)")
    parser.add_argument(
        "-o", "--output", help=f"a .png file or a folder (default: {DEFAULT_OUTPUT}/, named after prompt and seed)"
    )
    parser.add_argument("--backend", default="auto", choices=BACKENDS, help="auto: Core ML on macOS, else reference")
    parser.add_argument(
        "--compute-unit", choices=COMPUTE_UNITS,
        help="Core ML compute units (default: CPU_AND_NE for split-einsum packages, CPU_AND_GPU for original "
        "attention, ALL when the package does not say)",
    )
    return parser


def slug(prompt: str, length: int = 60) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:length].rstrip("-") or "image"


def _free_path(path: Path) -> Path:
    """`path`, or `path` with -2, -3, ... before the suffix when a file of that name exists."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


def output_paths(output: str | None, prompt: str, seeds: list[int]) -> tuple[list[Path], Path | None]:
    """Where the images (and the grid, for several) go; checks that the place is writable before any work."""
    if output is not None and Path(output).suffix.lower() in OTHER_IMAGE_SUFFIXES:
        raise GenerationError(f"images are written as PNG; give -o a .png name or a folder, not {output}")
    if output is not None and output.lower().endswith(".png"):
        file = Path(output)
        folder = file.parent
        if len(seeds) == 1:
            paths, grid = [file], None
        else:
            paths = [file.with_name(f"{file.stem}-{seed}.png") for seed in seeds]
            grid = file.with_name(f"{file.stem}-grid.png")
    else:
        folder = Path(output) if output is not None else DEFAULT_OUTPUT
        name = slug(prompt)
        paths = [_free_path(folder / f"{name}-{seed}.png") for seed in seeds]
        grid = _free_path(folder / f"{name}-{seeds[0]}-{seeds[-1]}-grid.png") if len(seeds) > 1 else None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise GenerationError(f"cannot write to {folder} ({exc.strerror or exc}); choose another -o") from None
    return paths, grid


@contextlib.contextmanager
def _console_logging():
    """Our warnings as `warning: ...` lines; coremltools' import-time notices (untested torch version, no
    Core ML framework off macOS) are not the user's concern here."""
    ours, coremltools = logging.getLogger("coreml_sd.runtime"), logging.getLogger("coremltools")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    ours.addHandler(handler)
    ours.propagate = False
    coremltools_level = coremltools.level
    coremltools.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ours.removeHandler(handler)
        ours.propagate = True
        coremltools.setLevel(coremltools_level)


def generate(args: argparse.Namespace) -> list[Path]:
    if args.strength is not None and args.image is None:
        raise GenerationError("--strength applies to image-to-image only; add --image PATH or drop --strength")
    strength = 0.8 if args.strength is None else args.strength
    check_options(args.scheduler, args.steps, strength, args.num_images, args.seed)
    image = images.open_image(args.image) if args.image is not None else None
    if args.seed is None:
        args.seed = random_seed(args.num_images)
        print(f"seed {args.seed} (random; pass --seed {args.seed} to make the same image again)")
    seeds = list(range(args.seed, args.seed + args.num_images))
    paths, grid = output_paths(args.output, args.prompt, seeds)

    pipe = Pipeline.from_package(args.model, backend=args.backend, compute_unit=args.compute_unit)
    result = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        scheduler=args.scheduler,
        seed=args.seed,
        image=image,
        strength=strength,
        num_images=args.num_images,
        height=args.height,
        width=args.width,
    )
    for picture, parameters, path in zip(result.images, result.parameters, paths):
        images.save_png(picture, path, parameters)
    if grid is not None:
        images.save_png(images.contact_sheet(result.images), grid)
        paths.append(grid)
    return paths


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        with _console_logging():
            paths = generate(args)
    except GenerationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(f"wrote {', '.join(map(str, paths))} in {time.perf_counter() - start:.1f} s")
    return 0
