"""Chunked Unet benchmark, printed as JSON: `coreml-convert --components Unet --chunk-unet` on the full-size SD v1.4
architecture (random weights, the folder scripts/bench_convert.py builds and caches), with validation on.

Targets: each chunk holds under 1 GB of weights and at most half the whole Unet's + 5%, and chunk 1 -> chunk 2
through the reference executor equals the whole Unet (PSNR >= 60 dB). The converter checks the last two itself
and records the figures in the manifest (`chunk_validation`); this script reads them from there, adds the
weights' sizes on disk, the wall time and the peak RSS, and exits 1 if a target is missed.

    flock /tmp/fullsize.lock python scripts/bench_chunks.py            # full size
    python scripts/bench_chunks.py --small                             # the tiny configuration: a smoke run
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_convert  # noqa: E402  (the cached random-weight model folders)

MAX_CHUNK_WEIGHT_BYTES = 10**9  # 1 GB
MAX_CHUNK_FRACTION = 0.55
MIN_PSNR_DB = 60.0
WEIGHTS = Path("Data") / "com.apple.CoreML" / "weights" / "weight.bin"


def convert_chunked(folder: Path, output: Path) -> dict:
    argv = [sys.executable, "-m", "coreml_sd.converter.cli", "--model", str(folder), "--components", "Unet",
            "--chunk-unet", "-o", str(output)]
    start = time.perf_counter()
    completed = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(f"coreml-convert failed:\n{completed.stderr[-3000:]}")
    return {"wall_s": round(seconds, 1), "stage_lines": [line for line in completed.stderr.splitlines()
                                                         if line.startswith("Unet ")]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the tiny configuration (targets not enforced)")
    parser.add_argument("--cache", type=Path, default=bench_convert.CACHE)
    args = parser.parse_args()
    folder = bench_convert.model_folder(bench_convert.SD, args.small, args.cache)
    report = {"size": "small" if args.small else "full", "model": folder.name,
              "load_average_before": list(os.getloadavg())}
    with tempfile.TemporaryDirectory(prefix="bench-chunks-") as temporary:
        output = Path(temporary) / "package"
        report.update(convert_chunked(folder, output))
        report["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)
        manifest = json.loads((output / "manifest.json").read_text())
        chunks = {name: entry for name, entry in manifest["components"].items() if entry.get("chunk_of") == "Unet"}
        checked = next(iter(chunks.values()))["chunk_validation"]
        report["chunks"] = {name: {"weight_bytes": (output / entry["file"] / WEIGHTS).stat().st_size,
                                   "inputs": len(entry["inputs"]), "outputs": len(entry["outputs"])}
                            for name, entry in chunks.items()}
        report["whole_unet_weight_bytes"] = checked["whole_weight_bytes"]
        report["weight_fractions"] = checked["weight_fractions"]
        report["chunk_psnr_db"] = checked["psnr_db"]
        report["unet_psnr_db_against_diffusers"] = next(iter(chunks.values()))["validation"]["psnr_db"]
    report["load_average_after"] = list(os.getloadavg())
    sizes = [chunk["weight_bytes"] for chunk in report["chunks"].values()]
    report["checks"] = [
        {"name": "two chunks", "value": sorted(report["chunks"]),
         "met": sorted(report["chunks"]) == ["UnetChunk1", "UnetChunk2"]},
        {"name": "each chunk under 1 GB of weights", "value": sizes, "target": MAX_CHUNK_WEIGHT_BYTES,
         "met": max(sizes) < MAX_CHUNK_WEIGHT_BYTES},
        {"name": "each chunk at most half the weights + 5%", "value": report["weight_fractions"],
         "target": MAX_CHUNK_FRACTION, "met": max(report["weight_fractions"]) <= MAX_CHUNK_FRACTION},
        {"name": "chunk 1 -> chunk 2 equals the whole Unet (PSNR dB)", "value": report["chunk_psnr_db"],
         "target": MIN_PSNR_DB, "met": report["chunk_psnr_db"] >= MIN_PSNR_DB},
    ]
    report["all_targets_met"] = all(check["met"] for check in report["checks"])
    print(json.dumps(report, indent=2))
    return 0 if report["all_targets_met"] or args.small else 1


if __name__ == "__main__":
    sys.exit(main())
