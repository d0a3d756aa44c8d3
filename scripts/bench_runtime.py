"""Runtime benchmark, printed as JSON.

1. Python-side cost per sampler step (scheduler, guidance, casts, progress) at SD's 64x64 latents, with the
   models replaced by precomputed outputs: the model calls are the backend's time, not the pipeline's.
   Measured as the difference between a long and a short run divided by the extra steps, so that the
   tokenizer, the decoder's output conversion and other per-image costs cancel out. Target: <= 2 ms.
2. Wall time of a full generation with the converted `tiny` package (load, and generate) when one exists.
3. With --few-step FOLDER: seconds and Unet calls per image for SD v1.5's full-size architecture (random
   weights, converted into FOLDER once, its Unet with the batch-1 function for sampling without guidance)
   through the reference executor: 25-step DPM++ with guidance (batch 2), 4-step LCM at guidance 1 and
   1-step Euler Ancestral at guidance 0 (batch 1). Targets: LCM >= 10x faster per image than guided, Turbo
   >= 40x.

    python scripts/bench_runtime.py [--package packages/tiny] [--repeats 5] [--few-step /tmp/sd15-random]
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
        return lambda: pipe("a photo of an astronaut riding a horse", steps=steps, scheduler=scheduler, seed=0,
                            progress=True)

    return 1000 * (best_time(run(long), repeats) - best_time(run(short), repeats)) / (long - short)


def tiny_generation(package: Path, steps: int, repeats: int) -> dict:
    start = time.perf_counter()
    pipe = Pipeline.from_package(package, backend="reference")
    load_s = time.perf_counter() - start
    generate_s = best_time(lambda: pipe("a photo of an astronaut riding a horse", steps=steps, seed=0, progress=False),
                           repeats)
    return {"package": str(package), "backend": "reference", "steps": steps, "load_s": round(load_s, 3),
            "generate_s": round(generate_s, 3), "ms_per_step": round(1000 * generate_s / steps, 2)}


# SD v1.5's architecture (diffusers' configs of stable-diffusion-v1-5), built with random weights.
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}  # otherwise diffusers' defaults
SD15_TEXT_ENCODER = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "hidden_act": "quick_gelu", "projection_dim": 768}
SD15_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
            "sample_size": 512}
FEW_STEP_RUNS = {  # name: (scheduler, steps, guidance scale)
    "guided_dpm++_25": ("dpm++", 25, 7.5),
    "lcm_4_unguided": ("lcm", 4, 1.0),
    "turbo_1_unguided": ("euler-a", 1, 0.0),
}
FEW_STEP_TARGETS = {"lcm_4_unguided": 10.0, "turbo_1_unguided": 40.0}  # times faster per image than guided


def sd15_package(folder: Path, size: int) -> Path:
    """SD v1.5's architecture with random weights, converted once into `folder` (TextEncoder, Unet with the
    unguided function, VAEDecoder) at `size` x `size` pixels."""
    if (folder / "manifest.json").is_file():
        return folder
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from coreml_sd.converter.conversion import ConversionOptions, convert_model
    from coreml_sd.converter.models.tiny import assemble_pipeline

    torch.manual_seed(0)
    pipeline = assemble_pipeline(UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE),
                                 CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER)))
    pipeline.save_pretrained(folder / "source")
    convert_model(ConversionOptions(model=str(folder / "source"), output=folder, validate=False, height=size,
                                    width=size, unguided_function=True,
                                    components=("TextEncoder", "Unet", "VAEDecoder")))
    return folder


class CountedModel:
    def __init__(self, model):
        self.model, self.input_description, self.calls = model, model.input_description, 0

    def predict(self, inputs):
        self.calls += 1
        return self.model.predict(inputs)


def few_step(folder: Path, size: int) -> dict:
    """Seconds and Unet calls per image (one image each, every model loaded before) for each run of
    FEW_STEP_RUNS."""
    pipe = Pipeline.from_package(sd15_package(folder, size), backend="reference")
    unguided = pipe.sampler.unguided_unet
    unguided.predict({name: np.zeros(shape, dtype) for name, (shape, dtype) in unguided.input_description.items()})
    unets = {"main": CountedModel(pipe.sampler.unet), "unguided": CountedModel(unguided)}
    pipe.sampler.unet, pipe.sampler.unguided_unet = unets["main"], unets["unguided"]
    runs = {}
    for name, (scheduler, steps, guidance) in FEW_STEP_RUNS.items():
        for unet in unets.values():
            unet.calls = 0
        start = time.perf_counter()
        pipe("a photo of an astronaut riding a horse", scheduler=scheduler, steps=steps, guidance_scale=guidance,
             seed=1, progress=False, safety_checker=False, watermark=False)
        runs[name] = {"scheduler": scheduler, "steps": steps, "guidance_scale": guidance,
                      "seconds_per_image": round(time.perf_counter() - start, 2),
                      "unet_calls_per_image": {key: unet.calls for key, unet in unets.items() if unet.calls},
                      "unet_batch": 2 if unets["main"].calls else 1}
    guided = runs["guided_dpm++_25"]["seconds_per_image"]
    for name, target in FEW_STEP_TARGETS.items():
        runs[name]["times_faster_than_guided"] = round(guided / runs[name]["seconds_per_image"], 1)
        runs[name]["target_times_faster"] = target
    import torch

    from coreml_sd.runtime.executor.model import default_device

    return {"architecture": "SD v1.5 (random weights)", "size": [size, size], "backend": "reference executor",
            "device": str(default_device()), "torch_threads": torch.get_num_threads(), "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default="packages/tiny", help="converted tiny package (skipped when absent)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="steps of the full tiny generation")
    parser.add_argument("--few-step", type=Path, metavar="FOLDER",
                        help="also time few-step sampling on SD v1.5's full-size architecture, converted into FOLDER")
    parser.add_argument("--few-step-size", type=int, default=512, help="its image size in pixels")
    args = parser.parse_args()

    pipe = sd_sized_pipeline()
    # LCM and TCD sample at most 50 steps (their distillation's schedule)
    overhead = {name: round(step_overhead_ms(pipe, name, args.repeats, long=40 if name in ("lcm", "tcd") else 60), 3)
                for name in SCHEDULERS}
    report = {
        "machine": platform.platform(),
        "step_overhead_ms": overhead,
        "method": "models answer with precomputed arrays; (best of 60-step runs - best of 10-step runs) / 50 "
                  "(lcm, tcd: 40-step runs, / 30)",
        "latent_size": [LATENT_SIZE, LATENT_SIZE],
        "target_ms_per_step": TARGET_MS_PER_STEP,
        "within_target": {name: ms <= TARGET_MS_PER_STEP for name, ms in overhead.items()},
    }
    package = Path(args.package)
    report["tiny_generation"] = (
        tiny_generation(package, args.steps, args.repeats) if package.is_dir() else f"skipped: no package at {package}"
    )
    if args.few_step:
        report["few_step"] = few_step(args.few_step, args.few_step_size)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
