"""Text-to-image and image-to-image over a converted package, step for step as diffusers' SD and SDXL pipelines,
and SDXL's base + refiner ensemble (the refiner takes the latents for the end of the schedule).

The pipeline composes the stages: conditioning (conditioning.py), the VAE encoder for image-to-image, sampling
(sampling.py) and the refiner (refiner.py), the VAE decoder (both tiled, tiling.py), the safety checker (safety.py)
and the watermark (watermark.py); a hires pass (upscaling.py) runs the denoising stages again on the enlarged image.
"""
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import images, tiling
from . import watermark as watermarks
from .backends import Model, release, resolve_backend
from .components import load_component, unguided_unet
from .conditioning import SizeConditioning, conditioning_for
from .contract import CONTROLLED_UNET, CONTROLNET_PREFIX, SAFETY_CHECKER, VAE_DECODER, VAE_ENCODER, VAE_FACTOR
from .control import Control, ControlRequest, check_control, control_settings
from .errors import GenerationError
from .generation_options import check_options, random_seed
from .infotext import parameters_text
from .inpaint_stage import InpaintStage, check_inpainting
from .inpainting import Inpainting
from .package import Package, find_package, load_package
from .recommended import choose, consistency_distilled, warn_unless_distilled
from .refiner import refinement_for
from .safety import SafetyChecker
from .sampler_names import sampler_fields
from .sampling import Pass, Sampler, Sampling, StepHook
from .schedulers import check_steps, schedule_options
from .upscaling import Upscale

logger = logging.getLogger("coreml_sd.runtime")
OUTPUT_TYPES = ("pil", "latent")
PROMPT_SYNTAXES = ("a1111", "compel")
UNGUIDED_UNET = "unguided Unet"  # the stage name of the Unet's batch-1 function, where the package has one


@dataclass
class GenerationResult:
    images: list[Image.Image]  # or (1, 4, h, w) latent tensors, for output_type="latent"
    seeds: list[int]
    parameters: list[str]  # per image, the settings as text in the format other SD tools write into PNGs
    nsfw_content_detected: list[bool] | None = None  # per image, as diffusers; None when no checker ran


