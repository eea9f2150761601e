import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The suite never reads or writes the user's disk cache: a stale entry there (figures of an
# older atom layout) must not decide a test, and tests must not leave entries behind.
os.environ["WORKBENCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="workbench-test-cache-")
atexit.register(shutil.rmtree, os.environ["WORKBENCH_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

from workbench.testing import tiny_sd15_config, tiny_sdxl_config, tiny_unet  # noqa: E402

torch.set_flush_denormal(True)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped, and said so, where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: no CUDA GPU here")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sdxl_config():
    from workbench.models import resolve_base

    return resolve_base("sdxl-base").unet_config


@pytest.fixture(scope="session")
def tiny_config():
    return tiny_sdxl_config()


@pytest.fixture(scope="session")
def tiny_teacher(tiny_config):
    return tiny_unet(tiny_config)


@pytest.fixture(scope="session")
def tiny_sd15_teacher():
    return tiny_unet(tiny_sd15_config())


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (use with ``pytestmark = pytest.mark.usefixtures``).

    Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP threads
    spinning against another process make a 7M-parameter forward 10-50x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store():
    """A UI store (its model, catalog and spec caches) shared by one test module."""
    from workbench.ui.store import Store

    return Store()


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> str:
    """An untrained tiny SDXL pipeline (real stock components) saved as a local diffusers folder
    (read-only: share, don't modify)."""
    from workbench.testing import tiny_pipeline

    return str(tiny_pipeline(tmp_path_factory.mktemp("tiny-pipeline") / "pipe"))


@pytest.fixture(scope="session")
def perturbed_pipeline(tmp_path_factory) -> str:
    """A tiny SDXL pipeline whose every UNet weight matters (read-only: share, don't modify)."""
    from workbench.testing import tiny_pipeline

    return str(tiny_pipeline(tmp_path_factory.mktemp("perturbed") / "pipe", perturb=True))
