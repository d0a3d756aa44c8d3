"""The samplers by the names AUTOMATIC1111's web UI gives them, as diffusers' documentation maps them to its
schedulers ("Schedulers" overview: the A1111/k-diffusion table): a scheduler class and the options it is
initialised with. The web UI's PLMS is diffusers' PNDM without its Runge-Kutta warm-up steps.

Names are matched without regard to case; "Euler a" is also "euler_a" in the web UI's API.
"""
from dataclasses import dataclass, field

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

KARRAS = {"use_karras_sigmas": True}
SDE = {"algorithm_type": "sde-dpmsolver++"}


@dataclass(frozen=True)
class NamedSampler:
    scheduler: type[SchedulerMixin]
    options: dict = field(default_factory=dict)


A1111_SAMPLERS = {
    "DPM++ 2M": NamedSampler(DPMSolverMultistepScheduler),
    "DPM++ 2M Karras": NamedSampler(DPMSolverMultistepScheduler, KARRAS),
    "DPM++ 2M SDE": NamedSampler(DPMSolverMultistepScheduler, SDE),
    "DPM++ 2M SDE Karras": NamedSampler(DPMSolverMultistepScheduler, {**SDE, **KARRAS}),
    "DPM++ SDE": NamedSampler(DPMSolverSinglestepScheduler),
    "DPM++ SDE Karras": NamedSampler(DPMSolverSinglestepScheduler, KARRAS),
    "DPM2": NamedSampler(KDPM2DiscreteScheduler),
    "DPM2 Karras": NamedSampler(KDPM2DiscreteScheduler, KARRAS),
    "DPM2 a": NamedSampler(KDPM2AncestralDiscreteScheduler),
    "DPM2 a Karras": NamedSampler(KDPM2AncestralDiscreteScheduler, KARRAS),
    "Euler": NamedSampler(EulerDiscreteScheduler),
    "Euler a": NamedSampler(EulerAncestralDiscreteScheduler),
    "Heun": NamedSampler(HeunDiscreteScheduler),
    "LMS": NamedSampler(LMSDiscreteScheduler),
    "LMS Karras": NamedSampler(LMSDiscreteScheduler, KARRAS),
    "DDIM": NamedSampler(DDIMScheduler),
    "PLMS": NamedSampler(PNDMScheduler, {"skip_prk_steps": True}),
    "UniPC": NamedSampler(UniPCMultistepScheduler),
    "LCM": NamedSampler(LCMScheduler),
}
_BY_FOLDED_NAME = {name.casefold(): name for name in A1111_SAMPLERS} | {
    name.casefold().replace(" ", "_"): name for name in A1111_SAMPLERS
}


def a1111_name(name: str) -> str | None:
    """The web UI's spelling of a sampler name typed in any case (or with underscores), or None."""
    return _BY_FOLDED_NAME.get(name.strip().casefold())


# Our short names whose scheduler, on a package's own settings, is the web UI's sampler of that name.
SHORT_NAMES = {"ddim": "DDIM", "euler": "Euler", "euler-a": "Euler a", "dpm++": "DPM++ 2M", "lms": "LMS"}


def sampler_fields(name: str, karras: bool = False) -> dict[str, str]:
    """How a PNG's parameters name the sampler: the web UI's name where it has one ("DPM++ 2M Karras"), so that
    its PNG Info and model sites read it, else ours; Karras sigmas the name does not say go into the web UI's
    "Schedule type"."""
    label = SHORT_NAMES.get(name) or a1111_name(name) or name
    if not karras or label.endswith(" Karras"):
        return {"Sampler": label}
    if f"{label} Karras" in A1111_SAMPLERS:
        return {"Sampler": f"{label} Karras"}
    return {"Sampler": label, "Schedule type": "Karras"}
