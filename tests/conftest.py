import os

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def ray_cluster():
    """One small local Ray cluster shared by every test that needs Ray (``ray.init`` costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=0, object_store_memory=200_000_000, include_dashboard=False,
                 logging_level="warning")
    yield ray
    ray.shutdown()
