"""What the fault catalogue's rows check: one `Error:` line, the files left, child processes under limits."""
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path


def error_line(text: str) -> str:
    """The one line a failure prints: exactly one non-empty line, `Error: ...`, and no traceback."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in text, text
    return lines[0]


def final_error_line(text: str) -> str:
    """After progress lines, the one `Error: ...` line a failure ends with, and no traceback."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines and "Traceback" not in text, text
    assert [line for line in lines if line.startswith("Error: ")] == lines[-1:], text
    return lines[-1]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def command(module: str, *argv: str, file_size_limit: int | None = None, env: dict | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m <module> argv...` in a child process; with `file_size_limit`, no file it writes can grow past that
    many bytes."""
    return subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})),
                          preexec_fn=_limit_file_size(file_size_limit) if file_size_limit else None)
