"""`--reduce-memory` benchmark, printed as JSON: peak RSS of a generation with and without it, through the
reference executor on the full-size SD v1.4 architecture (random weights), against the largest single model's
footprint.

A model's footprint is the peak RSS of a process that loads that one model and runs it once (Python, PyTorch
and coremltools included, as in a generation). Every measurement runs in a process of its own; its peak is
the child's max RSS as the kernel reports it (what `/usr/bin/time -v` prints). Target: the peak with
`reduce_memory` is at most the largest footprint + 20%.

    flock /tmp/fullsize.lock python scripts/bench_reduce_memory.py [--steps 2] [--package FOLDER]
    python scripts/bench_reduce_memory.py --small       # the tiny configuration: a quick smoke run

Without --package, the full-size package is converted once (TextEncoder, Unet, VAEDecoder; no validation) from
the random-weight diffusers folder that scripts/bench_convert.py builds, and cached next to it.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30
TARGET_FACTOR = 1.2  # the reduced peak may be at most this multiple of the largest single model's footprint
COMPONENTS = ("TextEncoder", "Unet", "VAEDecoder")
PROMPT = "a photo of an astronaut riding a horse"


def cached_package(small: bool) -> Path:
    """The converted package of bench_convert's random-weight folder, converted once."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_convert

    folder = bench_convert.model_folder(bench_convert.SD, small, bench_convert.CACHE)
    package = folder.with_name(folder.name + "-package")
    if not (package / "manifest.json").is_file():
        staging = package.with_name(package.name + ".partial")
        subprocess.run([sys.executable, "-m", "coreml_sd.converter.cli", "--model", str(folder), "-o", str(staging),
                        "--components", ",".join(COMPONENTS), "--no-validate"], check=True)
        staging.rename(package)
    return package


def run_child(args: list[str]) -> tuple[dict, float, float]:
    """A measurement in a process of its own: what it printed (JSON), its peak RSS in GiB and its wall time."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"measurement {args} failed with exit code {process.returncode}")
    return json.loads(output), usage.ru_maxrss * 1024 / GIB, time.perf_counter() - start


def single_model(package: Path, component: str) -> dict:
    """Load one component and run it once on inputs of its declared shapes."""
    import numpy as np

    from coreml_sd.runtime.backends import load_model
    from coreml_sd.runtime.package import load_package

    files = load_package(package).component(component)
    model = load_model(files, "reference", "ALL")
    rng = np.random.default_rng(0)
    inputs = {name: (rng.integers(0, 49406, shape) if name == "input_ids" else rng.standard_normal(shape)).astype(dtype)
              for name, (shape, dtype) in model.input_description.items()}
    outputs = model.predict(inputs)
    return {"outputs": {name: list(value.shape) for name, value in outputs.items()}}


def generation(package: Path, steps: int, reduce_memory: bool) -> dict:
    import numpy as np

    from coreml_sd.runtime import Pipeline

    start = time.perf_counter()
    pipe = Pipeline.from_package(package, backend="reference", reduce_memory=reduce_memory)
    loaded = time.perf_counter() - start
    image = pipe(PROMPT, steps=steps, seed=0, progress=False, watermark=False).images[0]
    return {"load_s": round(loaded, 1), "size": list(image.size), "mean_pixel": float(np.asarray(image).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", help="an SD package folder (default: the cached full-size random one)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--small", action="store_true", help="the tiny configuration instead of the full size")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "ARG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, value = args.child
        package = Path(args.package)
        if kind == "model":
            result = single_model(package, value)
        else:
            result = generation(package, args.steps, reduce_memory=value == "reduced")
        print(json.dumps(result))
        return

    package = Path(args.package) if args.package else cached_package(args.small)
    base = ["--package", str(package), "--steps", str(args.steps)]
    footprints = {}
    for component in COMPONENTS:
        _, peak, wall = run_child(base + ["--child", "model", component])
        footprints[component] = {"peak_rss_gib": round(peak, 3), "wall_s": round(wall, 1)}
    generations = {}
    for mode in ("all-loaded", "reduced"):
        result, peak, wall = run_child(base + ["--child", "generate", mode])
        generations[mode] = {"peak_rss_gib": round(peak, 3), "wall_s": round(wall, 1), **result}
    largest = max(footprints, key=lambda name: footprints[name]["peak_rss_gib"])
    limit = TARGET_FACTOR * footprints[largest]["peak_rss_gib"]
    reduced = generations["reduced"]["peak_rss_gib"]
    report = {
        "machine": platform.platform(),
        "load_average": open("/proc/loadavg").read().split()[:3] if Path("/proc/loadavg").exists() else None,
        "package": str(package),
        "backend": "reference",
        "steps": args.steps,
        "single_model_footprint": footprints,
        "largest_model": largest,
        "generation": generations,
        "reduced_over_largest": round(reduced / footprints[largest]["peak_rss_gib"], 3),
        "saved_gib": round(generations["all-loaded"]["peak_rss_gib"] - reduced, 3),
        "target": f"reduced peak <= {TARGET_FACTOR} x the largest single model's footprint ({limit:.3f} GiB)",
        "within_target": reduced <= limit,
        "same_image": generations["reduced"]["mean_pixel"] == generations["all-loaded"]["mean_pixel"],
    }
    print(json.dumps(report, indent=2))
    if not report["within_target"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
