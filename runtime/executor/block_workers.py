"""Independent blocks of one step run side by side, one single-threaded worker per core.

A blocked attention chain (`fusion.py`) is a few hundred small ops per step, each too short for
PyTorch's intra-op threads to pay off: every op waits at a barrier for all its threads, and on a
loaded machine for a thread that the scheduler has not run yet. Blocks of queries are independent,
so workers each take whole blocks instead, each running its ops on one thread. The ops are the same
and compute each element alike on one thread or several (they split rows and columns, not the sums),
so the values do not change.
"""
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _workers() -> ThreadPoolExecutor | None:
    """The process's pool, made at first use with as many workers as PyTorch has threads (None if 1)."""
    global _pool
    with _pool_lock:
        threads = torch.get_num_threads()
        if _pool is None and threads > 1:
            started = threading.Barrier(threads + 1)

            def single_threaded() -> None:
                torch.set_num_threads(1)  # this worker's own OpenMP and MKL thread counts
                started.wait()

            _pool = ThreadPoolExecutor(threads, thread_name_prefix="executor-block", initializer=single_threaded)
            for _ in range(threads):
                _pool.submit(lambda: None)  # each submission starts a worker while none is idle
            started.wait()
            # torch.set_num_threads also sets the count new threads start with: give it back.
            torch.set_num_threads(threads)
        return _pool


def run_blocks(run: Callable[[int], None], starts: Iterable[int], device: torch.device) -> None:
    """run(start) for every start: on the CPU workers when there are several blocks and workers, under the
    caller's inference mode; in order on the caller's thread otherwise (and on other devices)."""
    starts = list(starts)
    pool = _workers() if len(starts) > 1 and device.type == "cpu" else None
    if pool is None:
        for start in starts:
            run(start)
        return
    inference = torch.is_inference_mode_enabled()

    def run_in_mode(start: int) -> None:
        with torch.inference_mode(inference):
            run(start)

    for future in [pool.submit(run_in_mode, start) for start in starts]:
        future.result()
