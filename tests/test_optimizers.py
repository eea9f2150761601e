"""8-bit AdamW: clear one-line errors where it cannot run."""

from __future__ import annotations

import sys

import pytest
import torch

from workbench import optim
from workbench.errors import WorkbenchError
from workbench.testing import run_config


def test_unknown_optimizer_is_named():
    from workbench.distill_config import check_fields
    from workbench.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown --optimizer 'sgd'; choose one of adamw, adamw8bit"):
        check_fields(run_config(steps=1, fast=False, stages=({"name": "p"},), optimizer="sgd"))


def test_adamw8bit_without_bitsandbytes_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(WorkbenchError, match="needs bitsandbytes, which is not installed") as err:
        optim.make_optimizer(
            [torch.nn.Parameter(torch.zeros(2))],
            run_config(steps=1, fast=False, stages=({},), optimizer="adamw8bit"),
        )
    assert "\n" not in str(err.value)


def test_adamw8bit_on_a_device_without_support_is_one_line():
    pytest.importorskip("bitsandbytes")
    with pytest.raises(WorkbenchError, match="no 8-bit optimizer kernel for device 'meta'") as err:
        optim.check_optimizer_device("adamw8bit", "meta")
    assert "\n" not in str(err.value)
    optim.check_optimizer_device("adamw8bit", "cpu")  # bitsandbytes >= 0.49 runs 8-bit AdamW on a CPU
