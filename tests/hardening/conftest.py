"""The fault catalogue: each test is one row — an input or fault, the exact line and exit code it gets, and what
is left on disk. Commands run in-process through their `main`, or as real child processes where signals, resource
limits or the environment at import time are part of the fault."""
import shutil

import pytest


@pytest.fixture(scope="session")
def tiny_package(tiny_packages):
    return tiny_packages("split_einsum")


@pytest.fixture
def package_copy(tiny_package, tmp_path):
    """A copy of the tiny package to damage."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_package, copy)
    return copy
