"""Stable Diffusion XL, base and refiner, with the names of Apple's XL contract.

Both text encoders give their penultimate layer's hidden states (`hidden_embeds`); the base's Unet takes
them concatenated (768 + 1280 wide), the refiner's the second encoder's alone. The second encoder's projected
pooled output conditions the Unet as `text_embeds`, with `time_ids`: original size, crop top-left and target
size (base, 6 numbers) or aesthetic score (refiner, 5). SDXL's VAE overflows float16, so it computes in
float32 unless another VAE is swapped in. The refiner's Unet is `UnetRefiner`, the name Apple's Swift package
loads it by beside a base.
"""
from dataclasses import replace

from coreml_sd.runtime import contract

from . import Component, Family


def _text_encoder(name, dims):
    return contract.text_encoder_spec(name, contract.SDXL.hidden_layer, dims)


def _is_xl(unet_config: dict) -> bool:
    return unet_config.get("addition_embed_type") == "text_time"


def _has_first_text_encoder(model_index: dict) -> bool:
    return bool(model_index.get("text_encoder") and model_index["text_encoder"][0] is not None)


_VAE_DECODER = Component("vae_decoder", "vae", contract.vae_decoder_spec)
_VAE_ENCODER = Component("vae_encoder", "vae", contract.vae_encoder_spec)
_TEXT_ENCODER_2 = Component("text_encoder", "text_encoder_2", _text_encoder, hidden_layer=contract.SDXL.hidden_layer,
                            projected=True)

SDXL = Family(
    contract=contract.SDXL,
    description="Stable Diffusion XL",
    components={
        contract.TEXT_ENCODER: Component("text_encoder", "text_encoder", _text_encoder,
                                          hidden_layer=contract.SDXL.hidden_layer),
        contract.TEXT_ENCODER_2: _TEXT_ENCODER_2,
        contract.UNET: Component("unet", "unet", contract.unet_spec),
        contract.VAE_DECODER: _VAE_DECODER,
        contract.VAE_ENCODER: _VAE_ENCODER,
    },
    vae_compute_precision="float32",
    text_encoder_classes={"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"},
    swift_pipeline="StableDiffusionXLPipeline",
    minimum_os=contract.MinimumOS(macos="14", ios="17"),
    matches=lambda model_index, unet_config: _is_xl(unet_config) and _has_first_text_encoder(model_index),
)

SDXL_REFINER = replace(
    SDXL,
    contract=contract.SDXL_REFINER,
    description="Stable Diffusion XL refiner",
    components={
        contract.TEXT_ENCODER_2: _TEXT_ENCODER_2,
        contract.UNET_REFINER: Component("unet", "unet", contract.unet_spec),
        contract.VAE_DECODER: _VAE_DECODER,
        contract.VAE_ENCODER: _VAE_ENCODER,
    },
    text_encoder_classes={"text_encoder_2": "CLIPTextModelWithProjection"},
    matches=lambda model_index, unet_config: _is_xl(unet_config) and not _has_first_text_encoder(model_index),
)
