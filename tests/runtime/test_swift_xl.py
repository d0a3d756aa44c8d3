"""packages/README.md's SDXL pair, a `StableDiffusionXLPipeline` snippet and a `coreml-generate` line, against the
Swift package's SDXL text-to-image written out here in NumPy.

The reference follows Apple's ml-stable-diffusion at commit e12202c (swift/StableDiffusion/pipeline/):
DPMSolverMultistepScheduler.swift (betas, timesteps for `.leading` spacing, the solver and when it drops to first
order), StableDiffusionXLPipeline.swift (conditioning, the guidance batch, the loop and what it decodes),
StableDiffusionXL+Resources.swift (the second tokenizer pads with "!") and StableDiffusionPipeline.Configuration.swift
(the settings). It is written from what those files do, in this project's words; no Mac runs it.
"""
from functools import partial

import numpy as np
import pytest
from tqdm import tqdm

from coreml_sd.converter.swift_example import MIN_STEPS, XL_EXAMPLE, mismatched_step_counts
from coreml_sd.runtime import Pipeline
from coreml_sd.runtime.conditioning import channels_first
from coreml_sd.runtime.prompt import END_OF_TEXT, PromptEncoder
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


def swift_leading_timesteps(steps: int) -> list[int]:
    """`.leading`: the integer ratio of the last training timestep (999) to steps + 1, times steps down to 1,
    plus 1."""
    ratio = (TRAIN_STEPS - 1) // (steps + 1)
    return [1 + k * ratio for k in range(steps, 0, -1)]


class SwiftDPMSolver:
    """Second-order multistep DPM-Solver++ (midpoint, epsilon prediction) as the Swift package steps it: first
    order at the first step and, in schedules under 15 steps, at the last two; the step after the last timestep
    goes to training timestep 0. `denoised` keeps each step's denoised prediction, which the pipeline decodes."""

    def __init__(self, steps: int):
        cumprod = swift_alphas_cumprod()
        self.timesteps = swift_leading_timesteps(steps)
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


def swift_xl_latents(unet, conditioning: dict[str, np.ndarray], latents: np.ndarray, steps: int,
                     guidance_scale: float) -> tuple[np.ndarray, list[int]]:
    """StableDiffusionXLPipeline's text-to-image loop over `unet` (inputs in the dtypes it declares, as Core ML
    converts Swift's 32-bit arrays): the latents twice with the timestep twice, guidance from row 0 (negative) to
    row 1, a solver step; then the latents it decodes, the last step's denoised prediction, and the orders."""
    solver = SwiftDPMSolver(steps)
    dtypes = {name: dtype for name, (_, dtype) in unet.input_description.items()}
    for t in solver.timesteps:
        inputs = {"sample": np.concatenate([latents, latents]), "timestep": np.array([t, t]), **conditioning}
        noise = unet.predict({name: value.astype(dtypes[name]) for name, value in inputs.items()})["noise_pred"]
        noise = noise.astype(np.float32)
        guided = noise[:1] + np.float32(guidance_scale) * (noise[1:] - noise[:1])
        latents = solver.step(guided, t, latents)
    return solver.denoised[-1], solver.orders


def swift_geometry(original_size: float, crop: float, target_size: float) -> np.ndarray:
    """The base's time_ids: each setting twice (height and width), the same row for both halves of the batch."""
    row = [original_size, original_size, crop, crop, target_size, target_size]
    return np.array([row, row], dtype=np.float32)


def swift_conditioning(pipe: Pipeline, prompt: str, negative_prompt: str) -> dict[str, np.ndarray]:
    """Both encoders' hidden states side by side (first encoder's padded with the end token, the second's with
    "!"), the second's pooled output; negative prompt first, encoded whatever it is."""
    package = pipe.package
    first = PromptEncoder(package.vocab_file, package.merges_file, pipe.models["TextEncoder"], END_OF_TEXT)
    second = PromptEncoder(package.vocab_file, package.merges_file, pipe.models["TextEncoder2"], "!")
    hidden, pooled = [], []
    for text in (negative_prompt, prompt):
        outputs = second(text)
        hidden.append(np.concatenate([first(text)["hidden_embeds"], outputs["hidden_embeds"]], axis=2))
        pooled.append(outputs["pooled_outputs"])
    return {"encoder_hidden_states": channels_first(np.concatenate(hidden)), "text_embeds": np.concatenate(pooled)}


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
    """A recorded run's Unet calls played back in order: each call's inputs must be the recorded ones (the sample to
    within one float16 step, which 32-bit rounding on either side can tip), and it returns the recorded outputs; so
    the same Unet needs not run twice."""

    def __init__(self, recorded: RecordedUnet):
        self.input_description = recorded.input_description
        self.calls = iter(recorded.calls)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        expected, outputs = next(self.calls)
        assert inputs.keys() == expected.keys()
        for name, value in inputs.items():
            tolerance = np.spacing(np.abs(expected[name])) if name == "sample" else 0
            assert np.all(np.abs(value - expected[name]) <= tolerance), name
        return outputs


class SmoothUnet:
    """A stand-in for the Unet with its inputs: a smooth function of the sample, the timestep and each batch row's
    conditioning (so that guidance matters), for schedules too long to run the tiny Unet through."""

    def __init__(self, input_description):
        self.input_description = input_description

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = {name: np.asarray(value, np.float32) for name, value in inputs.items()}
        rows = [x[name].reshape(len(x[name]), -1).mean(axis=1) for name in ("encoder_hidden_states", "text_embeds")]
        condition = (rows[0] + rows[1] + x["time_ids"].mean(axis=1) / 1000)[:, None, None, None]
        scale = (0.6 + x["timestep"] / 2000)[:, None, None, None]
        return {"noise_pred": (np.tanh(x["sample"]) * scale + 0.3 * condition).astype(np.float32)}


