"""The commands' shared surface: `coreml-sd`, --version, --debug, exit codes, one-line errors, completion."""
import os
import subprocess
import sys
from importlib.metadata import version

import click
import pytest

from coreml_sd.runtime.commandline import DEBUG_ENV, main, run_command, shared_options
from coreml_sd.runtime.errors import GenerationError


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_version_is_the_distribution_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"coreml-sd, version {version('coreml-sd')}"


def test_group_runs_both_commands(capsys):
    code, out, _ = run(capsys, "convert", "--list-models")
    assert code == 0 and any(line.split()[0] == "sd-v1-4" for line in out.splitlines())
    code, _, err = run(capsys, "generate")
    assert code == 2
    assert err.strip().splitlines() == [
        "Error: give a PROMPT, or --from-png FILE to reuse a picture's (see coreml-sd generate --help)"]


def test_unknown_subcommand_is_a_usage_error(capsys):
    code, _, err = run(capsys, "upscale")
    assert code == 2 and err.strip().splitlines() == ["Error: No such command 'upscale'. (see coreml-sd --help)"]


@click.command("faulty")
@click.option("--fault", type=click.Choice(["bug", "user"]))
@shared_options
def faulty(fault: str) -> None:
    if fault == "bug":
        raise ZeroDivisionError("division by zero")
    raise GenerationError("the package is missing its Unet; convert it again")


def test_a_bug_is_one_line_pointing_to_debug(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert run_command(faulty, ["--fault", "bug"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "Error: unexpected ZeroDivisionError: division by zero "
        "(rerun with --debug for the traceback, and please report it)"
    ]


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_traceback(capsys, monkeypatch, how):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    argv = ["--fault", "user"]
    if how == "flag":
        argv.append("--debug")
    else:
        monkeypatch.setenv(DEBUG_ENV, "1")
    assert run_command(faulty, argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "GenerationError" in err
    assert err.splitlines()[-1] == "Error: the package is missing its Unet; convert it again"


def test_user_error_without_debug_is_one_line(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert run_command(faulty, ["--fault", "user"]) == 1
    assert capsys.readouterr().err.splitlines() == ["Error: the package is missing its Unet; convert it again"]


@pytest.mark.parametrize(
    "program, words, expected",
    [
        ("coreml-sd", "coreml-sd conv", "plain,convert"),
        ("coreml-generate", "coreml-generate x --scheduler e", "plain,euler\nplain,euler-a"),
        ("coreml-convert", "coreml-convert --attention-implementation o", "plain,original"),
    ],
)
def test_shell_completion(program, words, expected):
    modules = {"coreml-sd": "commandline", "coreml-generate": "cli", "coreml-convert": None}
    entry = (
        "from coreml_sd.converter.cli import main"
        if modules[program] is None
        else f"from coreml_sd.runtime.{modules[program]} import main"
    )
    variable = "_" + program.upper().replace("-", "_") + "_COMPLETE"
    env = dict(os.environ, COMP_WORDS=words, COMP_CWORD=str(len(words.split()) - 1), **{variable: "bash_complete"})
    result = subprocess.run(
        [sys.executable, "-c", f"{entry}; main()"], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.stdout.strip() == expected, result.stderr
