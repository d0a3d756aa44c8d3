"""`coreml-convert --catalogue`: every package of a catalogue converted through Ray, a task per component.

Ray places each task where its `memory` reservation fits (and, with --max-parallel, no more than that many
at once); the components of one package run one after another, the next submitted when the previous is
installed, so a package's folder only ever has one writer. This module only submits, waits and records:
the scheduling is Ray's.
"""
import logging
import os
import sys
from collections import deque
from pathlib import Path

from coreml_sd.runtime.errors import Interrupted

from ..errors import ConversionError
from .index import DONE, FAILED, INTERRUPTED, CatalogueIndex
from .plan import Catalogue, PackagePlan, load_catalogue
from .tasks import convert_component

GIB = 2**30
OBJECT_STORE_BYTES = 256 * 2**20  # the tasks hand back a few numbers each: the store needs no more
RAY_MISSING = "--catalogue runs on Ray, which is not installed: pip install 'coreml-sd[cluster]'"


def run_catalogue(path: Path, ray_address: str | None, max_parallel: int | None, dry_run: bool) -> int:
    if max_parallel is not None and max_parallel < 1:
        raise ConversionError(f"--max-parallel must be at least 1 (got {max_parallel})")
    catalogue = load_catalogue(path)
    index = CatalogueIndex(catalogue)
    if dry_run:
        largest = node_memory_gib(ray_address) if ray_address else local_memory_bytes() / GIB
        print_plan(catalogue, index, largest, ray_address)
        check_fits(catalogue, largest)
        return 0
    ray = start_ray(ray_address)
    check_fits(catalogue, node_memory_gib(ray_address))
    return Run(ray, catalogue, index, max_parallel).run()


def print_plan(catalogue: Catalogue, index: CatalogueIndex, largest_gib: float, ray_address: str | None) -> None:
    print(f"{'package':<36} {'component':<13} {'memory':>9}", flush=True)
    finished = 0
    for plan in catalogue.packages:
        done = index.finished_components(plan)
        finished += len(done)
        for component, gib in plan.memory_gib.items():
            print(f"{plan.name:<36} {component:<13} {gib:>5.1f} GiB{'  (up to date)' if component in done else ''}")
    where = f"the largest node of {ray_address}" if ray_address else "this machine, for a local Ray instance"
    print(f"{catalogue.tasks} tasks ({finished} up to date) in {len(catalogue.packages)} packages under "
          f"{catalogue.output}; largest reservation {max_reservation(catalogue):.1f} GiB, "
          f"{where}: {largest_gib:.1f} GiB")


def max_reservation(catalogue: Catalogue) -> float:
    return max((gib for plan in catalogue.packages for gib in plan.memory_gib.values()), default=0.0)


def check_fits(catalogue: Catalogue, largest_gib: float) -> None:
    """Refuse, before anything runs, a task that no node could ever place."""
    for plan in catalogue.packages:
        for component, gib in plan.memory_gib.items():
            if gib > largest_gib:
                raise ConversionError(
                    f"{plan.name} {component} needs {gib:.1f} GiB and the largest node has {largest_gib:.1f} GiB: "
                    "lower the variant's height/width, quantize, or add a node with more memory")


def local_memory_bytes() -> int:
    """What a local Ray instance may hand out: the memory available now, less the object store's."""
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024 - OBJECT_STORE_BYTES


def start_ray(ray_address: str | None):
    """Connect to the cluster at `ray_address`, or start Ray on this machine with its CPUs and available memory;
    a Ray already started in this process (a program that drives the catalogue itself) is used as it is."""
    try:
        import ray
    except ImportError:
        raise ConversionError(RAY_MISSING) from None
    if ray.is_initialized():
        return ray
    settings = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        if ray_address:
            ray.init(address=ray_address, **settings)
        else:
            ray.init(num_cpus=os.cpu_count(), _memory=local_memory_bytes(), object_store_memory=OBJECT_STORE_BYTES,
                     **settings)
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = f"the Ray cluster at {ray_address}" if ray_address else "a local Ray instance"
        raise ConversionError(f"cannot start or reach {where}: {str(error).strip().splitlines()[0]}") from None
    return ray


def node_memory_gib(ray_address: str | None) -> float:
    ray = start_ray(ray_address)
    return max((node["Resources"].get("memory", 0) for node in ray.nodes() if node["Alive"]), default=0) / GIB


def error_line(error: Exception, attempts: int) -> str:
    """The last line of what went wrong: the converter's own message, or how the worker process died."""
    from ray import exceptions

    if isinstance(error, exceptions.RayTaskError):
        cause = error.cause if error.cause is not None else error
        if isinstance(cause, KeyboardInterrupt):
            return "interrupted"
        text = str(cause).strip()
        return text.splitlines()[-1] if text else type(cause).__name__
    if isinstance(error, exceptions.OutOfMemoryError):
        return f"killed for using too much memory, {attempts} times (Ray's memory monitor)"
    if isinstance(error, (exceptions.WorkerCrashedError, exceptions.NodeDiedError, exceptions.ActorDiedError)):
        return f"its process died (killed, out of memory or crashed) on each of {attempts} attempts"
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[-1] if text else ''}"


