import os

import pytest

os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def _tune_malloc():
    """The engine's malloc settings (``ray_utils.MALLOC_ENV``) for the test cluster's workers (by environment) and
    for this process, whose malloc is already set up (``mallopt``, glibc only)."""
    import ctypes

    from raydebias._internal.ray_utils import apply_malloc_env

    apply_malloc_env()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, int(os.environ["MALLOC_MMAP_THRESHOLD_"]))  # M_MMAP_THRESHOLD
    libc.mallopt(-1, int(os.environ["MALLOC_TRIM_THRESHOLD_"]))  # M_TRIM_THRESHOLD


_tune_malloc()


def _init_ray():
    import ray

    if not ray.is_initialized():
        # address="local": a new cluster even when a `ray start` head (or its stale address file) is on the host
        ray.init(address="local", num_cpus=2, num_gpus=0, object_store_memory=200_000_000, include_dashboard=False,
                 logging_level="warning")
    return ray


@pytest.fixture
def ray_cluster():
    """A small local Ray cluster shared across tests (``ray.init`` costs seconds, so it is started once and
    kept; a test that needs Ray stopped — the job-submit test — shuts it down and the next user restarts it)."""
    yield _init_ray()


@pytest.fixture(scope="module")
def ray_module():
    """The same shared cluster, for module-scoped fixtures."""
    yield _init_ray()


@pytest.fixture(scope="module")
def tiny_diffusion_config():
    """The smallest bootstrap text-to-image config the diffusion tests use (16×16 images, 12×8×8 latents)."""
    from raydebias.config import DiffusionModelConfig

    return DiffusionModelConfig(resolution=16, unshuffle=2, block_out_channels=[16, 32], layers_per_block=1,
                                attention_head_dim=8, text_width=32, text_layers=1)


@pytest.fixture(scope="module")
def tiny_diffusion(tiny_diffusion_config):
    """An untrained bundle of that config, built from seed 0 (one per test module)."""
    import torch

    from raydebias.models.diffusion import bootstrap_diffusion

    torch.manual_seed(0)
    return bootstrap_diffusion(tiny_diffusion_config)


def pytest_sessionfinish(session, exitstatus):
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_generative() -> list[str]:
    """``--set`` overrides that shrink a "Harnessing diffusion" run (the demo's stages) to seconds. Training runs
    in Ray Train's local mode, as in the demo's config (a worker group costs ~12 s per fit; the tests of worker
    groups ask for them)."""
    return ["train.num_workers=0", "diffusion.num_workers=0",
            "data.builtin.n_train=300", "data.builtin.n_val=10", "data.builtin.n_test=20", "data.builtin.aligned=0.9",
            "models.classifier.width=8", "models.diffusion.block_out_channels=[16, 32]", "clip.steps=30",
            "diffusion.steps=30", "diffusion.num_cpus=1", "cluster.k_max=2", "finetune.steps=2",
            "finetune.min_images=15", "generate.images_per_group=2", "generate.num_steps=2", "generate.batch_size=50",
            "filter.dedup_threshold=1.0", "two_stage.epochs_synthetic=1", "two_stage.epochs_llr=1", "train.epochs=1"]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on 127.0.0.1 (moto's server, in a thread of this process) with the bucket ``raydebias``.
    Yields the environment a client needs (credentials, endpoint; no EC2 metadata lookups, which would hang
    offline); it is also set in this process, so that fsspec and pyarrow here talk to it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec

    fsspec.filesystem("s3", skip_instance_cache=True).mkdir("raydebias")
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3_root(s3_server):
    """A fresh folder in the test bucket: ``s3://raydebias/<random>``."""
    import uuid

    return f"s3://raydebias/{uuid.uuid4().hex[:12]}"