class Pipeline:
    """A package's models behind diffusers-like calls:

        pipe = Pipeline.from_package("packages/tiny")
        image = pipe("a photo of an astronaut riding a horse", seed=1).images[0]
        wide = pipe("a mountain range at dawn", width=1536, height=512).images[0]   # on a 512x512 package
        large = pipe("a castle", upscale=Upscale(2)).images[0]                      # 1024x1024

    Sizes beyond the package's are denoised in overlapping Unet windows and decoded in VAE tiles (see tiling.py).
    With `reduce_memory`, each model is loaded only while its stage runs and unloaded after it, as the Swift
    package does on iPhones: the peak is about the largest model's, at the cost of loading each model per image.
    """

    def __init__(self, package: Package, models: dict[str, Model], backend: str, compute_unit: str | None,
                 reduce_memory: bool = False):
        self.package = package
        self.models = models
        self.backend = backend
        self.compute_unit = compute_unit  # as asked; None: each component's own (see components.compute_unit_of)
        self.reduce_memory = reduce_memory
        self.conditioning = conditioning_for(package, models)
        self.unguided_unet = unguided_unet(package, backend, compute_unit)
        self._compel = {}  # per clip skip, built when a prompt in compel's syntax first comes
        self.sampler = Sampler(models[package.unet_name], package, self.unguided_unet)
        self.unet_batch_size = self.sampler.batch_size
        self.latent_window = self.sampler.latent_window
        self.height, self.width = (side * VAE_FACTOR for side in self.latent_window)
        # a quarter of the window's shorter side: a 512x512 package's windows share 16 latent (128 image) pixels
        self.default_overlap = min(self.latent_window) // 4 * VAE_FACTOR

    @classmethod
    def from_package(
        cls, package: str | Path | None = None, backend: str = "auto", compute_unit: str | None = None,
        verify: bool = False, reduce_memory: bool = False,
    ) -> "Pipeline":
        """Load a package by folder path or by name under the packages root (see `coreml-generate --help`); with
        `verify`, every model file's SHA-256 is checked against the manifest first; with `reduce_memory`, no model
        is loaded before its stage runs."""
        loaded = load_package(find_package(None if package is None else str(package)), verify)
        backend = resolve_backend(backend)
        models = {name: load_component(loaded, name, backend, compute_unit, reduce_memory)
                  for name in loaded.required_components}
        return cls(loaded, models, backend, compute_unit, reduce_memory)

    def model(self, name: str) -> Model:
        if name not in self.models:
            self.models[name] = load_component(self.package, name, self.backend, self.compute_unit, self.reduce_memory)
        return self.models[name]

    @contextmanager
    def stage(self, *names: str) -> Iterator[None]:
        """A stage that runs these models; with `reduce_memory`, they are unloaded when it ends."""
        try:
            yield
        finally:
            if self.reduce_memory:
                for name in names:
                    model = self.unguided_unet if name == UNGUIDED_UNET else self.models.get(name)
                    if model is not None:
                        release(model)

    def __call__(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: str | None = None,
        timestep_spacing: str | None = None,
        karras: bool = False,
        prompt_syntax: str = "a1111",
        clip_skip: int = 1,
        seed: int | None = None,
        image: str | Path | Image.Image | None = None,
        strength: float = 0.8,
        num_images: int = 1,
        height: int | None = None,
        width: int | None = None,
        upscale: Upscale | None = None,
        overlap: int | None = None,
        output_type: str = "pil",
        size_conditioning: SizeConditioning = SizeConditioning(),
        refiner: "Pipeline | None" = None,
        refiner_start: float = 0.8,
        controls: list[ControlRequest] = (),
        control_start: float = 0.0,
        control_end: float = 1.0,
        inpainting: Inpainting | None = None,
        progress: bool = True,
        safety_checker: bool = True,
        watermark: bool = True,
        on_step: StepHook | None = None,
    ) -> GenerationResult:
        """`num_images` images from seeds seed, seed+1, ... (a random seed when None); with `image`, image-to-image
        that keeps `1 - strength` of it. `scheduler` is one of `schedulers.scheduler_names()` (ours or the web
        UI's); it, `steps` and `guidance_scale` default to the package's recommendation (recommended.py), else its
        own scheduler, 50 and 7.5; at guidance 1 or below the Unet runs on the prompt alone, once per window and
        step. `timestep_spacing` and `karras` change the schedule where the scheduler has those settings. `clip_skip`
        N reads the prompt from N - 1 layers before the last the family conditions with (see clip_skip.py).
        `height`/`width` (default: the package's) may be any multiples of 8 at least the package's; with `upscale`, each
        image is then enlarged and refined (with `image`, the image itself is). `overlap`: image pixels that
        neighbouring windows share (default: a quarter of the package's shorter side). SDXL packages take
        `size_conditioning` (original size, crop, target size; default: the image's size and (0, 0)); with an SDXL
        `refiner` pipeline, this one runs the first `refiner_start` of the schedule and the refiner the rest, as
        diffusers' base + refiner ensemble. `controls` steer the Unet with the package's ControlNets, each on its
        control image, over [`control_start`, `control_end`) of the schedule. With `image` and `inpainting`
        (`inpainting.open_mask`), only the mask's white part is redrawn (of the whole picture, or of the box around the
        mask with its `padding`) and the result composited over the image (inpaint_stage.py). The
        package's safety checker, if it has one, blackens flagged images (`safety_checker=False` skips it);
        `watermark=False` leaves out the invisible watermark. `on_step` is called after every denoising step (see
        sampling.StepHook). Raises GenerationError for anything the caller can fix."""
        package = self.package
        choice = choose(package.recommended, package.scheduler_config, scheduler, steps, guidance_scale)
        scheduler, steps, guidance_scale = choice.scheduler, choice.steps, choice.guidance_scale
        self._check_call(scheduler, steps, strength, num_images, seed, width, height, upscale, refiner_start,
                         output_type)
        schedule_options(scheduler, timestep_spacing, karras)
        check_steps(scheduler, steps, package.scheduler_config)
        if prompt_syntax not in PROMPT_SYNTAXES:
            raise GenerationError(f"prompt_syntax must be one of {', '.join(PROMPT_SYNTAXES)}, not {prompt_syntax!r}")
        for pipe in (self, refiner):
            if pipe is not None:
                pipe.check_clip_skip(clip_skip)
        if choice.from_package:
            logger.info(choice.describe())
        warn_unless_distilled(scheduler, consistency_distilled(package.recommended, package.scheduler_config,
                                                               self.sampler.guidance_embedding), package.name)
        refinement = refinement_for(self, refiner, refiner_start, upscale)
        overlap = self._overlap(overlap)
        start = None if image is None else images.open_image(image)
        sampling = Sampling(scheduler, steps, guidance_scale, strength, timestep_spacing, karras)
        passes = self._passes(sampling, (width, height), start, upscale)
        inpaint = None
        if inpainting is not None:
            check_inpainting(start, passes[0].size, refiner is not None or upscale is not None,
                             (self.width, self.height) if self.sampler.takes_mask else None)
            if inpainting.empty:
                return GenerationResult([start] * num_images, [seed or 0] * num_images, [""] * num_images)
            inpaint = InpaintStage.prepare(inpainting, start, passes[0].size)
            start = inpaint.source
        if self.sampler.takes_mask and inpainting is None:
            raise GenerationError(f"package {self.package.name!r} has an inpainting Unet: pass --image and --mask "
                                  "(white = redraw)")
        control = self._control(controls, control_start, control_end) if controls else None
        sampler = self._controlled_sampler() if control is not None else self.sampler
        denoisers = (sampler.name, UNGUIDED_UNET, *(CONTROLNET_PREFIX + request.name for request in controls))
        if seed is None:
            seed = random_seed(num_images)

        first_size = passes[0].size[1], passes[0].size[0]
        with self.stage(*self.package.contract.text_encoders):
            conditioning = self.condition(prompt, negative_prompt, size_conditioning, first_size, prompt_syntax,
                                          clip_skip)
        refinement.condition(prompt, negative_prompt, size_conditioning, first_size, prompt_syntax, clip_skip)
        start_latents = None if start is None else self._encode(start, passes[0], overlap)
        masked_moments = None
        if inpaint is not None and self.sampler.takes_mask:
            masked_moments = self._encode(inpaint.redraw.masked_pixels(start), passes[0], overlap)
        # The safeguards, in the order Stable Diffusion's scripts apply them: safety check, then watermark.
        checker = self._safety_checker() if safety_checker and output_type == "pil" else None
        safeguard_settings = {
            **({"Safety checker": "off"} if not safety_checker and SAFETY_CHECKER in self.package.components else {}),
            **({} if watermark else {"Watermark": "off"}),
        }
        watermark = watermark and output_type == "pil" and self._watermark_fits(passes[-1].size)
        decoder = refinement.decoder
        result = GenerationResult([], [], [], [] if checker is not None else None)
        for index, image_seed in enumerate(range(seed, seed + num_images)):
            label = f"image {index + 1}/{num_images}" if num_images > 1 else "denoising"
            # disable=None: a bar on terminals only, so that logs and pipes stay clean
            bar = partial(tqdm, desc=label, disable=None if progress else True, leave=False)
            picture, init_latents = None, start_latents
            for number, stage in enumerate(passes):
                if number > 0:  # a hires pass: the previous pass's image, enlarged
                    init_latents = self._encode(picture, stage, overlap)
                with self.stage(*denoisers):
                    latents = sampler.denoise(conditioning, stage, image_seed, init_latents, overlap, bar,
                                              refinement.base_end, on_step, control,
                                              inpaint and inpaint.redraw.latent_mask(), masked_moments)
                latents = refinement(latents, stage, image_seed, overlap, bar, on_step)
                if output_type == "pil" or number < len(passes) - 1:
                    with decoder.stage(VAE_DECODER):
                        picture = decoder.decode(latents, overlap)
            if checker is not None:
                with self.stage(SAFETY_CHECKER):
                    picture, flagged = checker(picture)
                result.nsfw_content_detected.append(flagged)
            if watermark:
                picture = watermarks.apply(picture, self.package.watermark)
            if inpaint is not None and output_type == "pil":  # after the watermark: the kept pixels stay exact
                picture = inpaint.finish(picture)
            result.images.append(picture if output_type == "pil" else latents)
            result.seeds.append(image_seed)
            settings = {**self._settings(passes, image_seed, overlap, start is not None, upscale),
                        **refinement.settings, **control_settings(controls, control_start, control_end),
                        **(inpaint.settings if inpaint is not None else {}),
                        **({"Prompt syntax": prompt_syntax} if prompt_syntax != "a1111" else {}),
                        **({"Clip skip": clip_skip} if clip_skip != 1 else {}),
                        **safeguard_settings}
            result.parameters.append(parameters_text(prompt, negative_prompt, settings))
        return result

    def _check_call(self, scheduler: str, steps: int, strength: float, num_images: int, seed: int | None,
                    width: int | None, height: int | None, upscale: Upscale | None, refiner_start: float,
                    output_type: str) -> None:
        check_options(scheduler, steps, strength, num_images, seed, width, height, upscale, refiner_start)
        training_steps = self.package.scheduler_config.get("num_train_timesteps", 1000)
        for name, count in (("--steps", steps), ("--upscale-steps", upscale and upscale.steps)):
            if count and count > training_steps:
                raise GenerationError(f"{name} must be at most {training_steps}, the model's training timesteps, "
                                      f"not {count}")
        if output_type not in OUTPUT_TYPES:
            raise GenerationError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, not {output_type!r}")

    def check_clip_skip(self, clip_skip: int) -> None:
        """GenerationError unless every text encoder holds the layer `clip_skip` reads."""
        for encoder in self.conditioning.encoders:
            encoder.layers.output(clip_skip)

    def condition(self, prompt: str, negative_prompt: str, size: SizeConditioning, image_size: tuple[int, int],
                  prompt_syntax: str = "a1111", clip_skip: int = 1) -> dict[str, np.ndarray]:
        """The Unet's conditioning inputs for the guidance batch, in the Unet's dtypes."""
        if prompt_syntax == "compel":
            from .compel_prompts import CompelConditioning

            if clip_skip not in self._compel:
                self._compel[clip_skip] = CompelConditioning(self.conditioning, clip_skip)
            inputs = self._compel[clip_skip](prompt, negative_prompt, size, image_size)
        else:
            inputs = self.conditioning(prompt, negative_prompt, size, image_size, clip_skip)
        return {name: value.astype(self.sampler.dtypes[name]) for name, value in inputs.items()}

    def _controlled_sampler(self) -> Sampler:
        """The sampler over the package's ControlledUnet, which takes the ControlNets' residuals."""
        if CONTROLLED_UNET not in self.package.components:
            raise GenerationError(f"package {self.package.name!r} has no ControlledUnet, so it cannot run ControlNets; "
                                  "convert the model with coreml-convert --controlnet ID_OR_PATH")
        return Sampler(self.model(CONTROLLED_UNET), self.package, name=CONTROLLED_UNET)

    def _control(self, controls: list[ControlRequest], start: float, end: float) -> Control:
        """The control stage: each named ControlNet with its scale and its control image (each pass resizes it to
        its own size and cuts it into its Unet windows)."""
        check_control(start, end)
        models = [self.model(CONTROLNET_PREFIX + request.name) for request in controls]
        return Control(models, [request.scale for request in controls], [request.image for request in controls],
                       start, end)

    def _safety_checker(self) -> SafetyChecker | None:
        if SAFETY_CHECKER not in self.package.components:
            return None
        return SafetyChecker(self.model(SAFETY_CHECKER), self.package.feature_extractor)

    @staticmethod
    def _watermark_fits(size: tuple[int, int]) -> bool:
        if size[0] * size[1] < watermarks.MIN_PIXELS:
            logger.warning("%dx%d images are too small for the invisible watermark (256x256 at least): saved "
                           "without it", *size)
            return False
        return True

    def _overlap(self, overlap: int | None) -> int:
        """The windows' overlap in latent pixels, from image pixels."""
        overlap = self.default_overlap if overlap is None else overlap
        window = min(self.latent_window) * VAE_FACTOR
        if overlap % VAE_FACTOR or not 0 <= overlap < window:
            raise GenerationError(
                f"--tile-overlap must be a multiple of {VAE_FACTOR} in [0, {window}) pixels, not {overlap}"
            )
        return overlap // VAE_FACTOR

    def _checked_size(self, size: tuple[int, int], what: str) -> tuple[int, int]:
        if size[0] < self.width or size[1] < self.height:
            raise GenerationError(
                f"{what} {size[0]}x{size[1]} (width x height) is smaller than package {self.package.name!r}'s "
                f"{self.width}x{self.height}; its models run at that size or, in overlapping tiles, larger"
            )
        return size

    def _passes(
        self, sampling: Sampling, size: tuple[int | None, int | None], start: Image.Image | None,
        upscale: Upscale | None
    ) -> list[Pass]:
        """The denoising runs for one image: the generation (or image-to-image), then the hires pass."""
        size = self._checked_size((size[0] or self.width, size[1] or self.height), "the size")
        if upscale is None:
            return [Pass(size, sampling)]
        detail = replace(sampling, steps=upscale.steps or sampling.steps, strength=upscale.strength)
        if start is None:
            return [Pass(size, sampling), Pass(upscale.size(size), detail, upscale.upscaler)]
        return [Pass(self._checked_size(upscale.size(start.size), "the upscaled image"), detail, upscale.upscaler)]

    def _settings(
        self, passes: list[Pass], seed: int, overlap: int, from_image: bool, upscale: Upscale | None
    ) -> dict[str, object]:
        """What the PNG records, in the names other SD tools write."""
        first, last = passes[0].sampling, passes[-1]
        settings = {"Steps": first.steps, **sampler_fields(first.scheduler, first.karras),
                    **({"Timestep spacing": first.timestep_spacing} if first.timestep_spacing else {}),
                    "CFG scale": first.guidance_scale, "Seed": seed, "Size": "{}x{}".format(*last.size),
                    "Model": self.package.name}
        if from_image or upscale is not None:
            settings["Denoising strength"] = last.sampling.strength
        if upscale is not None:
            if not from_image:
                settings["First pass size"] = "{}x{}".format(*passes[0].size)
            settings.update({"Hires upscale": f"{upscale.factor:g}", "Hires steps": last.sampling.steps,
                             "Hires upscaler": upscale.upscaler.name})
        if any(stage.size != (self.width, self.height) for stage in passes):
            settings["Tile overlap"] = overlap * VAE_FACTOR
        return settings

    def _encode(self, picture: Image.Image | np.ndarray, stage: Pass, overlap: int) -> np.ndarray:
        """The VAE encoder's moments for `picture` (or pixels in [-1, 1] at the pass's size) brought to the pass's
        size, in tiles when it is larger."""
        if stage.upscaler is not None:
            picture = stage.upscaler(picture, stage.size)
        encoder = self.model(VAE_ENCODER)
        dtype = encoder.input_description["x"][1]
        window = tuple(side // VAE_FACTOR for side in encoder.input_description["x"][0][2:])
        pixels = picture if isinstance(picture, np.ndarray) else images.to_encoder_input(picture, stage.size)
        with self.stage(VAE_ENCODER):
            return tiling.tiled_encode(lambda x: encoder.predict({"x": x.astype(dtype)})["latent"], pixels, window,
                                       overlap)

    def decode(self, latents: torch.Tensor, overlap: int) -> Image.Image:
        decoder = self.models[VAE_DECODER]
        shape, dtype = decoder.input_description["z"]
        z = latents.numpy() / self.package.scaling_factor
        return images.to_pil(tiling.tiled_decode(lambda tile: decoder.predict({"z": tile.astype(dtype)})["image"], z,
                                                 tuple(shape[2:]), overlap))
