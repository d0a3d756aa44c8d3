"""Handing freed memory back to the system between stages (conversion stages, models the runtime unloads)."""
import bisect
import ctypes
import ctypes.util
import functools
import gc
import mmap
import sys


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, found once: `find_library` runs `ldconfig`, and `page_out` is called after every layer."""
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def release_memory() -> None:
    """Collect garbage, then have glibc return the heap it keeps for reuse: without it a full-size
    conversion keeps holding 1.2-2.2 GiB between stages that it no longer uses (0.6-0.7 GiB with
    it), memory the rest of a laptop could have during a run of several minutes."""
    gc.collect()
    if sys.platform.startswith("linux"):
        malloc_trim = getattr(_libc(), "malloc_trim", None)
        if malloc_trim is not None:  # glibc has it; musl does not
            malloc_trim(0)


MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now; a file's clean pages are read back from it when next used


def file_backed_ranges() -> list[tuple[int, int]]:
    """The address ranges of this process that map files (weights read zero-copy from a safetensors or weight
    file), from /proc/self/maps; empty off Linux."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[4] != "0" and fields[5].startswith("/"):
                    start, end = (int(address, 16) for address in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


def page_out(spans: list[tuple[int, int]]) -> None:
    """Hand back the pages of these file-backed (start, end) spans: a model whose weights are mapped from their
    file then holds a layer's weights only while it runs, not every weight it has run so far. The values stay
    what they were (the file still holds them); nothing happens off Linux."""
    if not sys.platform.startswith("linux") or not spans:
        return
    libc = _libc()
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page = mmap.PAGESIZE
    for start, end in spans:
        start &= ~(page - 1)
        libc.madvise(start, end - start, MADV_PAGEOUT)  # an error (an old kernel) leaves the pages resident


def file_backed_spans(addresses: list[tuple[int, int]], mapped: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Those of the (start, end) `addresses` that lie inside file mappings (`file_backed_ranges()`): only they
    are paged out, so that memory a program computed (which only swap could hold) is never touched."""
    mapped = sorted(mapped)
    starts = [low for low, _ in mapped]
    inside = []
    for start, end in addresses:
        index = bisect.bisect_right(starts, start) - 1
        if index >= 0 and end <= mapped[index][1]:
            inside.append((start, end))
    return inside


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
LARGE_ALLOCATION_BYTES = 2**20


def map_large_allocations() -> None:
    """Have glibc give every allocation of 1 MiB or more its own mapping, returned to the system when freed. By
    default glibc raises that threshold to the largest block freed so far (up to 32 MiB), and from then on a model
    run's activations and per-layer weight copies of up to 32 MiB land in its heap, which they fragment: the
    validation of SD's VAE decoder peaked 0.7 GiB higher after a conversion than with this set."""
    if sys.platform.startswith("linux"):
        mallopt = getattr(_libc(), "mallopt", None)
        if mallopt is not None:  # glibc has it; musl does not
            mallopt(M_MMAP_THRESHOLD, LARGE_ALLOCATION_BYTES)