@pytest.fixture(scope="module")
def base(tiny_xl_packages) -> Pipeline:
    return Pipeline.from_package(tiny_xl_packages("tiny-xl"), backend="reference")


def runtime_scheduler(pipe: Pipeline, steps: int):
    return pipe.sampler.scheduler(Sampling("dpm++", steps, XL_EXAMPLE.guidance_scale, 1.0))


def test_leading_timesteps_are_swifts_unless_steps_plus_one_divides_1000(base):
    differing = [steps for steps in range(1, TRAIN_STEPS)
                 if runtime_scheduler(base, steps).timesteps.tolist() != swift_leading_timesteps(steps)]
    assert differing == mismatched_step_counts(TRAIN_STEPS)  # the rule packages/README.md states
    assert XL_EXAMPLE.steps not in differing


@pytest.mark.parametrize("steps", [2, LOWER_ORDER_BELOW + 1, XL_EXAMPLE.steps])
def test_noise_levels_are_swifts(base, steps):
    """The noise level at each timestep is Swift's sigma / alpha; diffusers' last one is zero where Swift steps to
    timestep 0, and what Swift decodes instead is the denoised prediction that a step to zero returns."""
    scheduler = runtime_scheduler(base, steps)
    solver = SwiftDPMSolver(steps)
    levels = solver.sigma[solver.timesteps] / solver.alpha[solver.timesteps]
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), levels, rtol=1e-5)
    assert scheduler.sigmas[-1] == 0
    assert scheduler.init_noise_sigma == 1  # Swift's initial noise is NumPy's draws, unscaled


def sampled_both_ways(base: Pipeline, steps: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The latents the runtime's sampling loop ends with and those Swift's decodes, from the same starting latents
    and over a smooth stand-in Unet; and the orders of Swift's steps."""
    unet = SmoothUnet(base.sampler.unet.input_description)
    rng = np.random.default_rng(steps)
    conditioning = {name: rng.standard_normal(shape).astype(dtype)  # in the Unet's dtypes, as the pipeline passes it
                    for name, (shape, dtype) in unet.input_description.items() if name not in ("sample", "timestep")}
    stage = Pass((base.width, base.height), Sampling("dpm++", steps, XL_EXAMPLE.guidance_scale, 1.0))
    ours = Sampler(unet, base.package).denoise(conditioning, stage, XL_EXAMPLE.seed, None, 0, NO_BAR).numpy()
    # The runtime's initial noise: float16-rounded, where Swift keeps NumPy's draws in 32 bits (packages/README.md
    # says so); the loops are compared from the same start.
    noise = draw_noise(np.random.RandomState(XL_EXAMPLE.seed), ours.shape)
    swift, orders = swift_xl_latents(unet, conditioning, noise, steps, XL_EXAMPLE.guidance_scale)
    return ours, swift, orders


def relative_error(ours: np.ndarray, swift: np.ndarray) -> float:
    return float(np.abs(ours - swift).max() / np.abs(swift).max())


@pytest.mark.parametrize("steps", [LOWER_ORDER_BELOW + 1, XL_EXAMPLE.steps])
def test_sampling_ends_with_the_latents_swift_decodes(base, steps):
    """From 15 steps on, Swift's steps after the first are all second order; diffusers' too but the last, which goes
    to noise level zero at first order and so returns the denoised prediction that Swift decodes."""
    ours, swift, orders = sampled_both_ways(base, steps)
    assert orders == [1] + [2] * (steps - 1)
    assert relative_error(ours, swift) < 1e-5  # float32 rounding, and the float16 inputs of the Unet it flips


def test_shorter_schedules_part_at_the_second_to_last_step(base):
    """Under 15 steps Swift takes its second-to-last step at first order, where diffusers (solver order 2) takes it
    at second order: the reason packages/README.md asks for 15 steps or more."""
    assert XL_EXAMPLE.steps >= LOWER_ORDER_BELOW == MIN_STEPS  # the rule packages/README.md states
    ours, swift, orders = sampled_both_ways(base, 5)
    assert orders == [1, 2, 2, 1, 1]
    assert relative_error(ours, swift) > 1e-3


def test_generate_defaults_give_swifts_unet_inputs_and_latents(base, monkeypatch):
    """coreml-generate's defaults (size conditioning: the package's size, crop (0, 0)) with the snippet's prompts,
    seed, guidance and scheduler, through the tiny-xl Unet: each Unet call gets the inputs Swift builds with the
    snippet's settings at the package's size, and the latents to decode are Swift's."""
    steps = 2  # the tiny Unet is slow here; two first-order steps, taken alike in both (see above)
    recorded = RecordedUnet(base.sampler.unet)
    monkeypatch.setattr(base.sampler, "unet", recorded)
    ours = base(XL_EXAMPLE.prompt, negative_prompt=XL_EXAMPLE.negative_prompt, steps=steps, scheduler="dpm++",
                seed=XL_EXAMPLE.seed, guidance_scale=XL_EXAMPLE.guidance_scale, output_type="latent",
                progress=False).images[0].numpy()
    assert base.width == base.height  # Swift's size settings are one number each
    conditioning = {**swift_conditioning(base, XL_EXAMPLE.prompt, XL_EXAMPLE.negative_prompt),
                    "time_ids": swift_geometry(original_size=base.height, crop=0, target_size=base.height)}
    noise = draw_noise(np.random.RandomState(XL_EXAMPLE.seed), ours.shape)
    replayed = ReplayedUnet(recorded)
    swift, _ = swift_xl_latents(replayed, conditioning, noise, steps, XL_EXAMPLE.guidance_scale)
    assert next(replayed.calls, None) is None  # as many Unet calls
    assert relative_error(ours, swift) < 1e-5
