"""--quantize-nbits: palettes as good as scikit-learn's k-means, stored exactly in the package, and
packages that compute what the original computes with the same palettes."""
import copy
import json

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from coreml_sd.converter.cli import main
from coreml_sd.converter.compression import palettize
from coreml_sd.converter.compression.palettize import WEIGHT_THRESHOLD, palette, palettize_module, palettize_program
from coreml_sd.converter.conversion import ComponentOptions
from coreml_sd.converter.conversion.program_stats import load_program, program_stats
from coreml_sd.converter.conversion.settings import component_settings
from coreml_sd.runtime.executor import ReferenceModel, psnr

PSNR_THRESHOLD_DB = 60.0  # the tiny Unet measures 66 dB against the same palettes
NBITS = 6


def mean_squared_error(values: np.ndarray, centroids: np.ndarray) -> float:
    """Of every value quantized to its nearest centroid, by brute force."""
    nearest = np.abs(values[:, None] - centroids[None, :]).min(axis=1)
    return float(np.mean(nearest**2))


def test_weights_with_few_distinct_values_are_kept_exactly():
    rng = np.random.default_rng(0)
    weight = rng.choice(rng.standard_normal(50).astype(np.float16), size=(64, 64))
    centroids, indices = palette(weight, NBITS)
    assert np.array_equal(centroids[indices].astype(np.float16).reshape(weight.shape), weight)


@pytest.mark.parametrize("nbits", [2, 4, 6])
def test_palette_is_as_good_as_scikit_learns_kmeans(nbits):
    # A weight of a realistic size (a 3x3 convolution, 192 -> 192 channels), Gaussian like trained ones.
    weight = np.random.default_rng(nbits).standard_normal((192, 192, 3, 3)).astype(np.float16)
    values = weight.astype(np.float64).reshape(-1)
    centroids, indices = palette(weight, nbits)
    assert len(centroids) == 2**nbits and np.all(np.diff(centroids) > 0)
    # Each element gets its nearest centroid.
    np.testing.assert_allclose(np.abs(values - centroids[indices]), np.abs(values[:, None] - centroids).min(axis=1))
    reference = KMeans(n_clusters=2**nbits, n_init=1, random_state=0).fit(values.reshape(-1, 1))
    ours, theirs = mean_squared_error(values, centroids), mean_squared_error(values, reference.cluster_centers_.ravel())
    assert ours <= 1.01 * theirs, (ours, theirs)


def test_palettize_module_changes_large_linear_and_conv_weights_only():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3), torch.nn.Linear(64, 64), torch.nn.Linear(16, 16),
                                 torch.nn.GroupNorm(8, 64)).half()
    before = copy.deepcopy(module.state_dict())
    palettized = palettize_module(module, NBITS)
    assert palettized == 32 * 64 * 9 + 64 * 64
    for name, value in module.state_dict().items():
        if name in ("0.weight", "1.weight"):
            assert len(torch.unique(value)) <= 2**NBITS
            assert psnr(before[name].float().numpy(), value.float().numpy()) > 30
        else:
            assert torch.equal(value, before[name]), name


@pytest.fixture(scope="module")
def palettized_unet(tiny_palettized_package):
    assert (
        json.loads((tiny_palettized_package / "manifest.json").read_text())["components"]["Unet"]["settings"][
            "quantize_nbits"
        ]
        == NBITS
    )
    return tiny_palettized_package


def test_every_large_weight_is_stored_as_a_palette(palettized_unet, tiny_pipeline):
    program = load_program(palettized_unet / "Unet.mlpackage")
    palettes = [op for op in program.functions["main"].operations if op.op_type == "constexpr_lut_to_dense"]
    plain = [
        op
        for op in program.functions["main"].operations
        if op.op_type == "const"
        and getattr(op.outputs[0].val, "size", 0) > WEIGHT_THRESHOLD
        and op.outputs[0].child_ops[0] not in palettes
    ]
    assert not plain
    large = [
        m.weight
        for m in tiny_pipeline.unet.modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight.numel() > WEIGHT_THRESHOLD
    ]
    assert sum(int(np.prod(op.outputs[0].shape)) for op in palettes) == sum(w.numel() for w in large)
    assert all(op.lut.val.size == 2**NBITS for op in palettes)
    entry = json.loads((palettized_unet / "manifest.json").read_text())["components"]["Unet"]
    assert entry["settings"]["quantize_nbits"] == NBITS
    assert entry["palettized_parameters"] == sum(w.numel() for w in large)


