"""One generation at a time: a bounded first-in-first-out queue of jobs and the worker thread that runs them.

The worker owns the loaded pipelines; the event loop only submits jobs, waits on their futures and reads the
progress, so `/progress` and the page answer while a generation runs. A job whose client left is dropped from
the queue, or aborted at its next step; interrupt and skip end the current image at its next step and keep it
(as A1111 does), interrupt also the rest of the job.
"""
import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import GenerationError
from ..images import png_bytes
from ..pipeline import GenerationResult, Pipeline
from .codec import SD_LATENT_RGB, latent_rgb_fit, preview_png, to_base64
from .errors import ApiError, invalid
from .packages import Catalogue
from .translation import Generation

logger = logging.getLogger("coreml_sd.server")
RETRY_AFTER_S = 5


class ClientGone(Exception):
    """The job's client disconnected: its work is thrown away."""


@dataclass
class Outcome:
    images: list[str]  # base64 PNGs
    seeds: list[int]
    infotexts: list[str]
    model: str
    size: tuple[int, int]


@dataclass(eq=False)
class Job:
    """A generation, or (with `generation` None) a switch of the server's model to `model`."""

    generation: Generation | None
    model: str | None = None
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Progress:
    """A1111's `shared.state`: what the worker is doing, read by /progress from the event loop."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.job, self.job_count, self.job_no, self.step, self.steps = "", 0, 0, 0, 0
        self.started, self.timestamp = 0.0, "0"
        self.interrupted = self.skipped = False
        self.latents: torch.Tensor | None = None
        self.latent_rgb = SD_LATENT_RGB  # the preview's colours for the model running
        self.preview_key: tuple | None = None
        self.preview: str | None = None

    def begin(self, name: str, count: int, latent_rgb: np.ndarray = SD_LATENT_RGB) -> None:
        with self.lock:
            self.job, self.job_count, self.job_no, self.step, self.steps = name, count, 0, 0, 0
            self.latent_rgb = latent_rgb
            self.started, self.timestamp = time.time(), time.strftime("%Y%m%d%H%M%S")
            self.interrupted = self.skipped = False
            self.latents = None

    def end(self) -> None:
        with self.lock:
            self.job, self.job_count, self.latents = "", 0, None

    def snapshot(self, queued: int, want_preview: bool) -> dict[str, Any]:
        """A1111's /progress answer (`state` also says how many requests wait)."""
        with self.lock:
            state = {"skipped": self.skipped, "interrupted": self.interrupted, "job": self.job,
                     "job_count": self.job_count, "job_timestamp": self.timestamp, "job_no": self.job_no,
                     "sampling_step": self.step, "sampling_steps": self.steps, "queued": queued}
            if not self.job_count:
                return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None,
                        "textinfo": f"{queued} waiting" if queued else "idle"}
            fraction = (self.job_no + (self.step / self.steps if self.steps else 0)) / self.job_count
            elapsed = time.time() - self.started
            eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
            key = (self.timestamp, self.job_no, self.step)
            latents, latent_rgb = self.latents, self.latent_rgb
            textinfo = f"image {self.job_no + 1}/{self.job_count}, step {self.step}/{self.steps}"
        image = self._preview(key, latents, latent_rgb) if want_preview and latents is not None else None
        return {"progress": min(fraction, 1.0), "eta_relative": eta, "state": state, "current_image": image,
                "textinfo": textinfo}

    def _preview(self, key: tuple, latents: torch.Tensor, latent_rgb: np.ndarray) -> str | None:
        if key != self.preview_key:  # several pollers of one step share the picture
            png = preview_png(latents, latent_rgb)
            self.preview_key, self.preview = key, None if png is None else to_base64(png)
        return self.preview


