"""Efficient Diffusion Companion: measure why diffusion models get faster.

The public API, re-exported here, is small; each module has one job (see docs/architecture.md).
"""
from .device import generator, pick_device, randn
from .models import DiffusionModel, ModelError, load
from .samplers import glossary
from .sampling import sample

__version__ = "0.1.0"

_PANELS = ("ComparePanel", "SweepView")


def __getattr__(name: str):
    # The panels are imported on first use: scripts, benchmarks and GPU machines that only sample and measure
    # do not need the widget stack (ipywidgets, plotly) installed.
    if name in _PANELS:
        from . import widgets

        return getattr(widgets, name)
    raise AttributeError(f"module 'companion' has no attribute {name!r}")


__all__ = ["ComparePanel", "DiffusionModel", "ModelError", "SweepView", "generator", "glossary", "load", "pick_device", "randn", "sample",
           "__version__"]
