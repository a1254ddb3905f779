"""Efficient Diffusion Companion: measure why diffusion models get faster.

The public API, re-exported here, is small; each module has one job (see docs/architecture.md).

On import, torch's CPU threads are sized to the cores that are free (:func:`companion.device.fit_threads`): a
reader's laptop always has a browser and JupyterLab beside the kernel, and an OpenMP thread on a core someone else
needs makes every operator wait for it (benchmarks/results/contention.json). OpenMP's wait policy is left as it
is: ``OMP_WAIT_POLICY=PASSIVE`` made the same run 2.3x slower on an idle machine.
"""
from .device import fit_threads, generator, pick_device, randn
from .models import DiffusionModel, ModelError, load
from .samplers import glossary
from .sampling import sample

__version__ = "0.2.0"  # the one version source: pyproject reads it (setuptools dynamic), `companion --version` prints it
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
