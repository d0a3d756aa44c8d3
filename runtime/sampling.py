"""The sampling stage: the scheduler's loop with classifier-free guidance over a package's Unet, run in windows of
its own size over latents of any size (tiling.py), and the random numbers it starts from.

The random numbers are Apple's: NumPy's legacy `RandomState(seed).randn` draws the initial noise (and, for
image-to-image, then the VAE sample), cast to float16, so a seed gives the image the Swift package gives.
"""
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from . import tiling
from .backends import Model
from .contract import LATENT_CHANNELS, RESIDUAL_PREFIX, VAE_FACTOR
from .control import Control, PassControl
from .inpainting import LatentBlend
from .package import Package
from .schedulers import build_scheduler, step_keywords
from .tiling import Layout, TiledNoise
from .upscaling import Upscaler

logger = logging.getLogger("coreml_sd.runtime")
GUIDANCE_EMBEDDING = "timestep_cond"  # an LCM Unet's input: the guidance scale's embedding (see Sampler)
# Called after each denoising step with (steps done, steps in the pass, the latents); returning True ends the pass
# there, its latents decoded as they are (a server's interrupt and skip); raising aborts the generation.
StepHook = Callable[[int, int, torch.Tensor], bool]


@dataclass(frozen=True)
class Sampling:
    """How each image is denoised; `strength` applies to image-to-image only."""

    scheduler: str
    steps: int
    guidance_scale: float
    strength: float
    timestep_spacing: str | None = None  # None: the scheduler configuration's
    karras: bool = False


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
    """A package's Unet and schedule: `denoise` runs a pass (text-to-image, image-to-image, inpainting, or the first
    part of the schedule for a refiner), `refine` the rest of a schedule from given latents.

    With guidance above 1 each step runs the Unet on (unconditional, conditional) pairs; at 1 or below, as
    diffusers, on the conditional input alone: through `unguided_unet` where the package has one (a batch-1
    function of a multifunction Unet), else through the Unet itself, which at batch 1 then runs once per step
    and at batch 2 takes two windows per call. A Unet that takes LCM's guidance embedding (`timestep_cond`)
    is never run with guidance: the scale goes into the embedding, as in diffusers' LCM pipeline. A ControlledUnet
    takes its ControlNets' residuals, which the control stage computes for every Unet call.
    """

    window_weights = staticmethod(tiling.feathered_weights)  # how the Unet windows' predictions are blended

    def __init__(self, unet: Model, package: Package, unguided_unet: Model | None = None, name: str | None = None):
        self.unet = unet
        self.unguided_unet = unguided_unet or unet
        self.package = package
        self.name = name or package.unet_name  # the Unet component it runs
        self.dtypes = {name: dtype for name, (_, dtype) in unet.input_description.items()}
        sample_shape = unet.input_description["sample"][0]
        self.batch_size = sample_shape[0]
        self.unguided_batch_size = self.unguided_unet.input_description["sample"][0][0]
        self.latent_channels = LATENT_CHANNELS
        # An inpainting Unet also takes the mask and the masked image's latents beside the latents (9 channels)
        self.takes_mask = sample_shape[1] != LATENT_CHANNELS
        self.latent_window = tuple(sample_shape[2:])
        self.guidance_embedding = GUIDANCE_EMBEDDING in unet.input_description
        # A ControlledUnet's residual inputs, which the control stage fills
        self.residual_inputs = {name: description for name, description in unet.input_description.items()
                                if name.startswith(RESIDUAL_PREFIX)}

    def denoise(
        self, conditioning: dict[str, np.ndarray], stage: Pass, seed: int, init_latents: np.ndarray | None,
        overlap: int, bar: Callable, end: float | None = None, on_step: StepHook | None = None,
        control: Control | None = None, inpaint_mask: np.ndarray | None = None,
        masked_moments: np.ndarray | None = None,
    ) -> torch.Tensor:
        """The latents after the pass's schedule (or, with `end`, its first `end` fraction: diffusers'
        denoising_end); with `control`, steered by its ControlNets (the Sampler's Unet is then a ControlledUnet);
        with `inpaint_mask` (1 = redraw, at the latents' size), the rest kept as `init_latents` has it (an inpainting
        Unet takes the mask and `masked_moments`' latents instead), and at strength 1 started from pure noise, as
        diffusers' inpainting."""
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
            clean = latents = torch.from_numpy(sample_encoder_latents(init_latents, rng, self.package.scaling_factor))
            if inpaint_mask is not None and sampling.strength >= 1:
                latents = noise * scheduler.init_noise_sigma
            elif len(timesteps):
                latents = scheduler.add_noise(latents, noise, timesteps[:1])
        # the control fractions are of the whole pass, the refiner's part included (diffusers' controlnet_keep)
        steered = None if control is None else control.for_pass(
            Layout(latent_size, self.latent_window, overlap), len(timesteps))
        if end is not None:
            timesteps = timesteps[timesteps >= timestep_cutoff(scheduler, end)]
        blend, unet_extra = None, None
        if masked_moments is not None:  # its third draw, after the noise and the image's latents
            masked = sample_encoder_latents(masked_moments, rng, self.package.scaling_factor)
            unet_extra = np.concatenate([inpaint_mask, masked], axis=1)
        elif inpaint_mask is not None:
            blend = LatentBlend(inpaint_mask, clean, noise, scheduler, timesteps)
        return self._run(scheduler, timesteps, latents, conditioning, stage, seed, overlap, bar, on_step, steered,
                         blend, unet_extra)

    def refine(self, latents: torch.Tensor, conditioning: dict[str, np.ndarray], stage: Pass, seed: int,
                start: float, overlap: int, bar: Callable, on_step: StepHook | None = None) -> torch.Tensor:
        """The base's latents through the schedule after `start` of it (diffusers' denoising_start), no noise added."""
        scheduler = self.scheduler(stage.sampling)
        return self._run(scheduler, refiner_timesteps(scheduler, start), latents, conditioning, stage, seed, overlap,
                         bar, on_step)

    def scheduler(self, sampling: Sampling):
        scheduler = build_scheduler(sampling.scheduler, self.package.scheduler_config, self.package.prediction_type,
                                    sampling.timestep_spacing, sampling.karras)
        scheduler.set_timesteps(sampling.steps)
        return scheduler

    def guided(self, guidance_scale: float) -> bool:
        """Whether a step runs the unconditional input too (diffusers' do_classifier_free_guidance)."""
        return guidance_scale > 1 and not self.guidance_embedding

    def _run(self, scheduler, timesteps: torch.Tensor, latents: torch.Tensor, conditioning: dict[str, np.ndarray],
             stage: Pass, seed: int, overlap: int, bar: Callable, on_step: StepHook | None = None,
             control: PassControl | None = None, blend: LatentBlend | None = None,
             unet_extra: np.ndarray | None = None) -> torch.Tensor:
        """The scheduler's steps over `timesteps`, the Unet run in windows of its own size over the latents (and
        the kept latents blended back after each step, for inpainting)."""
        step_kwargs = {"eta": 0.0, "generator": torch.Generator().manual_seed(seed)}
        step_kwargs = {key: value for key, value in step_kwargs.items() if key in step_keywords(scheduler)}
        guidance_scale = stage.sampling.guidance_scale
        layout = Layout(tuple(latents.shape[2:]), self.latent_window, overlap)
        windows = len(layout.windows)
        if self.guided(guidance_scale):
            noise = partial(self._guided_noise, conditioning=conditioning, guidance_scale=guidance_scale,
                            control=control, unet_extra=unet_extra)
            windows_per_call = max(1, self.batch_size // 2)
        else:
            noise = partial(self._unguided_noise, control=control, unet_extra=unet_extra,
                            conditioning=self._unguided_conditioning(conditioning, guidance_scale))
            windows_per_call = self.unguided_batch_size
            if windows % self.unguided_batch_size:
                logger.warning("without guidance the Unet needs one input per window, but package %r's Unet takes "
                               "%d at once: %d of %d per step are repeats, computed for nothing; convert with "
                               "--unet-batch-size 1, or --unguided-function for a Unet that serves both",
                               self.package.name, self.unguided_batch_size, -windows % self.unguided_batch_size,
                               windows + -windows % self.unguided_batch_size)
        noise_prediction = TiledNoise(noise, layout, windows_per_call=windows_per_call, weights=self.window_weights)
        description = f"{stage.size[0]}x{stage.size[1]}, {windows} windows x {len(timesteps)} steps"
        with bar(total=windows * len(timesteps), unit="window", postfix=description) as progress:
            for step, t in enumerate(timesteps):
                model_input = scheduler.scale_model_input(latents, t).numpy()
                control_scales = None if control is None else control.step_scales[step]
                noise_pred = noise_prediction(model_input, float(t), control_scales)
                latents = scheduler.step(torch.from_numpy(noise_pred), t, latents, **step_kwargs).prev_sample
                if blend is not None:
                    latents = blend(latents, step)
                progress.update(windows)
                if on_step is not None and on_step(step + 1, len(timesteps), latents):
                    break
        return latents

    @staticmethod
    def _with_extra(samples: np.ndarray, unet_extra: np.ndarray | None) -> np.ndarray:
        """An inpainting Unet's input: the samples with the mask and masked-image channels (one window's)."""
        if unet_extra is None:
            return samples
        return np.concatenate([samples, np.repeat(unet_extra, len(samples), axis=0)], axis=1)

    def _residuals(self, control: PassControl | None, scales: list[float] | None,
                   row_windows: np.ndarray) -> Callable | None:
        """predict_in_batches' `residuals` for Unet input rows of these windows (a window index per row)."""
        if control is None:
            return None
        return lambda call, rows: control.residuals(call, row_windows[rows], scales, self.residual_inputs)

    def _guided_noise(self, samples: np.ndarray, t: float, windows: list[int], control_scales: list[float] | None,
                      conditioning: dict[str, np.ndarray], guidance_scale: float, control: PassControl | None = None,
                      unet_extra: np.ndarray | None = None) -> np.ndarray:
        """Classifier-free guidance for N window-sized samples (of these `windows` of the layout): their 2N
        (unconditional, conditional) Unet inputs packed into as few calls of the Unet's batch size as they fill (one
        sample per call at batch 2); with `control`, steered by its ControlNets at the step's `control_scales`."""
        pairs = len(samples)
        samples = self._with_extra(samples, unet_extra)
        rows = {"sample": np.repeat(samples.astype(self.dtypes["sample"]), 2, axis=0),
                **{name: np.concatenate([value] * pairs) for name, value in conditioning.items()}}
        noise = predict_in_batches(self.unet, rows, t, self._residuals(control, control_scales, np.repeat(windows, 2)))
        uncond, cond = noise[0::2], noise[1::2]
        return uncond + guidance_scale * (cond - uncond)

    def _unguided_conditioning(self, conditioning: dict[str, np.ndarray], guidance_scale: float) -> dict:
        """The conditional row of each input, and for an LCM Unet the embedding of the guidance scale."""
        conditional = {name: value[1:2] for name, value in conditioning.items()}
        if self.guidance_embedding:
            width = self.unet.input_description[GUIDANCE_EMBEDDING][0][1]
            embedding = guidance_scale_embedding(guidance_scale - 1, width)
            conditional[GUIDANCE_EMBEDDING] = embedding.astype(self.dtypes[GUIDANCE_EMBEDDING])
        return conditional

    def _unguided_noise(self, samples: np.ndarray, t: float, windows: list[int], control_scales: list[float] | None,
                        conditioning: dict[str, np.ndarray], control: PassControl | None = None,
                        unet_extra: np.ndarray | None = None) -> np.ndarray:
        """The conditional prediction for N window-sized samples, as few calls as they fill."""
        rows = {"sample": self._with_extra(samples, unet_extra).astype(self.dtypes["sample"]),
                **{name: np.concatenate([value] * len(samples)) for name, value in conditioning.items()}}
        return predict_in_batches(self.unguided_unet, rows, t,
                                  self._residuals(control, control_scales, np.asarray(windows)))


def predict_in_batches(unet: Model, rows: dict[str, np.ndarray], t: float,
                       residuals: Callable[[dict, np.ndarray], dict] | None = None) -> np.ndarray:
    """The Unet's noise for N input rows at timestep `t`, in calls of its batch size; the last call's empty
    places repeat its last row. `residuals(call, indices)` gives a ControlledUnet its ControlNets' residuals for
    a call's inputs, which are `rows`' rows at `indices`."""
    batch = unet.input_description["sample"][0][0]
    count = len(rows["sample"])
    order = np.minimum(np.arange(count + -count % batch), count - 1)
    timestep = np.full((batch,), t, dtype=unet.input_description["timestep"][1])

    def predict(indices: np.ndarray) -> np.ndarray:
        call = {"timestep": timestep, **{name: value[indices] for name, value in rows.items()}}
        if residuals is not None:
            call.update(residuals(call, indices))
        return unet.predict(call)["noise_pred"]

    return np.concatenate([predict(order[i : i + batch]) for i in range(0, len(order), batch)])[:count]


def guidance_scale_embedding(w: float, width: int) -> np.ndarray:
    """LCM's guidance embedding of `w` (the guidance scale minus 1), (1, width): sinusoids of 1000 w, sines then
    cosines, as diffusers' get_guidance_scale_embedding (in float32)."""
    half = width // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = torch.tensor([w * 1000.0], dtype=torch.float32)[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if width % 2:
        embedding = torch.nn.functional.pad(embedding, (0, 1))
    return embedding.numpy()
