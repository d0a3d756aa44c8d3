"""What the commands share: one-line errors, `--debug`, `--version`, and the `coreml-sd` group.

An error the user can fix is one line, `Error: what is wrong; what to do`, with exit code 2 for a bad command
line and 1 for a failure; nothing prints a traceback unless `--debug` (or COREML_SD_DEBUG=1) asks for it.
"""
import importlib
import os
import sys
import traceback
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

import click

from .errors import Interrupted, UserError

DEBUG_ENV = "COREML_SD_DEBUG"
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def package_version() -> str:
    try:
        return version("coreml-sd")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def shared_options(function: Callable) -> Callable:
    """`--debug` and `--version`, on every command."""
    function = click.option(
        "--debug", is_flag=True, expose_value=False, is_eager=True,
        help=f"Show the full traceback of an error, for a bug report (or set {DEBUG_ENV}=1).",
    )(function)
    return click.version_option(package_version(), "--version", prog_name="coreml-sd")(function)


def run_command(command: click.Command, argv: list[str] | None) -> int:
    """Run a click command and return its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog_name = command.name if command.name != "cli" else "coreml-sd"
    debug = debug_requested(argv)
    try:
        result = command.main(argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Exit as stop:  # --help, --version
        return stop.exit_code
    except click.UsageError as error:
        hint = error.ctx.command_path if error.ctx is not None else prog_name
        return _fail(f"{error.format_message()} (see {hint} --help)", error.exit_code, debug)
    except click.ClickException as error:
        return _fail(error.format_message(), error.exit_code, debug)
    except (click.Abort, KeyboardInterrupt):  # click.Abort: Ctrl-C while click parses or prompts
        return _fail("interrupted", Interrupted.exit_code, debug)
    except UserError as error:
        return _fail(str(error), error.exit_code, debug)
    except Exception as error:  # a bug: still one line, and the way to the traceback
        return _fail(f"unexpected {type(error).__name__}: {error} (rerun with --debug for the traceback, and "
                     "please report it)", 1, debug)
    return result if isinstance(result, int) else 0


def _fail(message: str, code: int, debug: bool) -> int:
    if debug and sys.exc_info()[0] is not None:
        traceback.print_exc()
    click.echo(f"Error: {message}", err=True)
    return code


class LazyGroup(click.Group):
    """The `coreml-sd` group: each subcommand is imported only when it is asked for, so `coreml-sd generate` never
    loads the converter."""

    SUBCOMMANDS = {
        "convert": ("coreml_sd.converter.cli", "convert", "Convert a model into Core ML packages."),
        "generate": ("coreml_sd.runtime.cli", "generate", "Make images from a converted package."),
        "watermark": ("coreml_sd.runtime.cli", "check_watermark",
                      "Check images for Stable Diffusion's invisible watermark."),
        "serve": ("coreml_sd.runtime.server.command", "serve", "Serve AUTOMATIC1111's web API and a web page."),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.SUBCOMMANDS:
            return None
        module, attribute, _ = self.SUBCOMMANDS[name]
        return getattr(importlib.import_module(module), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, _, summary) in self.SUBCOMMANDS.items()])


@click.group(cls=LazyGroup, context_settings=CONTEXT_SETTINGS)
@shared_options
def cli() -> None:
    """coreml-sd: Stable Diffusion on Apple silicon. `coreml-sd convert` is `coreml-convert`, `coreml-sd generate`
    is `coreml-generate`, `coreml-sd watermark` is `coreml-watermark`; `coreml-sd serve` serves AUTOMATIC1111's web
    API (pip install 'coreml-sd[serve]')."""


def main(argv: list[str] | None = None) -> int:
    return run_command(cli, argv)
