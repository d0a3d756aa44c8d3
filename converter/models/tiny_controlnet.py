"""Tiny ControlNets with random weights for a tiny model's Unet (`tiny`, `tiny-xl`), for tests and benchmarks.

A ControlNet is trained from zero-initialised projections (every residual starts at zero), so here they are
drawn at random too, or a ControlNet would add nothing and a test of it would prove nothing. So are the control
image's embedding convolutions: with diffusers' default initialisation their seven layers shrink the image's signal
until a black and a noise control image change the residuals by 0.01%, and a test could not tell which control image
(or which crop of it) a ControlNet saw; drawn with EMBEDDING_GAIN (variance kept through SiLU), they change them by
about 22%.
"""
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

# The control image's embedding: three stride-2 convolutions bring the image to the latent size, as SD's do.
CONDITIONING_CHANNELS = (8, 8, 16, 16)
PROJECTION_STD = 0.5  # the randomised zero convolutions: residuals about as large as the skips they join
EMBEDDING_GAIN = 1.7


def build_tiny_controlnet(unet: UNet2DConditionModel, seed: int) -> ControlNetModel:
    """A ControlNet with the Unet's encoder layout and random weights from `seed` (the global RNG is left as it is)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=CONDITIONING_CHANNELS,
                                               load_weights_from_unet=False)
        projections = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                       controlnet.controlnet_cond_embedding.conv_out]
        embedding = controlnet.controlnet_cond_embedding
        with torch.no_grad():
            for convolution in (embedding.conv_in, *embedding.blocks):
                convolution.weight.normal_(0, EMBEDDING_GAIN / convolution.weight[0].numel() ** 0.5)
            for projection in projections:
                projection.weight.normal_(0, PROJECTION_STD / projection.weight[0].numel() ** 0.5)
                projection.bias.normal_(0, 0.1)
    return controlnet.eval()


def save_tiny_controlnet(unet: UNet2DConditionModel, seed: int, folder: Path) -> ControlNetModel:
    """`build_tiny_controlnet`, saved as a diffusers folder (what `--controlnet FOLDER` converts)."""
    controlnet = build_tiny_controlnet(unet, seed)
    controlnet.save_pretrained(folder, safe_serialization=True)
    return controlnet
