"""The samplers, by the names users type: diffusers' schedulers configured from the package's scheduler config."""
import inspect

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .errors import GenerationError

SCHEDULERS = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "lms": LMSDiscreteScheduler,
}
DEFAULT_SCHEDULER = "pndm"


def default_scheduler_name(config: dict) -> str:
    """The package's own scheduler when it is one of ours (as diffusers' pipelines do), else PNDM."""
    by_class = {cls.__name__: name for name, cls in SCHEDULERS.items()}
    return by_class.get(config.get("_class_name"), DEFAULT_SCHEDULER)


def scheduler_class(name: str) -> type[SchedulerMixin]:
    if name not in SCHEDULERS:
        raise GenerationError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]


def build_scheduler(name: str, config: dict, prediction_type: str) -> SchedulerMixin:
    return scheduler_class(name).from_config(config, prediction_type=prediction_type)


def step_keywords(scheduler: SchedulerMixin) -> frozenset[str]:
    """Which of `eta` / `generator` the scheduler's step takes (diffusers passes eta=0 and the generator)."""
    return frozenset(inspect.signature(scheduler.step).parameters) & {"eta", "generator"}
