"""Tiled generation benchmark, printed as JSON: windows, seconds and peak memory as the image grows.

1. Hires upscales of one start image by 1x, 2x, 3x and 4x with the converted `tiny` package through the reference
   executor, each in a fresh process so that its peak RSS is its own: Unet windows per step, denoising steps,
   seconds, CPU seconds, CPU seconds per window-step, peak RSS. Targets: peak RSS of 4x at most 1.2x that of 2x
   (tiles, not whole-image buffers); time in proportion to windows x steps: CPU seconds per window-step within
   25% across the scales. CPU seconds (one thread per worker), because wall time on a shared machine measures
   the other processes too.
2. With --fullsize-unet: one denoising step's noise prediction over the latent of a 2x upscale (1024x1024 from a
   512x512 package: 128x128 latent pixels in 64x64 windows) with SD v1.4's Unet architecture through the executor,
   one batch-2 Unet call per window as a batch-2 package runs classifier-free guidance.

    python scripts/bench_tiling.py --package packages/tiny
    flock /tmp/fullsize.lock python scripts/bench_executor.py --save-package /tmp/unet-full.mlpackage   # once
    flock /tmp/fullsize.lock python scripts/bench_tiling.py --package packages/tiny \
        --fullsize-unet /tmp/unet-full.mlpackage
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SCALES = (1, 2, 3, 4)
PEAK_RATIO_TARGET = 1.2
PER_WINDOW_SPREAD_TARGET = 1.25  # the largest CPU seconds per window-step over the smallest, across scales
PROMPT = "a photo of an astronaut riding a horse"


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def upscale_run(package: str, scale: float, steps: int, strength: float) -> dict:
    """One hires pass (the worker process's whole job)."""
    from PIL import Image

    from coreml_sd.runtime import Pipeline
    from coreml_sd.runtime.contract import VAE_FACTOR
    from coreml_sd.runtime.tiling import Layout
    from coreml_sd.runtime.upscaling import Upscale

    pipe = Pipeline.from_package(package, backend="reference")
    pipe.model("VAEEncoder")
    start_image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (pipe.height, pipe.width, 3), np.uint8))
    upscale = Upscale(scale, strength=strength)
    width, height = upscale.size((pipe.width, pipe.height))
    windows = len(Layout((height // VAE_FACTOR, width // VAE_FACTOR), pipe.latent_window,
                         pipe.default_overlap // VAE_FACTOR).windows)
    loaded_gib = peak_rss_gib()
    start, cpu_start = time.perf_counter(), time.process_time()
    pipe(PROMPT, image=start_image, upscale=upscale, steps=steps, scheduler="ddim", seed=0, progress=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    denoising_steps = int(steps * strength)
    return {"scale": scale, "size": f"{width}x{height}", "windows": windows, "steps": denoising_steps,
            "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
            "cpu_seconds_per_window_step": round(cpu_seconds / (windows * denoising_steps), 3),
            "peak_rss_gib": round(peak_rss_gib(), 3), "peak_rss_after_load_gib": round(loaded_gib, 3)}


def fullsize_run(unet_path: str) -> dict:
    """One step of tiled noise prediction at 2x with the full-size Unet (the worker process's whole job)."""
    from coreml_sd.runtime.executor import ReferenceModel
    from coreml_sd.runtime.tiling import Layout, TiledNoise

    start = time.perf_counter()
    unet = ReferenceModel(Path(unet_path))
    load_s = time.perf_counter() - start
    (batch, channels, *window), _ = unet.input_description["sample"]
    (_, text_width, _, tokens), _ = unet.input_description["encoder_hidden_states"]
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((batch, text_width, 1, tokens)).astype(np.float16)

    def guided_noise(crops: np.ndarray, t: float, windows: list[int]) -> np.ndarray:
        noise = unet.predict({"sample": np.repeat(crops, 2, axis=0).astype(np.float16),
                              "timestep": np.full((batch,), t, np.float16), "encoder_hidden_states": hidden})
        uncond, cond = np.split(noise["noise_pred"], 2)
        return uncond + 7.5 * (cond - uncond)

    layout = Layout((2 * window[0], 2 * window[1]), tuple(window), window[0] // 4)
    latents = rng.standard_normal((1, channels, *layout.size)).astype(np.float32)
    predict = TiledNoise(guided_noise, layout)
    start = time.perf_counter()
    noise = predict(latents, 500.0)
    seconds = time.perf_counter() - start
    return {"unet": unet_path, "latent": list(layout.size), "window": window, "overlap": layout.overlap,
            "windows": len(layout.windows), "load_s": round(load_s, 1), "seconds_one_step": round(seconds, 1),
            "seconds_per_window": round(seconds / len(layout.windows), 1), "finite": bool(np.isfinite(noise).all()),
            "peak_rss_gib": round(peak_rss_gib(), 2)}


def in_worker(*arguments: str) -> dict:
    completed = subprocess.run([sys.executable, __file__, "--worker", *arguments], capture_output=True, text=True)
    if completed.returncode:
        sys.exit(f"worker {arguments} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default="packages/tiny", help="a converted tiny package with its VAEEncoder")
    parser.add_argument("--steps", type=int, default=8, help="schedule length; the hires pass runs steps x strength")
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--scales", default=",".join(map(str, SCALES)), help="upscale factors on tiny ('' for none)")
    parser.add_argument("--fullsize-unet", help="an Unet.mlpackage of SD v1.4's architecture (bench_executor.py)")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(1)  # CPU seconds without idle threads spinning
        kind, *rest = args.worker
        result = fullsize_run(*rest) if kind == "fullsize" else upscale_run(rest[0], float(rest[1]), int(rest[2]),
                                                                            float(rest[3]))
        print(json.dumps(result))
        return
    scales = [float(scale) for scale in args.scales.split(",") if scale]
    if scales and not Path(args.package).is_dir():
        sys.exit(f"no package at {args.package}; convert one with coreml-convert --model tiny "
                 "--components TextEncoder,Unet,VAEDecoder,VAEEncoder")
    report = {"machine": platform.platform(), "load_average_before": os.getloadavg()}
    runs = [in_worker("upscale", args.package, str(scale), str(args.steps), str(args.strength)) for scale in scales]
    by_scale = {run["scale"]: run for run in runs}
    if runs:
        report["tiny_upscales"] = runs
    if 2 in by_scale and 4 in by_scale:
        report["peak_rss_4x_over_2x"] = round(by_scale[4]["peak_rss_gib"] / by_scale[2]["peak_rss_gib"], 3)
        report["peak_ratio_target"] = PEAK_RATIO_TARGET
        report["within_target"] = report["peak_rss_4x_over_2x"] <= PEAK_RATIO_TARGET
    if len(runs) > 1:
        per_window = [run["cpu_seconds_per_window_step"] for run in runs]
        report["cpu_per_window_step_spread"] = round(max(per_window) / min(per_window), 3)
        report["spread_target"] = PER_WINDOW_SPREAD_TARGET
        report["proportional"] = report["cpu_per_window_step_spread"] <= PER_WINDOW_SPREAD_TARGET
    if args.fullsize_unet:
        report["fullsize_unet_2x"] = in_worker("fullsize", args.fullsize_unet)
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
