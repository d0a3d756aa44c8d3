"""The families' contracts: per family the components generating needs, and the settings that apply when a
package carries no manifest (Apple's published bundles): the scheduler, the latent scale, the hidden layer the
text encoders condition with.
"""
from dataclasses import dataclass

from .names import TEXT_ENCODER, TEXT_ENCODER_2, UNET, UNET_REFINER, VAE_DECODER


@dataclass(frozen=True)
class FamilyContract:
    """What a family's packages hold and, for packages without a manifest, the settings that apply.

    `force_zeros_for_empty_prompt` is diffusers' pipeline setting: an empty negative prompt conditions on zeros
    rather than on the encoded empty string (None: the family's pipeline has no such setting, which is False).
    """

    name: str
    text_encoders: tuple[str, ...]
    unet: str
    scheduler_config: dict
    latent_scaling_factor: float
    force_zeros_for_empty_prompt: bool | None = None
    prediction_type: str = "epsilon"
    # the text encoders' hidden states that condition the Unet: -1 the last layer's after the final layer norm,
    # -2 the penultimate layer's, without it (transformers' hidden_states index)
    hidden_layer: int = -1

    @property
    def required_components(self) -> tuple[str, ...]:
        """What generating needs: the text encoders, the Unet and the decoder."""
        return (*self.text_encoders, self.unet, VAE_DECODER)


# SD v1.4's scheduler, for bundles that carry no manifest (Apple's published SD v1 bundles).
SD_V1_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
# stabilityai's SDXL 1.0 scheduler, for Apple's XL bundles, which carry no manifest.
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "interpolation_type": "linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
SD = FamilyContract("sd", (TEXT_ENCODER,), UNET, SD_V1_SCHEDULER_CONFIG, latent_scaling_factor=0.18215)
SDXL = FamilyContract("sdxl", (TEXT_ENCODER, TEXT_ENCODER_2), UNET, SDXL_SCHEDULER_CONFIG,
                      latent_scaling_factor=0.13025, force_zeros_for_empty_prompt=True, hidden_layer=-2)
SDXL_REFINER = FamilyContract("sdxl-refiner", (TEXT_ENCODER_2,), UNET_REFINER, SDXL_SCHEDULER_CONFIG,
                              latent_scaling_factor=0.13025, force_zeros_for_empty_prompt=False, hidden_layer=-2)
FAMILY_CONTRACTS = {family.name: family for family in (SD, SDXL, SDXL_REFINER)}
