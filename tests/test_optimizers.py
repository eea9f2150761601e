"""Optimizers: 8-bit AdamW's clear errors, and its states as bitsandbytes lays them out."""

from __future__ import annotations

import sys

import pytest
import torch

from workbench import optimizers
from workbench.errors import WorkbenchError


def test_unknown_optimizer_is_named():
    with pytest.raises(WorkbenchError, match="unknown optimizer 'sgd'; choose one of adamw, adamw8bit"):
        optimizers.make_optimizer("sgd", [torch.nn.Parameter(torch.zeros(2))], 1e-3, 0.0)


def test_adamw8bit_without_bitsandbytes_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(WorkbenchError, match="needs bitsandbytes, which is not installed") as err:
        optimizers.make_optimizer("adamw8bit", [torch.nn.Parameter(torch.zeros(2))], 1e-3, 0.0)
    assert "\n" not in str(err.value)


def test_adamw8bit_on_a_device_without_support_is_one_line():
    pytest.importorskip("bitsandbytes")
    with pytest.raises(WorkbenchError, match="no 8-bit optimizer kernel for device 'meta'") as err:
        optimizers.check_device("adamw8bit", "meta")
    assert "\n" not in str(err.value)
    optimizers.check_device("adamw8bit", "cpu")  # bitsandbytes >= 0.49 runs 8-bit AdamW on a CPU
