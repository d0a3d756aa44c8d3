"""Text-to-image and image-to-image over a converted package, step for step as diffusers' SD and SDXL pipelines,
and SDXL's base + refiner ensemble (the refiner takes the latents for the end of the schedule).

The random numbers are Apple's: NumPy's legacy `RandomState(seed).randn` draws the initial noise (and, for
image-to-image, then the VAE sample), cast to float16, so a seed gives the image the Swift package gives.
"""
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import images
from .backends import Model, default_compute_unit, load_model, resolve_backend
from .errors import GenerationError
from .conditioning import SizeConditioning, conditioning_for
from .package import Package, find_package, load_package
from .schedulers import build_scheduler, default_scheduler_name, scheduler_class, step_keywords

VAE_FACTOR = 8
MAX_SEED = 2**32 - 1  # RandomState's seed range


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    parameters: list[str]  # per image, the settings as text in the format other SD tools write into PNGs


@dataclass(frozen=True)
class Sampling:
    """How each image is denoised; `strength` applies to image-to-image only."""

    scheduler: str
    steps: int
    guidance_scale: float
    strength: float


def draw_noise(rng: np.random.RandomState, shape: tuple[int, ...]) -> np.ndarray:
    return rng.randn(*shape).astype(np.float16).astype(np.float32)


def sample_encoder_latents(moments: np.ndarray, rng: np.random.RandomState, scaling_factor: float) -> np.ndarray:
    """A draw from the VAE encoder's diagonal Gaussian (log-variance clamped as diffusers), times the scaling
    factor; its noise comes from `rng` after the initial noise, as in Apple's pipeline."""
    mean, log_variance = np.split(moments, 2, axis=1)
    std = np.exp(0.5 * np.clip(log_variance, -30.0, 20.0))
    return ((mean + std * draw_noise(rng, mean.shape)) * scaling_factor).astype(np.float32)


def timestep_cutoff(scheduler, fraction: float) -> int:
    """The training timestep at which `fraction` of the schedule is done, as diffusers' denoising_end/_start."""
    train_steps = scheduler.config.num_train_timesteps
    return int(round(train_steps - fraction * train_steps))


def refiner_timesteps(scheduler, start: float) -> torch.Tensor:
    """The tail of the schedule after `start` of it, as diffusers' SDXL img2img with `denoising_start`."""
    count = int((scheduler.timesteps < timestep_cutoff(scheduler, start)).sum())
    if scheduler.order == 2 and count % 2 == 0:  # never stop between a second-order step's two halves
        count += 1
    begin = len(scheduler.timesteps) - count
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return scheduler.timesteps[begin:]


def denoising_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """The tail of the schedule that image-to-image runs: `int(steps * strength)` steps, as diffusers."""
    start = (steps - min(int(steps * strength), steps)) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def random_seed(num_images: int = 1) -> int:
    return secrets.randbelow(MAX_SEED + 2 - num_images)


def check_options(scheduler: str | None, steps: int, strength: float, num_images: int, seed: int | None,
                  refiner_start: float = 0.8) -> None:
    """The checks that need no model, so that a command line fails before any model loads."""
    if not 0 < refiner_start < 1:
        raise GenerationError(f"--refiner-start must be between 0 and 1 (the fraction of the schedule the base runs), not {refiner_start}")
    if scheduler is not None:
        scheduler_class(scheduler)
    if steps < 1:
        raise GenerationError(f"--steps must be at least 1, not {steps}")
    if not 0 <= strength <= 1:
        raise GenerationError(f"--strength must be in [0, 1], not {strength}")
    if num_images < 1:
        raise GenerationError(f"--num-images must be at least 1, not {num_images}")
    last_seed = MAX_SEED + 1 - num_images
    if seed is not None and not 0 <= seed <= last_seed:
        raise GenerationError(f"--seed must be in [0, {last_seed}] for {num_images} image(s), not {seed}")


def parameters_text(prompt: str, negative_prompt: str, settings: dict[str, object]) -> str:
    lines = [prompt] + ([f"Negative prompt: {negative_prompt}"] if negative_prompt else [])
    return "\n".join(lines + [", ".join(f"{key}: {value}" for key, value in settings.items())])


def load_component(package: Package, name: str, backend: str, compute_unit: str | None) -> Model:
    """A component on the compute units asked for, else where its manifest says it runs (a float32 VAE:
    CPU_AND_GPU), else where its attention implementation runs best."""
    units = compute_unit or package.compute_units.get(name) or default_compute_unit(package.attention_implementation)
    return load_model(package.component(name), backend, units)


