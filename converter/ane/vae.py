"""The `VAEDecoder` and `VAEEncoder` components: diffusers' `AutoencoderKL` halves for the Neural Engine.

Only the mid-block's single-head self-attention depends on the attention implementation; every group
norm is the rank-4 one.
"""
import torch
from torch import nn

from .attention import AttentionImplementation, SpatialSelfAttention
from .layers import GroupNorm
from .resnet import ResnetBlock, downsamplers, upsamplers


class MidBlock(nn.Module):
    """`UNetMidBlock2D` without time embedding: resnet, then (attention, resnet) pairs."""

    def __init__(self, block: nn.Module, implementation: AttentionImplementation):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(resnet) for resnet in block.resnets)
        self.attentions = nn.ModuleList(
            nn.Identity() if attention is None else SpatialSelfAttention(attention, implementation)
            for attention in block.attentions
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attention(x))
        return x


class ResampleBlock(nn.Module):
    """`DownEncoderBlock2D` or `UpDecoderBlock2D`: resnets, then the block's resamplers."""

    def __init__(self, block: nn.Module):
        super().__init__()
        kind = type(block).__name__
        if kind not in ("DownEncoderBlock2D", "UpDecoderBlock2D"):
            raise ValueError(f"VAE block {kind} is not supported for conversion")
        self.resnets = nn.ModuleList(ResnetBlock(resnet) for resnet in block.resnets)
        self.resamplers = downsamplers(block) if kind == "DownEncoderBlock2D" else upsamplers(block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for resampler in self.resamplers:
            x = resampler(x)
        return x


def check_vae(vae: nn.Module) -> None:
    if type(vae).__name__ != "AutoencoderKL" or type(vae.decoder.mid_block).__name__ != "UNetMidBlock2D":
        raise ValueError(f"VAE {type(vae).__name__} is not supported for conversion; AutoencoderKL is")
    if not isinstance(vae.decoder.conv_norm_out, nn.GroupNorm):
        raise ValueError("VAE decoders with spatial normalization are not supported for conversion")


class VAEDecoder(nn.Module):
    """(z,) → (image,): `post_quant_conv`, then the decoder."""

    def __init__(self, vae: nn.Module, implementation: AttentionImplementation):
        super().__init__()
        check_vae(vae)
        decoder = vae.decoder
        self.post_quant_conv = vae.post_quant_conv if vae.post_quant_conv is not None else nn.Identity()
        self.conv_in = decoder.conv_in
        self.mid_block = MidBlock(decoder.mid_block, implementation)
        self.up_blocks = nn.ModuleList(ResampleBlock(block) for block in decoder.up_blocks)
        self.conv_norm_out = GroupNorm(decoder.conv_norm_out)
        self.conv_act = decoder.conv_act
        self.conv_out = decoder.conv_out

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor]:
        x = self.conv_in(self.post_quant_conv(z.to(self.conv_in.weight.dtype)))
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return (self.conv_out(self.conv_act(self.conv_norm_out(x))),)


class VAEEncoder(nn.Module):
    """(x,) → (latent,): the encoder, then `quant_conv`; the latent holds the mean and log-variance."""

    def __init__(self, vae: nn.Module, implementation: AttentionImplementation):
        super().__init__()
        check_vae(vae)
        encoder = vae.encoder
        self.conv_in = encoder.conv_in
        self.down_blocks = nn.ModuleList(ResampleBlock(block) for block in encoder.down_blocks)
        self.mid_block = MidBlock(encoder.mid_block, implementation)
        self.conv_norm_out = GroupNorm(encoder.conv_norm_out)
        self.conv_act = encoder.conv_act
        self.conv_out = encoder.conv_out
        self.quant_conv = vae.quant_conv if vae.quant_conv is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        x = self.conv_in(x.to(self.conv_in.weight.dtype))
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        x = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        return (self.quant_conv(x),)
