"""A diffusers Stable Diffusion pipeline's weights written in the original CompVis/LDM single-file layout,
as model sites publish checkpoints: the inverse of diffusers' single-file key conversion, written out
independently here so that the converter's reading of single files is tested against it."""
import re

import torch

RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_key(name: str, config) -> str:
    per_down, per_up = config.layers_per_block + 1, config.layers_per_block + 1

    def resnet(rest):
        layer, kind = rest.split(".", 1)[0], rest.split(".", 1)[1]
        return RESNET_NAMES[layer] + "." + kind

    if match := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
        block, part, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        position = 1 + block * per_down + index
        return f"input_blocks.{position}.0.{resnet(rest)}" if part == "resnets" else f"input_blocks.{position}.1.{rest}"
    if match := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", name):
        return f"input_blocks.{(int(match[1]) + 1) * per_down}.0.op.{match[2]}"
    if match := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
        block, part, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        position = block * per_up + index
        return (
            f"output_blocks.{position}.0.{resnet(rest)}" if part == "resnets" else f"output_blocks.{position}.1.{rest}"
        )
    if match := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", name):
        block = int(match[1])
        has_attention = config.up_block_types[block].startswith("CrossAttn")
        return f"output_blocks.{block * per_up + per_up - 1}.{2 if has_attention else 1}.conv.{match[2]}"
    if match := re.match(r"mid_block\.resnets\.(\d)\.(.*)", name):
        return f"middle_block.{2 * int(match[1])}.{resnet(match[2])}"
    if name.startswith("mid_block.attentions.0."):
        return "middle_block.1." + name.removeprefix("mid_block.attentions.0.")
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    module, kind = name.rsplit(".", 1)
    return fixed[module] + "." + kind


def vae_key(name: str, tensor: torch.Tensor, blocks: int) -> tuple[str, torch.Tensor]:
    name = name.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    name = re.sub(r"mid_block\.resnets\.(\d)", lambda m: f"mid.block_{int(m[1]) + 1}", name)
    if match := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", name):
        name = f"{match[1]}.mid.attn_1.{VAE_ATTENTION_NAMES[match[2]]}.{match[3]}"
        if match[2] != "group_norm" and match[3] == "weight":
            tensor = tensor[:, :, None, None]  # the original's attention projections are 1x1 convolutions
    name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
    name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
    name = re.sub(r"decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.", name)
    name = name.replace(".resnets.", ".block.").replace(".upsamplers.0.", ".upsample.")
    return name, tensor


def clip_state(text_encoder) -> dict[str, torch.Tensor]:
    """SD 1.x: transformers' CLIP text model under `cond_stage_model.transformer.text_model.`."""
    return {
        "cond_stage_model.transformer.text_model." + name.removeprefix("text_model."): tensor
        for name, tensor in text_encoder.state_dict().items()
        if not name.endswith("position_ids")
    }


def open_clip_state(text_encoder) -> dict[str, torch.Tensor]:
    """SD 2.x: OpenCLIP's text tower, fused q/k/v, one more layer than SD reads and a text projection."""
    prefix = "cond_stage_model.model."
    state = {name.removeprefix("text_model."): tensor for name, tensor in text_encoder.state_dict().items()}
    layers = text_encoder.config.num_hidden_layers
    out = {
        prefix + "token_embedding.weight": state["embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state["embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state["final_layer_norm.weight"],
        prefix + "ln_final.bias": state["final_layer_norm.bias"],
        prefix + "text_projection": torch.randn(text_encoder.config.hidden_size, text_encoder.config.hidden_size),
    }
    names = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "self_attn.out_proj": "attn.out_proj",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    for layer in range(layers + 1):
        source = min(layer, layers - 1)  # the extra last layer: a copy, which SD never reads
        block = f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[block + f"attn.in_proj_{kind}"] = torch.cat(
                [state[f"encoder.layers.{source}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            )
            for ours, theirs in names.items():
                out[block + f"{theirs}.{kind}"] = state[f"encoder.layers.{source}.{ours}.{kind}"]
    return out


def ldm_state(pipeline, unet=True, vae=True, text_encoder=True, open_clip=False) -> dict[str, torch.Tensor]:
    state = {}
    if unet:
        state.update(
            {
                "model.diffusion_model." + unet_key(name, pipeline.unet.config): tensor
                for name, tensor in pipeline.unet.state_dict().items()
            }
        )
    if vae:
        blocks = len(pipeline.vae.config.up_block_types)
        for name, tensor in pipeline.vae.state_dict().items():
            key, value = vae_key(name, tensor, blocks)
            state["first_stage_model." + key] = value
    if text_encoder:
        state.update(open_clip_state(pipeline.text_encoder) if open_clip else clip_state(pipeline.text_encoder))
    return {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}


def controlnet_key(name: str, config) -> str:
    """A diffusers ControlNetModel's weight name in lllyasviel's original layout (the Unet encoder's names, the zero
    convolutions, and the control image's embedding as one sequential `input_hint_block` of convolutions and SiLUs)."""
    module, kind = name.rsplit(".", 1)
    if match := re.match(r"controlnet_down_blocks\.(\d+)$", module):
        return f"zero_convs.{match[1]}.0.{kind}"
    if module == "controlnet_mid_block":
        return f"middle_block_out.0.{kind}"
    if module == "controlnet_cond_embedding.conv_in":
        return f"input_hint_block.0.{kind}"
    if match := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)$", module):
        return f"input_hint_block.{2 * (int(match[1]) + 1)}.{kind}"
    if module == "controlnet_cond_embedding.conv_out":
        return f"input_hint_block.{2 * (len(config.conditioning_embedding_out_channels) * 2 - 1)}.{kind}"
    if match := re.match(r"add_embedding\.linear_(\d)$", module):  # SDXL's pooled text and time ids
        return f"label_emb.0.{2 * (int(match[1]) - 1)}.{kind}"
    return unet_key(name, config)


def controlnet_state(controlnet, prefix: str = "control_model.") -> dict[str, torch.Tensor]:
    """A ControlNet's weights as lllyasviel's control_v11p_sd15_* files hold them."""
    return {prefix + controlnet_key(name, controlnet.config): tensor.detach().clone().contiguous()
            for name, tensor in controlnet.state_dict().items()}