def test_palettized_unet_computes_what_the_palettized_original_computes(palettized_unet, tiny_pipeline):
    entry = json.loads((palettized_unet / "manifest.json").read_text())["components"]["Unet"]
    rng = np.random.RandomState(1)
    inputs = {
        "sample": rng.randn(2, 4, 16, 16).astype(np.float16),
        "timestep": np.array([981, 1], dtype=np.float16),
        "encoder_hidden_states": rng.randn(2, 32, 1, 77).astype(np.float16),
    }
    actual = ReferenceModel(palettized_unet / "Unet.mlpackage").predict(inputs)["noise_pred"]

    def diffusers_unet(unet):
        x = {name: torch.from_numpy(value.astype(np.float32)) for name, value in inputs.items()}
        context = x["encoder_hidden_states"][:, :, 0, :].transpose(1, 2)
        with torch.no_grad():
            return unet(x["sample"], x["timestep"], context).sample.numpy()

    original = diffusers_unet(tiny_pipeline.unet)
    unet = copy.deepcopy(tiny_pipeline.unet)
    palettize_module(unet, NBITS)
    palettized = diffusers_unet(unet)
    assert psnr(palettized, actual) >= PSNR_THRESHOLD_DB
    # Palettization costs something, and the manifest says what, on the validation inputs.
    assert psnr(original, actual) < psnr(palettized, actual)
    validation = entry["validation"]
    assert validation["psnr_db"] >= PSNR_THRESHOLD_DB and validation["unquantized_psnr_db"] < validation["psnr_db"]


def test_palettized_program_is_the_float16_program_with_palettes(palettized_unet, tiny_packages):
    palettized = program_stats(palettized_unet / "Unet.mlpackage")
    plain = program_stats(tiny_packages() / "Unet.mlpackage")
    counts = dict(palettized.pop("op_counts"))
    assert counts.pop("constexpr_lut_to_dense") > 0
    assert counts == plain.pop("op_counts")
    assert palettized == plain


def test_palettized_weights_take_three_quarters_of_a_byte(palettized_unet, tiny_packages):
    def weights_bytes(folder):
        return next((folder / "Unet.mlpackage").rglob("weight.bin")).stat().st_size

    large = sum(
        int(np.prod(op.outputs[0].shape))
        for op in load_program(palettized_unet / "Unet.mlpackage").functions["main"].operations
        if op.op_type == "constexpr_lut_to_dense"
    )
    saved = weights_bytes(tiny_packages()) - weights_bytes(palettized_unet)
    # Each palettized parameter goes from 2 bytes to 6 bits (plus a 64-entry palette per weight).
    assert saved == pytest.approx(large * (2 - NBITS / 8), rel=0.02)


def test_palettizing_group_by_group_stores_what_one_pass_stores(tiny_pipeline, monkeypatch):
    """The weights are palettized a group at a time, so that memory is freed as it goes: the groups must not change
    what is stored."""
    from coreml_sd.converter.ane import component_module
    from coreml_sd.converter.conversion.convert import to_mil_program, trace
    from coreml_sd.converter.families.sd import SD
    from coreml_sd.converter.sources import ModelParts
    from coreml_sd.runtime.contract import ModelDimensions

    # the VAE decoder: its weights make as many groups as the Unet's, for a third of its conversion
    vae = copy.deepcopy(tiny_pipeline.vae).half()
    palettize_module(vae, NBITS)
    spec = SD.spec("VAEDecoder", ModelDimensions(32, 128, 128))
    traced = trace(component_module(ModelParts(vae=vae), SD.component("VAEDecoder"), "split_einsum"), spec)

    def stored(group_bytes: int) -> tuple[int, dict]:
        monkeypatch.setattr(palettize, "GROUP_BYTES", group_bytes)
        program = to_mil_program(traced, spec)
        groups = len(palettize._weight_groups(program))
        palettize_program(program, NBITS)
        return groups, {
            op.name: (op.lut.val.tobytes(), op.indices.val.tobytes(), tuple(op.shape.val))
            for op in program.functions["main"].operations
            if op.op_type == "constexpr_lut_to_dense"
        }

    one_group, in_one_pass = stored(palettize.GROUP_BYTES)
    many_groups, in_groups = stored(64 << 10)
    assert one_group == 1 and many_groups > 5
    assert in_groups == in_one_pass and len(in_one_pass) > 20  # the decoder has 23 weights to palettize


def test_only_the_text_encoder_and_unet_depend_on_the_palette_size(tiny_pipeline):
    from coreml_sd.converter.sources import resolve
    from coreml_sd.runtime.contract import ModelDimensions

    source = resolve("tiny")
    dims = ModelDimensions(32, 128, 128)
    options = ComponentOptions(quantize_nbits=NBITS)
    assert component_settings("Unet", source, dims, options)["quantize_nbits"] == NBITS
    assert component_settings("TextEncoder", source, dims, options)["quantize_nbits"] == NBITS
    assert "quantize_nbits" not in component_settings("VAEDecoder", source, dims, options)


def test_unsupported_palette_size_is_refused(tmp_path, capsys):
    assert main(["--model", "tiny", "-o", str(tmp_path / "out"), "--quantize-nbits", "3"]) == 2
    assert "Invalid value for '--quantize-nbits': '3' is not one of" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
