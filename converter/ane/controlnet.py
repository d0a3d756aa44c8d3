"""The `controlnet/<Name>` and `ControlledUnet` components: diffusers' `ControlNetModel` and a Unet that takes its
residuals, for the Neural Engine, in Apple's contract.

A ControlNet is a copy of the Unet's encoder (time embedding, conv_in, down and mid blocks, rewritten here as the
Unet's are) whose conv_in output also gets the control image's embedding, and whose skip connections and mid block
output each pass a 1x1 convolution: those are the residuals, in the Unet's skip order, the mid block's last.
"""
import torch
from torch import nn

from .attention import AttentionImplementation
from .unet import Encoder, Unet


class ControlNet(Encoder):
    """(sample, timestep, encoder_hidden_states (B, D, 1, 77)[, time_ids, text_embeds], controlnet_cond) →
    (additional_residual_0, ..., the mid block's)."""

    def __init__(self, controlnet: nn.Module, implementation: AttentionImplementation):
        super().__init__(controlnet, implementation)
        if controlnet.config.global_pool_conditions:
            raise ValueError("ControlNets with global_pool_conditions (shuffle-style) are not supported for conversion")
        self.text_time = self.add_embedding is not None
        self.bgr = controlnet.config.controlnet_conditioning_channel_order == "bgr"
        self.cond_embedding = controlnet.controlnet_cond_embedding  # plain convolutions: already rank 4
        self.down_projections = controlnet.controlnet_down_blocks
        self.mid_projection = controlnet.controlnet_mid_block

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        time_ids, text_embeds = rest[:2] if self.text_time else (None, None)
        image = rest[-1]
        sample, temb, context = self.embeddings(sample, timestep, encoder_hidden_states, time_ids, text_embeds)
        image = image.to(sample.dtype)
        if self.bgr:
            image = torch.flip(image, dims=[1])
        x = self.conv_in(sample) + self.cond_embedding(image)
        x, skips = self.encode(x, temb, context)
        residuals = [projection(skip) for projection, skip in zip(self.down_projections, skips)]
        return (*residuals, self.mid_projection(x))


class ControlledUnet(Unet):
    """The Unet's inputs, then the residuals (float16, Apple's `additional_residual_<i>`) → (noise_pred,)."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor]:
        added = 2 if self.add_embedding is not None else 0
        time_ids, text_embeds = rest[:2] if added else (None, None)
        return (self.predict(sample, timestep, encoder_hidden_states, time_ids, text_embeds, rest[added:]),)
