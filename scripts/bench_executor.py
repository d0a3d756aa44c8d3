"""Reference executor benchmark, printed as JSON: the Unet package through the executor and the same
Unet through diffusers in PyTorch float32 eager, side by side in one process (wall times of warm
runs, taken alternately so both see the same machine load; their ratio; PSNR of the executor's
output against diffusers'; load time and peak memory each adds).

The Unet has SD v1.4's architecture with random weights from a fixed seed; its package is converted
first (split_einsum by default) unless --package names one converted earlier by this script.

    flock /tmp/fullsize.lock python scripts/bench_executor.py --save-package /tmp/unet-full.mlpackage
    flock /tmp/fullsize.lock python scripts/bench_executor.py --package /tmp/unet-full.mlpackage
    python scripts/bench_executor.py --small          # the tiny configuration: a quick smoke run

Both models stay loaded (about 9 GB at full size): wrap full-size runs in `flock /tmp/fullsize.lock ...`.
"""
import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SEED = 0
BATCH_SIZE = 2


def build_unet(small: bool, dtype: torch.dtype):
    """The benchmark Unet; the same weights on every call."""
    from diffusers import UNet2DConditionModel

    config = build_config(small)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNet2DConditionModel(**config)
    return unet.to(dtype).eval().requires_grad_(False)


def convert_unet(small: bool, attention_implementation: str, path: Path) -> None:
    """Convert the Unet to `path` with the project's converter (fp16 weights, as coreml-convert does)."""
    from coreml_sd.converter.ane import component_module
    from coreml_sd.converter.conversion.convert import to_mil_program, to_ml_program, trace
    from coreml_sd.converter.families.sd import SD
    from coreml_sd.converter.sources import ModelParts
    from coreml_sd.runtime.contract import ModelDimensions

    unet = build_unet(small, torch.float16)
    dims = ModelDimensions(unet.config.cross_attention_dim, unet.config.sample_size * 8, unet.config.sample_size * 8,
                           BATCH_SIZE)
    spec = SD.spec("Unet", dims)
    module = component_module(ModelParts(unet=unet), SD.component("Unet"), attention_implementation)
    program = trace(module, spec)
    del module, unet
    gc.collect()
    mil_program = to_mil_program(program, spec)
    del program
    gc.collect()
    model = to_ml_program(mil_program)
    model.save(str(path))


def inputs_for(small: bool) -> dict[str, np.ndarray]:
    config = build_config(small)
    rng = np.random.default_rng(SEED)
    size = config["sample_size"]
    return {
        "sample": rng.standard_normal((BATCH_SIZE, 4, size, size)).astype(np.float16),
        "timestep": np.full((BATCH_SIZE,), 500, np.float16),
        "encoder_hidden_states": rng.standard_normal((BATCH_SIZE, config["cross_attention_dim"], 1, 77)
                                                     ).astype(np.float16),
    }


def build_config(small: bool) -> dict:
    if small:
        from coreml_sd.converter.models.tiny import UNET_CONFIG

        return UNET_CONFIG
    from coreml_sd.converter.models.sd_v1_4 import SD_UNET_CONFIG

    return SD_UNET_CONFIG


def rss_gib() -> dict[str, float]:
    """Current and peak resident set size of this process."""
    figures = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            figures[line.split(":")[0]] = int(line.split()[1]) / 2**20
    return figures


def reset_peak_rss() -> float:
    """Let the peak restart from the current RSS (Linux: writing 5 to clear_refs); returns it."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss_gib()["VmRSS"]


def load_diffusers(small: bool, inputs: dict[str, np.ndarray]):
    unet = build_unet(small, torch.float32)
    sample = torch.from_numpy(inputs["sample"]).float()
    timestep = torch.from_numpy(inputs["timestep"]).float()
    context = torch.from_numpy(inputs["encoder_hidden_states"]).float()[:, :, 0, :].transpose(1, 2)

    def run():
        with torch.inference_mode():
            return unet(sample, timestep, context).sample.numpy()

    return run


def load_executor(package: Path, inputs: dict[str, np.ndarray], precision: str):
    from coreml_sd.runtime.executor import ReferenceModel

    model = ReferenceModel(package, precision=precision)
    return lambda: model.predict(inputs)["noise_pred"]


def loaded_and_warm(load) -> tuple[object, dict]:
    """Load, then run once (the warm-up); the memory this added at its peak and the load time."""
    baseline = reset_peak_rss()
    start = time.perf_counter()
    run = load()
    load_s = time.perf_counter() - start
    run()
    return run, {"load_s": round(load_s, 2), "peak_rss_added_gib": round(rss_gib()["VmHWM"] - baseline, 2)}


def interleaved_timings(runs: dict, count: int) -> tuple[dict[str, list[float]], dict]:
    """`count` rounds of one timed call of each, alternating, so that both see the same machine load."""
    times = {name: [] for name in runs}
    outputs = {}
    for _ in range(count):
        for name, run in runs.items():
            start = time.perf_counter()
            outputs[name] = run()
            times[name].append(round(time.perf_counter() - start, 3))
    return times, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, help="an Unet.mlpackage converted earlier by this script")
    parser.add_argument("--save-package", type=Path, help="keep the converted package here")
    parser.add_argument("--small", action="store_true", help="the tiny configuration (a smoke run)")
    parser.add_argument("--attention-implementation", default="split_einsum")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each, after one warm-up run (default 3)")
    parser.add_argument("--precision", default="float16", choices=("float16", "float32"))
    args = parser.parse_args()
    from coreml_sd.runtime.executor import psnr

    report = {
        "configuration": "tiny" if args.small else "SD v1.4 (random weights)",
        "attention_implementation": args.attention_implementation,
        "batch_size": BATCH_SIZE,
        "precision": args.precision,
        "torch_threads": torch.get_num_threads(),
    }
    scratch = Path(tempfile.mkdtemp(prefix="bench-executor-"))
    try:
        package = args.package
        if package is None:
            package = args.save_package or scratch / "Unet.mlpackage"
            if package.exists():
                sys.exit(f"{package} exists; pass it as --package to reuse it, or remove it")
            start = time.perf_counter()
            convert_unet(args.small, args.attention_implementation, package)
            report["conversion_s"] = round(time.perf_counter() - start, 1)
            gc.collect()
        elif not package.exists():
            sys.exit(f"no package at {package}")
        report["package"] = str(package)
        inputs = inputs_for(args.small)
        diffusers, diffusers_memory = loaded_and_warm(lambda: load_diffusers(args.small, inputs))
        executor, executor_memory = loaded_and_warm(lambda: load_executor(package, inputs, args.precision))
        times, outputs = interleaved_timings({"diffusers": diffusers, "executor": executor}, args.runs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["diffusers_fp32_eager"] = dict(wall_s=times["diffusers"], **diffusers_memory)
    report["executor"] = dict(wall_s=times["executor"], **executor_memory)
    report["ratio"] = round(statistics.median(times["executor"]) / statistics.median(times["diffusers"]), 2)
    report["psnr_db"] = round(psnr(outputs["diffusers"], outputs["executor"]), 2)
    report["executor_output_finite"] = bool(np.isfinite(outputs["executor"]).all())
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
