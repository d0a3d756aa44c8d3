"""The FastAPI application: AUTOMATIC1111's `/sdapi/v1` routes over the worker, and the web page at `/`.

Every error is A1111's JSON shape (`error`, `detail`, `body`, `errors`) with one sentence in `detail`; nothing a
request does shows a traceback or stops the server.
"""
import asyncio
import base64
import binascii
import logging
from importlib.resources import files
from pathlib import Path
from secrets import compare_digest
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from . import codec, translation
from .errors import ApiError, invalid
from .packages import Catalogue
from .queue import ClientGone, Job, Worker
from .schemas import (
    GenerationResponse,
    Img2ImgRequest,
    LoraItem,
    PNGInfoRequest,
    PNGInfoResponse,
    ProgressResponse,
    SamplerItem,
    SchedulerItem,
    SDModelItem,
    Txt2ImgRequest,
)

logger = logging.getLogger("coreml_sd.server")
STATIC = Path(str(files("coreml_sd.runtime.server") / "static"))
MAX_BODY_BYTES = 24 * 2**20  # a 2048x2048 PNG in base64 fits; a 50 MB one is refused before it is read
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there


def error_body(status: int, message: str, kind: str = "HTTPException") -> dict[str, Any]:
    return {"error": kind, "detail": message, "body": "", "errors": message}


def error_response(status: int, message: str, headers: dict[str, str] | None = None,
                   kind: str = "HTTPException") -> JSONResponse:
    return JSONResponse(error_body(status, message, kind), status_code=status, headers=headers)


