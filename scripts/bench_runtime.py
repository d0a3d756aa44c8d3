"""Runtime benchmark, printed as JSON.

1. Python-side cost per sampler step (scheduler, guidance, casts, progress) at SD's 64x64 latents, with the
   models replaced by precomputed outputs: the model calls are the backend's time, not the pipeline's.
   Measured as the difference between a long and a short run divided by the extra steps, so that the
   tokenizer, the decoder's output conversion and other per-image costs cancel out. Target: <= 2 ms.
2. Wall time of a full generation with the converted `tiny` package (load, and generate) when one exists.

    python scripts/bench_runtime.py [--package packages/tiny] [--repeats 5]
"""
import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from coreml_sd.converter.models.tiny import SCHEDULER_CONFIG, clip_vocabulary_files
from coreml_sd.runtime.package import Package
from coreml_sd.runtime.pipeline import Pipeline
from coreml_sd.runtime.schedulers import SCHEDULERS

TARGET_MS_PER_STEP = 2.0
LATENT_SIZE = 64
TEXT_WIDTH = 768


class PrecomputedModel:
    """Answers every call with the same arrays, so that only the pipeline's own work is timed."""

    def __init__(self, inputs: dict[str, tuple[tuple[int, ...], str]], outputs: dict[str, np.ndarray]):
        self.input_description = {name: (shape, np.dtype(dtype)) for name, (shape, dtype) in inputs.items()}
        self.outputs = outputs

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.outputs


def sd_sized_pipeline() -> Pipeline:
    rng = np.random.default_rng(0)
    b, h, w, d = 2, LATENT_SIZE, LATENT_SIZE, TEXT_WIDTH
    models = {
        "TextEncoder": PrecomputedModel(
            {"input_ids": ((1, 77), "float32")},
            {"last_hidden_state": rng.standard_normal((1, 77, d), dtype=np.float32)},
        ),
        "Unet": PrecomputedModel(
            {
                "sample": ((b, 4, h, w), "float16"),
                "timestep": ((b,), "float16"),
                "encoder_hidden_states": ((b, d, 1, 77), "float16"),
            },
            {"noise_pred": rng.standard_normal((b, 4, h, w), dtype=np.float32)},
        ),
        "VAEDecoder": PrecomputedModel(
            {"z": ((1, 4, h, w), "float16")},
            {"image": rng.uniform(-1, 1, (1, 3, 8 * h, 8 * w)).astype(np.float32)},
        ),
    }
    vocab, merges = clip_vocabulary_files()
    package = Package(
        path=Path("."),
        name="precomputed",
        components={},
        vocab_file=Path(vocab),
        merges_file=Path(merges),
        scheduler_config={"_class_name": "PNDMScheduler", **SCHEDULER_CONFIG},
        scaling_factor=0.18215,
        prediction_type="epsilon",
        attention_implementation=None,
    )
    return Pipeline(package, models, backend="precomputed", compute_unit="ALL")


def best_time(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def step_overhead_ms(pipe: Pipeline, scheduler: str, repeats: int, short: int = 10, long: int = 60) -> float:
    def run(steps):
        return lambda: pipe("a photo of an astronaut riding a horse", steps=steps, scheduler=scheduler, seed=0, progress=True)

    return 1000 * (best_time(run(long), repeats) - best_time(run(short), repeats)) / (long - short)


def tiny_generation(package: Path, steps: int, repeats: int) -> dict:
    start = time.perf_counter()
    pipe = Pipeline.from_package(package, backend="reference")
    load_s = time.perf_counter() - start
    generate_s = best_time(lambda: pipe("a photo of an astronaut riding a horse", steps=steps, seed=0, progress=False), repeats)
    return {"package": str(package), "backend": "reference", "steps": steps, "load_s": round(load_s, 3),
            "generate_s": round(generate_s, 3), "ms_per_step": round(1000 * generate_s / steps, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default="packages/tiny", help="converted tiny package (skipped when absent)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps of the full tiny generation")
    args = parser.parse_args()

    pipe = sd_sized_pipeline()
    overhead = {name: round(step_overhead_ms(pipe, name, args.repeats), 3) for name in SCHEDULERS}
    report = {
        "machine": platform.platform(),
        "step_overhead_ms": overhead,
        "method": "models answer with precomputed arrays; (best of 60-step runs - best of 10-step runs) / 50",
        "latent_size": [LATENT_SIZE, LATENT_SIZE],
        "target_ms_per_step": TARGET_MS_PER_STEP,
        "within_target": {name: ms <= TARGET_MS_PER_STEP for name, ms in overhead.items()},
    }
    package = Path(args.package)
    report["tiny_generation"] = (
        tiny_generation(package, args.steps, args.repeats) if package.is_dir() else f"skipped: no package at {package}"
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
