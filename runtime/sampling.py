"""The sampling stage: the scheduler's loop with classifier-free guidance over a package's Unet, run in windows of
its own size over latents of any size (tiling.py), and the random numbers it starts from.

The random numbers are Apple's: NumPy's legacy `RandomState(seed).randn` draws the initial noise (and, for
image-to-image, then the VAE sample), cast to float16, so a seed gives the image the Swift package gives.
"""
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from . import tiling
from .backends import Model
from .contract import VAE_FACTOR
from .package import Package
from .schedulers import build_scheduler, step_keywords
from .tiling import Layout, TiledNoise
from .upscaling import Upscaler


@dataclass(frozen=True)
class Sampling:
    """How each image is denoised; `strength` applies to image-to-image only."""

    scheduler: str
    steps: int
    guidance_scale: float
    strength: float


@dataclass(frozen=True)
class Pass:
    """One denoising run at `size` (width, height); with an image to start from, `upscaler` brings it to `size`
    (None: resized with a warning, as any image-to-image input of another size)."""

    size: tuple[int, int]
    sampling: Sampling
    upscaler: Upscaler | None = None


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



class Sampler:
    """A package's Unet and schedule: `denoise` runs a pass (text-to-image, image-to-image, or the first part of
    the schedule for a refiner), `refine` the rest of a schedule from given latents."""

    window_weights = staticmethod(tiling.feathered_weights)  # how the Unet windows' predictions are blended

    def __init__(self, unet: Model, package: Package):
        self.unet = unet
        self.package = package
        self.dtypes = {name: dtype for name, (_, dtype) in unet.input_description.items()}
        sample_shape = unet.input_description["sample"][0]
        self.batch_size = sample_shape[0]
        self.latent_channels = sample_shape[1]
        self.latent_window = tuple(sample_shape[2:])

    def denoise(
        self, conditioning: dict[str, np.ndarray], stage: Pass, seed: int, init_latents: np.ndarray | None,
        overlap: int, bar: Callable, end: float | None = None,
    ) -> torch.Tensor:
        """The latents after the pass's schedule (or, with `end`, its first `end` fraction: diffusers'
        denoising_end)."""
        sampling = stage.sampling
        scheduler = self.scheduler(sampling)
        rng = np.random.RandomState(seed)
        latent_size = (stage.size[1] // VAE_FACTOR, stage.size[0] // VAE_FACTOR)
        noise = torch.from_numpy(draw_noise(rng, (1, self.latent_channels, *latent_size)))
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
        return self._run(scheduler, timesteps, latents, conditioning, stage, seed, overlap, bar)

    def refine(self, latents: torch.Tensor, conditioning: dict[str, np.ndarray], stage: Pass, seed: int,
                start: float, overlap: int, bar: Callable) -> torch.Tensor:
        """The base's latents through the schedule after `start` of it (diffusers' denoising_start), no noise added."""
        scheduler = self.scheduler(stage.sampling)
        return self._run(scheduler, refiner_timesteps(scheduler, start), latents, conditioning, stage, seed, overlap,
                         bar)

    def scheduler(self, sampling: Sampling):
        scheduler = build_scheduler(sampling.scheduler, self.package.scheduler_config, self.package.prediction_type)
        scheduler.set_timesteps(sampling.steps)
        return scheduler

    def _run(self, scheduler, timesteps: torch.Tensor, latents: torch.Tensor, conditioning: dict[str, np.ndarray],
             stage: Pass, seed: int, overlap: int, bar: Callable) -> torch.Tensor:
        """The scheduler's steps over `timesteps`, the Unet run in windows of its own size over the latents."""
        step_kwargs = {"eta": 0.0, "generator": torch.Generator().manual_seed(seed)}
        step_kwargs = {key: value for key, value in step_kwargs.items() if key in step_keywords(scheduler)}
        guided_noise = partial(self._guided_noise, conditioning=conditioning,
                               guidance_scale=stage.sampling.guidance_scale)
        noise_prediction = TiledNoise(guided_noise, Layout(tuple(latents.shape[2:]), self.latent_window, overlap),
                                      windows_per_call=max(1, self.batch_size // 2), weights=self.window_weights)
        windows = len(noise_prediction.windows)
        description = f"{stage.size[0]}x{stage.size[1]}, {windows} windows x {len(timesteps)} steps"
        with bar(total=windows * len(timesteps), unit="window", postfix=description) as progress:
            for t in timesteps:
                model_input = scheduler.scale_model_input(latents, t).numpy()
                noise_pred = noise_prediction(model_input, float(t))
                latents = scheduler.step(torch.from_numpy(noise_pred), t, latents, **step_kwargs).prev_sample
                progress.update(windows)
        return latents

    def _guided_noise(self, samples: np.ndarray, t: float, conditioning: dict[str, np.ndarray],
                      guidance_scale: float) -> np.ndarray:
        """Classifier-free guidance for N window-sized samples: their 2N (unconditional, conditional) Unet inputs
        packed into as few calls of the Unet's batch size as they fill (one sample per call at batch 2)."""
        batch = self.batch_size
        pairs = len(samples)
        padding = -2 * pairs % batch  # the last call's empty places repeat its last input

        def batched(rows: np.ndarray) -> np.ndarray:
            return np.concatenate([rows, rows[-1:].repeat(padding, axis=0)])

        inputs = {"sample": batched(np.repeat(samples.astype(self.dtypes["sample"]), 2, axis=0)),
                  **{name: batched(np.concatenate([value] * pairs)) for name, value in conditioning.items()}}
        timestep = np.full((batch,), t, dtype=self.dtypes["timestep"])
        noise = np.concatenate([
            self.unet.predict({"timestep": timestep, **{name: value[i : i + batch] for name, value in inputs.items()}})[
                "noise_pred"]
            for i in range(0, len(inputs["sample"]), batch)
        ])[: 2 * pairs]
        uncond, cond = noise[0::2], noise[1::2]
        return uncond + guidance_scale * (cond - uncond)
