"""coreml-convert: convert a diffusers Stable Diffusion model into Core ML packages."""
import json
import sys
from pathlib import Path

import click

from coreml_sd.runtime.commandline import CONTEXT_SETTINGS, run_command, shared_options
from coreml_sd.runtime.contract import MANIFEST_FILE
from coreml_sd.runtime.errors import Interrupted

from .ane import ATTENTION_IMPLEMENTATIONS
from .compression import NBITS_CHOICES
from .families import FAMILIES
from .quiet import quiet_libraries
from .sources.checkpoint_configs import MODEL_TYPES, NOT_YET, PREDICTION_TYPES

SINGLE_FILE_MODEL_TYPES = (*MODEL_TYPES, *NOT_YET)


def list_models(ctx: click.Context, _, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from .sources import list_models as aliases  # see convert()

    for name, origin in aliases():
        click.echo(f"{name:<14} {origin}")
    ctx.exit()


@click.command("coreml-convert", context_settings=CONTEXT_SETTINGS)
@click.option("--model", help="Alias (see --list-models), Hugging Face id, local diffusers folder, single-file "
              "checkpoint (.safetensors/.ckpt, converted offline), or a built-in model (tiny, tiny-xl, "
              "tiny-xl-refiner).")
@click.option("--revision", help="Hugging Face revision (branch, tag or commit).")
@click.option("--model-type", type=click.Choice(SINGLE_FILE_MODEL_TYPES),
              help="Single files: what the checkpoint is (default: inferred from its tensors, and printed).")
@click.option("--prediction-type", type=click.Choice(PREDICTION_TYPES),
              help="Single files: what the Unet predicts (default: the checkpoint's hints; SD 2.x: v_prediction, "
              "768x768).")
@click.option("--config", "config_folder", type=click.Path(path_type=Path, file_okay=False),
              help="Single files: a diffusers folder whose configs to use instead of the shipped SD 1.x/2.x ones.")
@click.option("--lora", "loras", multiple=True, metavar="PATH[:SCALE]",
              help="Merge a LoRA (kohya/LoCon or diffusers/PEFT) into the Unet and text encoder: a file, or a Hugging "
              "Face id ORG/NAME[:FILE][:SCALE] (e.g. latent-consistency/lcm-lora-sdv1-5, downloaded once and "
              "then read from the cache); repeatable.")
@click.option("--embedding", "embeddings", multiple=True, metavar="PATH[:TOKEN]",
              help="Add a textual-inversion embedding (A1111, kohya, diffusers) as TOKEN (letters only; k vectors: "
              "TOKEN, TOKENb, ...); one id for every BPE tokenizer of the package, Swift's included; repeatable.")
@click.option("--controlnet", "controlnets", multiple=True, metavar="ID_OR_PATH",
              help="Also convert this ControlNet (diffusers ControlNetModel: Hugging Face id or folder; or one "
              ".safetensors/.pth file as model sites publish them, e.g. control_v11p_sd15_canny) into "
              "controlnet/<Name>.mlpackage, and the ControlledUnet that takes its residuals; repeatable.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Package folder (default: packages/<model name>).")
@click.option("--components", help="Comma-separated (default: the model family's; " + "; ".join(
    f"{f.description}: {','.join(f.default_components)} of {','.join(f.components)}" for f in FAMILIES) + ").")
@click.option("--attention-implementation", type=click.Choice(ATTENTION_IMPLEMENTATIONS),
              default=ATTENTION_IMPLEMENTATIONS[0], show_default=True,
              help="split_einsum suits the Neural Engine, original the GPU.")
@click.option("--height", type=int, help="Image height in pixels, a multiple of 64 (default: the model's).")
@click.option("--width", type=int, help="Image width in pixels, a multiple of 64 (default: the model's).")
@click.option("--unet-batch-size", type=click.Choice([1, 2]),
              help="2 runs classifier-free guidance in one Unet call; 1 in two, and sampling without guidance in one "
              "(default: 1 for models made to sample without guidance, such as sd-turbo; else 2).")
@click.option("--unguided-function", is_flag=True,
              help="Also store the Unet at batch 1, as function 'unguided' of the same package (weights stored once): "
              "sampling without guidance runs it once per step, guided sampling and Apple's Swift package run the "
              "batch-2 default function. Needs macOS 15 / iOS 18.")
@click.option("--max-prompt-chunks", type=int, default=1, show_default=True, metavar="K",
              help="Let the Unet (and ControlNets) take prompts of up to K 77-token chunks (A1111's long prompts): "
              "K > 1 adds a function per length, tokens_154 ... tokens_<77K>, to the same package (weights stored "
              "once); Apple's Swift package runs the 77-token default function. Needs macOS 15 / iOS 18.")
@click.option("--shared-controlled-unet", is_flag=True,
              help="With --controlnet: store the ControlledUnet as functions 'controlled' (and "
              "'controlled_tokens_154', ...) of Unet.mlpackage, the weights once, instead of a second package "
              "ControlledUnet.mlpackage that holds them again. coreml-generate and apps that load by function name "
              "run it; Apple's Swift package does not (no --bundle-resources). Needs macOS 15 / iOS 18.")
@click.option("--guidance-embedding", is_flag=True,
              help="LCM checkpoints whose Unet embeds the guidance scale (time_cond_proj_dim): convert it with the "
              "extra input timestep_cond, which coreml-generate feeds and Apple's Swift package does not.")
@click.option("--clip-skip-layers", type=int, metavar="K",
              help="The TextEncoder also outputs the layers coreml-generate --clip-skip 2 to K reads (default: 2, "
              "the penultimate; the web UI goes up to 12); Apple's Swift package reads its usual output only.")
@click.option("--recommend", multiple=True, metavar="NAME=VALUE",
              help="Record a sampling setting coreml-generate uses by default: scheduler=lcm, steps=4, "
              "guidance-scale=1 (known few-step models and LoRAs record theirs); repeatable.")
@click.option("--quantize-nbits", type=click.Choice(NBITS_CHOICES),
              help="Store the text encoders' and Unet's weights as 2^N-entry palettes (at 6 bits they take 6/16 "
              "of their float16 size; default: float16).")
@click.option("--quantize-recipe", metavar="FILE.json[:NAME]",
              help="Palettize each Unet layer at the bits an Apple mixed-bit recipe gives it (the JSON that "
              "ml-stable-diffusion's mixed_bit_compression_pre_analysis writes; NAME picks one of its recipes).")
@click.option("--quantize-bits", type=float, metavar="AVERAGE",
              help="Analyse the Unet's sensitivity (as --mixed-bit-analysis) and palettize it with the recipe of "
              "this many bits per weight on average (1 to 16, e.g. 4.5), in one command; the recipes are written to "
              "mixed_bit_recipes.json in the package folder.")
@click.option("--mixed-bit-analysis", type=click.Path(path_type=Path, dir_okay=False), metavar="OUT.json",
              help="Only analyse the Unet's sensitivity to palettes (a few minutes on a laptop, no conversion) and "
              "write mixed-bit recipes of 2.5 to 6.5 bits per weight in Apple's format, for --quantize-recipe "
              "OUT.json:NAME.")
@click.option("--quantize-granularity", metavar="per-tensor|per-grouped-channel[:GROUP]",
              help="With --quantize-nbits: one palette per weight (default), or one per GROUP output channels "
              "(default 16; iOS 18 / macOS 15).")
@click.option("--quantize-linear", metavar="int8|int4[:BLOCK]",
              help="Store the text encoders' and Unet's weights as 8- or 4-bit integers with a scale per output "
              "channel, or per BLOCK input channels (int4 and blocks: iOS 18 / macOS 15).")
@click.option("--min-target", metavar="iOS16|iOS17|iOS18",
              help="The packages' minimum deployment target (or macOS13..macOS15; default: iOS16, raised to what the "
              "compression needs).")
@click.option("--safety-checker", metavar="PATH_OR_ID",
              help="With SafetyChecker in --components: convert this folder's or Hugging Face id's safety checker "
              "(e.g. CompVis/stable-diffusion-safety-checker) instead of the model's own, for models that carry none.")
@click.option("--vae", metavar="PATH_OR_ID",
              help="Convert this VAE instead of the model's own: a diffusers VAE folder or Hugging Face id (e.g. "
              "madebyollin/sdxl-vae-fp16-fix); it computes in float16 (an SDXL model's own VAE computes in float32).")
@click.option("--chunk-unet", is_flag=True,
              help="Split the Unet into UnetChunk1 and UnetChunk2 of about half its weights each (iPhone/iPad: "
              "each under 1 GB for SD 1.x), chained as Apple's Swift package chains them.")
@click.option("--bundle-resources", is_flag=True,
              help="Also write Resources/ in the package folder, as Apple's Swift package loads it: .mlmodelc "
              "compiled with xcrun coremlcompiler on a Mac, the .mlpackage files for Xcode to compile elsewhere.")
@click.option("--force", is_flag=True, help="Convert components again even if up to date.")
@click.option("--no-validate", is_flag=True,
              help="Skip checking each component against the original with the reference executor.")
@click.option("--validate-only", type=click.Path(path_type=Path), metavar="FOLDER",
              help="Check an existing package folder against its original model and print a table.")
@click.option("--catalogue", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="Convert and validate every model x variant of a catalogue (.toml) as Ray tasks (needs "
              "coreml-sd[cluster]); writes catalogue.json beside the packages.")
@click.option("--ray-address", metavar="auto|HOST:PORT",
              help="With --catalogue: run on this Ray cluster (default: a local Ray instance on this machine).")
@click.option("--max-parallel", type=int, help="With --catalogue: at most this many tasks at once (default: as "
              "many as the nodes' CPUs and memory hold).")
@click.option("--dry-run", is_flag=True, help="With --catalogue: print the tasks and the memory each reserves.")
@click.option("--verbose", is_flag=True, help="Show the libraries' own progress bars and warnings too.")
@click.option("--list-models", is_flag=True, expose_value=False, is_eager=True, callback=list_models,
              help="List the model aliases and exit.")
@shared_options
def convert(model: str | None, revision: str | None, model_type: str | None, prediction_type: str | None,
            config_folder: Path | None, loras: tuple[str, ...], embeddings: tuple[str, ...],
            controlnets: tuple[str, ...], output: Path | None, components: str | None,
            attention_implementation: str, height: int | None, width: int | None, unet_batch_size: int | None,
            unguided_function: bool, max_prompt_chunks: int, shared_controlled_unet: bool, guidance_embedding: bool,
            clip_skip_layers: int | None, recommend: tuple[str, ...],
            quantize_nbits: int | None, quantize_recipe: str | None, quantize_bits: float | None,
            mixed_bit_analysis: Path | None, quantize_granularity: str | None,
            quantize_linear: str | None, min_target: str | None, safety_checker: str | None, vae: str | None,
            chunk_unet: bool,
            bundle_resources: bool, force: bool, no_validate: bool, validate_only: Path | None,
            catalogue: Path | None, ray_address: str | None, max_parallel: int | None, dry_run: bool,
            verbose: bool) -> int:
    """Convert a Stable Diffusion model (alias, Hugging Face id, local diffusers folder or single-file checkpoint),
    with any LoRAs and embeddings merged, into Core ML packages for the Neural Engine, in packages/<name>/."""
    if not verbose:
        quiet_libraries()
    if catalogue or ray_address or max_parallel or dry_run:
        return convert_catalogue(catalogue, ray_address, max_parallel, dry_run, model or output or validate_only)
    if validate_only:
        return validate_folder(validate_only)
    if not model:
        raise click.UsageError("--model is required (e.g. --model tiny, --model sd-v1-4; see --list-models)")
    # The converting libraries load here, when a command runs: after quiet_libraries() has silenced their
    # import-time warnings, and never for --help.
    from .conversion import ConversionOptions, convert_model

    options = ConversionOptions(
        model=model,
        output=output,
        revision=revision,
        model_type=model_type,
        prediction_type=prediction_type,
        config=config_folder,
        loras=loras,
        embeddings=embeddings,
        controlnets=controlnets,
        components=None if components is None else tuple(c.strip() for c in components.split(",") if c.strip()),
        attention_implementation=attention_implementation,
        height=height,
        width=width,
        unet_batch_size=unet_batch_size,
        recommend=recommend,
        unguided_function=unguided_function,
        max_prompt_chunks=max_prompt_chunks,
        shared_controlled_unet=shared_controlled_unet,
        guidance_embedding=guidance_embedding,
        clip_skip_layers=clip_skip_layers,
        quantize_nbits=quantize_nbits,
        quantize_recipe=quantize_recipe,
        quantize_bits=quantize_bits,
        quantize_granularity=quantize_granularity,
        quantize_linear=quantize_linear,
        min_target=min_target,
        safety_checker=safety_checker,
        vae=vae,
        chunk_unet=chunk_unet,
        bundle_resources=bundle_resources,
        force=force,
        validate=not no_validate,
        verbose=verbose,
    )
    if mixed_bit_analysis:
        from .conversion.mixed_bit_analysis import write_mixed_bit_analysis

        click.echo(write_mixed_bit_analysis(options, mixed_bit_analysis))
        return 0
    try:
        report = convert_model(options)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: finished components were kept, nothing half-written") from None
    print_summary(report)
    return 0


def convert_catalogue(catalogue: Path | None, ray_address: str | None, max_parallel: int | None, dry_run: bool,
                      single_model_options: object) -> int:
    if catalogue is None:
        raise click.UsageError("--ray-address, --max-parallel and --dry-run go with --catalogue FILE")
    if single_model_options:
        raise click.UsageError("--catalogue names its models and output root itself: leave out --model, -o and "
                               "--validate-only")
    from .catalogue.run import run_catalogue  # Ray, an extra: see convert()

    return run_catalogue(catalogue, ray_address, max_parallel, dry_run)


def validate_folder(folder: Path) -> int:
    from .conversion import validate_package  # see convert()
    from .conversion.validate import PSNR_THRESHOLD_DB

    results = validate_package(folder)
    rows = [(name, result) for component, checked in results.items()  # a multifunction model: each function
            for name, result in ((component, checked), *((f"{component}:{function}", value) for function, value
                                                         in checked.get("functions", {}).items()))]
    width = max(12, *(len(name) for name, _ in rows))
    click.echo(f"{'component':<{width}} {'PSNR (dB)':>10} {'max abs error':>14}  "
               f"result (threshold {PSNR_THRESHOLD_DB:.0f} dB)")
    failed = 0
    for component, result in rows:
        passed = result["psnr_db"] >= PSNR_THRESHOLD_DB
        failed += not passed
        palettes = (f"{result['quantize_nbits']}-bit palettes" if "quantize_nbits" in result
                    else f"{result['quantize_linear']['dtype']} weights" if "quantize_linear" in result
                    else f"recipe {result.get('quantize_recipe')}")
        quantized = (f"  {palettes}: {result['unquantized_psnr_db']:.1f} dB against the unquantized original"
                     if "unquantized_psnr_db" in result else "")
        click.echo(f"{component:<{width}} {result['psnr_db']:>10.1f} {result['max_abs_error']:>14.3g}  "
                   f"{'ok' if passed else 'FAILED'}{quantized}")
    return 1 if failed else 0


def print_summary(report) -> None:
    manifest = json.loads((report.folder / MANIFEST_FILE).read_text())
    click.echo(f"{report.folder}: {manifest['attention_implementation']}, {manifest['width']}x{manifest['height']}")
    for name, entry in manifest["components"].items():
        size = sum(f.stat().st_size for f in (report.folder / entry["file"]).rglob("*") if f.is_file())
        inputs = ", ".join(f"{k} {tuple(v['shape'])} {v['dtype']}" for k, v in entry["inputs"].items())
        outputs = ", ".join(f"{k} {tuple(v['shape'])} {v['dtype']}" for k, v in entry["outputs"].items())
        click.echo(f"  {entry['file']:<22} {size / 2**20:8.1f} MiB  {inputs} -> {outputs}")
    if report.bundle is not None:
        click.echo(f"{report.bundle}: {', '.join(sorted(p.name for p in report.bundle.iterdir()))}")


def main(argv: list[str] | None = None) -> int:
    return run_command(convert, argv)


if __name__ == "__main__":
    sys.exit(main())