class Run:
    """The driver's loop: submit each package's next component when its previous one is installed, record every
    outcome in the index, print a line per finished task and the overall bar."""

    def __init__(self, ray, catalogue: Catalogue, index: CatalogueIndex, max_parallel: int | None):
        self.ray, self.catalogue, self.index = ray, catalogue, index
        self.max_parallel = max_parallel or len(catalogue.packages)
        self.remote = ray.remote(max_retries=catalogue.retries, retry_exceptions=False)(convert_component)
        self.waiting: deque[tuple[PackagePlan, list[str]]] = deque()  # packages with components still to submit
        self.running: dict = {}  # ObjectRef -> (plan, component, components after it)
        self.total = catalogue.tasks
        self.finished = self.failed = 0
        self.bar_shown = False

    def run(self) -> int:
        for plan in self.catalogue.packages:
            finished = self.index.finished_components(plan)
            self.finished += len(finished)
            if len(finished) == len(plan.memory_gib):
                self.say(f"{plan.name:<36} up to date")
                continue
            self.index.start(plan, finished)
            self.waiting.append((plan, [c for c in plan.memory_gib if c not in finished]))
        self.index.write()
        try:
            while self.waiting or self.running:
                self.submit()
                ready, _ = self.ray.wait(list(self.running), num_returns=1)
                self.collect(ready[0])
        except KeyboardInterrupt:
            self.stop()
        self.clear_bar()
        counts = self.index.counts()
        if counts[FAILED]:
            raise ConversionError(f"{counts[FAILED]} of {len(self.catalogue.packages)} packages failed (their last "
                                  f"error lines are in {self.index.path}); run the catalogue again to retry them")
        print(f"{counts[DONE]} packages under {self.catalogue.output}, index {self.index.path}", flush=True)
        return 0

    def submit(self) -> None:
        """Up to --max-parallel tasks at once, one per package: the next components of begun packages first."""
        while self.waiting and len(self.running) < self.max_parallel:
            plan, components = self.waiting.popleft()
            component, rest = components[0], components[1:]
            task = self.remote.options(memory=int(plan.memory_gib[component] * GIB), num_cpus=1,
                                       name=f"{plan.name}/{component}")
            self.running[task.remote(plan.task_options(component))] = (plan, component, rest)

    def collect(self, ref) -> None:
        plan, component, rest = self.running.pop(ref)
        try:
            result = self.ray.get(ref)
        except Exception as error:  # any Ray error here is this task's: the others run on
            line = error_line(error, self.catalogue.retries + 1)
            self.index.record(plan, component, None, line)
            self.finished += 1 + len(rest)  # the components after a failed one are not converted this run
            self.failed += 1
            self.say(f"{plan.name:<36} {component:<13} FAILED: {line}")
            return
        self.index.record(plan, component, result)
        self.finished += 1
        what = "converted" if result["converted"] else "up to date"
        figures = result["validation"]
        psnr = f", PSNR {figures['psnr_db']:.1f} dB" if figures else ""
        self.say(f"{plan.name:<36} {component:<13} {what} in {result['seconds']:.1f} s{psnr}")
        if rest:  # ahead of packages not yet begun: a package is finished, and usable, as soon as it can be
            self.waiting.appendleft((plan, rest))

    def stop(self) -> None:
        """Ctrl-C: submit nothing more; ask the running tasks to stop (each discards its staged component, as
        an interrupted coreml-convert does) and wait for them; a second Ctrl-C ends them at once."""
        self.clear_bar()
        print(f"interrupted: stopping {len(self.running)} running task(s); installed components are kept",
              file=sys.stderr, flush=True)
        for ref in self.running:
            self.ray.cancel(ref)
        try:
            self.ray.wait(list(self.running), num_returns=len(self.running), timeout=60)
        except KeyboardInterrupt:
            for ref in self.running:
                self.ray.cancel(ref, force=True)
        for ref, (plan, component, _) in self.running.items():
            try:  # it may have finished before it heard of the interruption
                self.index.record(plan, component, self.ray.get(ref, timeout=0))
            except Exception:
                self.index.record(plan, component, None, "interrupted", status=INTERRUPTED)
        for plan, components in self.waiting:
            self.index.record(plan, components[0], None, "not started: interrupted", status=INTERRUPTED)
        raise Interrupted(f"interrupted: finished packages and components were kept and {self.index.path} says "
                          "which; run the catalogue again to go on")

    def say(self, line: str) -> None:
        self.clear_bar()
        print(line, flush=True)
        self.draw_bar()

    def draw_bar(self) -> None:
        width = 30
        filled = round(width * self.finished / self.total) if self.total else width
        failures = f", {self.failed} failed" if self.failed else ""
        bar = f"[{'#' * filled}{'.' * (width - filled)}] {self.finished}/{self.total} tasks{failures}"
        if sys.stderr.isatty():
            sys.stderr.write(bar)
            self.bar_shown = True
        else:
            print(bar, file=sys.stderr)
        sys.stderr.flush()

    def clear_bar(self) -> None:
        if self.bar_shown:
            sys.stderr.write("\r\033[K")
            self.bar_shown = False