class Guard:
    """Before any route runs: HTTP basic auth (with --api-auth) and the body size cap; after: any exception a
    route let through becomes a one-line 500, so the log never shows a request's traceback."""

    def __init__(self, app, credentials: dict[str, str] | None, max_body: int):
        self.app, self.credentials, self.max_body = app, credentials, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.credentials is not None and not self._authorized(headers.get(b"authorization", b"")):
            response = error_response(401, "incorrect or missing username or password; send HTTP basic auth with "
                                      "the credentials of the server's --api-auth", {"WWW-Authenticate": "Basic"})
            return await response(scope, receive, send)
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body:
            response = error_response(413, f"the request body is over {self.max_body // 2**20} MiB; send smaller "
                                      "images")
            return await response(scope, receive, send)
        started = False

        async def capped_receive():
            message = await receive()
            capped_receive.total += len(message.get("body", b""))
            if capped_receive.total > self.max_body:  # a chunked body declares no length
                raise HTTPException(413, f"the request body is over {self.max_body // 2**20} MiB; send smaller images")
            return message

        capped_receive.total = 0

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, capped_receive, tracked_send)
        except Exception as error:  # noqa: BLE001 - a bug in a route answers 500; the server goes on
            logger.error("%s %s failed: %s: %s", scope["method"], scope["path"], type(error).__name__, error)
            if not started:
                await error_response(500, f"internal error ({type(error).__name__}); see the server's log",
                                     kind=type(error).__name__)(scope, receive, send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, encoded = header.decode("latin-1").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        expected = self.credentials.get(user)
        return expected is not None and compare_digest(password.encode(), expected.encode())


def validation_message(error: RequestValidationError) -> str:
    """Pydantic's first complaint as one sentence about the request's field."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')}); send a JSON object"
    if not where:
        return "the body must be a JSON object of the request's fields (see /docs)"
    if first.get("type") == "missing":
        return f"{where} is required (see /docs)"
    return f"{where}: {first['msg'][0].lower()}{first['msg'][1:]} (got {first.get('input')!r:.60}); see /docs"


def create_app(worker: Worker, catalogue: Catalogue, credentials: dict[str, str] | None = None,
               max_body: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="coreml-sd", description="AUTOMATIC1111's web API on Core ML packages", version="1")
    app.add_middleware(Guard, credentials=credentials, max_body=max_body)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(422, validation_message(error), kind="RequestValidationError")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = f"no endpoint {request.url.path}; the API is under /sdapi/v1 (see /docs)"
        elif error.status_code == 405:
            allowed = (error.headers or {}).get("Allow", "another method")
            message = f"{request.method} is not allowed on {request.url.path}; use {allowed}"
        else:
            message = str(error.detail)
        return error_response(error.status_code, message, error.headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, error: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    async def run(job: Job, request: Request) -> Any:
        """The job's result, once the worker has run it; a client that leaves meanwhile cancels it."""
        worker.submit(job)
        waiting = asyncio.wrap_future(job.future)
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
            if not waiting.done() and await request.is_disconnected():
                worker.cancel(job)
                raise ClientGone
        if waiting.cancelled():
            raise ClientGone
        return waiting.result()

    async def generate(body: Txt2ImgRequest | Img2ImgRequest, generation: translation.Generation,
                       request: Request) -> dict[str, Any]:
        for name in (generation.model, generation.refiner):
            if name is not None:
                catalogue.folder(name)
        outcome = await run(Job(generation), request)
        info = translation.info_json(generation, outcome.seeds, outcome.infotexts, outcome.model, outcome.size,
                                     translation.sampler_title(generation.scheduler))
        return {"images": outcome.images if body.send_images else [],
                "parameters": translation.echoed_parameters(body), "info": info}

    @app.post("/sdapi/v1/txt2img", response_model=GenerationResponse)
    async def txt2img(body: Txt2ImgRequest, request: Request) -> dict[str, Any]:
        return await generate(body, translation.txt2img(body), request)

    @app.post("/sdapi/v1/img2img", response_model=GenerationResponse)
    async def img2img(body: Img2ImgRequest, request: Request) -> dict[str, Any]:
        encoded = translation.check_img2img_inputs(body)
        image = await run_in_threadpool(codec.open_image, encoded, "init_images[0]")
        mask = await run_in_threadpool(codec.open_image, body.mask, "mask", "RGBA") if body.mask else None
        return await generate(body, translation.img2img(body, image, mask), request)

    @app.get("/sdapi/v1/progress", response_model=ProgressResponse)
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        return worker.progress.snapshot(worker.queued(), not skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt() -> dict:
        worker.interrupt()
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip() -> None:
        worker.skip()

    @app.get("/sdapi/v1/options")
    async def get_options() -> dict[str, Any]:
        return {"sd_model_checkpoint": worker.checkpoint, "sd_checkpoint_hash": None, "samples_format": "png"}

    @app.post("/sdapi/v1/options")
    async def set_options(options: dict[str, Any], request: Request) -> None:
        """Only sd_model_checkpoint acts: it loads that package, after the requests already queued."""
        name = options.get("sd_model_checkpoint")
        if name is None:
            return
        if not isinstance(name, str):
            raise invalid("sd_model_checkpoint must be a model title from /sdapi/v1/sd-models")
        catalogue.folder(name)
        await run(Job(None, model=name), request)

    @app.get("/sdapi/v1/sd-models", response_model=list[SDModelItem])
    async def sd_models() -> list[dict[str, Any]]:
        return catalogue.sd_models()

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints() -> None:
        """The list is read anew on every call; kept for clients that ask for a refresh."""

    @app.get("/sdapi/v1/samplers", response_model=list[SamplerItem])
    async def samplers() -> list[dict[str, Any]]:
        return translation.sampler_items()

    @app.get("/sdapi/v1/schedulers", response_model=list[SchedulerItem])
    async def schedulers() -> list[dict[str, Any]]:
        return translation.scheduler_items()

    @app.get("/sdapi/v1/upscalers")
    async def upscalers() -> list[dict[str, Any]]:
        return [{"name": "Lanczos", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]

    @app.get("/sdapi/v1/loras", response_model=list[LoraItem])
    async def loras() -> list[dict[str, Any]]:
        return catalogue.loras()

    @app.get("/sdapi/v1/scripts")
    async def scripts() -> dict[str, list]:
        return {"txt2img": [], "img2img": []}

    @app.post("/sdapi/v1/png-info", response_model=PNGInfoResponse)
    async def png_info(body: PNGInfoRequest) -> dict[str, Any]:
        items = codec.png_text(codec.decode_base64(body.image, "image"))
        info = items.pop("parameters", "")
        return {"info": info, "items": items, "parameters": translation.parse_parameters(info) if info else {}}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
