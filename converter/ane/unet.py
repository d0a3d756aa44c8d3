"""The `Unet` component: diffusers' `UNet2DConditionModel` (SD v1/v2 and SDXL configurations) for the
Neural Engine.

The text conditioning arrives as (B, D, 1, 77), the layout of Apple's Swift package, and stays in it for
the channels-first implementations; `original` turns it into diffusers' (B, 77, D) once. An SDXL Unet
(`addition_embed_type="text_time"`) also takes `time_ids` and the pooled `text_embeds`, whose embedding is
added to the timestep's.
"""
import torch
from torch import nn

from .attention import AttentionImplementation
from .layers import TOKENS_LAST, GroupNorm
from .resnet import ResnetBlock, downsamplers, upsamplers
from .transformer import SpatialTransformer

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


def check_block(block: nn.Module, supported: tuple[str, ...]) -> None:
    kind = type(block).__name__
    if kind not in supported:
        raise ValueError(f"UNet block {kind} is not supported for conversion (supported: {', '.join(supported)})")


def transformers(block: nn.Module, implementation: AttentionImplementation) -> nn.ModuleList | None:
    attentions = getattr(block, "attentions", None)
    if attentions is None:
        return None
    return nn.ModuleList(SpatialTransformer(attention, implementation) for attention in attentions)


