"""iOS 18 compression: palettes per group of output channels (--quantize-granularity), linear int8/int4 weights per
channel or per block (--quantize-linear), each stored with the op it needs, run by the reference executor, and
computing what the original carrying the same compression (applied here in NumPy) computes."""
import copy
import json

import coremltools as ct
import numpy as np
import pytest
import torch

from coreml_sd.converter.cli import main
from coreml_sd.converter.compression.palettize import WEIGHT_THRESHOLD, palette
from coreml_sd.converter.conversion import ConversionOptions, convert_model
from coreml_sd.converter.conversion.program_stats import load_program
from coreml_sd.runtime.executor import ReferenceModel, psnr

PSNR_THRESHOLD_DB = 60.0  # measured: 66 dB for each mode against the same compression applied in NumPy
GROUP = 16
BLOCK = 32
# Core ML specification versions: 7 is iOS 16 / macOS 13, 9 is iOS 18 / macOS 15.
SPECIFICATION_VERSIONS = {"iOS16": 7, "iOS18": 9}


def grouped_palettes(weight: np.ndarray) -> np.ndarray:
    """Each GROUP output channels' own 4-bit palette."""
    chunks = [palette(chunk, 4) for chunk in np.split(weight.astype(np.float16), weight.shape[0] // GROUP)]
    return np.concatenate([centroids[indices] for centroids, indices in chunks]).reshape(weight.shape)


def symmetric(bits: int, block: int | None):
    """Round to integers in [-(2^(bits-1) - 1), 2^(bits-1) - 1] times a scale per output channel, or per `block`
    input channels (with their whole kernels); the scale maps the largest magnitude to the largest integer."""
    limit = 2 ** (bits - 1) - 1

    def quantize(weight: np.ndarray) -> np.ndarray:
        values = weight.astype(np.float16).astype(np.float64)
        out, inputs = values.shape[:2]
        blocks = inputs // block if block and inputs % block == 0 and inputs > block else 1
        result = np.empty_like(values)
        for channel in range(out):
            for index in range(blocks):
                span = slice(index * inputs // blocks, (index + 1) * inputs // blocks)
                scale = np.abs(values[channel, span]).max() / limit
                result[channel, span] = np.round(values[channel, span] / scale) * scale
        return result

    return quantize


MODES = {
    "grouped-4bit": ({"quantize_nbits": 4, "quantize_granularity": f"per-grouped-channel:{GROUP}"},
                     grouped_palettes, "constexpr_lut_to_dense", "iOS18"),
    "int8": ({"quantize_linear": "int8"}, symmetric(8, None), "constexpr_affine_dequantize", "iOS16"),
    "int4-blocks": ({"quantize_linear": f"int4:{BLOCK}"}, symmetric(4, BLOCK), "constexpr_blockwise_shift_scale",
                    "iOS18"),
}


@pytest.fixture(scope="module", params=list(MODES))
def compressed_unet(request, tmp_path_factory):
    options, *_ = MODES[request.param]
    output = tmp_path_factory.mktemp(request.param)
    report = convert_model(ConversionOptions(model="tiny", output=output, components=("Unet",), **options))
    assert report.converted == ["Unet"]
    return request.param, output


def test_each_mode_stores_its_weights_with_its_op_and_target(compressed_unet, tiny_pipeline):
    mode, folder = compressed_unet
    _, _, op_type, target = MODES[mode]
    package = folder / "Unet.mlpackage"
    operations = load_program(package).functions["main"].operations
    compressed = [op for op in operations if op.op_type == op_type]
    large = [m.weight for m in tiny_pipeline.unet.modules()
             if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight.numel() > WEIGHT_THRESHOLD]
    assert len(compressed) == len(large)
    assert not [op for op in operations if op.op_type.startswith("constexpr") and op.op_type != op_type]
    if mode == "grouped-4bit":  # one 16-entry palette per 16 output channels
        assert all(op.lut.val.shape[0] == op.indices.val.shape[0] // GROUP and op.lut.val.shape[-2] == 16
                   for op in compressed)
    if mode == "int4-blocks":  # int4, a scale per 32 input channels where there are more than 32
        assert all(op.data.dtype == ct.converters.mil.mil.types.int4 for op in compressed)
        assert any(op.scale.val.shape[1] == op.data.val.shape[1] // BLOCK > 1 for op in compressed)
    assert ct.utils.load_spec(str(package)).specificationVersion == SPECIFICATION_VERSIONS[target]
    settings = json.loads((folder / "manifest.json").read_text())["components"]["Unet"]["settings"]
    assert settings.get("minimum_deployment_target", "iOS16") == target


def test_each_mode_computes_what_the_same_compression_in_numpy_computes(compressed_unet, tiny_pipeline):
    mode, folder = compressed_unet
    _, compress, _, _ = MODES[mode]
    rng = np.random.RandomState(1)
    inputs = {"sample": rng.randn(2, 4, 16, 16).astype(np.float16),
              "timestep": np.array([981, 1], dtype=np.float16),
              "encoder_hidden_states": rng.randn(2, 32, 1, 77).astype(np.float16)}
    actual = ReferenceModel(folder / "Unet.mlpackage").predict(inputs)["noise_pred"]

    unet = copy.deepcopy(tiny_pipeline.unet)
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and module.weight.numel() > WEIGHT_THRESHOLD:
                module.weight.copy_(torch.from_numpy(compress(module.weight.numpy())))
        x = {name: torch.from_numpy(value.astype(np.float32)) for name, value in inputs.items()}
        expected = unet(x["sample"], x["timestep"], x["encoder_hidden_states"][:, :, 0, :].transpose(1, 2)).sample
    assert psnr(expected.numpy(), actual) >= PSNR_THRESHOLD_DB
    validation = json.loads((folder / "manifest.json").read_text())["components"]["Unet"]["validation"]
    assert validation["psnr_db"] >= PSNR_THRESHOLD_DB and validation["unquantized_psnr_db"] < validation["psnr_db"]


@pytest.mark.parametrize("arguments, message", [
    (["--quantize-linear", "int4", "--min-target", "iOS16"],
     "--min-target iOS16 is lower than --quantize-linear int4 needs (iOS18 / macOS15)"),
    (["--quantize-nbits", "4", "--quantize-granularity", "per-grouped-channel:8", "--min-target", "macOS14"],
     "--min-target macOS14 is lower than --quantize-granularity per-grouped-channel:8 needs (iOS18 / macOS15)"),
    (["--quantize-granularity", "per-grouped-channel"], "pass --quantize-nbits too"),
    (["--quantize-linear", "int8", "--quantize-nbits", "6"], "pass one of them"),
    (["--quantize-linear", "int2"], "'int2' is not a supported type"),
    (["--quantize-linear", "int4:0"], "'0' is not a positive integer"),
    (["--quantize-nbits", "4", "--quantize-granularity", "per-row"], "per-row is not supported"),
    (["--min-target", "iOS15"], "--min-target iOS15 is not a deployment target"),
])
def test_bad_compression_options_are_refused_in_one_line(arguments, message, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["--model", "tiny", "-o", str(output), "--components", "Unet", *arguments]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not output.exists()
