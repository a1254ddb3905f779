"""Efficient Diffusion Companion: measure why diffusion models get faster.

The public API, re-exported here, is small; each module has one job (see docs/architecture.md).

On import, torch's CPU threads are sized to the cores that are free (:func:`companion.device.fit_threads`) and
OpenMP's idle threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``, unless set already; it only takes
effect if torch was not imported before the companion): a reader's laptop always has a browser and JupyterLab
beside the kernel, and a spinning thread on a core someone else needs makes every operator wait.
"""
import os as _os

_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .device import fit_threads, generator, pick_device, randn  # noqa: E402
from .models import DiffusionModel, ModelError, load  # noqa: E402
from .samplers import glossary  # noqa: E402
from .sampling import sample  # noqa: E402

__version__ = "0.1.0"
THREADS = fit_threads()

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
