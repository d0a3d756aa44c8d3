"""Server fixtures: a packages folder holding the tiny and demo packages, a real `coreml-sd serve` on it, and
`coreml-generate` on the same packages."""
import re
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra: pip install 'coreml-sd[serve]'")
pytest.importorskip("uvicorn", reason="the server needs the serve extra: pip install 'coreml-sd[serve]'")

from server_testing import start_server


@pytest.fixture(scope="session")
def packages_root(tmp_path_factory, tiny_packages, demo_package) -> Path:
    """A packages folder as users have one: `tiny` (128x128, random weights) and `demo` (64x64, draws shapes)."""
    root = tmp_path_factory.mktemp("packages")
    shutil.copytree(tiny_packages("split_einsum"), root / "tiny")
    shutil.copytree(demo_package, root / "demo")
    return root


@pytest.fixture(scope="session")
def server(packages_root, tmp_path_factory):
    """A server on the tiny package, shared by the tests that leave its model as they found it."""
    running = start_server(packages_root, tmp_path_factory.mktemp("server") / "server.log", "--model", "tiny")
    yield running
    running.stop()


@pytest.fixture
def generate_cli(packages_root, monkeypatch, tmp_path):
    """`coreml-generate` in this process on the same packages: the PNG files it writes, by seed."""
    from coreml_sd.runtime.cli import main

    def run(*args: str) -> dict[int, bytes]:
        monkeypatch.setenv("COREML_SD_PACKAGES", str(packages_root))
        folder = tmp_path / f"cli-{time.monotonic_ns()}"
        assert main([*args, "-o", str(folder)]) == 0
        return {int(re.search(r"-(\d+)\.png$", path.name).group(1)): path.read_bytes()
                for path in folder.glob("*.png") if not path.name.endswith("-grid.png")}

    return run
