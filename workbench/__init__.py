"""SDXL block-removal and knowledge-distillation workbench."""

__version__ = "0.1.0"
