"""Text-to-image and image-to-image over a converted package, step for step as diffusers' SD pipelines.

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
from .package import Package, find_package, load_package
from .prompt import PromptEncoder
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


def denoising_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
    """The tail of the schedule that image-to-image runs: `int(steps * strength)` steps, as diffusers."""
    start = (steps - min(int(steps * strength), steps)) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def random_seed(num_images: int = 1) -> int:
    return secrets.randbelow(MAX_SEED + 2 - num_images)


def check_options(scheduler: str | None, steps: int, strength: float, num_images: int, seed: int | None) -> None:
    """The checks that need no model, so that a command line fails before any model loads."""
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
        self.prompt_encoder = PromptEncoder(package.vocab_file, package.merges_file, models["TextEncoder"],
                                            package.pad_token)
        unet_inputs = models["Unet"].input_description
        self.unet_dtypes = {name: dtype for name, (_, dtype) in unet_inputs.items()}
        sample_shape = unet_inputs["sample"][0]
        self.unet_batch_size = sample_shape[0]
        self.latent_shape = (1, *sample_shape[1:])
        self.height, self.width = sample_shape[2] * VAE_FACTOR, sample_shape[3] * VAE_FACTOR

    @classmethod
    def from_package(
        cls, package: str | Path | None = None, backend: str = "auto", compute_unit: str | None = None
    ) -> "Pipeline":
        """Load a package by folder path or by name under the packages root (see `coreml-generate --help`)."""
        loaded = load_package(find_package(None if package is None else str(package)))
        backend = resolve_backend(backend)
        compute_unit = compute_unit or default_compute_unit(loaded.attention_implementation)
        models = {
            name: load_model(loaded.component(name), backend, compute_unit)
            for name in ("TextEncoder", "Unet", "VAEDecoder")
        }
        return cls(loaded, models, backend, compute_unit)

    def _model(self, name: str) -> Model:
        if name not in self.models:
            self.models[name] = load_model(self.package.component(name), self.backend, self.compute_unit)
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
        progress: bool = True,
    ) -> GenerationResult:
        """`num_images` images from seeds seed, seed+1, ... (a random seed when None); with `image`, image-to-image
        that keeps `1 - strength` of it. `scheduler` is a name from `schedulers.SCHEDULERS`; `height`/`width`, when
        given, must be the package's. Raises GenerationError for anything the caller can fix."""
        scheduler = scheduler or default_scheduler_name(self.package.scheduler_config)
        check_options(scheduler, steps, strength, num_images, seed)
        self._check_size(height, width)
        if seed is None:
            seed = random_seed(num_images)
        init_latents = None
        if image is not None:
            encoder = self._model("VAEEncoder")
            pixels = images.to_encoder_input(images.open_image(image), (self.width, self.height))
            init_latents = encoder.predict({"x": pixels.astype(encoder.input_description["x"][1])})["latent"]

        sampling = Sampling(scheduler, steps, guidance_scale, strength)
        hidden = np.concatenate([self.prompt_encoder(negative_prompt), self.prompt_encoder(prompt)])
        hidden = hidden.astype(self.unet_dtypes["encoder_hidden_states"])
        settings = {"Steps": steps, "Sampler": scheduler, "CFG scale": guidance_scale}
        result = GenerationResult([], [], [])
        for index, image_seed in enumerate(range(seed, seed + num_images)):
            label = f"image {index + 1}/{num_images}" if num_images > 1 else "denoising"
            # disable=None: a bar on terminals only, so that logs and pipes stay clean
            bar = partial(tqdm, desc=label, unit="step", disable=None if progress else True, leave=False)
            result.images.append(self._decode(self._denoise(hidden, sampling, image_seed, init_latents, bar)))
            result.seeds.append(image_seed)
            image_settings = {**settings, "Seed": image_seed, "Size": f"{self.width}x{self.height}",
                              "Model": self.package.name}
            if image is not None:
                image_settings["Denoising strength"] = strength
            result.parameters.append(parameters_text(prompt, negative_prompt, image_settings))
        return result

    def _check_size(self, height: int | None, width: int | None) -> None:
        height, width = height or self.height, width or self.width
        if (height, width) != (self.height, self.width):
            raise GenerationError(
                f"package {self.package.name!r} makes {self.width}x{self.height} images (width x height), not "
                f"{width}x{height}; convert the model at that size (coreml-convert --width {width} --height {height})"
            )

    def _denoise(
        self, hidden: np.ndarray, sampling: Sampling, seed: int, init_latents: np.ndarray | None, bar: Callable
    ) -> torch.Tensor:
        scheduler = build_scheduler(sampling.scheduler, self.package.scheduler_config, self.package.prediction_type)
        scheduler.set_timesteps(sampling.steps)
        rng = np.random.RandomState(seed)
        noise = torch.from_numpy(draw_noise(rng, self.latent_shape))
        if init_latents is None:
            timesteps = scheduler.timesteps
            latents = noise * scheduler.init_noise_sigma
        else:
            timesteps = denoising_timesteps(scheduler, sampling.steps, sampling.strength)
            latents = torch.from_numpy(self._sample_latents(init_latents, rng))
            if len(timesteps):
                latents = scheduler.add_noise(latents, noise, timesteps[:1])
        step_kwargs = {"eta": 0.0, "generator": torch.Generator().manual_seed(seed)}
        step_kwargs = {key: value for key, value in step_kwargs.items() if key in step_keywords(scheduler)}
        for t in bar(timesteps):
            model_input = scheduler.scale_model_input(latents, t).numpy()
            noise_pred = self._guided_noise(model_input, float(t), hidden, sampling.guidance_scale)
            latents = scheduler.step(torch.from_numpy(noise_pred), t, latents, **step_kwargs).prev_sample
        return latents

    def _guided_noise(self, model_input: np.ndarray, t: float, hidden: np.ndarray, guidance_scale: float) -> np.ndarray:
        """Classifier-free guidance: one batch-2 Unet call (unconditional first), or two batch-1 calls."""
        unet = self.models["Unet"]
        sample = model_input.astype(self.unet_dtypes["sample"])
        batch = self.unet_batch_size
        timestep = np.full((batch,), t, dtype=self.unet_dtypes["timestep"])
        if batch == 2:
            inputs = {"sample": np.concatenate([sample, sample]), "timestep": timestep, "encoder_hidden_states": hidden}
            uncond, cond = np.split(unet.predict(inputs)["noise_pred"], 2)
        else:
            uncond, cond = (
                unet.predict({"sample": sample, "timestep": timestep, "encoder_hidden_states": hidden[i : i + 1]})["noise_pred"]
                for i in range(2)
            )
        return uncond + guidance_scale * (cond - uncond)

    def _sample_latents(self, moments: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        """A draw from the encoder's diagonal Gaussian (clamped log-variance as diffusers), times the scaling factor."""
        mean, log_variance = np.split(moments, 2, axis=1)
        std = np.exp(0.5 * np.clip(log_variance, -30.0, 20.0))
        return ((mean + std * draw_noise(rng, mean.shape)) * self.package.scaling_factor).astype(np.float32)

    def _decode(self, latents: torch.Tensor) -> Image.Image:
        decoder = self.models["VAEDecoder"]
        z = (latents.numpy() / self.package.scaling_factor).astype(decoder.input_description["z"][1])
        return images.to_pil(decoder.predict({"z": z})["image"])
