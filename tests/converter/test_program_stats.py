"""Program statistics, first on a program built op by op, then on the converted tiny packages: no tensor
above rank 4, no transposes in the channels-first Unet, attention scores one head (and chunk) at a time.
"""
import json
import math

import coremltools as ct
import pytest
import torch
from coremltools.converters.mil import Builder as mb
from diffusers.models.attention_processor import Attention as DiffusersAttention

from coreml_sd.converter.ane import ATTENTION_IMPLEMENTATIONS
from coreml_sd.converter.ane.attention import IMPLEMENTATIONS, QUERY_CHUNK, Attention
from coreml_sd.converter.conversion.program_stats import program_stats
from coreml_sd.converter.families.sd import SD
from coreml_sd.runtime.contract import VAE_FACTOR


def test_stats_of_a_program_built_op_by_op():
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 2, 3, 4))])
    def program(x):
        x = mb.reshape(x=x, shape=(1, 2, 3, 2, 2))
        x = mb.transpose(x=x, perm=[0, 1, 2, 4, 3])
        x = mb.reshape(x=x, shape=(1, 2, 3, 4))
        x = mb.tile(x=x, reps=(3, 1, 1, 1))
        return mb.softmax(x=x, axis=-1)

    stats = program_stats(program)
    assert stats["max_rank"] == 5
    assert stats["op_counts"] == {"reshape": 2, "transpose": 1, "tile": 1, "softmax": 1}
    assert (stats["transposes"], stats["reshapes"]) == (1, 2)
    assert stats["largest_intermediate"]["op"] == "tile"
    assert stats["largest_intermediate"]["shape"] == [3, 2, 3, 4]
    assert stats["largest_intermediate"]["elements"] == 72
    assert stats["largest_attention_scores"]["shape"] == [3, 2, 3, 4]


def convert(module: torch.nn.Module, example: torch.Tensor) -> ct.models.MLModel:
    program = torch.export.export(module, (example,), strict=False).run_decompositions({})
    return ct.convert(program, convert_to="mlprogram", compute_precision=ct.precision.FLOAT16,
                      minimum_deployment_target=ct.target.macOS13, skip_model_load=True)


@pytest.fixture(scope="module")
def long_self_attention():
    """One self-attention over a sequence longer than split_einsum_v2's query chunk, with its sizes."""
    torch.manual_seed(0)
    heads, length = 2, 2 * QUERY_CHUNK + 100
    attention = DiffusersAttention(query_dim=8, heads=heads, dim_head=4).eval()
    example = torch.randn(1, 8, 1, length)
    models = {name: convert(Attention(attention, IMPLEMENTATIONS[name]), example)
              for name in ("split_einsum", "split_einsum_v2")}
    return models, heads, length


def test_split_einsum_v2_scores_one_query_chunk_at_a_time(long_self_attention):
    models, heads, length = long_self_attention
    whole, chunked = program_stats(models["split_einsum"]), program_stats(models["split_einsum_v2"])
    assert whole["largest_attention_scores"]["shape"] == [1, length, length]
    assert chunked["largest_attention_scores"]["shape"] == [1, length, QUERY_CHUNK]
    assert chunked["op_counts"]["softmax"] == heads * math.ceil(length / QUERY_CHUNK)
    assert max(whole["max_rank"], chunked["max_rank"]) <= 4
    assert whole["transposes"] == chunked["transposes"] == 0


def test_saved_package_gives_the_stats_of_the_converted_model(long_self_attention, tmp_path):
    model = long_self_attention[0]["split_einsum_v2"]
    model.save(str(tmp_path / "attention.mlpackage"))
    assert program_stats(tmp_path / "attention.mlpackage") == program_stats(model)


@pytest.mark.parametrize("implementation", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize("component", SD.components)
def test_no_tensor_above_rank_4(tiny_packages, component, implementation):
    assert program_stats(tiny_packages(implementation) / f"{component}.mlpackage")["max_rank"] <= 4


@pytest.mark.parametrize("implementation", ["split_einsum", "split_einsum_v2"])
def test_channels_first_unet_has_no_transposes(tiny_packages, implementation):
    assert program_stats(tiny_packages(implementation) / "Unet.mlpackage")["transposes"] == 0


def test_split_einsum_scores_are_one_head_of_the_original(tiny_packages, tiny_pipeline):
    heads = tiny_pipeline.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads
    manifest = json.loads((tiny_packages("split_einsum") / "manifest.json").read_text())
    tokens = (manifest["height"] // VAE_FACTOR) * (manifest["width"] // VAE_FACTOR)  # the first, largest level
    batch = manifest["unet_batch_size"]
    original = program_stats(tiny_packages("original") / "Unet.mlpackage")["largest_attention_scores"]
    split = program_stats(tiny_packages("split_einsum") / "Unet.mlpackage")["largest_attention_scores"]
    assert original["shape"] == [batch, heads, tokens, tokens]
    assert split["shape"] == [batch, tokens, tokens]
