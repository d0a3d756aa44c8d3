"""The Swift package's DPM-Solver++ and its text-to-image loop written out in NumPy, for the README's Swift pairs
(tests/runtime/test_swift.py), and the means to run the runtime's sampling beside them.

The reference follows Apple's ml-stable-diffusion at commit e12202c (swift/StableDiffusion/pipeline/):
DPMSolverMultistepScheduler.swift (betas, timesteps for `.linspace` and `.leading` spacing, the solver and when it
drops to first order), Scheduler.swift (its float32 linspace), and the loops of StableDiffusionPipeline.swift and
StableDiffusionXLPipeline.swift, which are alike for text-to-image at guidance above 1: the latents twice with the
timestep twice, guidance from row 0 (negative prompt) to row 1, a solver step, and the last step's denoised prediction
decoded. It is written from what those files do, in this project's words; no Mac runs it.
"""
from functools import partial

import numpy as np
from tqdm import tqdm

from coreml_sd.converter.docgen.swift_example import Example
from coreml_sd.runtime import Pipeline
from coreml_sd.runtime.sampling import Pass, Sampler, Sampling, draw_noise

TRAIN_STEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012
LOWER_ORDER_BELOW = 15  # schedules shorter than this end with two first-order steps
NO_BAR = partial(tqdm, disable=True)


def swift_alphas_cumprod() -> np.ndarray:
    """Swift's scaled-linear schedule in 32-bit floats: an evenly spaced ramp (start + i * spacing) between the
    square roots of the two betas, squared, and the running product of 1 - beta."""
    start, end = np.sqrt(np.float32(BETA_START)), np.sqrt(np.float32(BETA_END))
    roots = np.arange(TRAIN_STEPS, dtype=np.float32) * ((end - start) / np.float32(TRAIN_STEPS - 1)) + start
    return np.cumprod(np.float32(1) - roots * roots, dtype=np.float32)


def swift_timesteps(spacing: str, steps: int) -> list[int]:
    """`.leading`: the integer ratio of the last training timestep (999) to steps + 1, times steps down to 1, plus 1.
    `.linspace`: steps + 1 points from 0 to 999 in float32 (k times the float32 ratio 999 / steps), the first
    dropped, from the last down, each rounded to the nearest integer with halves away from zero."""
    if spacing == "leading":
        ratio = (TRAIN_STEPS - 1) // (steps + 1)
        return [1 + k * ratio for k in range(steps, 0, -1)]
    if spacing == "linspace":
        points = np.arange(1, steps + 1, dtype=np.float32) * (np.float32(TRAIN_STEPS - 1) / np.float32(steps))
        return np.floor(points.astype(np.float64) + 0.5).astype(int)[::-1].tolist()  # exact for float32 points
    raise ValueError(f"no Swift spacing {spacing!r} here")