class Pipeline:
    """A package's models behind diffusers-like calls:

        pipe = Pipeline.from_package("packages/tiny")
        image = pipe("a photo of an astronaut riding a horse", seed=1).images[0]
    """

    def __init__(self, package: Package, models: dict[str, Model], backend: str, compute_unit: str):
        self.package = package
        self.models = models
        self.backend = backend
        self.compute_unit = compute_unit
        self.conditioning = conditioning_for(package, models)
        self.unet = models[package.unet_name]
        unet_inputs = self.unet.input_description
        self.unet_dtypes = {name: dtype for name, (_, dtype) in unet_inputs.items()}
        sample_shape = unet_inputs["sample"][0]
        self.unet_batch_size = sample_shape[0]
        self.latent_shape = (1, *sample_shape[1:])
        self.height, self.width = sample_shape[2] * VAE_FACTOR, sample_shape[3] * VAE_FACTOR

    @classmethod
    def from_package(
        cls, package: str | Path | None = None, backend: str = "auto", compute_unit: str | None = None,
        verify: bool = False,
    ) -> "Pipeline":
        """Load a package by folder path or by name under the packages root (see `coreml-generate --help`); with
        `verify`, every model file's SHA-256 is checked against the manifest first."""
        loaded = load_package(find_package(None if package is None else str(package)), verify)
        backend = resolve_backend(backend)
        models = {name: load_component(loaded, name, backend, compute_unit) for name in loaded.required_components}
        return cls(loaded, models, backend, compute_unit)

    def _model(self, name: str) -> Model:
        if name not in self.models:
            self.models[name] = load_component(self.package, name, self.backend, self.compute_unit)
        return self.models[name]

    def __call__(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        steps: int = 50,
        guidance_scale: float = 7.5,
        scheduler: str | None = None,
        seed: int | None = None,
        image: str | Path | Image.Image | None = None,
        strength: float = 0.8,
        num_images: int = 1,
        height: int | None = None,
        width: int | None = None,
        size_conditioning: SizeConditioning = SizeConditioning(),
        refiner: "Pipeline | None" = None,
        refiner_start: float = 0.8,
        progress: bool = True,
    ) -> GenerationResult:
        """`num_images` images from seeds seed, seed+1, ... (a random seed when None); with `image`, image-to-image
        that keeps `1 - strength` of it. `scheduler` is a name from `schedulers.SCHEDULERS`; `height`/`width`, when
        given, must be the package's. SDXL packages take `size_conditioning` (original size, crop, target size;
        default: the image's size and (0, 0)); with an SDXL `refiner` pipeline, this one runs the first
        `refiner_start` of the schedule and the refiner the rest, as diffusers' base + refiner ensemble.
        Raises GenerationError for anything the caller can fix."""
        scheduler = scheduler or default_scheduler_name(self.package.scheduler_config)
        check_options(scheduler, steps, strength, num_images, seed, refiner_start)
        training_steps = self.package.scheduler_config.get("num_train_timesteps", 1000)
        if steps > training_steps:
            raise GenerationError(f"--steps must be at most {training_steps}, the model's training timesteps, "
                                  f"not {steps}")
        self._check_size(height, width)
        if refiner is not None:
            self._check_refiner(refiner)
        if seed is None:
            seed = random_seed(num_images)
        init_latents = None
        if image is not None:
            encoder = self._model("VAEEncoder")
            pixels = images.to_encoder_input(images.open_image(image), (self.width, self.height))
            init_latents = encoder.predict({"x": pixels.astype(encoder.input_description["x"][1])})["latent"]

        sampling = Sampling(scheduler, steps, guidance_scale, strength)
        conditioning = self._conditioning(prompt, negative_prompt, size_conditioning)
        refiner_conditioning = None
        settings = {"Steps": steps, "Sampler": scheduler, "CFG scale": guidance_scale}
        if refiner is not None:
            refiner_conditioning = refiner._conditioning(prompt, negative_prompt, size_conditioning)
            settings.update({"Refiner": refiner.package.name, "Refiner start": refiner_start})
        result = GenerationResult([], [], [])
        for index, image_seed in enumerate(range(seed, seed + num_images)):
            label = f"image {index + 1}/{num_images}" if num_images > 1 else "denoising"
            # disable=None: a bar on terminals only, so that logs and pipes stay clean
            bar = partial(tqdm, desc=label, unit="step", disable=None if progress else True, leave=False)
            end = refiner_start if refiner is not None else None
            latents = self._denoise(conditioning, sampling, image_seed, init_latents, bar, end)
            if refiner is not None:
                latents = refiner._refine(latents, refiner_conditioning, sampling, image_seed, refiner_start, bar)
            result.images.append((refiner or self)._decode(latents))
            result.seeds.append(image_seed)
            image_settings = {**settings, "Seed": image_seed, "Size": f"{self.width}x{self.height}",
                              "Model": self.package.name}
            if image is not None:
                image_settings["Denoising strength"] = strength
            result.parameters.append(parameters_text(prompt, negative_prompt, image_settings))
        return result

    def _conditioning(self, prompt: str, negative_prompt: str, size: SizeConditioning) -> dict[str, np.ndarray]:
        """The Unet's conditioning inputs for the guidance batch, in the Unet's dtypes."""
        inputs = self.conditioning(prompt, negative_prompt, size, (self.height, self.width))
        return {name: value.astype(self.unet_dtypes[name]) for name, value in inputs.items()}

    def _check_size(self, height: int | None, width: int | None) -> None:
        height, width = height or self.height, width or self.width
        if (height, width) != (self.height, self.width):
            raise GenerationError(
                f"package {self.package.name!r} makes {self.width}x{self.height} images (width x height), not "
                f"{width}x{height}; convert the model at that size (coreml-convert --width {width} --height {height})"
            )

    def _check_refiner(self, refiner: "Pipeline") -> None:
        if refiner.package.family != "sdxl-refiner" or self.package.family != "sdxl":
            raise GenerationError(
                f"--refiner takes an SDXL refiner package for an SDXL base package; {refiner.package.name!r} is "
                f"{refiner.package.family!r} and {self.package.name!r} is {self.package.family!r}")
        if refiner.latent_shape != self.latent_shape:
            raise GenerationError(
                f"refiner {refiner.package.name!r} makes {refiner.width}x{refiner.height} images, the base "
                f"{self.width}x{self.height}; convert both at the same size")

    def _denoise(
        self, conditioning: dict[str, np.ndarray], sampling: Sampling, seed: int, init_latents: np.ndarray | None,
        bar: Callable, end: float | None = None,
    ) -> torch.Tensor:
        """The latents after the schedule (or, with `end`, its first `end` fraction: diffusers' denoising_end)."""
        scheduler = self._scheduler(sampling)
        rng = np.random.RandomState(seed)
        noise = torch.from_numpy(draw_noise(rng, self.latent_shape))
        if init_latents is None:
            timesteps = scheduler.timesteps
            latents = noise * scheduler.init_noise_sigma
        else:
            timesteps = denoising_timesteps(scheduler, sampling.steps, sampling.strength)
            latents = torch.from_numpy(sample_encoder_latents(init_latents, rng, self.package.scaling_factor))
            if len(timesteps):
                latents = scheduler.add_noise(latents, noise, timesteps[:1])
        if end is not None:
            timesteps = timesteps[timesteps >= timestep_cutoff(scheduler, end)]
        return self._run(scheduler, timesteps, latents, conditioning, sampling, seed, bar)

    def _refine(self, latents: torch.Tensor, conditioning: dict[str, np.ndarray], sampling: Sampling, seed: int,
                start: float, bar: Callable) -> torch.Tensor:
        """The base's latents through the schedule after `start` of it (diffusers' denoising_start), no noise added."""
        scheduler = self._scheduler(sampling)
        return self._run(scheduler, refiner_timesteps(scheduler, start), latents, conditioning, sampling, seed, bar)

    def _scheduler(self, sampling: Sampling):
        scheduler = build_scheduler(sampling.scheduler, self.package.scheduler_config, self.package.prediction_type)
        scheduler.set_timesteps(sampling.steps)
        return scheduler

    def _run(self, scheduler, timesteps: torch.Tensor, latents: torch.Tensor, conditioning: dict[str, np.ndarray],
             sampling: Sampling, seed: int, bar: Callable) -> torch.Tensor:
        step_kwargs = {"eta": 0.0, "generator": torch.Generator().manual_seed(seed)}
        step_kwargs = {key: value for key, value in step_kwargs.items() if key in step_keywords(scheduler)}
        for t in bar(timesteps):
            model_input = scheduler.scale_model_input(latents, t).numpy()
            noise_pred = self._guided_noise(model_input, float(t), conditioning, sampling.guidance_scale)
            latents = scheduler.step(torch.from_numpy(noise_pred), t, latents, **step_kwargs).prev_sample
        return latents

    def _guided_noise(self, model_input: np.ndarray, t: float, conditioning: dict[str, np.ndarray],
                      guidance_scale: float) -> np.ndarray:
        """Classifier-free guidance: one batch-2 Unet call (unconditional first), or two batch-1 calls."""
        sample = model_input.astype(self.unet_dtypes["sample"])
        batch = self.unet_batch_size
        timestep = np.full((batch,), t, dtype=self.unet_dtypes["timestep"])
        if batch == 2:
            inputs = {"sample": np.concatenate([sample, sample]), "timestep": timestep, **conditioning}
            uncond, cond = np.split(self.unet.predict(inputs)["noise_pred"], 2)
        else:
            uncond, cond = (
                self.unet.predict({"sample": sample, "timestep": timestep,
                                   **{name: value[i : i + 1] for name, value in conditioning.items()}})["noise_pred"]
                for i in range(2)
            )
        return uncond + guidance_scale * (cond - uncond)

    def _decode(self, latents: torch.Tensor) -> Image.Image:
        decoder = self.models["VAEDecoder"]
        z = (latents.numpy() / self.package.scaling_factor).astype(decoder.input_description["z"][1])
        return images.to_pil(decoder.predict({"z": z})["image"])
