"""diffusers' `ResnetBlock2D` with its group norms kept at rank 4, and the blocks' resamplers."""
import torch
from torch import nn

from .layers import GroupNorm, constant


class ResnetBlock(nn.Module):
    """`ResnetBlock2D` as in SD's UNet (time embedding added before `norm2`) and VAE (no time embedding)."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        added_time = resnet.time_emb_proj is None or resnet.time_embedding_norm == "default"
        if resnet.up or resnet.down or not added_time:
            raise ValueError("only ResnetBlock2D without resampling and with an added time embedding can be converted")
        self.norm1 = GroupNorm(resnet.norm1)
        self.conv1 = resnet.conv1
        self.time_emb_proj = resnet.time_emb_proj
        self.skip_time_act = resnet.skip_time_act
        self.norm2 = GroupNorm(resnet.norm2)
        self.conv2 = resnet.conv2
        self.conv_shortcut = resnet.conv_shortcut
        self.nonlinearity = resnet.nonlinearity
        self.output_scale_factor = resnet.output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.conv1(self.nonlinearity(self.norm1(x)))
        if self.time_emb_proj is not None:
            time = temb if self.skip_time_act else self.nonlinearity(temb)
            hidden_states = hidden_states + self.time_emb_proj(time)[:, :, None, None]
        hidden_states = self.conv2(self.nonlinearity(self.norm2(hidden_states)))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        output = shortcut + hidden_states
        return output * constant(1 / self.output_scale_factor, output)


def pad_bottom_right(x: torch.Tensor) -> torch.Tensor:
    """`F.pad(x, (0, 1, 0, 1))` by concatenating zeros: coremltools converts a constant pad in float32.

    (`torch.full` with an explicit dtype is the one zero-tensor constructor it converts in float16.)
    """
    batch, channels, height, width = x.shape
    x = torch.cat([x, torch.full((batch, channels, height, 1), 0.0, dtype=x.dtype)], dim=3)
    return torch.cat([x, torch.full((batch, channels, 1, width + 1), 0.0, dtype=x.dtype)], dim=2)


class Downsample(nn.Module):
    """`Downsample2D`: a stride-2 convolution (or average pool), after VAE-style bottom-right padding."""

    def __init__(self, downsample: nn.Module):
        super().__init__()
        check_resampler(downsample)
        self.pad = downsample.use_conv and downsample.padding == 0
        self.conv = downsample.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(pad_bottom_right(x) if self.pad else x)


def check_resampler(module: nn.Module) -> None:
    if getattr(module, "norm", None) is not None:
        raise ValueError(f"{type(module).__name__} with a normalization layer is not supported for conversion")


def downsamplers(block: nn.Module) -> nn.ModuleList:
    return nn.ModuleList(Downsample(module) for module in getattr(block, "downsamplers", None) or ())


def upsamplers(block: nn.Module) -> nn.ModuleList:
    """The block's `Upsample2D` modules, shared as they are (a nearest-neighbour resize and a convolution)."""
    modules = getattr(block, "upsamplers", None) or nn.ModuleList()
    for module in modules:
        check_resampler(module)
    return modules
