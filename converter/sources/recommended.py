"""The sampling settings a model is made for, recorded in the package's manifest (`"recommended"`) so that
`coreml-generate` samples with them unless told otherwise.

Few-step models sample well only as they were distilled: SD-Turbo in 1 step without guidance, an LCM-LoRA in 4
steps with the LCM scheduler, SDXL-Lightning with Euler on trailing timesteps. The settings come from the
tables below (by Hugging Face id of the model or LoRA, as their model cards give them), from the model's own
scheduler (an LCM checkpoint's), and last from `--recommend NAME=VALUE`, which wins.
"""
from dataclasses import dataclass, field, fields, replace

from coreml_sd.runtime.schedulers import SCHEDULERS

from ..errors import ConversionError

TRAILING = {"timestep_spacing": "trailing"}


@dataclass(frozen=True)
class Recommendation:
    scheduler: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    schedule: dict = field(default_factory=dict)  # changes to the model's scheduler config (its timestep spacing)

    def then(self, other: "Recommendation") -> "Recommendation":
        """These settings with `other`'s where it has them."""
        given = {f.name: getattr(other, f.name) for f in fields(other) if getattr(other, f.name) not in (None, {})}
        return replace(self, **given)

    @property
    def unguided(self) -> bool:
        return self.guidance_scale is not None and self.guidance_scale <= 1

    def to_manifest(self) -> dict:
        settings = {"scheduler": self.scheduler, "steps": self.steps, "guidance_scale": self.guidance_scale}
        return {name: value for name, value in settings.items() if value is not None}

    def applied_to(self, scheduler_config: dict) -> dict:
        """The scheduler config with this recommendation's changes; diffusers would put its class defaults back
        for keys listed in `_use_default_values`, so those keys leave that list."""
        if not self.schedule:
            return scheduler_config
        defaults = [key for key in scheduler_config.get("_use_default_values", []) if key not in self.schedule]
        return {**scheduler_config, **self.schedule, "_use_default_values": defaults}


# By Hugging Face id (built-in models by name), from the model cards.
MODELS = {
    "stabilityai/sd-turbo": Recommendation(steps=1, guidance_scale=0.0),
    "stabilityai/sdxl-turbo": Recommendation(steps=1, guidance_scale=0.0),
    "demo": Recommendation("dpm++", 20, 5.0),  # converter/data/demo/README.md
}
# By Hugging Face id of a LoRA, with ":file" where the repository holds several.
LORAS = {
    "latent-consistency/lcm-lora-sdv1-5": Recommendation("lcm", 4, 1.0),
    "latent-consistency/lcm-lora-sdxl": Recommendation("lcm", 4, 1.0),
    "h1t/TCD-SD15-LoRA": Recommendation("tcd", 4, 0.0),
    "h1t/TCD-SDXL-LoRA": Recommendation("tcd", 4, 0.0),
    **{f"ByteDance/SDXL-Lightning:sdxl_lightning_{steps}step_lora.safetensors":
       Recommendation("euler", steps, 0.0, TRAILING) for steps in (2, 4, 8)},
}
# An LCM checkpoint's own scheduler: 4 steps, and with a guidance embedding diffusers' LCM pipeline's guidance.
LCM_STEPS = 4
LCM_EMBEDDED_GUIDANCE = 8.5


def from_arguments(arguments: tuple[str, ...]) -> Recommendation:
    """`--recommend scheduler=lcm --recommend steps=4 --recommend guidance-scale=1`."""
    settings: dict = {}
    for argument in arguments:
        name, _, value = argument.partition("=")
        name = name.strip().replace("-", "_")
        try:
            if name == "scheduler":
                if value not in SCHEDULERS:
                    raise ValueError(f"choose from {', '.join(SCHEDULERS)}")
                settings[name] = value
            elif name == "steps":
                settings[name] = int(value)
                if settings[name] < 1:
                    raise ValueError("it must be at least 1")
            elif name == "guidance_scale":
                settings[name] = float(value)
            else:
                raise ValueError("NAME is scheduler, steps or guidance-scale")
        except ValueError as error:
            reason = (str(error) if not str(error).startswith(("invalid literal", "could not convert"))
                      else "not a number")
            raise ConversionError(f"--recommend {argument}: {reason} (NAME=VALUE, e.g. steps=4)") from None
    return Recommendation(**settings)


def recommendation(model_id: str | None, scheduler_config: dict, guidance_embedding: bool, lora_ids: list[str],
                   arguments: tuple[str, ...]) -> Recommendation:
    """What the package records: the model's settings, then its LoRAs', then --recommend's."""
    settings = MODELS.get(model_id or "", Recommendation())
    if scheduler_config.get("_class_name") == "LCMScheduler":
        settings = settings.then(Recommendation("lcm", LCM_STEPS, LCM_EMBEDDED_GUIDANCE if guidance_embedding else 1.0))
    for lora_id in lora_ids:
        settings = settings.then(LORAS.get(lora_id, Recommendation()))
    return settings.then(from_arguments(arguments))
