"""The Core ML adapter line for line, with Core ML replaced by the reference executor at the adapter's seam
(coreml_standin.py): compiled-model cache, compute units, input casts, output names, a whole generation."""
import json
import shutil

import coremltools as ct
import numpy as np
import pytest

from coreml_sd.runtime import Pipeline, backends
from coreml_sd.runtime.backends import CompiledModelCache, CoreMLModel
from coreml_sd.runtime.errors import GenerationError
from coreml_sd.runtime.executor import ReferenceModel

from coreml_standin import COMPILED_METADATA, CompiledMLModel, Compiler, core_ml_standin

PROMPT = "a photo of an astronaut riding a horse"
SETTINGS = dict(steps=1, scheduler="ddim", seed=3, progress=False)


@pytest.fixture
def compiler():
    return Compiler()


@pytest.fixture
def core_ml(compiler, monkeypatch, tmp_path):
    """The stand-in installed where the adapter looks for coremltools, with a cache folder of its own."""
    functions = core_ml_standin(compiler)
    monkeypatch.setattr(backends, "core_ml_functions", functions)
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path / "cache"))
    return functions


def test_a_package_compiles_once_whatever_the_compute_units(tiny_package, compiler, core_ml, tmp_path):
    package = tiny_package / "TextEncoder.mlpackage"
    cache = CompiledModelCache(tmp_path / "cache", core_ml)
    first = CoreMLModel(package, "CPU_AND_NE", core_ml, cache)
    second = CoreMLModel(package, "CPU_ONLY", core_ml, cache)
    assert compiler.compiled == [package]
    assert first.compiled_path == second.compiled_path == cache.path(package)
    assert first.compiled_path.parent == tmp_path / "cache" and first.compiled_path.suffix == ".mlmodelc"
    assert (first._model.compute_units, second._model.compute_units) == (ct.ComputeUnit.CPU_AND_NE,
                                                                          ct.ComputeUnit.CPU_ONLY)


