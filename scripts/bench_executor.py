"""Reference executor benchmark, printed as JSON: the Unet package through the executor and the same
Unet through diffusers in PyTorch float32 eager, side by side in one process (wall times of warm
runs, taken alternately so both see the same machine load; their ratio beside its target; PSNR of
the executor's output against diffusers'; load time and peak memory each adds; the executor's time
per MIL op type in its last run).

The Unet has SD v1.4's architecture with random weights from a fixed seed; its package is converted
first (split_einsum by default) unless --package names one converted earlier by this script.
--package-dir takes a converted model directory whose manifest names its diffusers `source` instead,
and measures its Unet and its VAE decoder (512 x 512 for SD v1.x), each against the source's.

    flock /tmp/fullsize.lock python scripts/bench_executor.py --save-package /tmp/unet-full.mlpackage
    flock /tmp/fullsize.lock python scripts/bench_executor.py --package /tmp/unet-full.mlpackage
    flock /tmp/fullsize.lock python scripts/bench_executor.py --package-dir /work/bench/sd15-random
    python scripts/bench_executor.py --small          # the tiny configuration: a quick smoke run

Both models stay loaded (about 9 GB at full size): wrap full-size runs in `flock /tmp/fullsize.lock ...`.
"""
import argparse
import gc
import json
import os
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
# Executor time / PyTorch float32 eager time (issue #31 for the Unet step; the decoder, which
# dominates a one-step image, is held to the same bar).
TARGET_RATIO = 1.0


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


class OpTimes:
    """Seconds per MIL op type over the executor's steps, reset at each run (the last run's split)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def timed(self, step):
        def run(env: list) -> None:
            start = time.perf_counter()
            step(env)
            self.seconds[step.op_type] = self.seconds.get(step.op_type, 0.0) + time.perf_counter() - start

        return run

    def split(self) -> dict[str, float]:
        ranked = sorted(self.seconds.items(), key=lambda item: -item[1])
        return {op_type: round(seconds, 2) for op_type, seconds in ranked if seconds >= 0.005}


def load_executor(package: Path, inputs: dict[str, np.ndarray], precision: str, output: str, op_times: OpTimes):
    from coreml_sd.runtime.executor import ReferenceModel

    model = ReferenceModel(package, precision=precision)
    # The compiled program runs its steps in order; timing each is this script's business, not the executor's.
    function = model._function
    function.steps = [op_times.timed(step) for step in function.steps]

    def run():
        op_times.seconds.clear()
        return model.predict(inputs)[output]

    return run


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


def compared(diffusers_load, executor_load, op_times: OpTimes, runs: int) -> dict:
    """Both loaded and warmed, timed alternately: wall times, ratio beside its target, PSNR, op split."""
    from coreml_sd.runtime.executor import psnr

    diffusers, diffusers_memory = loaded_and_warm(diffusers_load)
    executor, executor_memory = loaded_and_warm(executor_load)
    times, outputs = interleaved_timings({"diffusers": diffusers, "executor": executor}, runs)
    medians = {name: statistics.median(wall) for name, wall in times.items()}
    ratio = medians["executor"] / medians["diffusers"]
    return {
        "diffusers_fp32_eager": dict(wall_s=times["diffusers"], median_s=round(medians["diffusers"], 3),
                                     **diffusers_memory),
        "executor": dict(wall_s=times["executor"], median_s=round(medians["executor"], 3), **executor_memory),
        "ratio": round(ratio, 2),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "psnr_db": round(psnr(outputs["diffusers"], outputs["executor"]), 2),
        "executor_output_finite": bool(np.isfinite(outputs["executor"]).all()),
        "executor_op_seconds": op_times.split(),
    }


def load_diffusers_component(source: Path, component: str, inputs: dict[str, np.ndarray]):
    """The source's Unet or VAE decoder in float32, called as the package's program computes it."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if component == "Unet":
        unet = UNet2DConditionModel.from_pretrained(source / "unet", torch_dtype=torch.float32).eval()
        sample = torch.from_numpy(inputs["sample"]).float()
        timestep = torch.from_numpy(inputs["timestep"]).float()
        context = torch.from_numpy(inputs["encoder_hidden_states"]).float()[:, :, 0, :].transpose(1, 2)
        return lambda: unet(sample, timestep, context).sample.numpy()
    vae = AutoencoderKL.from_pretrained(source / "vae", torch_dtype=torch.float32).eval()
    latent = torch.from_numpy(inputs["z"]).float()
    return lambda: vae.decode(latent).sample.numpy()


def package_dir_report(directory: Path, precision: str, runs: int) -> dict:
    """The directory's Unet and VAE decoder, each against its diffusers source."""
    manifest = json.loads((directory / "manifest.json").read_text())
    source = Path(manifest["source"]["path"])
    report = {"package_dir": str(directory), "source": str(source)}
    rng = np.random.default_rng(SEED)
    for component, output in (("Unet", "noise_pred"), ("VAEDecoder", "image")):
        description = manifest["components"][component]["inputs"]
        inputs = {name: (np.full(d["shape"], 500, d["dtype"]) if name == "timestep"
                         else rng.standard_normal(d["shape"]).astype(d["dtype"]))
                  for name, d in description.items()}
        op_times = OpTimes()
        with torch.inference_mode():
            report[component] = dict(
                input_shapes={name: list(value.shape) for name, value in inputs.items()},
                **compared(lambda: load_diffusers_component(source, component, inputs),
                           lambda: load_executor(directory / manifest["components"][component]["file"], inputs,
                                                 precision, output, op_times),
                           op_times, runs))
        gc.collect()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, help="an Unet.mlpackage converted earlier by this script")
    parser.add_argument("--package-dir", type=Path, help="a converted SD model directory: its Unet and VAE decoder")
    parser.add_argument("--save-package", type=Path, help="keep the converted package here")
    parser.add_argument("--small", action="store_true", help="the tiny configuration (a smoke run)")
    parser.add_argument("--attention-implementation", default="split_einsum")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each, after one warm-up run (default 3)")
    parser.add_argument("--precision", default="float16", choices=("float16", "float32"))
    args = parser.parse_args()
    report = {"precision": args.precision, "torch_threads": torch.get_num_threads(),
              "load_average_before": list(os.getloadavg())}
    if args.package_dir is not None:
        if not (args.package_dir / "manifest.json").is_file():
            sys.exit(f"{args.package_dir} is not a converted model directory (no manifest.json); "
                     "pass one that coreml-convert wrote")
        report |= package_dir_report(args.package_dir, args.precision, args.runs)
        report["load_average_after"] = list(os.getloadavg())
        print(json.dumps(report, indent=2))
        return
    report |= {
        "configuration": "tiny" if args.small else "SD v1.4 (random weights)",
        "attention_implementation": args.attention_implementation,
        "batch_size": BATCH_SIZE,
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
        op_times = OpTimes()
        report |= compared(lambda: load_diffusers(args.small, inputs),
                           lambda: load_executor(package, inputs, args.precision, "noise_pred", op_times),
                           op_times, args.runs)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["load_average_after"] = list(os.getloadavg())
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
