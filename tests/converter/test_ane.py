"""The Neural Engine rewrite computes what diffusers/transformers compute, in float32, for every attention
implementation: layer by layer against the original modules, then whole components against the tiny pipeline.
"""
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention as DiffusersAttention
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from coreml_sd.converter.ane import ATTENTION_IMPLEMENTATIONS, component_module
from coreml_sd.converter.ane.attention import (
    IMPLEMENTATIONS,
    QUERY_CHUNK,
    Attention,
    AttentionImplementation,
    SpatialSelfAttention,
    all_heads_attention,
    per_head_attention,
)
from coreml_sd.converter.ane.layers import CHANNELS_FIRST, TOKENS_LAST, GroupNorm
from coreml_sd.converter.ane.resnet import ResnetBlock
from coreml_sd.converter.ane.transformer import SpatialTransformer
from coreml_sd.converter.families.sd import SD
from coreml_sd.converter.models.tiny import UNET_CONFIG

TOLERANCE = 1e-4
# split_einsum_v2 with a chunk short enough for the small test sequences to be split, remainder included.
SHORT_CHUNKS = AttentionImplementation("split_einsum_v2", CHANNELS_FIRST, query_chunk=7)
EVERY_IMPLEMENTATION = [IMPLEMENTATIONS[name] for name in ATTENTION_IMPLEMENTATIONS] + [SHORT_CHUNKS]


def implementation_id(implementation: AttentionImplementation) -> str:
    return (
        f"{implementation.name}-chunk{implementation.query_chunk}"
        if implementation.query_chunk
        else implementation.name
    )


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape
    return (actual - expected).abs().max().item()


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturbs every parameter, so that no norm's affine or bias is an identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return module.eval()


def to_channels_first(tokens: torch.Tensor) -> torch.Tensor:
    """(B, S, C) → (B, C, 1, S)."""
    return tokens.transpose(1, 2)[:, :, None, :]


def to_tokens_last(channels_first: torch.Tensor) -> torch.Tensor:
    return channels_first[:, :, 0, :].transpose(1, 2)


def in_layout(implementation: AttentionImplementation, tokens: torch.Tensor) -> torch.Tensor:
    return tokens if implementation.layout is TOKENS_LAST else to_channels_first(tokens)


def from_layout(implementation: AttentionImplementation, x: torch.Tensor) -> torch.Tensor:
    return x if implementation.layout is TOKENS_LAST else to_tokens_last(x)


@pytest.mark.parametrize("groups, channels, eps", [(8, 32, 1e-6), (32, 64, 1e-5), (1, 12, 1e-5)])
def test_group_norm_matches_torch(groups, channels, eps):
    norm = randomize_(torch.nn.GroupNorm(groups, channels, eps=eps))
    x = torch.randn(2, channels, 5, 7) * 3 + 1
    assert max_error(GroupNorm(norm)(x), norm(x)) <= TOLERANCE


def test_layer_norm_and_linear_match_torch_in_both_layouts():
    norm, linear = randomize_(torch.nn.LayerNorm(24)), randomize_(torch.nn.Linear(24, 40))
    tokens = torch.randn(2, 10, 24) * 2 + 0.5
    assert max_error(TOKENS_LAST.layer_norm(tokens, norm), norm(tokens)) <= TOLERANCE
    assert (
        max_error(to_tokens_last(CHANNELS_FIRST.layer_norm(to_channels_first(tokens), norm)), norm(tokens)) <= TOLERANCE
    )
    assert (
        max_error(to_tokens_last(CHANNELS_FIRST.linear(to_channels_first(tokens), linear)), linear(tokens)) <= TOLERANCE
    )


