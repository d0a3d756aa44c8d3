"""Catalogue benchmark, printed as JSON: a catalogue through a local Ray instance against the same conversions
one after another.

The catalogue is one model (the full-size SD v1.4 architecture with random weights, the folder
`scripts/bench_convert.py` builds and caches) x {split_einsum, original} x its three default components,
validated. It is converted three ways, each into a fresh output root, each a process of its own:

- sequentially: one plain `coreml-convert` per variant, one after another;
- `coreml-convert --catalogue` with `--max-parallel 1`, then with `--max-parallel 2`.

For each: wall seconds, the peak of the machine's used memory (MemTotal - MemAvailable) above what was used
just before, and the peak of the summed RSS of the run's own process tree (the driver, Ray's processes and
workers), sampled every 0.2 s; the load average before and after, since the machine may be shared. The
catalogue's dry run (the memory each task reserves) is included, and the packages of every way are checked
to hold the same weights.

    python scripts/bench_catalogue.py            # full size: wrap it in flock /tmp/fullsize.lock
    python scripts/bench_catalogue.py --small    # the tiny model: a quick smoke run
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import CACHE, GIB, SD, model_folder, rss_bytes  # noqa: E402

VARIANTS = ("split_einsum", "original")
SAMPLE_SECONDS = 0.2


def machine_used_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo}
    return fields["MemTotal"] - fields["MemAvailable"]


def process_tree(root: int) -> list[int]:
    """`root` and every process descended from it (Ray's raylet and workers are children of the driver)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    tree, queue = [], [root]
    while queue:
        pid = queue.pop()
        tree.append(pid)
        queue += children.get(pid, [])
    return tree


def run_measured(argv: list[str]) -> dict:
    """Run a command; wall seconds, the machine's used memory above its level at the start, the peak summed RSS
    of its process tree."""
    baseline = machine_used_bytes()
    load_before = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {"machine": 0, "tree": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peaks["machine"] = max(peaks["machine"], machine_used_bytes() - baseline)
            peaks["tree"] = max(peaks["tree"], sum(rss_bytes(pid) or 0 for pid in process_tree(process.pid)))
            done.wait(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = process.stdout.read()
    process.wait()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({process.returncode}):\n{output[-3000:]}")
    print(output, file=sys.stderr, flush=True)
    return {
        "wall_s": round(wall, 1),
        "machine_used_peak_gib": round(peaks["machine"] / GIB, 2),
        "process_tree_rss_peak_gib": round(peaks["tree"] / GIB, 2),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }


def weights(root: Path) -> dict[str, str]:
    """SHA-256 of every package's weights under an output root, by package folder name and component."""
    return {f"{path.parents[3].parent.name}/{path.parents[3].name}": hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.glob("*/*.mlpackage/Data/com.apple.CoreML/weights/weight.bin"))}


def write_catalogue(path: Path, folder: Path, output: Path) -> Path:
    lines = [f'output = "{output}"', "[[model]]", f'source = "{folder}"', 'name = "sd14"']
    for implementation in VARIANTS:
        lines += ["[[variant]]", f'attention_implementation = "{implementation}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def benchmark(small: bool, cache: Path, work: Path) -> dict:
    folder = model_folder(SD, small, cache)
    convert = [sys.executable, "-m", "coreml_sd.converter.cli"]
    catalogue = write_catalogue(work / "catalogue.toml", folder, work / "catalogue-out")
    report = {"size": "small" if small else "full", "model_folder": str(folder), "cpus": os.cpu_count(),
              "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
              "variants": list(VARIANTS), "runs": {}}
    dry_run = subprocess.run(convert + ["--catalogue", str(catalogue), "--dry-run"], capture_output=True, text=True,
                             check=True).stdout
    report["reservations_gib"] = {f"{row.split()[0]}/{row.split()[1]}": float(row.split()[2])
                                  for row in dry_run.splitlines() if row.endswith("GiB") and len(row.split()) == 4}
    print("sequential: one coreml-convert per variant", file=sys.stderr, flush=True)
    sequential = work / "sequential"
    script = " && ".join(" ".join(convert + ["--model", str(folder), "--attention-implementation", implementation,
                                             "-o", str(sequential / f"sd14-{implementation}")])
                         for implementation in VARIANTS)
    report["runs"]["sequential"] = run_measured(["bash", "-c", script])
    print(json.dumps({"sequential": report["runs"]["sequential"]}), file=sys.stderr, flush=True)  # if later runs fail
    digests = {"sequential": weights(sequential)}
    for parallel in (1, 2):
        print(f"catalogue through local Ray, --max-parallel {parallel}", file=sys.stderr, flush=True)
        output = work / f"catalogue-out-{parallel}"
        write_catalogue(catalogue, folder, output)
        report["runs"][f"ray_max_parallel_{parallel}"] = run_measured(
            convert + ["--catalogue", str(catalogue), "--max-parallel", str(parallel)])
        index = json.loads((output / "catalogue.json").read_text())
        report["runs"][f"ray_max_parallel_{parallel}"]["packages"] = {
            name: {"status": entry["status"], "psnr_db": {c: f["validation"]["psnr_db"]
                                                          for c, f in entry["files"].items()},
                   "size_mib": entry["size_mib"]} for name, entry in index["packages"].items()}
        digests[f"ray_max_parallel_{parallel}"] = weights(output)
        print(json.dumps({f"ray_max_parallel_{parallel}": report["runs"][f"ray_max_parallel_{parallel}"]}),
              file=sys.stderr, flush=True)
    report["same_weights_every_way"] = all(d == digests["sequential"] for d in digests.values())
    report["packages_compared"] = len(digests["sequential"])
    sequential_wall = report["runs"]["sequential"]["wall_s"]
    for name, run in report["runs"].items():
        run["speedup_over_sequential"] = round(sequential_wall / run["wall_s"], 2)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the tiny model instead of the full-size architecture")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the random-weight model folder is kept "
                        "(default: %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-catalogue-") as work:
        report = benchmark(args.small, args.cache, Path(work))
    print(json.dumps(report, indent=2))
    return 0 if report["same_weights_every_way"] else 1


if __name__ == "__main__":
    sys.exit(main())
