"""Capture named module outputs during a forward pass, and always remove the hooks.

Hooks are registered on the *unwrapped* model (``accelerator.unwrap_model``), so module
names are diffusers' own paths even under DDP, where the wrapper would add ``module.``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def _tensor(output: Any) -> torch.Tensor:
    """The hidden state in a module's output (blocks return tuples, Transformer2D a dataclass)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample"):
        return output.sample
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find a tensor in module output of type {type(output).__name__}")


class FeatureCapture:
    """``with FeatureCapture(model, names) as feats: model(...)`` -> ``feats[name]`` tensors."""

    def __init__(self, model: torch.nn.Module, names: Iterable[str]) -> None:
        self.model = model
        self.names = list(names)
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> dict[str, torch.Tensor]:
        self.features.clear()
        try:
            for name in self.names:
                module = self.model.get_submodule(name)
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise
        return self.features

    def _hook(self, name: str):
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            self.features[name] = _tensor(output)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc: Any) -> None:
        self.remove()
