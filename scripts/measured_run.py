"""A child process measured as the benchmarks report it: wall and CPU seconds, exact peak RSS (wait4's max RSS,
what `/usr/bin/time -v` prints), the peak of its anonymous part (RssAnon, sampled: file-backed pages such as
mapped weights are reclaimable, anonymous ones are not), and each coreml-convert stage's sampled peak."""
import os
import subprocess
import threading
import time

GIB = 2**30


def memory_bytes(pid: int) -> tuple[int, int] | None:
    """(VmRSS, RssAnon) of a process, None once it is gone."""
    figures = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key = line.split(":")[0]
                if key in ("VmRSS", "RssAnon"):
                    figures[key] = int(line.split()[1]) * 1024
    except OSError:
        return None
    return (figures["VmRSS"], figures.get("RssAnon", 0)) if "VmRSS" in figures else None


def rss_bytes(pid: int) -> int | None:
    figures = memory_bytes(pid)
    return figures[0] if figures else None


def run_measured(argv: list[str]) -> dict:
    """Run a child; wall seconds, exact peak RSS (wait4), sampled peak RssAnon, its stdout, and each
    coreml-convert stage's seconds and sampled peak RSS (stage lines on stderr: "<component> <stage> <seconds> s")."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, int, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            figures = memory_bytes(process.pid)
            if figures is not None:
                samples.append((time.perf_counter(), *figures))
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout_chunks: list[str] = []
    reader = threading.Thread(target=lambda: stdout_chunks.append(process.stdout.read()), daemon=True)
    reader.start()
    stage_lines = []
    stderr_lines = []
    for line in process.stderr:
        stderr_lines.append(line)
        fields = line.split()
        if len(fields) == 4 and fields[3] == "s":
            try:
                stage_lines.append((time.perf_counter(), fields[1], float(fields[2])))
            except ValueError:
                pass
    reader.join()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({process.returncode}):\n{''.join(stderr_lines[-30:])}")
    stages = {}
    for end, name, seconds in stage_lines:
        in_stage = [rss for t, rss, _ in samples if end - seconds - 0.1 <= t <= end]
        stages[name] = {"seconds": seconds, "peak_rss_gib": round(max(in_stage, default=0) / GIB, 2)}
    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),  # less sensitive than wall time to other load
        "peak_rss_gib": round(usage.ru_maxrss * 1024 / GIB, 2),  # ru_maxrss is in KiB on Linux
        "peak_rss_anon_gib": round(max((anon for _, _, anon in samples), default=0) / GIB, 2),
        "stages": stages,
        "stdout": "".join(stdout_chunks),
    }


