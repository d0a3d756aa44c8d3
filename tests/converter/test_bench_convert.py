"""scripts/bench_convert.py --small: every figure of the converter benchmark is there, and is right where
it can be checked against the contract or the model's configuration."""
import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from coreml_sd.converter.families.sd import SD
from coreml_sd.converter.models.tiny import TEXT_WIDTH, UNET_CONFIG, VAE_CONFIG
from coreml_sd.runtime.contract import ModelDimensions

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_convert.py"
STAGES = ["load", "rewrite", "trace", "convert", "save"]
PSNR_THRESHOLD_DB = 60.0  # the tiny components measure 66-70 dB

pytestmark = pytest.mark.slow  # the script converts every component three times and validates: minutes


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_convert", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    cache = tmp_path_factory.mktemp("bench-cache")
    result = subprocess.run([sys.executable, str(SCRIPT), "--small", "--cache", str(cache)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_every_conversion_is_measured_and_described(report):
    size = VAE_CONFIG["sample_size"]
    dims = ModelDimensions(TEXT_WIDTH, size, size, unet_batch_size=2, clip_skip_layers=2)
    assert set(report["conversion"]) == {"split_einsum", "split_einsum_v2", "original"}
    assert set(report["conversion"]["split_einsum"]) == {"TextEncoder", "Unet", "VAEDecoder"}
    for implementation, runs in report["conversion"].items():
        for component, figures in runs.items():
            assert figures["wall_s"] > 0 and figures["cpu_s"] > 0 and figures["peak_rss_gib"] > 0
            assert list(figures["stages"]) == STAGES
            assert all(stage["peak_rss_gib"] <= figures["peak_rss_gib"] for stage in figures["stages"].values())
            assert figures["package_mib"] > 0
            expected = SD.spec(component, dims).to_json()
            assert figures["io"] == {"inputs": expected["inputs"], "outputs": expected["outputs"]}
            program = figures["program"]
            assert program["max_rank"] <= 4
            assert program["largest_intermediate"]["elements"] > 0


def test_attention_scores_shrink_by_the_head_count(report):
    """split_einsum computes one head's scores at a time: 1/heads of original's (the tiny latent has fewer
    tokens than split_einsum_v2's query chunk, so v2 is split_einsum there)."""
    scores = {name: runs["Unet"]["program"]["largest_attention_scores"]["elements"]
              for name, runs in report["conversion"].items()}
    heads = UNET_CONFIG["attention_head_dim"]  # diffusers' SD v1 configs give the head count under this name
    assert scores["original"] == heads * scores["split_einsum"]
    assert scores["split_einsum_v2"] == scores["split_einsum"]


def test_validation_is_measured_per_component_and_in_a_whole_run(report):
    assert set(report["validation"]) == {"TextEncoder", "Unet", "VAEDecoder"}
    main = report["conversion"]["split_einsum"]
    for component, figures in report["validation"].items():
        assert figures["wall_s"] > 0 and figures["peak_rss_gib"] > 0
        assert figures["psnr_db"] >= PSNR_THRESHOLD_DB
    whole = report["whole_run"]
    # One process converts and validates all three, so it holds at least the most any of them needs.
    assert whole["peak_rss_gib"] >= max(f["peak_rss_gib"] for f in main.values()) - 0.05
    assert whole["wall_s"] > 0
    assert 0 < whole["peak_rss_anon_gib"] <= whole["peak_rss_gib"]  # sampled anonymous part of the exact peak


def test_palettized_components_are_measured_and_smaller(report):
    quantized = report["quantized"]
    assert quantized["nbits"] == 6 and set(quantized["conversion"]) == {"TextEncoder", "Unet"}
    main = report["conversion"]["split_einsum"]
    for component, figures in quantized["conversion"].items():
        assert figures["io"] == main[component]["io"]
        assert figures["peak_rss_gib"] > 0 and "palettize" in figures["stages"]
        validation = quantized["validation"][component]
        assert validation["quantize_nbits"] == 6
        assert validation["psnr_db"] >= PSNR_THRESHOLD_DB
        assert validation["unquantized_psnr_db"] <= validation["psnr_db"]
    unet = quantized["conversion"]["Unet"]
    assert unet["program"]["op_counts"]["constexpr_lut_to_dense"] > 0
    assert unet["package_mib"] < main["Unet"]["package_mib"]


def test_every_target_is_a_check_with_its_figure(report):
    names = {check["name"] for check in report["checks"]}
    for component in ("TextEncoder", "Unet", "VAEDecoder"):
        assert f"{component} conversion peak RSS (GiB)" in names
        assert f"{component} PSNR (dB)" in names
        assert f"{component} split_einsum max rank" in names
    assert {"conversion wall time, all components (s)", "Unet split_einsum transposes",
            "whole run with validation, peak RSS (GiB)", "Unet 6-bit conversion peak RSS (GiB)",
            "Unet 6-bit PSNR against the same palettes (dB)", "Unet 6-bit package (MiB)",
            "Unet split_einsum largest attention scores (elements)",
            "Unet split_einsum_v2 largest attention scores (elements)"} <= names
    assert all({"value", "target", "met"} <= set(check) for check in report["checks"])
    assert report["targets_enforced"] is False  # --small


def test_a_missed_target_or_a_changed_output_fails_the_run(report, bench):
    heavier = copy.deepcopy(report)
    heavier["conversion"]["split_einsum"]["Unet"]["peak_rss_gib"] = bench.SD.peak_rss_targets_gib["Unet"] + 0.1
    checks = {c["name"]: c for c in bench.evaluate(heavier, baseline=report)}
    assert not checks["Unet conversion peak RSS (GiB)"]["met"]
    assert checks["TextEncoder conversion peak RSS (GiB)"]["met"]

    changed = copy.deepcopy(report)
    changed["validation"]["Unet"]["psnr_db"] += 1.0
    changed["conversion"]["original"]["Unet"]["program"]["op_counts"]["softmax"] += 1
    checks = {c["name"]: c for c in bench.evaluate(changed, baseline=report)}
    assert not checks["Unet PSNR change from the baseline (dB)"]["met"]
    assert not checks["Unet original op counts as in the baseline"]["met"]
    assert checks["Unet split_einsum op counts as in the baseline"]["met"]
