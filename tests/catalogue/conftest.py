"""One local Ray instance (2 CPUs) for the catalogue's tests, with the faults of `catalogue_faults.py` in its
workers. Only test_catalogue.py uses it, so it lives as long as that module: Ray's processes are gone before the
rest of the suite runs."""
import pytest

import catalogue_faults as faults


@pytest.fixture(scope="module")
def ray_instance():
    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(faults)  # the workers cannot import the tests
    ray.init(num_cpus=2, _memory=4 * 2**30, object_store_memory=128 * 2**20, include_dashboard=False,
             log_to_driver=False, runtime_env={"worker_process_setup_hook": faults.install})
    yield ray
    ray.shutdown()
