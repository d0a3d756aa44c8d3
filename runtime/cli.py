"""`coreml-generate "prompt"`: images from a converted package, written as PNGs with their settings."""
import contextlib
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

import click
from click.shell_completion import CompletionItem

from . import images
from .backends import BACKENDS, COMPUTE_UNITS
from .clip_skip import check_clip_skip
from .commandline import CONTEXT_SETTINGS, run_command, shared_options
from .conditioning import SizeConditioning
from .control import check_control, control_requests, parse_preprocess
from .errors import GenerationError
from .generation_options import check_options, random_seed
from .infotext import generation_options, read_png_parameters
from .inpaint_stage import DEFAULT_PADDING, INPAINT_AREAS
from .inpainting import DEFAULT_MASK_BLUR, open_mask, open_with_alpha
from .package import PACKAGES_ENV
from .pipeline import PROMPT_SYNTAXES, Pipeline
from .sampler_names import A1111_SAMPLERS
from .schedulers import SCHEDULERS, TIMESTEP_SPACINGS, check_steps, schedule_options, scheduler_names
from .upscaling import DEFAULT_STRENGTH, ModelUpscaler, Upscale

DEFAULT_OUTPUT = Path("outputs")
OTHER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


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


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{'warning' if record.levelno >= logging.WARNING else 'note'}: {record.getMessage()}"


@contextlib.contextmanager
def _console_logging():
    """Our warnings as `warning: ...` lines and our notes (a model compiled once) as `note: ...`; coremltools'
    import-time notices (untested torch version, no Core ML framework off macOS) are not the user's concern here."""
    ours, coremltools = logging.getLogger("coreml_sd.runtime"), logging.getLogger("coremltools")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ConsoleFormatter())
    ours.addHandler(handler)
    ours.propagate = False
    ours_level, coremltools_level = ours.level, coremltools.level
    ours.setLevel(logging.INFO)
    coremltools.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ours.removeHandler(handler)
        ours.propagate = True
        ours.setLevel(ours_level)
        coremltools.setLevel(coremltools_level)