class Worker:
    """Runs jobs one at a time on its thread; at most `queue_size` wait (a full queue is a 503)."""

    def __init__(self, catalogue: Catalogue, pipeline: Pipeline, model: str, loading: dict[str, Any],
                 queue_size: int):
        self.catalogue = catalogue
        self.loading = loading  # Pipeline.from_package's keywords (backend, compute units)
        self.queue_size = queue_size
        self.checkpoint = model  # A1111's sd_model_checkpoint option: the model requests get by default
        self.loaded: dict[str, Pipeline] = {model: pipeline}  # the base model, and the refiner if one is asked for
        self.latent_rgb: dict[str, np.ndarray] = {}  # per model, the preview's colours fitted to its last image
        self.progress = Progress()
        self.waiting: deque[Job] = deque()
        self.condition = threading.Condition()
        self.running: Job | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="coreml-sd generation", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.condition:
            self.stopping = True
            for job in self.waiting:
                job.future.cancel()
            self.waiting.clear()
            self.condition.notify_all()
        if self.running is not None:
            self.running.cancelled.set()
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> Job:
        with self.condition:
            if len(self.waiting) >= self.queue_size:
                raise ApiError(503, f"the queue is full ({self.queue_size} requests wait); retry in "
                               f"{RETRY_AFTER_S} s", {"Retry-After": str(RETRY_AFTER_S)})
            self.waiting.append(job)
            self.condition.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client left: a waiting job leaves the queue, a running one stops at its next step."""
        job.cancelled.set()
        with self.condition:
            if job in self.waiting:
                self.waiting.remove(job)
                job.future.cancel()

    def queued(self) -> int:
        return len(self.waiting)

    def interrupt(self) -> None:
        with self.progress.lock:
            if self.progress.job_count:
                self.progress.interrupted = True

    def skip(self) -> None:
        with self.progress.lock:
            if self.progress.job_count:
                self.progress.skipped = True

    def _loop(self) -> None:
        while True:
            with self.condition:
                while not self.waiting and not self.stopping:
                    self.condition.wait()
                if self.stopping:
                    return
                job = self.running = self.waiting.popleft()
            if not job.future.set_running_or_notify_cancel():
                self.running = None
                continue
            try:
                job.future.set_result(self._run(job))
            except Exception as error:  # noqa: BLE001 - every failure is the job's answer; the worker goes on
                job.future.set_exception(self._answer(error))
            finally:
                self.progress.end()
                self.running = None

    @staticmethod
    def _answer(error: Exception) -> Exception:
        if isinstance(error, (ApiError, ClientGone)):
            return error
        if isinstance(error, GenerationError):
            return invalid(str(error))
        logger.error("generation failed: %s: %s", type(error).__name__, error)
        logger.debug("the failure's traceback", exc_info=error)
        return ApiError(500, f"generation failed ({type(error).__name__}: {error}); see the server's log")

    def _run(self, job: Job) -> Outcome | None:
        if job.generation is None:
            self._pipeline(job.model)
            self.checkpoint = job.model
            return None
        return self._generate(job, job.generation)

    def _pipeline(self, name: str, keep: str | None = None) -> Pipeline:
        """Package `name`, loaded; other pipelines but `keep` are let go first, so one base model is in memory."""
        if name not in self.loaded:
            for other in [other for other in self.loaded if other != keep]:
                del self.loaded[other]
            gc.collect()
            self.progress.begin(f"loading {name}", 0)
            self.loaded[name] = Pipeline.from_package(self.catalogue.folder(name), **self.loading)
            logger.info("loaded model %s", name)
        return self.loaded[name]

    def _generate(self, job: Job, generation: Generation) -> Outcome:
        model = generation.model or self.checkpoint
        pipe = self._pipeline(model, keep=generation.refiner)
        refiner = self._pipeline(generation.refiner, keep=model) if generation.refiner else None
        progress = self.progress
        progress.begin("txt2img" if generation.image is None else "img2img", generation.num_images,
                       self.latent_rgb.get(model, SD_LATENT_RGB))
        started = time.perf_counter()
        outcome = Outcome([], [], [], model, (0, 0))
        for index in range(generation.num_images):
            with progress.lock:
                if progress.interrupted:
                    break
                progress.job_no, progress.step, progress.steps, progress.skipped = index, 0, 0, False
            result = pipe(generation.prompt, **generation.pipeline_keywords(index), refiner=refiner,
                          on_step=self._step_hook(job))
            self._fit_preview(model, result)
            outcome.images.append(to_base64(png_bytes(result.images[0], result.parameters[0])))
            outcome.seeds.append(result.seeds[0])
            outcome.infotexts.append(result.parameters[0])
            outcome.size = result.images[0].size
        logger.info("%d image(s) of %s in %.1f s%s", len(outcome.images), model, time.perf_counter() - started,
                    " (interrupted)" if progress.interrupted else "")
        return outcome

    def _fit_preview(self, model: str, result: GenerationResult) -> None:
        """The preview's colours for `model` from the image just made and its last latents (not from an image the
        safety checker blackened)."""
        latents = self.progress.latents
        if latents is None or (result.nsfw_content_detected or [False])[0]:
            return
        fitted = latent_rgb_fit(latents, result.images[0])
        if fitted is not None:
            self.latent_rgb[model] = fitted
            with self.progress.lock:
                self.progress.latent_rgb = fitted

    def _step_hook(self, job: Job) -> Callable[[int, int, torch.Tensor], bool]:
        progress = self.progress

        def on_step(done: int, total: int, latents: torch.Tensor) -> bool:
            if job.cancelled.is_set():
                raise ClientGone
            with progress.lock:
                progress.step, progress.steps, progress.latents = done, total, latents
                return progress.interrupted or progress.skipped

        return on_step