@pytest.mark.parametrize("query_length", [5, QUERY_CHUNK + 88])
def test_attention_kernels_match_scaled_dot_product_attention(query_length):
    heads, head_dim, key_length = 2, 4, 77
    generator = torch.Generator().manual_seed(1)
    query, key, value = (
        torch.randn(2, length, heads * head_dim, generator=generator)
        for length in (query_length, key_length, key_length)
    )

    def split_heads(x):
        return x.reshape(2, -1, heads, head_dim).transpose(1, 2)

    expected = F.scaled_dot_product_attention(split_heads(query), split_heads(key), split_heads(value))
    expected = expected.transpose(1, 2).reshape(2, query_length, heads * head_dim)
    scale = head_dim**-0.5
    assert max_error(all_heads_attention(query, key, value, heads, scale), expected) <= TOLERANCE
    channels_first = [to_channels_first(x) for x in (query, key, value)]
    for query_chunk in (None, QUERY_CHUNK):
        actual = per_head_attention(*channels_first, heads, scale, query_chunk)
        assert max_error(to_tokens_last(actual), expected) <= TOLERANCE


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("implementation", EVERY_IMPLEMENTATION, ids=implementation_id)
def test_attention_matches_diffusers(implementation, cross):
    original = randomize_(
        DiffusersAttention(query_dim=24, heads=3, dim_head=8, cross_attention_dim=16 if cross else None)
    )
    hidden_states = torch.randn(2, 20, 24)
    context = torch.randn(2, 77, 16) if cross else None
    with torch.no_grad():
        expected = original(hidden_states, encoder_hidden_states=context)
        rewritten = Attention(original, implementation)
        actual = rewritten(
            in_layout(implementation, hidden_states), None if context is None else in_layout(implementation, context)
        )
    assert max_error(from_layout(implementation, actual), expected) <= TOLERANCE


@pytest.mark.parametrize("use_linear_projection", [False, True], ids=["conv-projections", "linear-projections"])
@pytest.mark.parametrize("implementation", EVERY_IMPLEMENTATION, ids=implementation_id)
def test_spatial_transformer_matches_diffusers(implementation, use_linear_projection):
    original = randomize_(
        Transformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=16,
            norm_num_groups=4,
            cross_attention_dim=12,
            use_linear_projection=use_linear_projection,
        )
    )
    x, context = torch.randn(2, 16, 3, 5), torch.randn(2, 77, 12)
    with torch.no_grad():
        expected = original(x, encoder_hidden_states=context).sample
        actual = SpatialTransformer(original, implementation)(x, in_layout(implementation, context))
    assert max_error(actual, expected) <= TOLERANCE


def test_resnets_match_diffusers(tiny_pipeline):
    unet_resnet = tiny_pipeline.unet.down_blocks[1].resnets[0]  # 32 → 64 channels: a shortcut convolution
    vae_resnet = tiny_pipeline.vae.decoder.mid_block.resnets[0]  # no time embedding
    x, temb = torch.randn(2, 32, 8, 8), torch.randn(2, unet_resnet.time_emb_proj.in_features)
    vae_x = torch.randn(1, vae_resnet.in_channels, 6, 6)
    with torch.no_grad():
        assert max_error(ResnetBlock(unet_resnet)(x, temb), unet_resnet(x, temb)) <= TOLERANCE
        assert max_error(ResnetBlock(vae_resnet)(vae_x), vae_resnet(vae_x, None)) <= TOLERANCE


@pytest.mark.parametrize("implementation", EVERY_IMPLEMENTATION, ids=implementation_id)
def test_vae_attention_matches_diffusers(tiny_pipeline, implementation):
    original = tiny_pipeline.vae.decoder.mid_block.attentions[0]
    x = torch.randn(1, original.to_q.in_features, 24, 24)  # 576 tokens: chunked by split_einsum_v2 too
    with torch.no_grad():
        assert max_error(SpatialSelfAttention(original, implementation)(x), original(x)) <= TOLERANCE


