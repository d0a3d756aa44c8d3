"""The fault catalogue: each test is one row — an input or fault, the exact line and exit code it gets, and what
is left on disk. Commands run in-process through their `main`, or as real child processes where signals, resource
limits or the environment at import time are part of the fault."""
import shutil

import pytest
from hypothesis import HealthCheck, settings


@pytest.fixture(scope="session")
def tiny_package(tiny_packages):
    return tiny_packages("split_einsum")


@pytest.fixture
def package_copy(tiny_package, tmp_path):
    """A copy of the tiny package to damage."""
    copy = tmp_path / "copy"
    shutil.copytree(tiny_package, copy)
    return copy


# Fuzzing budget: small in scripts/test; `--hypothesis-profile long` runs more.
settings.register_profile("default", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("long", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile("default")
