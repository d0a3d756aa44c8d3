"""The sampling settings a package recommends, used wherever the caller gives none.

A few-step model samples well only as it was distilled: SD-Turbo in 1 step without guidance, an LCM-LoRA in 4
steps with the LCM scheduler at guidance 1; the demo model draws best at guidance 5. The converter records such
settings in the manifest (`"recommended": {"scheduler": ..., "steps": ..., "guidance_scale": ...}`, each
optional); `choose` fills what the caller left out from them, then from the package's own scheduler and the
general defaults, and says on one line which came from the package.
"""
import logging
from dataclasses import dataclass

from .errors import GenerationError
from .schedulers import CONSISTENCY_SCHEDULERS, SCHEDULERS, default_scheduler_name

logger = logging.getLogger("coreml_sd.runtime")
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 7.5
# diffusers' scheduler classes that mark a consistency-distilled model when its own config names them.
CONSISTENCY_CLASSES = ("LCMScheduler", "TCDScheduler")


@dataclass(frozen=True)
class Recommended:
    scheduler: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None

    @classmethod
    def from_manifest(cls, entry: object) -> "Recommended":
        """The manifest's "recommended" entry; raises GenerationError naming what is wrong with it."""
        if not isinstance(entry, dict):
            raise GenerationError("'recommended' is not an object")
        scheduler, steps, guidance = entry.get("scheduler"), entry.get("steps"), entry.get("guidance_scale")
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise GenerationError(f"recommended scheduler {scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise GenerationError(f"recommended steps {steps!r} is not a positive whole number")
        if guidance is not None and (not isinstance(guidance, (int, float)) or isinstance(guidance, bool)):
            raise GenerationError(f"recommended guidance_scale {guidance!r} is not a number")
        return cls(scheduler, steps, None if guidance is None else float(guidance))


@dataclass(frozen=True)
class Choice:
    """The settings a run samples with, and the names of those that came from the package's recommendation."""

    scheduler: str
    steps: int
    guidance_scale: float
    from_package: tuple[str, ...] = ()

    def describe(self) -> str:
        options = {"scheduler": "--scheduler", "steps": "--steps", "guidance scale": "--guidance-scale"}
        return (f"sampling with {self.scheduler}, {self.steps} steps, guidance {self.guidance_scale:g}: "
                f"{', '.join(self.from_package)} as the package recommends (override with "
                f"{', '.join(options[name] for name in self.from_package)})")


def choose(recommended: Recommended, scheduler_config: dict, scheduler: str | None, steps: int | None,
           guidance_scale: float | None) -> Choice:
    """The caller's settings where given, else the package's recommendation, else the package's own scheduler,
    50 steps and guidance 7.5."""
    from_package = []
    if scheduler is None and recommended.scheduler is not None:
        scheduler = recommended.scheduler
        from_package.append("scheduler")
    if steps is None and recommended.steps is not None:
        steps = recommended.steps
        from_package.append("steps")
    if guidance_scale is None and recommended.guidance_scale is not None:
        guidance_scale = recommended.guidance_scale
        from_package.append("guidance scale")
    return Choice(scheduler or default_scheduler_name(scheduler_config), DEFAULT_STEPS if steps is None else steps,
                  DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale, tuple(from_package))


def consistency_distilled(recommended: Recommended, scheduler_config: dict, guidance_embedding: bool) -> bool:
    """Whether a package says its model is consistency-distilled (LCM, LCM-LoRA, TCD): its recommendation or own
    scheduler is LCM's or TCD's, or its Unet takes LCM's guidance embedding."""
    return (recommended.scheduler in CONSISTENCY_SCHEDULERS
            or scheduler_config.get("_class_name") in CONSISTENCY_CLASSES
            or guidance_embedding)


def warn_unless_distilled(scheduler: str, distilled: bool, package_name: str) -> None:
    """The LCM and TCD schedulers run on any model, but only a distilled one makes an image with them."""
    if scheduler in CONSISTENCY_SCHEDULERS and not distilled:
        logger.warning("the %s scheduler is for consistency-distilled models, and package %r records none (no LCM "
                       "checkpoint or LCM-LoRA): expect a blurred image; convert with --lora "
                       "latent-consistency/lcm-lora-sdv1-5 (SDXL: lcm-lora-sdxl), or choose another scheduler",
                       scheduler, package_name)