def contract_inputs(pipeline, component: str, batch: int = 2, latent: tuple[int, int] = (16, 16)) -> tuple:
    generator = torch.Generator().manual_seed(2)
    if component == "TextEncoder":
        ids = pipeline.tokenizer(
            ["a photo of an astronaut riding a horse"], padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        return (ids.float(),)
    if component == "Unet":
        text_width = pipeline.text_encoder.config.hidden_size
        return (
            torch.randn(batch, 4, *latent, generator=generator),
            torch.tensor([981.0, 1.0][:batch]),
            torch.randn(batch, text_width, 1, 77, generator=generator),
        )
    if component == "VAEDecoder":
        return (torch.randn(1, 4, *latent, generator=generator),)
    return (torch.rand(1, 3, 8 * latent[0], 8 * latent[1], generator=generator) * 2 - 1,)


@torch.no_grad()
def pipeline_outputs(pipeline, component: str, inputs: tuple) -> tuple:
    """The contract's outputs computed the way diffusers' StableDiffusionPipeline calls the modules."""
    if component == "TextEncoder":
        output = pipeline.text_encoder(inputs[0].long())
        return output.last_hidden_state, output.pooler_output
    if component == "Unet":
        sample, timestep, context = inputs
        return (pipeline.unet(sample, timestep, encoder_hidden_states=to_tokens_last(context)).sample,)
    vae = pipeline.vae
    if component == "VAEDecoder":
        return (vae.decoder(vae.post_quant_conv(inputs[0])),)
    return (vae.quant_conv(vae.encoder(inputs[0])),)


@pytest.mark.parametrize("implementation", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("component", ["TextEncoder", "Unet", "VAEDecoder", "VAEEncoder"])
def test_components_match_the_pipeline(tiny_pipeline, component, implementation):
    inputs = contract_inputs(tiny_pipeline, component)
    with torch.no_grad():
        actual = component_module(tiny_pipeline, SD.component(component), implementation)(*inputs)
    expected = pipeline_outputs(tiny_pipeline, component, inputs)
    assert isinstance(actual, tuple) and len(actual) == len(expected)
    for actual_output, expected_output in zip(actual, expected):
        assert max_error(actual_output, expected_output) <= TOLERANCE


def test_unet_resizes_to_skip_connections_when_the_latent_is_not_a_multiple_of_the_upsampling(tiny_pipeline):
    inputs = contract_inputs(tiny_pipeline, "Unet", batch=1, latent=(10, 14))  # 2 upsamplers: multiples of 4
    with torch.no_grad():
        actual = component_module(tiny_pipeline, SD.component("Unet"), "split_einsum")(*inputs)
    assert max_error(actual[0], pipeline_outputs(tiny_pipeline, "Unet", inputs)[0]) <= TOLERANCE


@pytest.mark.parametrize("component", ["TextEncoder", "Unet", "VAEDecoder", "VAEEncoder"])
def test_modules_share_the_pipeline_weights_and_leave_it_unchanged(tiny_pipeline, component):
    owner = {"TextEncoder": tiny_pipeline.text_encoder, "Unet": tiny_pipeline.unet}.get(component, tiny_pipeline.vae)
    before = {name: value.clone() for name, value in owner.state_dict().items()}
    module = component_module(tiny_pipeline, SD.component(component), "split_einsum")
    with torch.no_grad():
        module(*contract_inputs(tiny_pipeline, component))
    assert {id(p) for p in module.parameters()} <= {id(p) for p in owner.parameters()}
    after = owner.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)


def test_float16_weights_compute_in_float16(tiny_pipeline):
    half_pipeline = SimpleNamespace(unet=copy.deepcopy(tiny_pipeline.unet).half())
    inputs = contract_inputs(tiny_pipeline, "Unet")  # float32 inputs are cast to the weights' dtype
    with torch.no_grad():
        (actual,) = component_module(half_pipeline, SD.component("Unet"), "split_einsum")(*inputs)
    expected = pipeline_outputs(tiny_pipeline, "Unet", inputs)[0]
    assert actual.dtype == torch.float16
    assert max_error(actual.float(), expected) <= 1e-2 * expected.abs().max().item()


def test_unknown_names_are_rejected_with_the_choices(tiny_pipeline):
    with pytest.raises(ValueError, match="split_einsum_v2"):
        component_module(tiny_pipeline, SD.component("Unet"), "flash")
    with pytest.raises(ValueError, match="VAEEncoder"):
        component_module(tiny_pipeline, SD.component("Vocoder"), "split_einsum")


def test_unsupported_unet_configuration_is_rejected(tiny_pipeline):
    pipeline = SimpleNamespace(unet=UNet2DConditionModel(**UNET_CONFIG, num_class_embeds=10))
    with pytest.raises(ValueError, match="class_embedding"):
        component_module(pipeline, SD.component("Unet"), "split_einsum")
