"""`coreml-sd serve`: AUTOMATIC1111's web API and a web page on a Core ML package, on 127.0.0.1 unless told.

Everything that can be wrong with the command line (a host open to the network without --api-auth, a port in use,
a missing package, the serve extra not installed) is one line before anything listens.
"""
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Iterator

import click

from ..backends import BACKENDS, COMPUTE_UNITS
from ..commandline import CONTEXT_SETTINGS, shared_options
from ..errors import UserError
from ..package import find_package, list_packages, packages_root

DEFAULT_PORT = 7860  # A1111's, so that clients find the server where they look by default
DEFAULT_QUEUE_SIZE = 16
SHUTDOWN_GRACE_S = 3
logger = logging.getLogger("coreml_sd.server")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def listening_socket(host: str, port: int) -> socket.socket:
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(family, kind, protocol)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port} ({error.strerror or error}); choose another --port or "
                        "--host") from None
    listener.listen(128)
    return listener


@contextlib.contextmanager
def server_logging() -> Iterator[None]:
    """The server's lines (a model loaded, images made, a failure) with the time, while it runs; coremltools'
    import-time notices (no Core ML framework off macOS) are not a server operator's concern."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    loggers = [logging.getLogger(name) for name in ("coreml_sd.server", "coreml_sd.runtime")]
    coremltools = logging.getLogger("coremltools")
    saved = [(each, each.level, each.propagate) for each in (*loggers, coremltools)]
    for each in loggers:
        each.addHandler(handler)
        each.propagate = False
    logger.setLevel(logging.INFO)
    coremltools.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for each, level, propagate in saved:
            each.removeHandler(handler)
            each.setLevel(level)
            each.propagate = propagate


def parse_credentials(api_auth: str) -> dict[str, str]:
    """A1111's --api-auth: `USER:PASS`, several separated by commas."""
    credentials = {}
    for pair in api_auth.split(","):
        user, colon, password = pair.strip().partition(":")
        if not user or not colon or not password:
            raise click.UsageError(f"--api-auth takes USER:PASS (several separated by commas), not {pair.strip()!r}")
        credentials[user] = password
    return credentials


@click.command("serve", context_settings=CONTEXT_SETTINGS)
@click.option("--model", help="The package to load first: a name under ./packages (or $COREML_SD_PACKAGES) or a "
              "folder; may be left out when there is only one. Clients switch among the packages with "
              "sd_model_checkpoint.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Where to listen; any address but a loopback one needs --api-auth.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="0: any free port (printed).")
@click.option("--api-auth", metavar="USER:PASS", help="HTTP basic auth for every request, as A1111's --api-auth "
              "(several USER:PASS separated by commas).")
@click.option("--queue-size", type=click.IntRange(1, 1000), default=DEFAULT_QUEUE_SIZE, show_default=True,
              help="Requests that may wait behind the running one; more get 503 with Retry-After.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: Core ML on macOS, else the reference executor.")
@click.option("--compute-unit", type=click.Choice(COMPUTE_UNITS), help="Core ML compute units (default: each "
              "component's own, as coreml-generate).")
@shared_options
def serve(model: str | None, host: str, port: int, api_auth: str | None, queue_size: int, backend: str,
          compute_unit: str | None) -> None:
    """Serve AUTOMATIC1111's web API (/sdapi/v1/txt2img, ...) and a web page from Core ML packages."""
    if not is_loopback(host) and api_auth is None:
        raise click.UsageError(f"--host {host} lets other machines generate here; add --api-auth USER:PASS, or "
                               "leave --host out to serve this machine only")
    credentials = parse_credentials(api_auth) if api_auth is not None else None
    with server_logging():
        run_server(model, host, port, credentials, queue_size, {"backend": backend, "compute_unit": compute_unit})


def run_server(model: str | None, host: str, port: int, credentials: dict[str, str] | None, queue_size: int,
               loading: dict[str, str | None]) -> None:
    """Load the model, listen, and serve until Ctrl-C; `loading`: Pipeline.from_package's keywords."""
    try:
        import uvicorn

        from .app import create_app
    except ImportError as error:
        raise UserError(f"coreml-sd serve needs FastAPI and uvicorn ({error.name} is missing); install them with "
                        "pip install 'coreml-sd[serve]'") from None
    from ..pipeline import Pipeline
    from .packages import Catalogue
    from .queue import Worker

    folder = find_package(model)
    root = packages_root()
    name = folder.name
    pinned = {} if folder.parent.resolve() == root.resolve() and name in list_packages(root) else {name: folder}
    listener = listening_socket(host, port)
    click.echo(f"loading {name} ...", err=True)
    catalogue = Catalogue(root, pinned)
    worker = Worker(catalogue, Pipeline.from_package(folder, **loading), name, loading, queue_size)
    app = create_app(worker, catalogue, credentials)
    bound_host, bound_port = listener.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    click.echo(f"serving http://{shown}:{bound_port} (A1111's API under /sdapi/v1, the page at /, the API's "
               "reference at /docs); Ctrl-C stops")
    worker.start()
    try:
        # Ctrl-C does not wait for the requests in the queue: after a moment they are cancelled, then the worker
        server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                               timeout_graceful_shutdown=SHUTDOWN_GRACE_S))
        server.run(sockets=[listener])
    finally:
        worker.stop()
