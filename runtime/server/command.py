"""`coreml-sd serve`: AUTOMATIC1111's web API and a web page on a Core ML package, on 127.0.0.1 unless told.

Everything that can be wrong with the command line (a host open to the network without --api-auth, a port in use,
a missing package, the serve extra not installed) is one line before anything listens.
"""
import ipaddress
import logging
import socket

import click

from ..backends import BACKENDS, COMPUTE_UNITS
from ..commandline import CONTEXT_SETTINGS, shared_options
from ..errors import UserError
from ..package import find_package, list_packages, packages_root

DEFAULT_PORT = 7860  # A1111's, so that clients find the server where they look by default
DEFAULT_QUEUE_SIZE = 16
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


def server_logging() -> None:
    """The server's lines (a model loaded, images made, a failure) with the time; coremltools' import-time notices
    (no Core ML framework off macOS) are not a server operator's concern."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    for name in ("coreml_sd.server", "coreml_sd.runtime"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).propagate = False
    logger.setLevel(logging.INFO)
    logging.getLogger("coremltools").setLevel(logging.ERROR)


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
    try:
        import uvicorn

        from .app import create_app, parse_credentials
    except ImportError as error:
        raise UserError(f"coreml-sd serve needs FastAPI and uvicorn ({error.name} is missing); install them with "
                        "pip install 'coreml-sd[serve]'") from None
    try:
        credentials = parse_credentials(api_auth) if api_auth is not None else None
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    from ..pipeline import Pipeline
    from .packages import Catalogue
    from .queue import Worker

    folder = find_package(model)
    root = packages_root()
    name = folder.name
    pinned = {} if folder.parent.resolve() == root.resolve() and name in list_packages(root) else {name: folder}
    listener = listening_socket(host, port)
    server_logging()
    click.echo(f"loading {name} ...", err=True)
    loading = {"backend": backend, "compute_unit": compute_unit}
    catalogue = Catalogue(root, pinned)
    worker = Worker(catalogue, Pipeline.from_package(folder, **loading), name, loading, queue_size)
    app = create_app(worker, catalogue, credentials)
    bound_host, bound_port = listener.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    click.echo(f"serving http://{shown}:{bound_port} (A1111's API under /sdapi/v1, the page at /, the API's "
               "reference at /docs); Ctrl-C stops", err=False)
    worker.start()
    try:
        server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
        server.run(sockets=[listener])
    finally:
        worker.stop()