def _complete_scheduler(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[CompletionItem]:
    return [CompletionItem(name) for name in scheduler_names() if name.startswith(incomplete)]


def _list_schedulers(ctx: click.Context, _parameter: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"ours: {', '.join(SCHEDULERS)}")
    click.echo("AUTOMATIC1111's (as diffusers maps them):")
    for name, named in A1111_SAMPLERS.items():
        options = ", ".join(f"{key}={value!r}" for key, value in named.options.items())
        click.echo(f"  {name:<20} {named.scheduler.__name__}{f'({options})' if options else ''}")
    ctx.exit()


@click.command("coreml-generate", context_settings=CONTEXT_SETTINGS)
@click.argument("prompt", required=False)
@click.option("--negative-prompt", default="", help="What the image should not show.")
@click.option("--prompt-syntax", type=click.Choice(PROMPT_SYNTAXES), default="a1111", show_default=True,
              help="How prompts are weighted: AUTOMATIC1111's (word:1.3), [word], BREAK; or compel's word++, "
              "(word)1.3, blend and and (needs pip install 'coreml-sd[compel]').")
@click.option("--clip-skip", type=int, default=1, show_default=True, metavar="N",
              help="Read the prompt from the text encoder's Nth layer from the end, as the web UI's Clip skip (2: the "
              "penultimate, what anime-style models are made for; SDXL: diffusers' clip_skip N-1). The package holds "
              "the layers up to coreml-convert --clip-skip-layers (default 2).")
@click.option("--from-png", metavar="FILE", help="Reuse a picture's parameters (prompt, negative prompt, steps, "
              "sampler, CFG scale, seed, size, clip skip) as coreml-generate or AUTOMATIC1111's web UI wrote them; "
              "options given override them.")
@click.option("--model", help=f"Package name under ./packages (or ${PACKAGES_ENV}) or a package folder; may be left "
              "out when there is only one package.")
@click.option("--steps", type=int, help="Denoising steps (default: the package's recommendation, else 50).")
@click.option("--guidance-scale", type=float, help="Classifier-free guidance; at 1 or less none, and the Unet runs "
              "once per step (default: the package's recommendation, else 7.5).")
@click.option("--scheduler", metavar="NAME", shell_complete=_complete_scheduler,
              help="Ours or AUTOMATIC1111's sampler name, e.g. 'DPM++ 2M Karras' (see --list-schedulers). Default: "
              "the package's recommendation, else its own, else pndm.")
@click.option("--list-schedulers", is_flag=True, expose_value=False, is_eager=True, callback=_list_schedulers,
              help="List the scheduler names and exit.")
@click.option("--karras", is_flag=True, help="Karras sigmas, for the schedulers that take them.")
@click.option("--timestep-spacing", type=click.Choice(TIMESTEP_SPACINGS),
              help="How the steps are spread over the training timesteps (default: the package's scheduler config).")
@click.option("--seed", type=int, help="Random seed (default: a random one, printed).")
@click.option("--image", help="Start from this image (image-to-image).")
@click.option("--strength", type=float, help="With --image: how much to change it, 0 to 1 (default: 0.8; 1.0 when "
              "inpainting).")
@click.option("--mask", help="With --image: inpaint, redrawing only where this mask (of the image's size) is white "
              "(a mask with transparency: where it is opaque); without --mask, an image's transparent pixels are "
              "redrawn.")
@click.option("--mask-blur", type=int, default=DEFAULT_MASK_BLUR, show_default=True, metavar="PIXELS",
              help="Feather the mask's edge by a Gaussian of this standard deviation before compositing the result "
              "over the image.")
@click.option("--inpaint-area", type=click.Choice(INPAINT_AREAS), default="whole", show_default=True,
              help="masked: generate only the box around the mask at the package's size (or --width x --height) and "
              "paste it back (a hand in a 1024x1024 image with a 512x512 package).")
@click.option("--inpaint-padding", type=int, default=DEFAULT_PADDING, show_default=True, metavar="PIXELS",
              help="With --inpaint-area masked: the margin kept around the mask's box.")
@click.option("--num-images", type=int, default=1, show_default=True, help="Images from consecutive seeds.")
@click.option("--height", type=int, help="In pixels, a multiple of 8, at least the package's (default: the package's); "
              "larger sizes are denoised in overlapping windows of the package's size.")
@click.option("--width", type=int, help="In pixels, as --height (e.g. 1536 with --height 512 for a 3:1 panorama from a "
              "512x512 package).")
@click.option("--upscale", type=float, metavar="FACTOR", help="Hires: enlarge each image (or --image) FACTOR times, "
              "1 to 8, then refine it at that size in overlapping windows.")
@click.option("--upscale-strength", type=float, help="With --upscale: how much the refinement may change the "
              f"enlarged image, 0 to 1 (default: {DEFAULT_STRENGTH}).")
@click.option("--upscale-steps", type=int,
              help="With --upscale: steps of the refinement's schedule (default: --steps).")
@click.option("--upscaler", metavar="PATH", help="With --upscale: an ESRGAN-family .pth model to enlarge with instead "
              "of Lanczos (needs pip install 'coreml-sd[upscalers]').")
@click.option("--tile-overlap", type=int, metavar="PIXELS", help="How many pixels neighbouring windows share, a "
              "multiple of 8 (default: a quarter of the package's shorter side).")
@click.option("--original-size", type=(int, int), metavar="H W",
              help="SDXL: the original size the image is conditioned on, height and width (default: the package's).")
@click.option("--crop", type=(int, int), default=(0, 0), show_default=True, metavar="TOP LEFT",
              help="SDXL: the crop top-left coordinates the image is conditioned on.")
@click.option("--target-size", type=(int, int), metavar="H W",
              help="SDXL: the target size the image is conditioned on, height and width (default: the package's).")
@click.option("--refiner", metavar="PACKAGE",
              help="SDXL: an SDXL refiner package (name or folder) that denoises the end of the schedule.")
@click.option("--refiner-start", type=float, default=0.8, show_default=True,
              help="With --refiner: the fraction of the schedule the base runs before handing over.")
@click.option("--controlnet", "controlnets", multiple=True, metavar="NAME[:SCALE]",
              help="Steer the image with the package's ControlNet NAME (controlnet/NAME.mlpackage) at SCALE (default "
              "1) on the matching --control-image; repeatable, paired in order.")
@click.option("--control-image", "control_images", multiple=True, metavar="FILE",
              help="The control image (edge, pose or depth map) of the ControlNet given at the same place.")
@click.option("--control-preprocess", metavar="canny[:LOW:HIGH]",
              help="Turn each control image (an ordinary picture) into its Canny edge map first (default thresholds "
              "100:200).")
@click.option("--control-start", type=float, default=0.0, show_default=True,
              help="The fraction of the schedule after which the ControlNets start to act.")
@click.option("--control-end", type=float, default=1.0, show_default=True,
              help="The fraction of the schedule after which they stop.")
@click.option("-o", "--output", help=f"A .png file or a folder (default: {DEFAULT_OUTPUT}/, named after prompt and "
              "seed).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: Core ML on macOS, else the reference executor.")
@click.option("--compute-unit", type=click.Choice(COMPUTE_UNITS),
              help="Core ML compute units (default: CPU_AND_NE for split-einsum packages, CPU_AND_GPU for original "
              "attention, ALL when the package does not say).")
@click.option("--verify", is_flag=True, help="Check every model file's SHA-256 against the manifest before loading.")
@click.option("--reduce-memory", is_flag=True, help="Load each model only while its stage runs and unload it after "
              "(as the Swift package on iPhones): the peak is about the largest model's, and models load per image.")
@click.option("--safety-checker/--no-safety-checker", default=True,
              help="Run the package's safety checker, if it has one: flagged images are saved black "
              "[default: on; off is stated in the PNG].")
@click.option("--watermark/--no-watermark", default=True,
              help="Write Stable Diffusion's invisible watermark (see coreml-sd watermark) "
              "[default: on; off is stated in the PNG].")
@shared_options
def generate(from_png: str | None, **options) -> None:
    """Make images from a converted package and write them as PNGs with their settings."""
    start = time.perf_counter()
    with _console_logging():
        if from_png is not None:
            options = with_png_parameters(from_png, options)
        if options["prompt"] is None:
            raise click.UsageError("give a PROMPT, or --from-png FILE to reuse a picture's")
        paths = write_images(**options)
    click.echo(f"wrote {', '.join(map(str, paths))} in {time.perf_counter() - start:.1f} s")


def with_png_parameters(path: str, options: dict) -> dict:
    """`options` with the settings the picture at `path` carries in place of those not given on the command line."""
    ctx = click.get_current_context()
    settings = generation_options(read_png_parameters(path), path)
    given = {name for name in options if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE}
    return options | {name: value for name, value in settings.items() if name not in given}


def write_images(prompt: str, negative_prompt: str, model: str | None, steps: int | None, guidance_scale: float | None,
                 scheduler: str | None, karras: bool, timestep_spacing: str | None, prompt_syntax: str,
                 clip_skip: int, seed: int | None, image: str | None, strength: float | None,
                 mask: str | None, mask_blur: int, inpaint_area: str, inpaint_padding: int, num_images: int,
                 height: int | None, width: int | None, upscale: float | None, upscale_strength: float | None,
                 upscale_steps: int | None, upscaler: str | None, tile_overlap: int | None,
                 original_size: tuple[int, int] | None, crop: tuple[int, int], target_size: tuple[int, int] | None,
                 refiner: str | None, refiner_start: float, controlnets: tuple[str, ...],
                 control_images: tuple[str, ...], control_preprocess: str | None, control_start: float,
                 control_end: float, output: str | None, backend: str,
                 compute_unit: str | None, verify: bool, reduce_memory: bool, safety_checker: bool,
                 watermark: bool) -> list[Path]:
    try:  # the option checks that need no model are usage errors
        hires = hires_settings(upscale, upscale_strength, upscale_steps, upscaler is not None)
        if strength is not None and image is None:
            raise GenerationError("--strength applies to image-to-image only; add --image PATH or drop --strength")
        if image is not None and hires is not None and (strength is not None or width or height):
            raise GenerationError("--image with --upscale refines the enlarged image: its size follows the image, "
                                  "and --upscale-strength says how much it changes; drop --strength, --width, --height")
        if mask is not None and image is None:
            raise GenerationError("--mask needs the image it masks: add --image PATH")
        for name, pixels in (("--mask-blur", mask_blur), ("--inpaint-padding", inpaint_padding)):
            if pixels < 0:
                raise GenerationError(f"{name} must be at least 0 pixels, not {pixels}")
        check_clip_skip(clip_skip)
        check_options(scheduler, steps, 1.0 if strength is None else strength, num_images, seed, width, height, hires,
                      refiner_start)
        if controlnets or control_images:
            check_control(control_start, control_end)
            parse_preprocess(control_preprocess)
            if len(controlnets) != len(control_images):
                raise GenerationError(f"{len(controlnets)} --controlnet but {len(control_images)} --control-image: "
                                      "pass one control image per ControlNet, in the same order")
        if scheduler is not None:
            schedule_options(scheduler, timestep_spacing, karras)
            if steps is not None:
                check_steps(scheduler, steps)
    except GenerationError as error:
        raise click.UsageError(str(error)) from None
    if upscaler is not None:
        hires = Upscale(hires.factor, hires.strength, hires.steps, ModelUpscaler(upscaler))
    start_image = images.open_image(image) if image is not None else None
    masked_area = inpaint_area == "masked"
    inpainting = open_mask(mask, image, mask_blur, inpaint_padding if masked_area else None) if image else None
    if masked_area and inpainting is None:
        raise GenerationError("--inpaint-area masked inpaints: add --image and --mask")
    if masked_area and inpainting.empty:
        raise GenerationError("--inpaint-area masked needs a mask with white in it; the mask is black everywhere")
    if strength is None:
        strength = 1.0 if inpainting is not None else 0.8
    controls = control_requests(controlnets, control_images, control_preprocess,
                                lambda file: open_with_alpha(file, "--control-image"))
    if seed is None:
        seed = random_seed(num_images)
        click.echo(f"seed {seed} (random; pass --seed {seed} to make the same image again)")
    seeds = list(range(seed, seed + num_images))
    paths, grid = output_paths(output, prompt, seeds)

    loading = dict(backend=backend, compute_unit=compute_unit, verify=verify, reduce_memory=reduce_memory)
    pipe = Pipeline.from_package(model, **loading)
    refiner_pipe = Pipeline.from_package(refiner, **loading) if refiner else None
    result = pipe(
        prompt,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance_scale=guidance_scale,
        scheduler=scheduler,
        karras=karras,
        timestep_spacing=timestep_spacing,
        prompt_syntax=prompt_syntax,
        clip_skip=clip_skip,
        seed=seed,
        image=start_image,
        strength=strength,
        num_images=num_images,
        height=height,
        width=width,
        upscale=hires,
        overlap=tile_overlap,
        safety_checker=safety_checker,
        watermark=watermark,
        size_conditioning=SizeConditioning(original_size, crop, target_size),
        refiner=refiner_pipe,
        refiner_start=refiner_start,
        controls=controls,
        control_start=control_start,
        control_end=control_end,
        inpainting=inpainting,
    )
    for index, flagged in enumerate(result.nsfw_content_detected or []):
        if flagged:
            click.echo(f"image {index + 1} (seed {result.seeds[index]}) was flagged by the safety checker "
                       "and saved black")
    for picture, parameters, path in zip(result.images, result.parameters, paths):
        images.save_png(picture, path, parameters)
    if grid is not None:
        images.save_png(images.contact_sheet(result.images), grid)
        paths.append(grid)
    return paths


def hires_settings(factor: float | None, strength: float | None, steps: int | None, model: bool) -> Upscale | None:
    """The hires pass the options ask for (its model upscaler is loaded later), or None without --upscale."""
    if factor is None:
        given = [name for name, value in (("--upscale-strength", strength), ("--upscale-steps", steps),
                                          ("--upscaler", model or None)) if value is not None]
        if given:
            raise GenerationError(f"{', '.join(given)} applies to --upscale only; add --upscale FACTOR")
        return None
    return Upscale(factor, DEFAULT_STRENGTH if strength is None else strength, steps)


def main(argv: list[str] | None = None) -> int:
    return run_command(generate, argv)


@click.command("coreml-watermark", context_settings=CONTEXT_SETTINGS)
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@shared_options
def check_watermark(files: tuple[str, ...]) -> int:
    """Say whether each image carries Stable Diffusion's invisible watermark, and how many of its bits matched."""
    failed = False
    for file in files:
        try:
            click.echo(f"{file}: {watermark_report(images.open_image(file))}")
        except GenerationError as error:
            click.echo(f"Error: {error}", err=True)
            failed = True
    return 1 if failed else 0


def watermark_report(image) -> str:
    from . import watermark

    if not watermark.fits(image):
        return f"{image.width}x{image.height} is too small to carry the watermark (256x256 at least)"
    matches = [(watermark.matched_bits(image, known), known) for known in watermark.KNOWN_WATERMARKS]
    best, known = max(matches, key=lambda match: match[0] / len(match[1].bits))
    length = len(known.bits)
    verdict = "watermark" if best >= watermark.PRESENT_FRACTION * length else "no watermark"
    return f"{verdict} ({best}/{length} bits of {known.name} matched; {length // 2} by chance)"


def watermark_main(argv: list[str] | None = None) -> int:
    return run_command(check_watermark, argv)


if __name__ == "__main__":
    sys.exit(main())
