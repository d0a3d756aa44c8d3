"""ControlNet benchmark, printed as JSON: conversion peak memory of a ControlNet and of the ControlledUnet against the
plain Unet's, and the time of one guided step with one ControlNet against one without.

Runs on the full-size SD v1.x architecture with random weights (SD v1.4's and v1.5's are the same: the folder
scripts/bench_convert.py builds and caches) and a full-size ControlNet made from its Unet's config, random weights
too (its zero-initialised projections drawn at random, as a trained one has them), cached beside it. Every
conversion runs `coreml-convert --no-validate` in its own process, so that each peak RSS (the child's max RSS as the
kernel reports it) is its own: the plain Unet first, then Unet + ControlNet, whose ControlNet and ControlledUnet
are then converted again one at a time (the other packages being up to date). The steps run the converted
packages through the reference executor at the packages' size (512x512, Unet batch 2): the Unet alone, and the
ControlNet followed by the ControlledUnet given its residuals, as coreml-generate runs a guided step with one
ControlNet; the two alternate, each the best of --repeats, in wall and in CPU seconds (the target is checked on CPU
seconds, which other load on a shared machine inflates less).

Targets: ControlNet conversion peak <= 1.1x the plain Unet's; ControlledUnet conversion peak <= 1.1x the plain
Unet's; a step with one ControlNet <= 1.5x a step without. Each figure is printed beside its target, and a missed
target exits 1.

    flock /tmp/fullsize.lock python scripts/bench_controlnet.py     # full size (~4-6 GiB, several minutes)
    python scripts/bench_controlnet.py --small                      # the tiny configuration: a quick smoke run
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_convert  # noqa: E402  (the cached random-weight model folders and the measured child runs)

CONTROLNET_PEAK_FACTOR = 1.1  # of the plain Unet's conversion peak
CONTROLLED_UNET_PEAK_FACTOR = 1.1
STEP_TIME_FACTOR = 1.5  # a guided step with one ControlNet, of one without
PROJECTION_STD = 0.5  # the randomised zero convolutions: residuals about as large as the skips they join


def build_controlnet(model_folder: Path, output: Path) -> None:
    """A ControlNet with the Unet's encoder layout (diffusers' ControlNetModel.from_unet, default conditioning
    embedding) and random weights, saved as a diffusers folder."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(model_folder / "unet"))
    torch.manual_seed(bench_convert.SEED)
    controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    with torch.no_grad():
        for projection in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                           controlnet.controlnet_cond_embedding.conv_out]:
            projection.weight.normal_(0, PROJECTION_STD / projection.weight[0].numel() ** 0.5)
            projection.bias.normal_(0, 0.1)
    controlnet.save_pretrained(output, safe_serialization=True)


def controlnet_folder(model_folder: Path) -> Path:
    """The cached ControlNet for `model_folder`'s Unet, built in a child process when missing."""
    folder = model_folder.with_name(model_folder.name + "-controlnet")
    if not folder.is_dir():
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
        try:
            subprocess.run([sys.executable, __file__, "--build-controlnet", str(model_folder), str(staging)],
                           check=True)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def packages(output: Path) -> dict[str, int]:
    """Each installed package by component name, with its folder's inode: an install renames a new folder into
    place, so a changed inode is a component converted."""
    manifest = json.loads((output / "manifest.json").read_text())
    return {name: (output / entry["file"]).stat().st_ino for name, entry in manifest["components"].items()
            if (output / entry["file"]).is_dir()}


def convert(argv: list[str], output: Path, expected: list[str] | None) -> dict:
    """One measured coreml-convert run, which must convert exactly the components `expected` names (a ControlNet
    as "controlnet"; None: any)."""
    before = packages(output) if (output / "manifest.json").is_file() else {}
    result = bench_convert.run_measured([sys.executable, "-m", "coreml_sd.converter.cli", *argv, "--no-validate",
                                         "-o", str(output)])
    after = packages(output)
    converted = sorted("controlnet" if name.startswith("controlnet/") else name
                       for name, inode in after.items() if before.get(name) != inode)
    if expected is not None and converted != sorted(expected):
        raise RuntimeError(f"coreml-convert {' '.join(argv)} converted {converted}, not {expected}")
    return {"converted": converted, "peak_rss_gib": result["peak_rss_gib"], "wall_s": result["wall_s"],
            "cpu_s": result["cpu_s"]}


def conversions(model: Path, controlnet: Path, output: Path) -> dict:
    plain = ["--model", str(model), "--components", "Unet"]
    controlled = [*plain, "--controlnet", str(controlnet)]
    runs = {"Unet": convert(plain, output, ["Unet"])}
    print("converting the ControlledUnet and the ControlNet (setting up)", file=sys.stderr, flush=True)
    convert(controlled, output, None)
    manifest = json.loads((output / "manifest.json").read_text())
    name = next(name for name in manifest["components"] if name.startswith("controlnet/"))
    for component, expected in ((name, "controlnet"), ("ControlledUnet", "ControlledUnet")):
        print(f"converting {component} alone", file=sys.stderr, flush=True)
        shutil.rmtree(output / manifest["components"][component]["file"])
        runs[expected] = convert(controlled, output, [expected])
    runs["controlnet"]["component"] = name
    return runs


