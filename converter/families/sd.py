"""Stable Diffusion 1.x and 2.x: one CLIP text encoder whose last hidden states condition the Unet.

SD 2.x differs from 1.x only in data the model's own configs carry (text width 1024, a v-prediction
scheduler for the 768 models, the Unet's attention settings), so one family covers both; a variant that
needs other defaults is `dataclasses.replace(SD, name=..., defaults=...)`.
"""
from . import Component, Defaults, Family
from .contract import safety_checker_spec, text_encoder_spec, unet_spec, vae_decoder_spec, vae_encoder_spec


def _text_encoder(name, dims):
    return text_encoder_spec(name, "last_hidden_state", dims)


SD = Family(
    name="sd",
    description="Stable Diffusion 1.x/2.x",
    components={
        "TextEncoder": Component("text_encoder", "text_encoder", _text_encoder),
        "Unet": Component("unet", "unet", unet_spec),
        "VAEDecoder": Component("vae_decoder", "vae", vae_decoder_spec),
        "VAEEncoder": Component("vae_encoder", "vae", vae_encoder_spec),
        "SafetyChecker": Component("safety_checker", "safety_checker", safety_checker_spec),
    },
    default_components=("TextEncoder", "Unet", "VAEDecoder"),
    defaults=Defaults(latent_scaling_factor=0.18215),
)
