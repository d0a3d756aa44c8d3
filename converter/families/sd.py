"""Stable Diffusion 1.x and 2.x: one CLIP text encoder whose last hidden states condition the Unet.

SD 2.x differs from 1.x only in data the model's own configs carry (text width 1024, a v-prediction
scheduler for the 768 models, the Unet's attention settings), so one family covers both; a variant that
needs other defaults is `dataclasses.replace(SD, contract=...)`.
"""
from coreml_sd.runtime import contract
from coreml_sd.runtime.contract import (
    SAFETY_CHECKER,
    TEXT_ENCODER,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    safety_checker_spec,
    text_encoder_spec,
    unet_spec,
    vae_decoder_spec,
    vae_encoder_spec,
)

from . import Component, Family


def _text_encoder(name, dims):
    return text_encoder_spec(name, "last_hidden_state", dims)


SD = Family(
    contract=contract.SD,
    description="Stable Diffusion 1.x/2.x",
    components={
        TEXT_ENCODER: Component("text_encoder", "text_encoder", _text_encoder),
        UNET: Component("unet", "unet", unet_spec),
        VAE_DECODER: Component("vae_decoder", "vae", vae_decoder_spec),
        VAE_ENCODER: Component("vae_encoder", "vae", vae_encoder_spec),
        SAFETY_CHECKER: Component("safety_checker", "safety_checker", safety_checker_spec),
    },
)
