"""Stable Diffusion 1.x and 2.x: one CLIP text encoder whose last hidden states condition the Unet.

SD 2.x differs from 1.x only in data the model's own configs carry (text width 1024, a v-prediction
scheduler for the 768 models, the Unet's attention settings), so one family covers both; a variant that
needs other defaults is `dataclasses.replace(SD, contract=...)`.
"""
from coreml_sd.runtime import contract

from . import Component, Family


def _text_encoder(name, dims):
    return contract.text_encoder_spec(name, contract.SD.hidden_layer, dims)


SD = Family(
    contract=contract.SD,
    description="Stable Diffusion 1.x/2.x",
    components={
        contract.TEXT_ENCODER: Component("text_encoder", "text_encoder", _text_encoder),
        contract.UNET: Component("unet", "unet", contract.unet_spec),
        contract.VAE_DECODER: Component("vae_decoder", "vae", contract.vae_decoder_spec),
        contract.VAE_ENCODER: Component("vae_encoder", "vae", contract.vae_encoder_spec),
        contract.SAFETY_CHECKER: Component("safety_checker", "safety_checker", contract.safety_checker_spec),
    },
)