class SwiftDPMSolver:
    """Second-order multistep DPM-Solver++ (midpoint, epsilon prediction) as the Swift package steps it: first
    order at the first step and, in schedules under 15 steps, at the last two; the step after the last timestep
    goes to training timestep 0. `denoised` keeps each step's denoised prediction, which the pipeline decodes."""

    def __init__(self, steps: int, spacing: str):
        cumprod = swift_alphas_cumprod()
        self.timesteps = swift_timesteps(spacing, steps)
        # 32-bit tables, as Swift keeps them; each step's coefficients are worked out in 64 bits from them
        self.alpha, self.sigma = np.sqrt(cumprod), np.sqrt(np.float32(1) - cumprod)
        self.log_snr = np.log(self.alpha) - np.log(self.sigma)
        self.denoised: list[np.ndarray] = []
        self.orders: list[int] = []

    def step(self, noise: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        index = self.timesteps.index(t)
        count = len(self.timesteps)
        target = 0 if index == count - 1 else self.timesteps[index + 1]
        first_order = not self.orders or (count < LOWER_ORDER_BELOW and index >= count - 2)
        self.denoised.append((sample - noise * self.sigma[t]) / self.alpha[t])
        alpha, sigma, log_snr = (np.float64(table[target]) for table in (self.alpha, self.sigma, self.log_snr))
        h = log_snr - np.float64(self.log_snr[t])
        keep, pull = np.float32(sigma / np.float64(self.sigma[t])), np.float32(-alpha * np.expm1(-h))
        if first_order:
            update = pull * self.denoised[-1]
        else:
            ratio = (np.float64(self.log_snr[t]) - np.float64(self.log_snr[self.timesteps[index - 1]])) / h
            slope = (self.denoised[-1] - self.denoised[-2]) / np.float32(ratio)
            update = pull * self.denoised[-1] + np.float32(0.5) * pull * slope
        self.orders.append(1 if first_order else 2)
        return keep * sample + update


def swift_latents(unet, conditioning: dict[str, np.ndarray], latents: np.ndarray, steps: int, guidance_scale: float,
                  spacing: str) -> tuple[np.ndarray, list[int]]:
    """The Swift pipelines' text-to-image loop over `unet` (inputs in the dtypes it declares, as Core ML converts
    Swift's 32-bit arrays); then the latents it decodes, the last step's denoised prediction, and the orders."""
    solver = SwiftDPMSolver(steps, spacing)
    dtypes = {name: dtype for name, (_, dtype) in unet.input_description.items()}
    for t in solver.timesteps:
        inputs = {"sample": np.concatenate([latents, latents]), "timestep": np.array([t, t]), **conditioning}
        noise = unet.predict({name: value.astype(dtypes[name]) for name, value in inputs.items()})["noise_pred"]
        noise = noise.astype(np.float32)
        guided = noise[:1] + np.float32(guidance_scale) * (noise[1:] - noise[:1])
        latents = solver.step(guided, t, latents)
    return solver.denoised[-1], solver.orders


class RecordedUnet:
    """The package's Unet, keeping each call's inputs and outputs."""

    def __init__(self, unet):
        self.unet = unet
        self.input_description = unet.input_description
        self.calls: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.unet.predict(inputs)
        self.calls.append((inputs, outputs))
        return outputs


class ReplayedUnet:
    """A recorded run's Unet calls played back in order: each call's inputs must be the recorded ones, and it returns
    the recorded outputs; so the same Unet needs not run twice. The sample may differ by the 32-bit rounding of the
    two loops, which is absolute (a few float32 steps at the largest latent: near zero, where the values come from
    cancellation, it is many float16 steps of the value), and by the float16 step that this rounding can tip."""

    def __init__(self, recorded: RecordedUnet):
        self.input_description = recorded.input_description
        self.calls = iter(recorded.calls)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        expected, outputs = next(self.calls)
        assert inputs.keys() == expected.keys()
        for name, value in inputs.items():
            if name == "sample":  # float16, as the Unet takes it
                size = np.abs(expected[name])
                tolerance = np.spacing(size).astype(np.float32) + np.float32(1e-6) * np.float32(size.max())
                assert np.all(np.abs(value.astype(np.float32) - expected[name]) <= tolerance), name
            else:
                assert np.array_equal(value, expected[name]), name
        return outputs


class SmoothUnet:
    """A stand-in for the Unet with its inputs: a smooth function of the sample, the timestep and each batch row's
    conditioning (so that guidance matters), for schedules too long to run a tiny Unet through."""

    def __init__(self, input_description):
        self.input_description = input_description

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = {name: np.asarray(value, np.float32) for name, value in inputs.items()}
        condition = sum(value.reshape(len(value), -1).mean(axis=1) for name, value in x.items()
                        if name not in ("sample", "timestep"))[:, None, None, None]
        scale = (0.6 + x["timestep"] / 2000)[:, None, None, None]
        return {"noise_pred": (np.tanh(x["sample"]) * scale + 0.3 * condition).astype(np.float32)}


def runtime_scheduler(pipe: Pipeline, example: Example, steps: int):
    """The DPM-Solver++ scheduler that coreml-generate's `--scheduler dpm++` builds from the package."""
    return pipe.sampler.scheduler(Sampling("dpm++", steps, example.guidance_scale, 1.0))


def sampled_both_ways(pipe: Pipeline, example: Example, steps: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The latents the runtime's sampling loop ends with and those Swift's decodes, from the same starting latents
    and over a smooth stand-in Unet; and the orders of Swift's steps."""
    unet = SmoothUnet(pipe.sampler.unet.input_description)
    rng = np.random.default_rng(steps)
    conditioning = {name: rng.standard_normal(shape).astype(dtype)  # in the Unet's dtypes, as the pipeline passes it
                    for name, (shape, dtype) in unet.input_description.items() if name not in ("sample", "timestep")}
    stage = Pass((pipe.width, pipe.height), Sampling("dpm++", steps, example.guidance_scale, 1.0))
    ours = Sampler(unet, pipe.package).denoise(conditioning, stage, example.seed, None, 0, NO_BAR).numpy()
    # The runtime's initial noise: float16-rounded, where Swift keeps NumPy's draws in 32 bits (packages/README.md
    # says so); the loops are compared from the same start.
    noise = draw_noise(np.random.RandomState(example.seed), ours.shape)
    swift, orders = swift_latents(unet, conditioning, noise, steps, example.guidance_scale, example.spacing)
    return ours, swift, orders


def first_unet_samples(example: Example) -> tuple[np.ndarray, np.ndarray]:
    """The initial noise as the Unet takes it (float16), from the runtime and from Swift: NumPyRandomSource's draws
    in float32, which Core ML is taken to round to nearest."""
    side = example.size // 8
    ours = draw_noise(np.random.RandomState(example.seed), (1, 4, side, side)).astype(np.float16)
    swift = np.random.RandomState(example.seed).randn(*ours.shape).astype(np.float32).astype(np.float16)
    return ours, swift


def relative_error(ours: np.ndarray, swift: np.ndarray) -> float:
    return float(np.abs(ours - swift).max() / np.abs(swift).max())
