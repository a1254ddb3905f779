"""Efficient Diffusion Companion: measure why diffusion models get faster.

The public API, re-exported here, is small; each module has one job (see docs/architecture.md).
"""
from .device import generator, pick_device, randn
from .models import DiffusionModel, ModelError, load
from .samplers import glossary
from .sampling import sample
from .widgets import ComparePanel, SweepView

__version__ = "0.1.0"

__all__ = ["ComparePanel", "DiffusionModel", "ModelError", "SweepView", "generator", "glossary", "load", "pick_device", "randn", "sample",
           "__version__"]
