import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from workbench.testing import tiny_sd15_config, tiny_sdxl_config, tiny_unet  # noqa: E402

torch.set_flush_denormal(True)


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
