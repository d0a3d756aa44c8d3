"""The samplers, by the names users type: diffusers' schedulers configured from the package's scheduler config."""
import inspect
import math

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    TCDScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .errors import GenerationError
from .sampler_names import A1111_SAMPLERS, KARRAS, a1111_name


class GaussLMSDiscreteScheduler(LMSDiscreteScheduler):
    """diffusers' LMS with each coefficient integrated by two-point Gauss-Legendre instead of scipy's quadrature.

    The integrand is a Lagrange basis polynomial of degree <= 3 in sigma (order <= 4), which two-point
    Gauss-Legendre integrates exactly; scipy's adaptive quadrature gets the same number at ~0.6 ms each,
    up to four per step.
    """

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        sigmas = self.sigmas.tolist()
        low, high = sigmas[t], sigmas[t + 1]
        half, middle = (high - low) / 2, (high + low) / 2
        others = [sigmas[t - k] for k in range(order) if k != current_order]
        total = 0.0
        for node in (middle - half / math.sqrt(3), middle + half / math.sqrt(3)):
            total += math.prod((node - s) / (sigmas[t - current_order] - s) for s in others)
        return total * half


SCHEDULERS = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "lms": GaussLMSDiscreteScheduler,
    "lcm": LCMScheduler,
    "tcd": TCDScheduler,
}
DEFAULT_SCHEDULER = "pndm"
# PNDM's linear multistep warms up on the schedule's last two timesteps; at one step its only timestep is the
# last, and the image stays noise.
MIN_STEPS = {"pndm": 2}
# Schedulers that sample only what a consistency-distilled model (an LCM checkpoint, LCM-LoRA, TCD-LoRA) predicts.
CONSISTENCY_SCHEDULERS = ("lcm", "tcd")
ORIGINAL_INFERENCE_STEPS = 50  # diffusers' LCM and TCD default: the distillation's schedule
# diffusers' StableDiffusionPipeline corrects these settings of older SD v1 scheduler configs when it loads
# them (DDIM's pixel-space clipping is wrong for latents; SD v1 counts timesteps from 1); so do we.
SD_PIPELINE_CORRECTIONS = {"steps_offset": 1, "clip_sample": False}


def default_scheduler_name(config: dict) -> str:
    """The package's own scheduler when it is one of ours (as diffusers' pipelines do), else PNDM."""
    by_class = {cls.__name__: name for name, cls in SCHEDULERS.items()} | {"LMSDiscreteScheduler": "lms"}
    return by_class.get(config.get("_class_name"), DEFAULT_SCHEDULER)


def scheduler_names() -> list[str]:
    """Every name a scheduler is chosen by: ours, then the web UI's."""
    return [*SCHEDULERS, *A1111_SAMPLERS]


def named_scheduler(name: str) -> tuple[type[SchedulerMixin], dict]:
    """The class and the options a scheduler name stands for (our names take the package's settings as they are)."""
    if name in SCHEDULERS:
        return SCHEDULERS[name], {}
    a1111 = a1111_name(name)
    if a1111 is None:
        raise GenerationError(f"unknown scheduler {name!r}; choose from {', '.join(scheduler_names())} "
                              "(coreml-generate --list-schedulers)")
    named = A1111_SAMPLERS[a1111]
    # the same algorithm as diffusers' LMS, with exact quadrature
    scheduler = GaussLMSDiscreteScheduler if named.scheduler is LMSDiscreteScheduler else named.scheduler
    return scheduler, dict(named.options)


def scheduler_class(name: str) -> type[SchedulerMixin]:
    return named_scheduler(name)[0]


# Settings of a schedule that only some of diffusers' schedulers implement: the others would quietly sample a
# schedule the model was not trained on.
SCHEDULE_FEATURES = ("rescale_betas_zero_snr",)


def _implements(cls: type[SchedulerMixin], feature: str) -> bool:
    return feature in inspect.signature(cls.__init__).parameters


def check_schedule(name: str, config: dict) -> None:
    """Raises GenerationError when scheduler `name` cannot follow the schedule `config` describes."""
    cls = scheduler_class(name)
    for feature in SCHEDULE_FEATURES:
        if config.get(feature) and not _implements(cls, feature):
            able = [other for other, candidate in SCHEDULERS.items() if _implements(candidate, feature)]
            raise GenerationError(f"the {name} scheduler cannot follow this model's schedule ({feature}); choose "
                                  f"from {', '.join(able)}")


TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def schedule_options(name: str, timestep_spacing: str | None = None, karras: bool = False) -> dict:
    """The options a scheduler is built with: its name's, then the timestep spacing and Karras sigmas asked for;
    raises GenerationError where the scheduler has no such setting."""
    cls, options = named_scheduler(name)
    if karras:
        if not _implements(cls, "use_karras_sigmas"):
            able = [other for other in scheduler_names()
                    if _implements(scheduler_class(other), "use_karras_sigmas") and not other.endswith(" Karras")]
            raise GenerationError(f"the {name} scheduler has no Karras sigmas; drop --karras or choose from "
                                  f"{', '.join(able)}")
        options |= KARRAS
    if timestep_spacing is not None:
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise GenerationError(f"--timestep-spacing must be one of {', '.join(TIMESTEP_SPACINGS)}, not "
                                  f"{timestep_spacing!r}")
        if not _implements(cls, "timestep_spacing"):
            raise GenerationError(f"the {name} scheduler spaces its timesteps its own way; drop --timestep-spacing")
        options["timestep_spacing"] = timestep_spacing
    return options


def build_scheduler(name: str, config: dict, prediction_type: str, timestep_spacing: str | None = None,
                    karras: bool = False) -> SchedulerMixin:
    check_schedule(name, config)
    cls = scheduler_class(name)
    options = schedule_options(name, timestep_spacing, karras)
    scheduler = cls.from_config(config, prediction_type=prediction_type, **options)
    corrections = {
        key: value for key, value in SD_PIPELINE_CORRECTIONS.items() if scheduler.config.get(key, value) != value
    }
    return cls.from_config(scheduler.config, **corrections) if corrections else scheduler


def check_steps(name: str, steps: int, config: dict | None = None) -> None:
    """Raises GenerationError when scheduler `name` cannot sample in `steps` steps (on the schedule `config`
    describes: LCM and TCD pick their steps from the `original_inference_steps` they were distilled on)."""
    needed = MIN_STEPS.get(name, 1)
    if steps < needed:
        able = ", ".join(other for other in SCHEDULERS if MIN_STEPS.get(other, 1) <= steps)
        raise GenerationError(f"the {name} scheduler needs at least {needed} steps, not {steps}; raise --steps or "
                              f"choose from {able}")
    if name in CONSISTENCY_SCHEDULERS:
        most = (config or {}).get("original_inference_steps") or ORIGINAL_INFERENCE_STEPS
        if steps > most:
            raise GenerationError(f"the {name} scheduler samples at most {most} steps (the schedule the model was "
                                  f"distilled on), not {steps}; lower --steps (LCM models need 2-8)")


def step_keywords(scheduler: SchedulerMixin) -> frozenset[str]:
    """Which of `eta` / `generator` the scheduler's step takes (diffusers passes eta=0 and the generator)."""
    return frozenset(inspect.signature(scheduler.step).parameters) & {"eta", "generator"}
