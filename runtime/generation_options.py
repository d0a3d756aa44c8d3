"""What a generation may be asked, checked before any model loads: sizes, steps, strength, seeds, the refiner's share
and the hires pass (the checks that need the package are the pipeline's)."""
import secrets

from .contract import VAE_FACTOR
from .errors import GenerationError
from .schedulers import scheduler_class
from .upscaling import Upscale

MAX_SEED = 2**32 - 1  # RandomState's seed range


def random_seed(num_images: int = 1) -> int:
    return secrets.randbelow(MAX_SEED + 2 - num_images)


def check_options(
    scheduler: str | None, steps: int | None, strength: float, num_images: int, seed: int | None,
    width: int | None = None, height: int | None = None, upscale: Upscale | None = None, refiner_start: float = 0.8,
) -> None:
    """The checks that need no model, so that a command line fails before any model loads."""
    for name, side in (("--width", width), ("--height", height)):
        if side is not None and (side < VAE_FACTOR or side % VAE_FACTOR):
            raise GenerationError(f"{name} {side} is not a positive multiple of {VAE_FACTOR}")
    if upscale is not None:
        upscale.check()
    if not 0 < refiner_start < 1:
        raise GenerationError(f"--refiner-start must be between 0 and 1 (the fraction of the schedule the base runs), "
                              f"not {refiner_start}")
    if scheduler is not None:
        scheduler_class(scheduler)
    if steps is not None and steps < 1:
        raise GenerationError(f"--steps must be at least 1, not {steps}")
    if not 0 <= strength <= 1:
        raise GenerationError(f"--strength must be in [0, 1], not {strength}")
    if num_images < 1:
        raise GenerationError(f"--num-images must be at least 1, not {num_images}")
    last_seed = MAX_SEED + 1 - num_images
    if seed is not None and not 0 <= seed <= last_seed:
        raise GenerationError(f"--seed must be in [0, {last_seed}] for {num_images} image(s), not {seed}")