def step_inputs(model, rng, residuals: dict | None = None) -> dict:
    import numpy as np

    inputs = {}
    for name, (shape, dtype) in model.input_description.items():
        if name == "timestep":
            value = np.full(shape, 981)
        elif name == "controlnet_cond":
            value = rng.uniform(0, 1, shape)
        elif residuals is not None and name in residuals:
            value = residuals[name]
        else:
            value = rng.standard_normal(shape)
        inputs[name] = np.asarray(value).astype(dtype)
    return inputs


def timed(run) -> tuple[float, float]:
    """Wall and CPU seconds (this process's, all its threads) of `run()`."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def steps(output: Path, repeats: int) -> dict:
    """Seconds of one guided step through the reference executor, the best of `repeats`: the Unet alone, and the
    ControlNet then the ControlledUnet given its residuals. The two alternate, so that other load on the machine
    falls on both alike; CPU seconds, less sensitive to that load than wall seconds, decide the target."""
    import numpy as np

    from coreml_sd.runtime.executor import ReferenceModel
    from coreml_sd.runtime.executor.model import default_device

    manifest = json.loads((output / "manifest.json").read_text())
    name = next(name for name in manifest["components"] if name.startswith("controlnet/"))
    rng = np.random.default_rng(0)
    unet = ReferenceModel(output / "Unet.mlpackage")
    controlnet = ReferenceModel(output / manifest["components"][name]["file"])
    controlled = ReferenceModel(output / "ControlledUnet.mlpackage")
    inputs, control_inputs = step_inputs(unet, rng), step_inputs(controlnet, rng)
    residuals = {}
    plain, control, controlled_unet = [], [], []
    for _ in range(repeats):  # alternating
        plain.append(timed(lambda: unet.predict(inputs)))
        control.append(timed(lambda: residuals.update(controlnet.predict(control_inputs))))
        controlled_unet.append(timed(lambda: controlled.predict(step_inputs(controlled, rng, residuals))))
    figures = {"unet_batch": unet.input_description["sample"][0][0], "size": [manifest["height"], manifest["width"]],
               "repeats": repeats, "device": str(default_device()), "load_average": list(os.getloadavg())}
    for index, unit in enumerate(("wall", "cpu")):
        step = min(c[index] + u[index] for c, u in zip(control, controlled_unet))
        figures[unit] = {"plain_step_s": round(min(t[index] for t in plain), 2),
                         "controlnet_step_s": round(step, 2),
                         "of_which_controlnet_s": round(min(t[index] for t in control), 2),
                         "of_which_controlled_unet_s": round(min(t[index] for t in controlled_unet), 2),
                         "ratio": round(step / min(t[index] for t in plain), 3)}
    figures["ratio"] = figures["cpu"]["ratio"]
    return figures


def check(checks: list, name: str, value: float, target: float) -> None:
    checks.append({"name": name, "value": value, "target": f"<= {target}", "met": value <= target})


def benchmark(small: bool, cache: Path, output: Path, repeats: int) -> dict:
    model = bench_convert.model_folder(bench_convert.SD, small, cache)
    controlnet = controlnet_folder(model)
    report = {"size": "small" if small else "full", "model_folder": str(model), "controlnet_folder": str(controlnet),
              "cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    print("converting the plain Unet", file=sys.stderr, flush=True)
    report["conversion"] = runs = conversions(model, controlnet, output)
    print("timing a step without and with the ControlNet", file=sys.stderr, flush=True)
    result = subprocess.run([sys.executable, __file__, "--steps", str(output), "--repeats", str(repeats)],
                            check=True, capture_output=True, text=True)
    report["step"] = json.loads(result.stdout.strip().splitlines()[-1])
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    unet_peak = runs["Unet"]["peak_rss_gib"]
    report["checks"] = checks = []
    check(checks, "ControlNet conversion peak / plain Unet's", round(runs["controlnet"]["peak_rss_gib"] / unet_peak, 3),
          CONTROLNET_PEAK_FACTOR)
    check(checks, "ControlledUnet conversion peak / plain Unet's",
          round(runs["ControlledUnet"]["peak_rss_gib"] / unet_peak, 3), CONTROLLED_UNET_PEAK_FACTOR)
    check(checks, "guided step with one ControlNet / without", report["step"]["ratio"], STEP_TIME_FACTOR)
    report["targets_enforced"] = not small
    report["all_targets_met"] = all(c["met"] for c in checks)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the tiny configuration (targets not enforced)")
    parser.add_argument("--cache", type=Path, default=bench_convert.CACHE,
                        help="where the random-weight model folders are kept (default: %(default)s)")
    parser.add_argument("--output", type=Path, help="keep the converted packages here (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=2, help="calls per step timing, the best counted")
    parser.add_argument("--build-controlnet", type=Path, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from coreml_sd.converter.quiet import quiet_libraries

    quiet_libraries()
    if args.build_controlnet:
        build_controlnet(*args.build_controlnet)
        return 0
    if args.steps:
        print(json.dumps(steps(args.steps, args.repeats)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-controlnet-") as temporary:
        report = benchmark(args.small, args.cache, args.output or Path(temporary) / "package", args.repeats)
    for c in report["checks"]:
        print(f"{'ok ' if c['met'] else 'MISSED'} {c['name']:<48} {c['value']!s:>8}  target {c['target']}",
              file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0 if report["all_targets_met"] or args.small else 1


if __name__ == "__main__":
    sys.exit(main())