class DownBlock(nn.Module):
    def __init__(self, block: nn.Module, implementation: AttentionImplementation):
        super().__init__()
        check_block(block, DOWN_BLOCKS)
        self.resnets = nn.ModuleList(ResnetBlock(resnet) for resnet in block.resnets)
        self.attentions = transformers(block, implementation)
        self.downsamplers = downsamplers(block)

    def forward(self, x: torch.Tensor, temb: torch.Tensor,
                context: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for index, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[index](x, context)
            skips.append(x)
        for downsampler in self.downsamplers:
            x = downsampler(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    def __init__(self, block: nn.Module, implementation: AttentionImplementation):
        super().__init__()
        check_block(block, MID_BLOCKS)
        self.resnets = nn.ModuleList(ResnetBlock(resnet) for resnet in block.resnets)
        self.attentions = transformers(block, implementation)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attention(x, context), temb)
        return x


class UpBlock(nn.Module):
    def __init__(self, block: nn.Module, implementation: AttentionImplementation):
        super().__init__()
        check_block(block, UP_BLOCKS)
        self.resnets = nn.ModuleList(ResnetBlock(resnet) for resnet in block.resnets)
        self.attentions = transformers(block, implementation)
        self.upsamplers = upsamplers(block)

    def forward(
        self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor,
        upsample_size: tuple[int, int] | None,
    ) -> torch.Tensor:
        for index, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[index](x, context)
        for upsampler in self.upsamplers:
            x = upsampler(x, upsample_size)
        return x


class Encoder(nn.Module):
    """What a Unet and a ControlNet share: the time (and SDXL's added) embedding, conv_in, the down and mid blocks."""

    def __init__(self, unet: nn.Module, implementation: AttentionImplementation):
        super().__init__()
        text_time = unet.config.addition_embed_type == "text_time"
        extras = [
            name for name in ("class_embedding", "add_embedding", "encoder_hid_proj", "time_embed_act")
            if getattr(unet, name, None) is not None and not (name == "add_embedding" and text_time)
        ] + (["center_input_sample"] if getattr(unet.config, "center_input_sample", False) else [])
        if extras:
            raise ValueError(
                f"this {type(unet).__name__} ({', '.join(extras)}) is not supported "
                "for conversion; SD v1/v2- and SDXL-style ones are"
            )
        self.layout = implementation.layout
        self.time_proj = unet.time_proj
        self.time_embedding = unet.time_embedding
        self.add_time_proj = unet.add_time_proj if text_time else None
        self.add_embedding = unet.add_embedding if text_time else None
        # The inputs after the text conditioning, in the contract's order (see unet_spec): SDXL's, then an LCM
        # Unet's guidance embedding.
        self.conditions = (("time_ids", "text_embeds") if text_time else ()) + (
            ("timestep_cond",) if getattr(unet.time_embedding, "cond_proj", None) is not None else ())
        self.conv_in = unet.conv_in
        self.down_blocks = nn.ModuleList(DownBlock(block, implementation) for block in unet.down_blocks)
        self.mid_block = MidBlock(unet.mid_block, implementation)

    def embeddings(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        time_ids: torch.Tensor | None, text_embeds: torch.Tensor | None, timestep_cond: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The sample in the weights' dtype, the time (and SDXL's added) embedding, and the text context in the
        attention's layout."""
        dtype = self.conv_in.weight.dtype
        context = encoder_hidden_states.to(dtype)
        if self.layout is TOKENS_LAST:
            context = context[:, :, 0, :].transpose(1, 2)
        temb = self.time_embedding(self.time_proj(timestep).to(dtype),
                                   None if timestep_cond is None else timestep_cond.to(dtype))
        if self.add_embedding is not None:
            # Each size number gets its own sinusoidal embedding, as the timestep does (in float32: see
            # convert.computes_in_float16); they follow the pooled text embedding.
            time_embeds = self.add_time_proj(time_ids.reshape(-1)).to(dtype).reshape(time_ids.shape[0], -1)
            temb = temb + self.add_embedding(torch.cat([text_embeds.to(dtype), time_embeds], dim=1))
        return sample.to(dtype), temb, context

    def encode(self, x: torch.Tensor, temb: torch.Tensor,
               context: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """conv_in's output `x` through the down blocks and the mid block: the mid block's output and the skips."""
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips.extend(block_skips)
        return self.mid_block(x, temb, context), skips


class Unet(Encoder):
    """(sample, timestep, encoder_hidden_states (B, D, 1, 77), SDXL's time_ids and text_embeds, LCM's
    timestep_cond) → (noise_pred,)."""

    def __init__(self, unet: nn.Module, implementation: AttentionImplementation):
        super().__init__(unet, implementation)
        if unet.conv_norm_out is None:
            raise ValueError("this UNet (no output norm) is not supported for conversion; SD v1/v2- and SDXL-style "
                             "UNets are")
        self.up_blocks = nn.ModuleList(UpBlock(block, implementation) for block in unet.up_blocks)
        self.upsampling = 2**unet.num_upsamplers
        self.conv_norm_out = GroupNorm(unet.conv_norm_out)
        self.conv_act = unet.conv_act
        self.conv_out = unet.conv_out

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *conditions: torch.Tensor) -> tuple[torch.Tensor]:
        named = dict(zip(self.conditions, conditions))
        return (self.predict(sample, timestep, encoder_hidden_states, named.get("time_ids"), named.get("text_embeds"),
                             timestep_cond=named.get("timestep_cond")),)

    def predict(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        time_ids: torch.Tensor | None = None, text_embeds: torch.Tensor | None = None,
        residuals: tuple[torch.Tensor, ...] = (), timestep_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The noise prediction; with ControlNet `residuals`, each added to its skip connection and the last to
        the mid block's output, as diffusers' down_block_additional_residuals and mid_block_additional_residual."""
        sample, temb, context = self.embeddings(sample, timestep, encoder_hidden_states, time_ids, text_embeds,
                                                timestep_cond)

        # diffusers resizes to the skip connection's size only when the latent isn't a multiple of 2^up-blocks.
        exact_upsample = any(size % self.upsampling for size in sample.shape[2:])

        x, skips = self.encode(self.conv_in(sample), temb, context)
        if residuals:
            skips = [skip + residual.to(skip.dtype) for skip, residual in zip(skips, residuals[:-1])]
            x = x + residuals[-1].to(x.dtype)
        for block in self.up_blocks:
            block_skips = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            upsample_size = tuple(skips[-1].shape[2:]) if exact_upsample and skips else None
            x = block(x, block_skips, temb, context, upsample_size)
        return self.conv_out(self.conv_act(self.conv_norm_out(x)))