def test_other_content_or_another_os_version_compiles_again(tiny_package, compiler, core_ml, tmp_path):
    package = tmp_path / "TextEncoder.mlpackage"
    shutil.copytree(tiny_package / "TextEncoder.mlpackage", package)
    cache = CompiledModelCache(tmp_path / "cache", core_ml)
    before = cache.compiled(package)
    assert cache.compiled(package) == before and len(compiler.compiled) == 1
    newer_os = CompiledModelCache(tmp_path / "cache", core_ml_standin(compiler, os_version="15.0"))
    assert newer_os.compiled(package) != before and len(compiler.compiled) == 2
    weights = next(package.rglob("weight.bin"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")  # one byte of the weights changed
    assert cache.compiled(package) not in (before, newer_os.path(package)) and len(compiler.compiled) == 3


def test_an_interrupted_compilation_leaves_nothing(tiny_package, core_ml, tmp_path):
    def failing(package, destination):
        shutil.copytree(package, destination)  # half-written, then the compiler fails
        raise KeyboardInterrupt

    cache = CompiledModelCache(tmp_path / "cache", core_ml_standin(failing))
    with pytest.raises(KeyboardInterrupt):
        cache.compiled(tiny_package / "TextEncoder.mlpackage")
    assert list((tmp_path / "cache").iterdir()) == []


def test_an_unwritable_cache_is_one_clear_line(tiny_package, core_ml, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(GenerationError, match=r"cannot write compiled models to .*; set COREML_SD_CACHE"):
        CompiledModelCache(blocker / "cache", core_ml).compiled(tiny_package / "TextEncoder.mlpackage")


def test_adapter_casts_inputs_and_returns_the_declared_outputs(tiny_package, core_ml):
    path = tiny_package / "Unet.mlpackage"
    model = CoreMLModel(path, "ALL")
    rng = np.random.default_rng(0)
    as_float64 = {name: rng.standard_normal(shape) for name, (shape, _) in model.input_description.items()}
    outputs = model.predict(as_float64)  # float64 in: the adapter casts to the declared float16
    reference = ReferenceModel(path)
    expected = reference.predict({name: value.astype(reference.input_description[name][1])
                                  for name, value in as_float64.items()})
    assert list(outputs) == list(reference.output_description) == ["noise_pred"]
    np.testing.assert_array_equal(outputs["noise_pred"], expected["noise_pred"])


def test_adapter_reads_a_published_compiled_models_metadata(tmp_path):
    """Apple's compiled SD v1.5 Unet's metadata.json: the inputs, outputs and user metadata the adapter reads."""
    compiled = tmp_path / "Unet.mlmodelc"
    compiled.mkdir()
    (compiled / "metadata.json").write_text(json.dumps(COMPILED_METADATA, indent=2, ensure_ascii=False))
    float16 = np.dtype(np.float16)
    assert backends.describe_model(compiled) == (
        {"sample": ((2, 4, 64, 64), float16), "timestep": ((2,), float16),
         "encoder_hidden_states": ((2, 768, 1, 77), float16)},
        {"noise_pred": ((2, 4, 64, 64), float16)},
    )
    assert backends.model_metadata(compiled)["com.github.apple.ml-stable-diffusion.version"] == "1.0.0"


def test_standin_keeps_core_mls_input_rules(tiny_package, core_ml):
    model = CoreMLModel(tiny_package / "TextEncoder.mlpackage", "ALL")
    with pytest.raises(KeyError, match="does not match any of the model input"):
        model._model.predict({"input_ids": np.zeros((1, 77), np.float32), "tokens": np.zeros(1, np.float32)})
    with pytest.raises(TypeError, match="no multi-array of int64"):
        model._model.predict({"input_ids": np.zeros((1, 77), np.int64)})
    with pytest.raises(TypeError, match="must be a coremltools.ComputeUnit"):
        CompiledMLModel(str(model.compiled_path), compute_units="ALL")


def test_generation_through_the_core_ml_backend(tiny_package, tiny_runtime, compiler, core_ml, tmp_path):
    """The whole pipeline on the Core ML backend (the stand-in computing), against the executor backend."""
    pipe = Pipeline.from_package(tiny_package, backend="coreml")
    assert all(isinstance(model, CoreMLModel) for model in pipe.models.values())
    assert pipe.models["Unet"]._model.compute_units == ct.ComputeUnit.CPU_AND_NE  # split_einsum: the Neural Engine
    image = pipe(PROMPT, **SETTINGS).images[0]
    np.testing.assert_array_equal(np.asarray(image), np.asarray(tiny_runtime(PROMPT, **SETTINGS).images[0]))
    compiled = len(compiler.compiled)
    assert compiled == len(pipe.models) == 4  # the safety checker too, loaded when its stage came

    # The compiled models as a Swift Resources/ bundle: loaded as they are, nothing compiled
    bundle = tmp_path / "app" / "Resources"
    bundle.mkdir(parents=True)
    for name, model in pipe.models.items():
        shutil.copytree(model.compiled_path, bundle / f"{name}.mlmodelc")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tiny_package / name, bundle)
    swift = Pipeline.from_package(tmp_path / "app", backend="coreml")
    assert swift.package.attention_implementation == "split_einsum"  # from the compiled Unet's metadata.json
    assert len(compiler.compiled) == compiled
    np.testing.assert_array_equal(np.asarray(swift(PROMPT, **SETTINGS).images[0]), np.asarray(image))


def test_the_command_says_when_it_compiles(tiny_package, core_ml, tmp_path, capsys):
    from coreml_sd.runtime.cli import main

    argv = [PROMPT, "--model", str(tiny_package), "--backend", "coreml", "--steps", "1", "--scheduler", "ddim",
            "--no-safety-checker", "--seed", "1", "-o", str(tmp_path / "out.png")]
    assert main(argv) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert [line.split()[2] for line in notes] == ["TextEncoder.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage"]
    assert notes[0].endswith(f"once for this OS version (a Unet takes minutes); kept in {tmp_path / 'cache'}")
    assert main(argv + ["--compute-unit", "CPU_ONLY"]) == 0
    assert "note: " not in capsys.readouterr().err  # compiled before: loaded from the cache
