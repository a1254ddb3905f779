"""Interactive panels: move a control, see the images change and the speed/quality curve grow.

Panels are composed from small parts so a chapter builds the one it needs in a line or two::

    panel = SamplerPanel(load("digits-cond"), controls=("sampler", "steps", "guidance", "seed"))
    panel                      # shows the controls, the image grid, the run record and the curve

    ComparePanel(model, a=dict(sampler="ddim", steps=10), b=dict(sampler="dpmpp_2m", steps=10))
    SweepView(model, ["ddim", "dpmpp_2m"], [5, 10, 20]).show()  # a bench sweep whose curve grows as runs finish
    ForwardPanel(images)                                   # the forward process q(x_t | x_0) under a t slider
    PartialPanel(model, {"real": x, "prior": p}, labels)   # the reverse chain started part-way, from t0

This module holds only panels and their parts: the control factories (:data:`CONTROL_FACTORIES`,
:func:`make_controls`), :class:`SamplingSetup` (parameters -> ``sample`` call -> measured run),
:class:`LatestOnlyRunner`, :class:`BackgroundWork` (what a run measures after its images are shown), the
panels' quality (:class:`ImageDistance`) and the curve (:class:`Curve`; :func:`add_point` / :func:`move_mark`
on a :func:`speed_quality_widget`). What a panel draws comes from elsewhere: image grids, PNGs and HTML
fragments from :mod:`companion.plots`, the run record table from :mod:`companion.report`.

Design choices, and why:

* A control change is served in two parts. The *foreground* part samples the images and shows them with the
  run's record; it runs on one worker thread per panel (:class:`LatestOnlyRunner`), so the kernel stays
  responsive. At most one foreground run is in flight; a request made while one runs *replaces* any queued
  request, so a burst of slider moves costs at most two runs and always ends on the last value.
* The *background* part — the quality value (which may need a reference solution: seconds) and further timed
  runs of the same configuration — runs afterwards on one process-wide thread (:class:`BackgroundWork`), newest
  run first, and adds the point to the curve when it is ready. It yields to foreground runs: before each of its
  network calls it waits while any panel's foreground run is in flight (:class:`ForegroundGate`), so a slow
  reference never holds up the next images, and it resumes where it stopped. References come from the shared
  cache :data:`companion.reference.SOLUTIONS`, so panels that need the same one compute it once.
* Timing is fair. The first run of a sampler at a batch shape is preceded by an untimed warm-up run (one-off
  costs: library set-up, kernel selection, memory), and each configuration is timed ``repeats`` times (a
  comparison: A and B interleaved), never while a foreground run is in flight (a disturbed repeat is
  discarded); a panel shows the median and the range, and says what was timed.
* The quality a panel shows is measured in one space for every point (:class:`ImageDistance`: images, after
  decoding latent samples), so pixel and latent models share one axis.
* Images are shown at their own pixel size (an integer scale chosen to fit, no smoothing), all grids of a
  panel at the same size.
* Images go to an ``ipywidgets.Image`` and the record to an ``HTML`` widget (not an ``Output`` widget:
  output capture from a worker thread is unreliable), the curve to a plotly ``FigureWidget``.
* The first run, with its background part, happens synchronously when the panel is built, so a notebook
  executed headless (nbval, nbconvert, the HTML report) already holds a complete result and nothing of the
  panel runs while later cells measure; each panel also carries a static HTML representation (image grid +
  figure) for readers without a live widget front end. :meth:`_RunnerPanel.wait` waits for both parts.
* Errors from a run are shown inside the panel in plain words; the panel keeps working.
* A sweep (:class:`SweepView`) runs on its own thread through :func:`companion.bench.iter_sweep`; Stop takes
  effect between runs, so every finished run is kept (and cached). :meth:`SweepView.show` displays the view
  before waiting for it, so points appear as runs finish even while the notebook runs all its cells.
"""
from __future__ import annotations

import abc
import contextlib
import html
import statistics
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import ipywidgets as w
import numpy as np
import plotly.graph_objects as go
import torch

from . import bench
from . import quicktrain
from . import schedules as sch
from .device import pick_device, release_cpu_threads
from .models import load
from .pipelines import compatible_samplers
from .partial import sample_from
from .caching import DeepCache
from .quantise import QUANT_MODES, quantise
from .plots import (AXIS_LABELS, data_range, difference_png, error_html, figure_html, fit_scale, grid_png, png_html,
                    png_size, series_style)
from .reference import SOLUTIONS, ReferenceDistance, ReferenceSolutions
from .report import ImageRow, mode_label, record_table, sweep_table, table_html, timing_text
from .samplers import REGISTRY, SPACINGS
from .samplers import get as get_sampler
from .sampling import sample
from .speed import DEVICE_PRECISIONS, SpeedOptions, accelerate

# ------------------------------------------------------------------------------------------ runner


class LatestOnlyRunner:
    """Run ``fn(request)`` on one worker thread; a newer request replaces a queued one.

    ``on_done(request, result)`` and ``on_error(request, exc)`` are called on the worker thread; if ``on_done``
    itself fails, ``on_error`` gets that failure (the worker never dies of it). ``runs`` counts started runs;
    :meth:`wait_idle` blocks until nothing is running or queued; :meth:`close` ends the worker.

    Bound methods are held weakly: the worker does not keep its panel alive, and it ends by itself once the
    panel is collected (it checks every :data:`IDLE_CHECK_S` seconds while idle).
    """

    IDLE_CHECK_S = 1.0

    def __init__(self, fn: Callable[[Any], Any], on_done: Callable[[Any, Any], None], on_error: Callable[[Any, BaseException], None]):
        self._fn, self._on_done, self._on_error = (_weak(f) for f in (fn, on_done, on_error))
        self._cond = threading.Condition()
        self._queued: Any = None
        self._has_queued = False
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self.runs = 0
        self.last_error: BaseException | None = None  # a failure of on_error itself (nothing else could show it)

    def request(self, req: Any) -> None:
        # The run happens on the worker: the requesting thread's idle OpenMP pool would only slow it down
        # (companion.device.release_cpu_threads says why).
        release_cpu_threads()
        with self._cond:
            if self._closed:
                raise RuntimeError("this panel was closed; create a new one")
            self._queued, self._has_queued = req, True
            self._busy = True
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True, name="companion-panel-runner")
                self._thread.start()
            self._cond.notify_all()

    def _alive(self) -> bool:
        return not self._closed and all(f() is not None for f in (self._fn, self._on_done, self._on_error))

    def _loop(self) -> None:
        # One long-lived worker per panel: a slider move reuses this thread (and the OpenMP team torch built
        # for it) instead of starting a new thread for every run.
        while True:
            with self._cond:
                if not self._has_queued:
                    release_cpu_threads()  # idle: the kernel thread's next torch call gets the CPUs to itself
                while not self._has_queued:
                    self._busy = False
                    self._cond.notify_all()
                    if not self._alive():
                        return
                    self._cond.wait(self.IDLE_CHECK_S)
                if not self._alive():
                    self._busy, self._has_queued = False, False
                    self._cond.notify_all()
                    return
                req, self._queued, self._has_queued = self._queued, None, False
                self.runs += 1
            self._serve(req)

    def _serve(self, req: Any) -> None:
        fn, on_done, on_error = self._fn(), self._on_done(), self._on_error()
        if fn is None or on_done is None or on_error is None:
            return
        try:
            result = fn(req)
            on_done(req, result)
        except BaseException as e:  # shown in the panel; the worker keeps serving requests
            try:
                on_error(req, e)
            except BaseException as e2:  # noqa: BLE001 - the last resort: kept for whoever asks
                self.last_error = e2
        finally:
            del fn, on_done, on_error  # no strong reference to the panel while idle

    def close(self, timeout: float = 10.0) -> None:
        """End the worker (after the run in progress, if any); later requests are refused."""
        with self._cond:
            self._closed = True
            self._has_queued = False
            self._cond.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._busy

    def wait_idle(self, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True


def _close_tree(widget: w.Widget) -> None:
    """Close a widget and every widget inside it (the front end then drops them)."""
    for child in getattr(widget, "children", ()):
        _close_tree(child)
    widget.close()


def _weak(f: Callable) -> Callable[[], Callable | None]:
    """A weak reference to a bound method (a plain function is held as it is)."""
    if hasattr(f, "__self__") and hasattr(f, "__func__"):
        return weakref.WeakMethod(f)
    return lambda: f


# ------------------------------------------------------------------------------------------ background work


class ForegroundGate:
    """Counts the foreground runs in flight (a reader waits for their images); background work yields to them.

    Background work calls :meth:`yield_now` before each network call (a forward pre-hook that :func:`yielding`
    puts on a model's networks): while a foreground run is in flight it waits, so the run a reader waits for has
    the CPUs to itself, and the background work resumes where it stopped. ``epoch`` counts foreground starts: a
    background timing during which it changed was disturbed and is discarded.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._active = 0
        self.epoch = 0
        self.last_end = float("-inf")
        self.yields = 0  # how often background work waited for a foreground run (tests read it)

    @contextlib.contextmanager
    def foreground(self):
        with self._cond:
            self._active += 1
            self.epoch += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self.last_end = time.monotonic()
                self._cond.notify_all()

    @property
    def active(self) -> bool:
        return self._active > 0

    def wait_clear(self, settle: float = 0.0) -> None:
        """Block while a foreground run is in flight, and until ``settle`` seconds after the last one ended."""
        with self._cond:
            while True:
                if self._active:
                    self._cond.wait()
                    continue
                left = self.last_end + settle - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def yield_now(self) -> None:
        """Called by background work between network calls: wait here while a foreground run is in flight."""
        if self._active:
            self.yields += 1
            release_cpu_threads()  # this thread's idle OpenMP team would only slow the foreground run down
            self.wait_clear()


GATE = ForegroundGate()
SETTLE_S = 0.2  # background timing starts this long after a foreground run ended (the browser draws its images)
_THREAD_ROLE = threading.local()  # .background is True on BackgroundWork's thread


def in_background() -> bool:
    return bool(getattr(_THREAD_ROLE, "background", False))


def _yield_hook(module, args):
    if in_background():
        GATE.yield_now()


_YIELDING: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def yielding(model) -> None:
    """Let ``model``'s network calls made by background work yield to foreground runs (a forward pre-hook on its
    networks, which does nothing on other threads; weights, results and fingerprints are unchanged)."""
    for name in ("unet", "vae"):
        net = getattr(model, name, None)
        if isinstance(net, torch.nn.Module) and net not in _YIELDING:
            net.register_forward_pre_hook(_yield_hook)
            _YIELDING.add(net)
    base = getattr(model, "base", None)  # an accelerated model: its base decodes
    if base is not None and base is not model:
        yielding(base)


class BackgroundWork:
    """One process-wide thread for what panels measure after a run's images are shown: quality values (which
    may need a reference solution), further timed runs. Jobs run newest first; a job of a panel that was closed or
    collected is dropped. The thread ends after :data:`IDLE_EXIT_S` idle seconds and starts again on demand.

    A job is ``fn(owner)``; the queue holds its owner weakly, so a queued job never keeps a panel alive.
    """

    IDLE_EXIT_S = 2.0

    def __init__(self, name: str = "companion-background"):
        self.name = name
        self._cond = threading.Condition()
        self._jobs: list[tuple[int, weakref.ref, Callable[[Any], None]]] = []
        self._running: weakref.ref | None = None
        self._seq = 0
        self._thread: threading.Thread | None = None
        self.last_error: BaseException | None = None  # a job's own error handling failed (nothing else could show it)

    def submit(self, owner, fn: Callable[[Any], None]) -> None:
        with self._cond:
            self._seq += 1
            self._jobs.append((self._seq, weakref.ref(owner), fn))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True, name=self.name)
                self._thread.start()
            self._cond.notify_all()

    def cancel(self, owner) -> None:
        """Drop ``owner``'s queued jobs (one already running finishes)."""
        with self._cond:
            self._jobs = [j for j in self._jobs if j[1]() is not None and j[1]() is not owner]
            self._cond.notify_all()

    def pending(self, owner) -> bool:
        """Whether ``owner`` has a job queued or running."""
        with self._cond:
            return self._pending(owner)

    def _pending(self, owner) -> bool:
        running = self._running() if self._running is not None else None
        return running is owner or any(j[1]() is owner for j in self._jobs)

    def wait_idle(self, owner, timeout: float = 120.0) -> bool:
        """Block until ``owner`` has no job queued or running; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending(owner):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
        return True

    def _loop(self) -> None:
        _THREAD_ROLE.background = True
        while True:
            with self._cond:
                self._jobs = [j for j in self._jobs if j[1]() is not None]
                if not self._jobs:
                    release_cpu_threads()
                    self._cond.notify_all()
                    self._cond.wait(self.IDLE_EXIT_S)
                    self._jobs = [j for j in self._jobs if j[1]() is not None]
                    if not self._jobs:
                        self._thread = None
                        self._cond.notify_all()
                        return
                    continue
                newest = max(range(len(self._jobs)), key=lambda i: self._jobs[i][0])
                _, ref, fn = self._jobs.pop(newest)
                owner = ref()
                self._running = ref
            try:
                if owner is not None:
                    fn(owner)
            except BaseException as e:  # noqa: BLE001 - a job shows its own errors; this is the last resort
                self.last_error = e
            finally:
                del owner, fn
                with self._cond:
                    self._running = None
                    self._cond.notify_all()


BACKGROUND = BackgroundWork()

# ------------------------------------------------------------------------------------------ parts



def sampler_control(value: str = "dpmpp_2m", names: Iterable[str] | None = None) -> w.Dropdown:
    names = list(names or REGISTRY)
    options = [(f"{REGISTRY[n].name}", n) for n in names]
    return w.Dropdown(options=options, value=value, description="sampler")


def steps_control(value: int = 20, min: int = 1, max: int = 100) -> w.IntSlider:
    return w.IntSlider(value=value, min=min, max=max, description="steps", continuous_update=False)


def guidance_control(value: float = 2.0, max: float = 8.0) -> w.FloatSlider:
    return w.FloatSlider(value=value, min=0.0, max=max, step=0.25, description="guidance", continuous_update=False)


def eta_control(value: float = 0.0) -> w.FloatSlider:
    return w.FloatSlider(value=value, min=0.0, max=1.0, step=0.1, description="eta", continuous_update=False)


def spacing_control(value: str = "trailing") -> w.Dropdown:
    return w.Dropdown(options=list(SPACINGS), value=value, description="spacing")


def seed_control(value: int = 0) -> w.IntText:
    return w.IntText(value=value, description="seed")


def batch_control(value: int = 16, max: int = 64) -> w.IntSlider:
    return w.IntSlider(value=value, min=1, max=max, description="batch", continuous_update=False)


def class_control(num_classes: int, value: int | None = None) -> w.Dropdown:
    options = [("every class", -1)] + [(str(c), c) for c in range(num_classes)]
    return w.Dropdown(options=options, value=-1 if value is None else value, description="class")


def mode_control(modes: Iterable[str], value: str | None = None) -> w.ToggleButtons:
    modes = list(modes)
    return w.ToggleButtons(options=modes, value=value or modes[0], description="space")


def speed_control(value: str = "fp32", device: str | None = None) -> w.Dropdown:
    """Speed options (precision, memory layout) for the network; the choices are those this device supports.
    torch.compile is left out of the panel: compiling takes minutes on a CPU (use companion.speed directly)."""
    kind = pick_device(device).type
    labels = []
    for prec in DEVICE_PRECISIONS.get(kind, ("fp32",)):
        labels += [prec, f"{prec}+channels_last"]
    if kind == "cuda":
        labels += ["bf16+channels_last+compile"]
    return w.Dropdown(options=labels, value=value if value in labels else labels[0], description="speed")


CACHE_INTERVALS = (1, 2, 3, 5)


def cache_control(value: int = 1) -> w.Dropdown:
    """DeepCache's interval N: the full UNet every N-th network call, its shallow branch in between (1: no cache)."""
    if value not in CACHE_INTERVALS:
        raise ValueError(f"cache interval {value!r} is not offered; choose one of {CACHE_INTERVALS}")
    return w.Dropdown(options=[("no cache" if n == 1 else f"full call every {n}", n) for n in CACHE_INTERVALS],
                      value=value, description="cache")


def quant_control(value: str = "none") -> w.Dropdown:
    """int8 quantisation of the network (companion.quantise): none, weight-only, dynamic (Linear layers) or static."""
    choices = ("none",) + QUANT_MODES
    if value not in choices:
        raise ValueError(f"quantisation {value!r} is not offered; choose one of {choices}")
    return w.Dropdown(options=choices, value=value, description="int8")


def prompt_control(value: str = "a watercolour painting of a lighthouse") -> w.Text:
    """The prompt of a text-to-image pipeline (applied on Enter or when the box loses focus)."""
    return w.Text(value=str(value), description="prompt", continuous_update=False, layout=w.Layout(width="420px"))


def negative_prompt_control(value: str = "") -> w.Text:
    """What guidance steers away from (a pipeline's negative prompt); empty: the unconditional half is the empty prompt."""
    return w.Text(value=str(value), description="negative", continuous_update=False, layout=w.Layout(width="420px"))


TEXT_CONTROLS = ("prompt", "negative_prompt")  # need a model that takes a prompt

CONTROL_FACTORIES: dict[str, Callable[..., w.Widget]] = {
    "sampler": sampler_control, "steps": steps_control, "guidance": guidance_control, "eta": eta_control,
    "spacing": spacing_control, "seed": seed_control, "batch": batch_control, "speed": speed_control,
    "cache": cache_control, "quant": quant_control, "prompt": prompt_control, "negative_prompt": negative_prompt_control,
}



def x_axis_control(value: str = "wall_s") -> w.ToggleButtons:
    """What the curve's x axis shows: network evaluations per sample, or measured wall time."""
    return w.ToggleButtons(options=[("NFE", "nfe"), ("wall time", "wall_s")], value=value, description="curve x",
                           tooltips=["network evaluations per sample", "wall time of one run (median of the timed runs)"],
                           style={"button_width": "84px"})


# ------------------------------------------------------------------------------------------ figure

MARK_COLORS = {"current": "black", "A": "#b2182b", "B": "#2166ac"}
MARK_TEXT_POSITIONS = {"A": "top left", "B": "top right"}  # A and B often sit close together: labels on either side
X_TITLES = {"wall_s": "wall time per run (s)", "nfe": "NFE per sample"}


def speed_quality_widget(x_title: str, y_title: str, marks: Iterable[str] = ("current",), *, width: int | None = None,
                         height: int = 360) -> go.FigureWidget:
    """An empty speed/quality figure whose first traces are highlight marks, one per name in ``marks``.

    The mark ``"current"`` is an unlabelled ring (the run shown beside the curve); any other mark (e.g. ``"A"``,
    ``"B"``) also shows its name. Both axes start at 0 (costs and distances are never negative); the legend sits
    below the plot. ``width``: fixed pixels (None: the container's).
    """
    fig = go.FigureWidget(layout=go.Layout(
        height=height, width=width, autosize=width is None, margin=dict(l=72, r=16, t=16, b=56),
        xaxis=dict(title=dict(text=x_title, standoff=8), rangemode="tozero", range=[0, 1], zeroline=True),
        yaxis=dict(title=dict(text=y_title, standoff=8), rangemode="tozero", range=[0, 1], zeroline=True),
        legend=dict(orientation="h", x=0, xanchor="left", y=-0.2, yanchor="top", font=dict(size=12)),
        font=dict(size=12), template="plotly_white"))
    for name in marks:
        ring = dict(size=18, symbol="circle-open", line=dict(width=3), color=MARK_COLORS.get(name, "black"))
        if name == "current":
            fig.add_scatter(x=[], y=[], mode="markers", name=name, marker=ring, hoverinfo="skip", showlegend=False)
        else:
            fig.add_scatter(x=[], y=[], text=[], mode="markers+text", name=name, marker=ring, hoverinfo="skip",
                            showlegend=False, textposition=MARK_TEXT_POSITIONS.get(name, "top center"),
                            textfont=dict(size=16, color=ring["color"]))
    return fig


def move_mark(fig: go.FigureWidget, mark: str, x: float | None, y: float | None) -> None:
    """Move the highlight trace named ``mark`` to (x, y); ``None`` hides it (a run without a quality value)."""
    trace = next((t for t in fig.data if t.name == mark and not t.hovertemplate), None)
    if trace is None:
        raise ValueError(f"the figure has no mark {mark!r}; marks: {[t.name for t in fig.data if not t.hovertemplate]}")
    shown = x is not None and y is not None
    trace.x, trace.y = ((x,), (y,)) if shown else ((), ())
    if "text" in (trace.mode or ""):
        trace.text = (mark,) if shown else ()


def _rgba(color: str, alpha: float) -> str:
    color = color.lstrip("#")
    r, g, b = (int(color[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def fit_axes(fig: go.BaseFigure, *, errors: bool = False) -> None:
    """Fit both axes to the points of the figure's series (marks included): from 0 to a little above the
    largest value on linear axes (never a negative cost or distance), the data's decades on log axes.
    ``errors``: let the error bars widen the range too (off: a wide interval does not squash the points)."""
    xs, ys = [], []
    for t in fig.data:
        if not t.x:
            continue
        x, y = np.asarray(t.x, dtype=float), np.asarray(t.y, dtype=float)
        xs.append(x)
        ys.append(y)
        if errors and t.hovertemplate:
            for arr, vals, out in ((t.error_x, x, xs), (t.error_y, y, ys)):
                if arr is not None and arr.array is not None and len(arr.array) == len(vals):
                    out.append(vals + np.asarray(arr.array, dtype=float))
    for axis, vals in ((fig.layout.xaxis, xs), (fig.layout.yaxis, ys)):
        rng = data_range(np.concatenate(vals) if vals else [], log=axis.type == "log")
        if rng is not None:
            axis.range = rng
        elif axis.type != "log":
            axis.range = [0, 1]


def add_point(fig: go.FigureWidget, series: str, x: float, y: float, text: str, *, mark: str | None = "current",
              error: tuple[float, float] | None = None) -> None:
    """Add a point to the trace named ``series`` (created on first use, with its own colour and marker), keep the
    trace sorted by x (its line never zig-zags back), move the highlight ``mark`` there and fit the axes.

    ``error``: the point's interval (low, high), drawn as a thin, light error bar (it must not hide the points).
    """
    with fig.batch_update():
        trace = next((t for t in fig.data if t.name == series and t.hovertemplate), None)
        plus, minus = (error[1] - y, y - error[0]) if error is not None else (None, None)
        if trace is None:
            style = series_style(sum(1 for t in fig.data if t.hovertemplate))
            err = None if error is None else dict(type="data", symmetric=False, array=[plus], arrayminus=[minus],
                                                  thickness=1, width=3, color=_rgba(style["color"], 0.35))
            fig.add_scatter(x=[x], y=[y], text=[text], mode="markers+lines", name=series, error_y=err,
                            marker=dict(color=style["color"], symbol=style["symbol"], size=9),
                            line=dict(color=style["color"], dash=style["dash"], width=2),
                            hovertemplate="%{text}<extra></extra>")
        else:
            n = len(trace.x)
            cols = [tuple(trace.x) + (x,), tuple(trace.y) + (y,), tuple(trace.text or ("",) * n) + (text,)]
            has_err = error is not None and trace.error_y.array is not None
            if has_err:
                cols += [tuple(trace.error_y.array) + (plus,), tuple(trace.error_y.arrayminus) + (minus,)]
            order = sorted(range(n + 1), key=lambda i: cols[0][i])
            cols = [tuple(c[i] for i in order) for c in cols]
            trace.x, trace.y, trace.text = cols[:3]
            if has_err:
                trace.error_y.array, trace.error_y.arrayminus = cols[3:]
        if mark is not None:
            move_mark(fig, mark, x, y)
    fit_axes(fig)  # after the batch: inside it the traces still read their old values


def series_points(fig: go.FigureWidget) -> int:
    """How many points the figure's series hold (highlight marks not counted)."""
    return sum(len(t.x) for t in fig.data if t.hovertemplate)



# ------------------------------------------------------------------------------------------ quality


class ImageDistance:
    """A panel's quality: RMS distance, in image space, between a run's images and the images of a converged
    solution of the probability-flow ODE from the same initial noise (lower is better).

    The converged solution is a ``reference_steps``-step run of ``reference_sampler``
    (:func:`companion.reference.converged_sample`) of the model itself — its base model when the run used speed
    options, so every speed option is measured against the same fp32 solution — or of ``teacher`` when one is
    given (a distilled student aims at its teacher's solution). Latent samples are decoded first, so pixel and
    latent models are measured in the same space and share one axis; both sides are clamped to [-1, 1], as the
    images are shown. Without a teacher, stochastic samplers (which do not follow the ODE) get no value.
    References come from the shared cache (:data:`companion.reference.SOLUTIONS`).
    """

    def __init__(self, teacher=None, reference_sampler: str = "unipc", reference_steps: int = 200,
                 cache: ReferenceSolutions | None = None):
        self.teacher, self.reference_sampler, self.reference_steps = teacher, reference_sampler, int(reference_steps)
        self.cache = cache if cache is not None else SOLUTIONS
        name = get_sampler(reference_sampler).name.split(" (")[0]
        whose = "the teacher's " if teacher is not None else "a "
        self.label = f"RMS distance to {whose}converged solution, image space (lower is better)"
        self.short_label = "distance to teacher (RMS)" if teacher is not None else "distance to converged (RMS)"
        self.description = (f"RMS distance, in image space, between a run's images and {whose}converged solution of "
                            f"the probability-flow ODE from the same initial noise ({self.reference_steps} {name} steps); "
                            "latent samples are decoded first, so every point is measured in the same space. "
                            "Lower is better" + ("" if teacher is not None else
                                                 "; stochastic samplers do not follow the ODE and get no value"))
        self._decoded: "OrderedDict[int, tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()

    @classmethod
    def like(cls, distance: ReferenceDistance) -> "ImageDistance":
        """The image-space version of a :class:`companion.reference.ReferenceDistance` (same teacher, reference)."""
        return cls(distance.teacher, distance.reference_sampler, distance.reference_steps, distance.cache)

    def reference_images(self, model, result, cond=None) -> torch.Tensor:
        """The converged solution's images from ``result``'s initial noise (decoded for a latent model)."""
        target = self.teacher if self.teacher is not None else getattr(model, "base", model)
        target = getattr(target, "original", target)  # a quantised copy is measured against its float network
        yielding(target)
        text = {}
        if getattr(target, "text_conditional", False):  # a pipeline's reference answers the same prompt
            text = dict(prompt=result.record.prompt, negative_prompt=result.record.negative_prompt)
        ref = self.cache.get(target, result.x_T, method="sampler", sampler=self.reference_sampler,
                             steps=self.reference_steps, class_labels=result.class_labels,
                             guidance=result.record.guidance, cond=cond, **text)
        if not getattr(target, "is_latent", False):
            return ref
        hit = self._decoded.get(id(ref))
        if hit is not None and hit[0] is ref:
            return hit[1]
        with torch.no_grad():
            images = target.decode(ref.to(getattr(target, "device", "cpu"))).float().cpu()
        self._decoded[id(ref)] = (ref, images)
        while len(self._decoded) > 16:
            self._decoded.popitem(last=False)
        return images

    def __call__(self, model, result, sample_kwargs: dict | None = None) -> float | None:
        if self.teacher is None and result.record.stochastic:
            return None
        ref = self.reference_images(model, result, (sample_kwargs or {}).get("cond"))
        a = result.images.detach().float().cpu().clamp(-1, 1)
        return float((a - ref.float().clamp(-1, 1)).pow(2).mean().sqrt())


# ------------------------------------------------------------------------------------------ panel


@dataclass(eq=False)
class PanelRun:
    """One configuration a panel ran: its parameters, its result (the images shown) and what was measured.

    ``times``: wall time (s) of every timed run of this configuration (the first is the run whose images are
    shown; the others were timed in the background); ``wall_s`` is their median. ``quality``: the panel's quality
    value (None: not measured yet, failed, or the sampler has none). ``measured``: the background part is done.
    """

    params: dict
    result: Any
    quality: float | None = None
    times: list = field(default_factory=list)
    measured: bool = False
    quality_done: bool = False
    quality_error: str | None = None
    timeline: dict = field(default_factory=dict)  # epoch seconds: requested, started, sampled, shown, measured

    @property
    def wall_s(self) -> float:
        return float(statistics.median(self.times)) if self.times else float("nan")


class _Quiet:
    """Set while a panel changes its own controls, so those changes start no run."""

    def __init__(self):
        self.on = False

    def __enter__(self):
        self.on = True

    def __exit__(self, *exc):
        self.on = False


def make_controls(names: Iterable[str], values: dict, models: Mapping[str, Any], *, mode: bool | None = None) -> dict[str, w.Widget]:
    """The named controls, in order. A name found in ``values`` takes its initial value from there and is removed
    from ``values`` (what is left are fixed values without a control). ``mode``: add a toggle between ``models``
    (default: when there are several)."""
    names = list(names)
    unknown = set(names) - set(CONTROL_FACTORIES) - {"class"}
    if unknown:
        raise ValueError(f"unknown control(s) {sorted(unknown)}; valid: {sorted(CONTROL_FACTORIES) + ['class']}")
    texts = [n for n in names if n in TEXT_CONTROLS]
    if texts and not any(getattr(m, "text_conditional", False) for m in models.values()):
        raise ValueError(f"control(s) {texts} need a text-conditioned pipeline (companion.load of a diffusers text-to-image "
                         f"pipeline); {', '.join(models)} take(s) no prompt")
    controls: dict[str, w.Widget] = {}
    for name in names:
        if name == "class":
            nc = next((m.num_classes for m in models.values() if m.num_classes), None)
            if nc is None:
                raise ValueError("control 'class' needs a class-conditional model")
            controls[name] = class_control(nc, values.pop("class", None))
        elif name in values:
            controls[name] = CONTROL_FACTORIES[name](values.pop(name))
        else:
            controls[name] = CONTROL_FACTORIES[name]()
    if mode if mode is not None else len(models) > 1:
        controls["mode"] = mode_control(models, values.pop("mode", None))
    return controls


def _params_key(p: Mapping) -> tuple:
    """A comparable key for a parameter dict (tensors, e.g. conditioning images, by identity)."""
    return tuple(sorted((k, ("tensor", id(v)) if isinstance(v, torch.Tensor) else v) for k, v in p.items()))


SETTING_NAMES = {"prompt": "prompt", "negative_prompt": "negative", "guidance": "w", "class": "class", "seed": "seed", "eta": "eta", "spacing": "spacing", "speed": "speed",
                 "cache": "cache N", "quant": "int8",
                 "batch": "batch"}


class SamplingSetup:
    """Turns a panel's parameter dict into a ``sample`` call and a measured :class:`PanelRun`.

    Shared by every panel: the models (one, or several chosen by a ``mode`` parameter), one accelerated copy
    per speed label, the warm-up before a configuration's first timed run, further timed runs, the quality
    measure and where a run sits on the curve (x: ``"wall_s"`` or ``"nfe"``, changeable).
    """

    WARMUP_STEPS = 3  # an untimed run this long precedes the first timed run of a sampler at a batch shape

    def __init__(self, models, quality: Callable | None = None, quality_label: str | None = None, x: str = "wall_s"):
        self.models = dict(models) if isinstance(models, Mapping) else {"model": models}
        self.x = x
        q = quality if quality is not None else ImageDistance()
        if isinstance(q, ReferenceDistance):  # measured in image space like every other point of a panel
            q = ImageDistance.like(q)
        self.quality = q
        self.quality_label = quality_label or getattr(q, "label", "quality")
        self.quality_short = quality_label or getattr(q, "short_label", None) or self.quality_label
        self.quality_description = getattr(q, "description", None) or self.quality_label
        self._speed_cache: dict = {}
        self._warm: set = set()
        self.warmups = 0  # untimed warm-up runs made (tests read it)

    @property
    def x(self) -> str:
        return self._x

    @x.setter
    def x(self, value: str) -> None:
        if value not in ("wall_s", "nfe"):
            raise ValueError(f"x={value!r} is not valid; choose 'wall_s' or 'nfe'")
        self._x = value

    @property
    def x_title(self) -> str:
        return X_TITLES[self.x]

    def model(self, p: Mapping) -> Any:
        return self.models[p.get("mode", next(iter(self.models)))]

    def sample_kwargs(self, p: Mapping) -> tuple[Any, dict]:
        model = self.model(p)
        if p.get("quant", "none") != "none":  # quantised first: the speed options then act on the int8 network
            model = self.quantised(model, p["quant"])
        if p.get("speed", "fp32") != "fp32":
            model = self.accelerated(model, p["speed"])
        kw = {k: p[k] for k in ("sampler", "steps", "seed", "batch", "spacing") if k in p}
        kw.setdefault("batch", 16)
        spec = REGISTRY[kw.get("sampler", "dpmpp_2m")]
        if p.get("cond") is not None:  # a super-resolution stage: fixed low-resolution inputs
            if len(p["cond"]) < kw["batch"]:
                raise ValueError(f"batch={kw['batch']} but only {len(p['cond'])} conditioning images were given")
            kw["cond"] = p["cond"][: kw["batch"]]
        if "eta" in p and spec.has_eta:
            kw["eta"] = p["eta"]
        if p.get("cache", 1) != 1:  # a fresh cache per call: it counts calls and keeps features for one run
            kw["wrap"] = DeepCache(model, p["cache"])
        if getattr(model, "text_conditional", False):
            for name in TEXT_CONTROLS:
                if p.get(name):
                    kw[name] = p[name]
            if "guidance" in p:
                kw["guidance"] = p["guidance"]
        if model.conditional:
            cls = p.get("class", -1)
            kw["class_labels"] = torch.arange(kw["batch"]) % model.num_classes if cls in (-1, None) else torch.full((kw["batch"],), int(cls))
            if "guidance" in p:
                kw["guidance"] = p["guidance"]
        return model, kw

    def accelerated(self, model, label: str):
        """One accelerated copy per (model, speed label): preparing (or compiling) once, not every run."""
        key = (id(model), label)
        if key not in self._speed_cache:
            self._speed_cache[key] = accelerate(model, SpeedOptions.from_label(label))
        return self._speed_cache[key]

    def quantised(self, model, mode: str):
        """One quantised copy per (model, mode): static calibration runs once, not every run."""
        key = (id(model), "quant", mode)
        if key not in self._speed_cache:
            self._speed_cache[key] = quantise(model, mode)
        return self._speed_cache[key]

    def warm_up(self, model, kw: dict) -> bool:
        """An untimed short run before the first timed run of this sampler, model and batch shape (library set-up,
        kernel selection and memory are paid here, not by the timing a reader compares). True if it ran."""
        key = (id(model), kw.get("sampler"), kw.get("spacing"), kw["batch"], kw.get("guidance") is not None,
               None if kw.get("cond") is None else tuple(kw["cond"].shape))
        if key in self._warm:
            return False
        for steps in (min(kw.get("steps", 20), self.WARMUP_STEPS), kw.get("steps", 20)):
            try:
                sample(model, **{**kw, "steps": steps})
            except Exception:  # noqa: BLE001 - a configuration that cannot run fails in the timed run, in plain words
                continue
            self._warm.add(key)
            self.warmups += 1
            return True
        return False

    def run(self, p: dict) -> PanelRun:
        """The foreground part: warm up if needed, then one timed run whose images the panel shows."""
        model, kw = self.sample_kwargs(p)
        self.warm_up(model, kw)
        res = sample(model, **kw)
        return PanelRun(p, res, times=[res.record.wall_s])

    def time_again(self, run: PanelRun) -> float | None:
        """Wall time (s) of one more run of ``run``'s configuration (the same call; its result is dropped), taken
        while no foreground run is in flight. None when foreground runs disturbed it three times."""
        model, kw = self.sample_kwargs(run.params)
        yielding(model)
        for _ in range(3):
            GATE.wait_clear(settle=SETTLE_S if in_background() else 0.0)
            epoch = GATE.epoch
            wall = sample(model, **kw).record.wall_s
            if GATE.epoch == epoch:
                return wall
        return None

    def measure_quality(self, run: PanelRun) -> None:
        """Set ``run.quality`` (once); a failure is kept in ``run.quality_error`` and raised."""
        if run.quality_done:
            return
        model, kw = self.sample_kwargs(run.params)
        try:
            if isinstance(self.quality, ImageDistance):
                run.quality = self.quality(model, run.result, kw)
            else:
                run.quality = self.quality(model, run.result)
        except Exception as e:
            run.quality_error = f"{type(e).__name__}: {e}"
            raise
        finally:
            run.quality_done = True

    def point(self, run: PanelRun, x: str | None = None) -> tuple[float, float, tuple[float, float] | None] | None:
        """Where a run sits on the curve: (x, quality, x interval or None), or None without a quality value."""
        if run.quality is None:
            return None
        x = x or self.x
        rec = run.result.record
        if x == "nfe":
            return float(rec.nfe), run.quality, None
        spread = (min(run.times), max(run.times)) if len(run.times) > 1 else None
        return run.wall_s, run.quality, spread

    def series(self, run: PanelRun) -> str:
        """The curve a run belongs to: one per sampler, and per model when there are several."""
        rec = run.result.record
        return REGISTRY[rec.sampler].name + (f" [{run.params['mode']}]" if "mode" in run.params else "")

    def settings(self, run: PanelRun) -> str:
        """The run's other settings in a few words (for hover texts)."""
        p = run.params
        parts = [f"{SETTING_NAMES[k]} {'every' if k == 'class' and p[k] in (-1, None) else p[k]}"
                 for k in SETTING_NAMES if k in p and not (k == "guidance" and p[k] is None)]
        return ", ".join(parts)

    def hover(self, run: PanelRun) -> str:
        rec = run.result.record
        q = "n/a" if run.quality is None else f"{run.quality:.4f}"
        return (f"{self.series(run)}<br>steps {rec.steps}, NFE {rec.nfe}<br>{self.settings(run)}"
                f"<br>wall {timing_text(run.times)}<br>{html.escape(self.quality_short)}: {q}")

    def sync_enabled(self, controls: Mapping[str, w.Widget], p: Mapping, quiet: _Quiet) -> None:
        """Disable controls the current sampler/model cannot use (e.g. eta for a sampler without it); offer only the
        samplers that fit the current model (a flow-matching model runs those with a flow-matching form)."""
        if "sampler" in controls:
            self._fit_samplers(controls["sampler"], self.model(p), quiet)
            p = dict(p, sampler=controls["sampler"].value)
        spec = REGISTRY[p.get("sampler", "dpmpp_2m")]
        if "eta" in controls:
            controls["eta"].disabled = not spec.has_eta
        if "spacing" in controls:
            sp = controls["spacing"]
            allowed = list(spec.spacings)
            if list(sp.options) != allowed:
                with quiet:
                    keep = sp.value if sp.value in allowed else spec.default_spacing
                    sp.options = allowed
                    sp.value = keep if keep in allowed else allowed[0]
        model = self.model(p)
        for name in ("guidance", "class"):
            if name in controls:
                controls[name].disabled = not model.conditional

    @staticmethod
    def _fit_samplers(control: w.Dropdown, model, quiet: _Quiet) -> None:
        every = control.__dict__.setdefault("_every_option", tuple(control.options))  # the list it was built with
        fits = set(compatible_samplers(model))
        allowed = tuple(o for o in every if (o[1] if isinstance(o, tuple) else o) in fits)
        if tuple(control.options) != allowed:
            with quiet:
                keep = control.value
                control.options = allowed
                values = [o[1] if isinstance(o, tuple) else o for o in allowed]
                control.value = keep if keep in values else ("euler" if "euler" in values else values[0])


class Curve:
    """A sampling panel's speed/quality figure, drawn from its runs.

    One line per sampler (and model) and fixed other settings — a steps sweep — with its points sorted by x, so a
    line never zig-zags back; each sampler has its own colour and marker (further settings of the same sampler:
    other dash styles). x is NFE or the median wall time (with the range of the timed runs as a bar), switchable;
    both axes start at 0 and fit the data.
    """

    def __init__(self, setup: SamplingSetup, marks: Iterable[str] = ("current",), *, width: int | None = 580,
                 height: int = 360):
        self.setup = setup
        self.figure = speed_quality_widget(setup.x_title, setup.quality_short, marks, width=width, height=height)
        self._traces: dict[tuple, int] = {}
        self._series: dict[str, dict] = {}
        self._configs: dict[str, list] = {}

    def _trace_for(self, series: str, config: tuple) -> go.Scatter:
        key = (series, config)
        if key not in self._traces:
            style = self._series.setdefault(series, series_style(len(self._series)))
            configs = self._configs.setdefault(series, [])
            configs.append(config)
            dash = ("solid", "dot", "dash", "dashdot", "longdash")[(len(configs) - 1) % 5]
            self.figure.add_scatter(x=[], y=[], text=[], mode="markers+lines", name=series, legendgroup=series,
                                    showlegend=len(configs) == 1,
                                    marker=dict(color=style["color"], symbol=style["symbol"], size=9),
                                    line=dict(color=style["color"], dash=dash, width=2),
                                    hovertemplate="%{text}<extra></extra>")
            self._traces[key] = len(self.figure.data) - 1
        return self.figure.data[self._traces[key]]

    def draw(self, runs: Iterable[PanelRun], marks: Mapping[str, PanelRun | None]) -> None:
        """Redraw every line from ``runs`` (those with a quality value) and put each mark on its run (None: hidden).

        Runs of the same configuration (a reader went back to it) are one point: their timings are pooled."""
        same: dict[tuple, PanelRun] = {}
        for run in runs:
            if run.quality is None:
                continue
            key = _params_key(run.params)
            if key in same:  # pooled: every timing of this configuration, the latest images and quality
                pooled = same.pop(key)
                run = PanelRun(run.params, run.result, run.quality, pooled.times + run.times, True, True)
            same[key] = run
        merged = {id(r): r for r in same.values()}
        for name, run in marks.items():  # a mark sits on its configuration's pooled point
            if run is not None:
                marks = {**marks, name: same.get(_params_key(run.params), run)}
        groups: dict[tuple, list] = {}
        for run in merged.values():
            point = self.setup.point(run)
            config = _params_key({k: v for k, v in run.params.items() if k != "steps"})
            groups.setdefault((self.setup.series(run), config), []).append((point, run))
        with self.figure.batch_update():
            self.figure.layout.xaxis.title.text = self.setup.x_title
            for (series, config), pts in groups.items():
                pts.sort(key=lambda pr: pr[0][0])
                trace = self._trace_for(series, config)
                trace.x = tuple(p[0] for p, _ in pts)
                trace.y = tuple(p[1] for p, _ in pts)
                trace.text = tuple(self.setup.hover(r) for _, r in pts)
                if any(p[2] is not None for p, _ in pts):
                    trace.error_x = dict(type="data", symmetric=False, thickness=1, width=3,
                                         array=[(p[2][1] - p[0]) if p[2] else 0 for p, _ in pts],
                                         arrayminus=[(p[0] - p[2][0]) if p[2] else 0 for p, _ in pts],
                                         color=_rgba(trace.line.color, 0.5))
                else:
                    trace.error_x = dict(array=None, arrayminus=None, visible=False)
            for key, i in self._traces.items():
                if key not in groups:
                    self.figure.data[i].x, self.figure.data[i].y, self.figure.data[i].text = (), (), ()
            for name, run in marks.items():
                point = self.setup.point(run) if run is not None else None
                move_mark(self.figure, name, *(point[:2] if point else (None, None)))
        fit_axes(self.figure, errors=True)  # after the batch: inside it the traces still read their old values


PIXELATED_STYLE = "<style>.companion-pixelated{image-rendering:pixelated;flex:0 0 auto;max-width:none !important}</style>"
MEASURING = "<i>images shown; measuring quality and timing in the background…</i>"


def _image_widget() -> w.Image:
    """An image widget shown at its PNG's own pixel size, without smoothing (see :func:`_show_png`)."""
    image = w.Image(format="png", layout=w.Layout(flex="0 0 auto"))
    image.add_class("companion-pixelated")
    return image


def _show_png(widget: w.Image, png: bytes) -> None:
    width, height = png_size(png)
    with widget.hold_sync():
        widget.value = png
        widget.width, widget.height = str(width), str(height)
    if widget.layout.width != f"{width}px" or widget.layout.height != f"{height}px":
        widget.layout.width, widget.layout.height = f"{width}px", f"{height}px"


class _Panel(abc.ABC):
    """A panel's two faces: the live ``widget``, and :meth:`static_html` (what nbconvert, the HTML report and a
    reader without a widget front end see). Every panel shows itself through here."""

    widget: w.Widget

    @abc.abstractmethod
    def static_html(self) -> str:
        """The panel as static HTML."""

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = self.widget._repr_mimebundle_(include=include, exclude=exclude) or {}
        bundle["text/html"] = self.static_html()
        return bundle


HISTORY_MAX = 500  # runs a panel remembers: enough for any curve a reader builds, bounded for a long session


class _RunnerPanel(_Panel):
    """What every sampling panel shares (:class:`SamplerPanel`, :class:`ComparePanel`): the
    :class:`SamplingSetup`, the status and error lines, the run history, a :class:`LatestOnlyRunner` fed by the
    controls (the foreground part: images), :data:`BACKGROUND` work after each run (quality, timing repeats),
    errors shown in plain words, and run now / wait / count runs.

    A panel calls ``_watch(controls)`` once its controls exist, and defines ``_request()`` (its current
    parameters), ``_foreground(request)`` (on the worker thread), ``_draw(out)`` (put a run's images on screen),
    ``_measure(out)`` (background: quality and timing), ``_measured(out)`` (put what was measured on screen) and
    ``_sync_enabled()``.
    """

    COMPACT_RECORD = False  # a panel with narrow record columns sets it (short labels, values may wrap)

    def __init__(self, models, quality: Callable | None, quality_label: str | None, x: str, repeats: int = 3):
        if not (isinstance(repeats, int) and repeats >= 1):
            raise ValueError(f"repeats={repeats!r} is not valid; give the number of timed runs per configuration (>= 1)")
        self.setup = SamplingSetup(models, quality, quality_label, x)
        self.repeats = repeats
        self.error = w.HTML()
        self.status = w.HTML(layout=w.Layout(min_height="1.6em"))  # a fixed line: a note never moves the page
        self.status.add_class("companion-status")
        self.history: list = []
        self._quiet = _Quiet()
        self._requested_at: float | None = None  # when the last control change arrived (epoch seconds)
        self._lock = threading.RLock()  # the worker (images) and the background thread (measurements) both draw
        self._runner = LatestOnlyRunner(self._compute, self._show, self._show_error)

    @property
    def x(self) -> str:
        return self.setup.x

    def _watch(self, controls: Iterable[w.Widget]) -> None:
        """Start a run whenever one of ``controls`` changes (not while the panel changes them itself)."""
        for c in controls:
            c.observe(self._on_change, names="value")
        self._sync_enabled()

    def _on_change(self, change) -> None:
        if self._quiet.on:
            return
        self._requested_at = time.time()
        self._sync_enabled()
        self.status.value = "<i>running…</i>"
        self._runner.request(self._request())

    def _compute(self, req):
        started = time.time()
        with GATE.foreground():  # background work pauses at its next network call until this is done
            out = self._foreground(req)
        out.timeline.update(requested=self._requested_at, started=started, sampled=time.time())
        return out

    def _show(self, req, out) -> None:
        """A run's images are ready: keep it (the last :data:`HISTORY_MAX`), draw it, queue its measurements."""
        with self._lock:
            self.history.append(out)
            del self.history[:-HISTORY_MAX]
            self._draw(out)
            self.error.value = ""
            self.status.value = MEASURING
        out.timeline["shown"] = time.time()
        BACKGROUND.submit(self, lambda panel: panel._follow_up(out))

    def _follow_up(self, out) -> None:
        """The background part of a run: measure, then show what was measured (and any failure) in the panel."""
        failure = None
        try:
            self._measure(out)
        except Exception as e:  # shown in the panel; the images stay
            failure = e
        out.timeline["measured"] = time.time()
        with self._lock:
            self._measured(out)
            if self._is_current(out):
                if failure is not None:
                    self.error.value = error_html(failure, "Measuring this run failed")
                self.status.value = ""

    def _is_current(self, out) -> bool:
        return bool(self.history) and self.history[-1] is out

    def _show_error(self, req, exc: BaseException) -> None:
        self.status.value = ""
        self.error.value = error_html(exc)

    def set_x(self, x: str) -> None:
        """Show NFE (``"nfe"``) or wall time (``"wall_s"``) on the curve's x axis."""
        with self._lock:
            self.setup.x = x
            if self.x_control.value != x:
                self.x_control.value = x
            self._redraw()

    def close(self) -> None:
        """End the panel's worker thread, drop its queued measurements and close its widgets (it stops responding)."""
        self._runner.close()
        BACKGROUND.cancel(self)
        widget = getattr(self, "widget", None)
        if widget is not None:
            _close_tree(widget)

    def run(self):
        """Run the current configuration now, on the calling thread, and wait for its measurements (used when the
        panel is built: a notebook executed headless holds the complete first result)."""
        req = self._request()
        try:
            out = self._compute(req)
        except Exception as e:
            self._show_error(req, e)
            return None
        self._show(req, out)
        release_cpu_threads()  # the measurements run on the background thread; this one waits
        BACKGROUND.wait_idle(self, timeout=3600)
        return out

    def wait(self, timeout: float = 120.0) -> bool:
        """Block until queued runs and their background measurements are done (for scripts and tests)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self._runner.wait_idle(max(0.0, deadline - time.monotonic())):
                return False
            if not BACKGROUND.wait_idle(self, max(0.0, deadline - time.monotonic())):
                return False
            if not self._runner.busy and not BACKGROUND.pending(self):
                return True

    def wait_idle(self, timeout: float = 120.0) -> bool:
        """The same as :meth:`wait`: nothing running or queued, in the foreground or the background."""
        return self.wait(timeout)

    @property
    def runs(self) -> int:
        return self._runner.runs

    def _record_html(self, run: PanelRun) -> str:
        missing = self.repeats - len(run.times)
        note = f"(timing {missing} more run{'s' if missing > 1 else ''}…)" if not run.measured and missing > 0 else ""
        if run.quality_error is not None:
            quality_note = "failed (see the message above)"
        elif not run.quality_done:
            quality_note = "measuring… (in the background)"
        else:
            quality_note = None
        return record_table(run.result.record, run.quality, self.setup.quality_short, times=run.times,
                            timing_note=note, quality_note=quality_note, compact=self.COMPACT_RECORD)

    def _time_repeats(self, runs: Sequence[PanelRun]) -> None:
        """Time ``runs`` again, interleaved (A, B, A, B, …), until each has :attr:`repeats` timings or has
        been timed ``repeats - 1`` more times in this call."""
        for _ in range(self.repeats - 1):
            due = [r for r in runs if len(r.times) < self.repeats or len(runs) > 1]
            if not due:
                return
            for r in due:
                wall = self.setup.time_again(r)
                if wall is not None:
                    r.times.append(wall)
            with self._lock:
                self._timing_progress()

    def _timing_progress(self) -> None:
        """Show timings as they arrive (a panel may override)."""

    def _caption(self, compare: bool = False) -> str:
        timed = ("A and B are timed interleaved (A, B, A, B, …)" if compare else "Each configuration is timed")
        return ("<div style='font-size:0.85em;line-height:1.35;color:#333'>"
                f"<b>y</b>: {html.escape(self.setup.quality_description)}.<br>"
                "<b>x</b>: network evaluations per sample (NFE), or the wall time of one <code>sample()</code> call for "
                "the whole batch (noise, solver loop, network, decoding) on this machine. "
                f"{timed} {self.repeats}× after an untimed warm-up run of each sampler and batch shape, never while "
                "another panel run is in flight: median, bar = range. Quality and the repeat timings are measured in "
                "the background after the images appear."
                + ("" if compare else " Ring: the run shown above.") + "</div>")


class SamplerPanel(_RunnerPanel):
    """Sampler dropdown, sliders and toggles over one model (or several, switched by a mode toggle).

    ``models``: a model, or a mapping label -> model (e.g. ``{"pixel": ..., "latent": ...}``; a toggle appears).
    ``controls``: which parts to show, from ``sampler, steps, guidance, eta, spacing, seed, batch, class``.
    ``defaults``: initial values, e.g. ``{"sampler": "ddim", "steps": 10}``.
    ``x``: ``"wall_s"`` or ``"nfe"``: the curve's x axis at first (a toggle switches it).
    ``quality``: callable (model, result) -> float | None (default: :class:`ImageDistance`).
    ``repeats``: timed runs per configuration (the median is shown, with the range).
    """

    IMAGE_WIDTH = 380  # the image grid is scaled by the largest integer factor that keeps it this narrow

    def __init__(self, models, controls: Iterable[str] = ("sampler", "steps", "seed"), defaults: Mapping[str, Any] | None = None,
                 *, x: str = "wall_s", quality: Callable | None = None, quality_label: str | None = None, repeats: int = 3,
                 run: bool = True):
        super().__init__(models, quality, quality_label, x, repeats)
        self.models = self.setup.models
        self.quality, self.quality_label = self.setup.quality, self.setup.quality_label
        defaults = dict(defaults or {})
        self.controls = make_controls(controls, defaults, self.models)
        self.fixed = defaults  # values without a control (e.g. batch=16 when no batch slider)
        self.image = _image_widget()
        self.image_scale: int | None = None
        self.record = w.HTML()
        self.curve = Curve(self.setup, width=560)
        self.figure = self.curve.figure
        self.x_control = x_axis_control(x)
        self.x_control.observe(lambda change: self.set_x(change["new"]), names="value")
        self.caption = w.HTML(self._caption(), layout=w.Layout(width="380px"))
        self.history: list[PanelRun] = []
        self._watch(self.controls.values())
        self.widget = w.VBox([
            w.HTML(PIXELATED_STYLE),
            w.HBox([w.VBox(list(self.controls.values()), layout=w.Layout(min_width="320px", margin="0 16px 0 0")),
                    w.VBox([self.image, self.status])]),
            self.error,
            w.HBox([w.VBox([self.record, self.x_control, self.caption], layout=w.Layout(width="390px", min_width="390px")),
                    self.figure], layout=w.Layout(align_items="flex-start")),
        ])
        if run:
            self.run()

    # -- parameters
    def params(self) -> dict:
        p = dict(self.fixed)
        for name, c in self.controls.items():
            p[name] = c.value
        return p

    def _sample_kwargs(self, p: dict) -> tuple[Any, dict]:
        return self.setup.sample_kwargs(p)

    def _sync_enabled(self) -> None:
        self.setup.sync_enabled(self.controls, self.params(), self._quiet)

    # -- running
    def _foreground(self, p: dict) -> PanelRun:
        return self.setup.run(p)

    def _draw(self, run: PanelRun) -> None:
        images = run.result.images
        self.image_scale = fit_scale(images, max_width=self.IMAGE_WIDTH)
        _show_png(self.image, grid_png(images, scale=self.image_scale))
        self.record.value = self._record_html(run)
        move_mark(self.figure, "current", None, None)  # back on the curve when this run's point is measured

    def _measure(self, run: PanelRun) -> None:
        try:
            self._time_repeats([run])
            self.setup.measure_quality(run)
        finally:
            run.measured = True

    def _timing_progress(self) -> None:
        if self.history:
            self.record.value = self._record_html(self.history[-1])

    def _measured(self, run: PanelRun) -> None:
        if self._is_current(run):
            self.record.value = self._record_html(run)
        self._redraw()

    def _redraw(self) -> None:
        current = self.history[-1] if self.history else None
        self.curve.draw(self.history, {"current": current if current is not None and current.measured else None})

    def _request(self) -> dict:
        return self.params()

    # -- display
    def static_html(self) -> str:
        parts = ["<div>"]
        if self.history:
            parts.append(png_html(self.image.value))
        parts.append(self.error.value + self.record.value)
        parts.append(figure_html(self.figure))
        parts.append("</div>")
        return "".join(parts)


# ------------------------------------------------------------------------------------------ compare

# Both configurations start from the same noise and draw the same classes, so these cannot differ between them.
SHARED_ONLY = ("seed", "batch", "class")


def image_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| per pixel of two image batches as displayed (clamped to [-1, 1]); values in [0, 2]."""
    if a.shape != b.shape:
        raise ValueError(f"A's images have shape {tuple(a.shape)} and B's {tuple(b.shape)}: "
                         "a difference image needs images of the same shape")
    return (a.float().clamp(-1, 1) - b.float().clamp(-1, 1)).abs()


@dataclass(eq=False)
class Comparison:
    """One run of a :class:`ComparePanel`: both configurations and their difference.

    ``difference``: |A − B| per pixel of the displayed images (clamped to [−1, 1]), shape (N, C, H, W).
    ``reused``: the sides whose parameters had not changed, so their previous run was shown again (and timed
    again, interleaved with the other side).
    """

    a: PanelRun
    b: PanelRun
    difference: torch.Tensor
    reused: frozenset = frozenset()
    timeline: dict = field(default_factory=dict)  # epoch seconds: requested, started, sampled, shown, measured

    @property
    def measured(self) -> bool:
        return self.a.measured and self.b.measured


class ComparePanel(_RunnerPanel):
    """Two sampling configurations, A and B, side by side from the same seed (the same initial noise).

    Shows each configuration's image grid and run record, their difference image (|A − B| per pixel, with its
    scale stated), all three at the same size, and both points on the speed/quality curve, labelled A and B::

        ComparePanel(model, a=dict(sampler="ddim", steps=10), b=dict(sampler="dpmpp_2m", steps=10))

    ``controls``: shared controls, one widget driving both (``seed``, ``batch``, ``class``, or any other).
    ``side_controls``: controls shown once per configuration (``sampler``, ``steps``, ``guidance``, ``eta``,
    ``spacing``, ``speed``); a mode toggle per side appears when ``models`` is a mapping of several models.
    ``a``, ``b``: each configuration's values (initial values of its controls, or fixed values without one).
    ``defaults``: shared values (e.g. ``{"batch": 8}``). ``diff_scale``: the |A − B| shown white (``None``: the
    largest in each run). ``x``, ``quality``, ``quality_label``: as for :class:`SamplerPanel`. ``repeats``: after
    each change A and B are timed this many more times, interleaved, and shown as median and range.
    Only the side whose parameters changed is sampled again for its images.
    """

    IMAGE_WIDTH = 300  # three columns (A, B, |A − B|) fit a notebook beside the file browser at 1400 px
    COMPACT_RECORD = True

    def __init__(self, models, a: Mapping[str, Any] | None = None, b: Mapping[str, Any] | None = None,
                 controls: Iterable[str] = ("seed",), side_controls: Iterable[str] = ("sampler", "steps"),
                 defaults: Mapping[str, Any] | None = None, *, x: str = "wall_s", quality: Callable | None = None,
                 quality_label: str | None = None, diff_scale: float | None = None, repeats: int = 3, run: bool = True):
        controls, side_controls = tuple(controls), tuple(side_controls)
        per_side = [n for n in side_controls if n in SHARED_ONLY]
        if per_side:
            raise ValueError(f"control(s) {per_side} cannot differ between A and B (both start from the same "
                             f"{', '.join(SHARED_ONLY)}); list them in controls=, not side_controls=")
        twice = sorted(set(controls) & set(side_controls))
        if twice:
            raise ValueError(f"control(s) {twice} are in both controls= (shared) and side_controls= (one per side); choose one")
        shared = set(controls) | set(SHARED_ONLY)
        sides = {"A": dict(a or {}), "B": dict(b or {})}
        for label, values in sides.items():
            clash = sorted(set(values) & shared)
            if clash:
                raise ValueError(f"{label.lower()}= sets {clash}, which A and B share; give shared values in defaults=")
        if diff_scale is not None and not diff_scale > 0:
            raise ValueError(f"diff_scale={diff_scale!r} is not valid; give a positive number or None (the largest difference)")
        super().__init__(models, quality, quality_label, x, repeats)
        self.diff_scale = diff_scale
        defaults = dict(defaults or {})
        self.controls = make_controls(controls, defaults, self.setup.models, mode=False)
        self.side_controls = {s: make_controls(side_controls, sides[s], self.setup.models) for s in "AB"}
        for c in (*self.side_controls["A"].values(), *self.side_controls["B"].values()):
            c.layout.width = "300px"
            c.style.description_width = "56px"
        self.fixed, self.side_fixed = defaults, sides  # values without a control
        self.images = {s: _image_widget() for s in "AB"}
        self.image_scale: int | None = None
        self.records = {s: w.HTML() for s in "AB"}
        self.diff_image = _image_widget()
        self.diff_caption = w.HTML()
        self.curve = Curve(self.setup, marks=("A", "B"), width=560)
        self.figure = self.curve.figure
        self.x_control = x_axis_control(x)
        self.x_control.observe(lambda change: self.set_x(change["new"]), names="value")
        self.caption = w.HTML(self._caption(compare=True), layout=w.Layout(width="370px"))
        self.history: list[Comparison] = []
        self._last: dict[str, tuple[tuple, PanelRun]] = {}
        self._watch([*self.controls.values(), *self.side_controls["A"].values(), *self.side_controls["B"].values()])
        column = dict(width="310px", min_width="310px", margin="0 12px 0 0")
        side = lambda s: w.VBox([w.HTML(f"<b>{s}</b>"), *self.side_controls[s].values(), self.images[s], self.records[s]],
                                layout=w.Layout(**column))
        self.widget = w.VBox([
            w.HTML(PIXELATED_STYLE),
            w.HBox(list(self.controls.values())),
            w.HBox([side("A"), side("B"), w.VBox([w.HTML("<b>|A − B|</b>"), self.diff_image, self.diff_caption],
                                                 layout=w.Layout(**column))],
                   layout=w.Layout(flex_flow="row nowrap", align_items="flex-start")),
            self.status, self.error,
            w.HBox([self.figure, w.VBox([self.x_control, self.caption])], layout=w.Layout(align_items="flex-start")),
        ])
        if run:
            self.run()

    # -- parameters
    def params(self, side: str) -> dict:
        """The parameters of configuration ``side`` ("A" or "B"): fixed values, then shared and own controls."""
        if side not in ("A", "B"):
            raise ValueError(f"side={side!r} is not valid; choose 'A' or 'B'")
        p = {**self.fixed, **self.side_fixed[side]}
        p.update({n: c.value for n, c in self.controls.items()})
        p.update({n: c.value for n, c in self.side_controls[side].items()})
        return p

    def _sync_enabled(self) -> None:
        for s in "AB":
            self.setup.sync_enabled({**self.controls, **self.side_controls[s]}, self.params(s), self._quiet)

    # -- running
    def _foreground(self, req: tuple[dict, dict]) -> Comparison:
        runs, reused = {}, set()
        for side, p in zip("AB", req):
            last = self._last.get(side)
            if last is not None and last[0] == _params_key(p):
                runs[side] = last[1]
                reused.add(side)
            else:
                runs[side] = self.setup.run(p)
        diff = image_difference(runs["A"].result.images, runs["B"].result.images)
        return Comparison(runs["A"], runs["B"], diff, frozenset(reused))

    def _draw(self, cmp: Comparison) -> None:
        self.image_scale = fit_scale(cmp.a.result.images, max_width=self.IMAGE_WIDTH)
        for side, run in (("A", cmp.a), ("B", cmp.b)):
            self._last[side] = (_params_key(run.params), run)
            _show_png(self.images[side], grid_png(run.result.images, scale=self.image_scale))
        png, caption = difference_png(cmp.difference, self.diff_scale, pixel_scale=self.image_scale)
        _show_png(self.diff_image, png)
        self.diff_caption.value = f"<div style='font-size:0.85em;line-height:1.35'>{html.escape(caption)}</div>"
        for side, run in (("A", cmp.a), ("B", cmp.b)):
            run.measured = False  # a reused side is timed again, interleaved with the other
            self.records[side].value = self._record_html(run)
        with self.figure.batch_update():
            for side in "AB":
                if side not in cmp.reused:
                    move_mark(self.figure, side, None, None)

    def _measure(self, cmp: Comparison) -> None:
        try:
            self._time_repeats([cmp.a, cmp.b])
            failures = []
            for run in (cmp.a, cmp.b):  # one side's failure does not keep the other side from its value
                try:
                    self.setup.measure_quality(run)
                except Exception as e:  # noqa: BLE001 - shown in the panel below
                    failures.append(e)
            if failures:
                raise failures[0]
        finally:
            cmp.a.measured = cmp.b.measured = True

    def _timing_progress(self) -> None:
        if self.history:
            cmp = self.history[-1]
            for side, run in (("A", cmp.a), ("B", cmp.b)):
                self.records[side].value = self._record_html(run)

    def _measured(self, cmp: Comparison) -> None:
        if self._is_current(cmp):
            for side, run in (("A", cmp.a), ("B", cmp.b)):
                self.records[side].value = self._record_html(run)
        self._redraw()

    def _redraw(self) -> None:
        runs = list({id(r): r for c in self.history for r in (c.a, c.b)}.values())
        cmp = self.history[-1] if self.history else None
        marks = {"A": cmp.a if cmp is not None and cmp.a.measured else None,
                 "B": cmp.b if cmp is not None and cmp.b.measured else None}
        self.curve.draw(runs, marks)

    def _request(self) -> tuple[dict, dict]:
        return self.params("A"), self.params("B")

    # -- display
    def static_html(self) -> str:
        parts = ["<div>"]
        if self.history:
            parts.append("<div style='white-space:nowrap'>")
            for s in "AB":
                parts.append(png_html(self.images[s].value, s))
            parts.append(png_html(self.diff_image.value, "|A − B|") + "</div>")
            parts.append(f"<div style='font-size:0.9em'>{self.diff_caption.value}</div>")
            parts.append("<div>" + "".join(f"<div style='display:inline-block;vertical-align:top;margin-right:2em'>"
                                          f"<b>{s}</b>{self.records[s].value}</div>" for s in "AB") + "</div>")
        parts.append(self.error.value)
        parts.append(figure_html(self.figure))
        parts.append("</div>")
        return "".join(parts)


# ------------------------------------------------------------------------------------------ sweep

# The table columns each bench metric produces (the y axes a sweep view can plot).
METRIC_COLUMNS = {"fd": ("fd",), "kid": ("kid",), "prdc": ("precision", "recall", "density", "coverage"),
                  "class_accuracy": ("class_accuracy",), "ode_distance": ("ode_distance",)}
SWEEP_X = ("wall_s", "nfe", "network_s", "flops_per_sample")
SWEEP_X_TITLES = {"wall_s": "wall time per run (s, log scale)", "nfe": "NFE per sample",
                  "network_s": "network time per run (s, log scale)", "flops_per_sample": "FLOPs per sample (log scale)"}


class SweepView(_Panel):
    """A :mod:`companion.bench` sweep run on a background thread; the speed/quality curve grows as runs finish.

    Takes :func:`companion.bench.iter_sweep`'s arguments (runs come from, and go to, its on-disk cache).
    ``y``: the quality column to plot (default: the first one ``metrics`` produce), with its bootstrap interval
    as an error bar; ``x``: ``wall_s``, ``nfe``, ``network_s`` or ``flops_per_sample``. A progress bar counts
    finished runs; Stop ends the sweep after the current run and keeps what finished; Resume runs the rest
    (finished runs come back from the cache at once). Runs without a ``y`` value (e.g. the ODE distance of a
    stochastic sampler) appear in the table but not on the curve. ``start=False`` builds the view idle.
    :meth:`show` displays the view and then waits for the sweep, so points appear as runs finish even while a
    notebook runs all its cells, and the output a headless run saves holds the finished sweep.
    """

    def __init__(self, model, samplers: Sequence[str], steps: Sequence[int], guidance=(None,), modes=({},), seeds=(0,), *,
                 y: str | None = None, x: str = "wall_s", n_samples: int | None = None, metrics: Sequence[str] | None = None,
                 feature: str | None = None, cache_dir=None, n_ode: int | None = None, start: bool = True):
        if isinstance(model, str):
            model = load(model)
        if isinstance(samplers, str) or isinstance(steps, int):
            raise TypeError("samplers and steps must be sequences, e.g. samplers=['ddim'], steps=[10, 20]")
        for s in samplers:
            get_sampler(s)  # an unknown name fails here, listing the valid ones
        metrics = tuple(bench.DEFAULT_METRICS if metrics is None else metrics)
        produced = [c for m in metrics for c in METRIC_COLUMNS.get(m, ())]
        if not produced:
            raise ValueError(f"metrics={list(metrics)} give no quality column to plot; choose from {', '.join(METRIC_COLUMNS)}")
        y = produced[0] if y is None else y
        if y not in produced:
            raise ValueError(f"y={y!r} is not measured by metrics={list(metrics)}; choose one of {produced}")
        if x not in SWEEP_X:
            raise ValueError(f"x={x!r} is not valid; choose one of {list(SWEEP_X)}")
        guidance = (guidance,) if guidance is None or isinstance(guidance, (int, float)) else tuple(guidance)
        modes = (modes,) if isinstance(modes, Mapping) else tuple(modes)
        seeds = (seeds,) if isinstance(seeds, int) else tuple(seeds)
        self.model, self.x, self.y = model, x, y
        self._grid = dict(samplers=list(samplers), steps=list(steps), guidance=guidance, modes=modes, seeds=seeds)
        self._options = dict(n_samples=bench.DEFAULT_N_SAMPLES if n_samples is None else n_samples, metrics=metrics,
                             feature=feature, cache_dir=cache_dir, n_ode=bench.DEFAULT_N_ODE if n_ode is None else n_ode)
        self._varying = [k for k, v in (("mode", modes), ("guidance", guidance), ("seed", seeds)) if len(v) > 1]
        self.total = len(samplers) * len(steps) * len(guidance) * len(modes) * len(seeds)
        self.rows: list[dict] = []
        self._keys: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = "idle"
        self._state_lock = threading.Lock()  # Stop (kernel thread) and the sweep's end (worker) must not cross

        self.figure = speed_quality_widget(SWEEP_X_TITLES.get(x, x), AXIS_LABELS.get(y, y), marks=(), height=380)
        if x in ("wall_s", "network_s", "flops_per_sample"):
            self.figure.layout.xaxis.type = "log"  # costs span orders of magnitude across step counts
            self.figure.layout.xaxis.rangemode = "normal"
        self.progress = w.IntProgress(value=0, min=0, max=self.total, description="runs", bar_style="info")
        self.count = w.HTML()
        self.stop_button = w.Button(description="Stop", icon="stop", tooltip="stop after the current run", disabled=True)
        self.resume_button = w.Button(description="Resume", icon="play", tooltip="run what is not finished yet", disabled=True)
        self.stop_button.on_click(lambda _: self.stop())
        self.resume_button.on_click(lambda _: self.start())
        self.status = w.HTML()
        self.error = w.HTML()
        self.table = w.HTML()
        self.widget = w.VBox([w.HBox([self.progress, self.count, self.stop_button, self.resume_button]), self.status,
                              self.error, self.figure, self.table])
        self._show_status()
        if start:
            self.start()

    # -- control
    def start(self) -> None:
        """Start (or resume) the sweep on a background thread; does nothing while it runs or once every run finished."""
        if self.running or self.done >= self.total:
            return
        self._stop.clear()
        self.error.value = ""
        self._state = "running"
        self.stop_button.disabled, self.resume_button.disabled = False, True
        self._show_status()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="companion-sweep")
        self._thread.start()

    def stop(self) -> None:
        """Stop after the run in progress; what finished stays on the curve and in the table."""
        with self._state_lock:
            if not self.running or self._state != "running":
                return
            self._stop.set()
            self._state = "stopping"
        self.stop_button.disabled = True
        self._show_status()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def done(self) -> int:
        return len(self.rows)

    def wait(self, timeout: float = 600.0) -> bool:
        """Block until the sweep thread ends (finished, stopped or failed); False on timeout."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def show(self, wait: bool = True, timeout: float = 600.0) -> None:
        """Display the view now, so a live front end draws each run as it finishes (also while a notebook runs all
        its cells); then, with ``wait``, block until the sweep ends (at most ``timeout`` seconds) and refresh that
        output, so a notebook executed headless saves the finished sweep. Use it as a cell's last line instead of
        ``view`` (it returns nothing, so the cell shows the view once)."""
        from IPython.display import display

        handle = display(self, display_id=True)
        if wait:
            self.wait(timeout)
            if handle is not None:
                handle.update(self)

    def close(self, timeout: float = 600.0) -> None:
        """Stop after the run in progress, wait for the sweep's thread to end, and close the widgets."""
        self.stop()
        self.wait(timeout)
        _close_tree(self.widget)

    def frame(self):
        """The finished runs as a :func:`companion.bench.sweep` table (one row a run)."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    # -- the worker
    def _loop(self) -> None:
        rows = bench.iter_sweep(self.model, **self._grid, **self._options, progress=False)
        try:
            for row in rows:
                if row["cache_key"] not in self._keys:  # on resume, runs shown before come back from the cache
                    self._add(row)
                if self._stop.is_set():
                    break
        except Exception as e:  # shown in the view; what finished stays
            self.error.value = error_html(e, "The sweep stopped at an error")
            with self._state_lock:
                self._state = "failed"
        else:
            with self._state_lock:
                self._state = "stopped" if self._stop.is_set() and self.done < self.total else "finished"
        finally:
            rows.close()
            self.stop_button.disabled = True
            self.resume_button.disabled = self.done >= self.total
            self._show_status()

    def _add(self, row: dict) -> None:
        self.rows.append(row)
        self._keys.add(row["cache_key"])
        y = row.get(self.y)
        if y is not None and np.isfinite(y):
            series = self.series(row)
            low, high = row.get(f"{self.y}_low"), row.get(f"{self.y}_high")
            error = (low, high) if low is not None and high is not None and np.isfinite([low, high]).all() else None
            interval = f" [{low:.3g}, {high:.3g}]" if error is not None else ""
            text = (f"{series}<br>steps {row['steps']}, NFE {row['nfe']}<br>wall time {row['wall_s'] * 1000:.0f} ms"
                    f"{' (from the cache)' if row.get('cached') else ''}<br>{AXIS_LABELS.get(self.y, self.y)}: {y:.3g}{interval}")
            add_point(self.figure, series, float(row[self.x]), float(y), text, mark=None, error=error)
        self.progress.value = self.done
        self.table.value = self._table_html()
        self._show_status()

    def series(self, row: Mapping) -> str:
        """A run's curve: the sampler's name, with guidance, options and seed where those vary in this sweep."""
        words = {"mode": lambda v: mode_label(v), "guidance": lambda v: f"w={v}", "seed": lambda v: f"seed {v}"}
        extra = [words[k](row[k]) for k in self._varying]
        return REGISTRY[row["sampler"]].name + (f" ({', '.join(extra)})" if extra else "")

    # -- display
    def _table_html(self) -> str:
        if not self.rows:
            return ""
        return table_html(sweep_table(self.frame()))

    def _show_status(self) -> None:
        n, total = self.done, self.total
        cached = sum(bool(r.get("cached")) for r in self.rows)
        from_cache = f" ({cached} from the cache)" if cached else ""
        self.count.value = f"{n} / {total}"
        self.status.value = {
            "idle": f"<i>not started: {total} runs</i>",
            "running": f"<i>running: {n} of {total} runs finished{from_cache}…</i>",
            "stopping": f"<i>stopping after the current run: {n} of {total} runs finished…</i>",
            "stopped": f"stopped: {n} of {total} runs finished{from_cache}; Resume runs the rest",
            "failed": f"{n} of {total} runs finished{from_cache} before the error",
            "finished": f"done: {n} of {total} runs{from_cache}",
        }[self._state]
        self.progress.bar_style = {"failed": "danger", "finished": "success"}.get(self._state, "info")

    def static_html(self) -> str:
        return ("<div>" + f"<div>{self.status.value}</div>" + self.error.value + figure_html(self.figure)
                + self._table_html() + "</div>")


# ------------------------------------------------------------------------------------------ training


class TrainingView(_Panel):
    """Tiny digits denoisers (:mod:`companion.quicktrain`) drawn while they train: class accuracy of each run's
    EMA samples against training seconds (one line per config, the training cost on x like every speed/quality
    plot here) and the current run's latest samples. :meth:`show` displays the view, trains the configs one after
    the other on the kernel thread and returns the finished :class:`~companion.quicktrain.TrainingRun` s.

    ``every``: steps between two looks (each costs a :func:`~companion.quicktrain.preview`: ``preview_n``
    samples of ``preview_steps`` DDIM steps).
    """

    def __init__(self, configs: Sequence | object = (), *, every: int = 250, preview_n: int = 100, preview_steps: int = 10,
                 controls: bool = False):
        configs = [configs] if isinstance(configs, quicktrain.TrainConfig) else list(configs)
        if not all(isinstance(c, quicktrain.TrainConfig) for c in configs) or not (configs or controls):
            raise TypeError("configs must be a TrainConfig or a list of them (companion.quicktrain.TrainConfig); "
                            "an empty list only with controls=True")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int (steps between two looks), got {every!r}")
        self.configs, self.every, self.preview_n, self.preview_steps = configs, every, preview_n, preview_steps
        self.runs: list = []
        self.points: list[dict] = []
        self._series = ""  # the curve the run in progress adds to
        self.figure = speed_quality_widget("training time (s)", "class accuracy of EMA samples", marks=(), height=340)
        self.figure.layout.yaxis.range = [0, 1.02]
        self.image = _image_widget()
        self.caption = w.HTML()
        self.status = w.HTML(value=f"<i>not started: {len(configs)} run(s)</i>" if configs else
                             "<i>choose a configuration and press Train</i>")
        parts = [self.status, w.HBox([self.figure, w.VBox([self.image, self.caption])], layout=w.Layout(align_items="flex-start"))]
        self.controls: dict[str, w.Widget] = {}
        if controls:
            base = configs[-1] if configs else quicktrain.TrainConfig()
            style = {"description_width": "initial"}
            self.controls = {
                "prediction": w.Dropdown(options=[("eps", "epsilon"), ("x0", "sample"), ("v", "v_prediction")],
                                         value=base.prediction, description="network predicts", style=style),
                "weighting": w.Dropdown(options=[("uniform", "uniform"), ("min-SNR-5", "min_snr")], value=base.weighting,
                                        description="loss weighting", style=style),
                "steps": w.IntSlider(value=base.steps, min=250, max=8000, step=250, description="steps", continuous_update=False),
                "ema": w.Dropdown(options=[0.99, 0.995, 0.999], value=base.ema if base.ema in (0.99, 0.995, 0.999) else 0.995,
                                  description="EMA decay", style=style),
            }
            self.train_button = w.Button(description="Train", icon="play", button_style="primary")
            self.train_button.on_click(lambda _: self.train_one(self.chosen()))
            parts.insert(0, w.HBox([*self.controls.values(), self.train_button], layout=w.Layout(flex_flow="row wrap")))
        self.widget = w.VBox(parts)

    def chosen(self):
        """The :class:`~companion.quicktrain.TrainConfig` the controls describe."""
        return quicktrain.TrainConfig(**{k: c.value for k, c in self.controls.items()})

    def train_one(self, config) -> object:
        """Train one more run (a Train press; on the kernel thread, the button disabled meanwhile) and draw it."""
        if getattr(self, "train_button", None) is not None:
            self.train_button.disabled = True
        try:
            self.status.value = f"<i>training: {html.escape(config.label())}, {config.steps} steps…</i>"
            self._series = f"{len(self.runs) + 1}. {config.label()}, {config.steps} steps, EMA {config.ema:g}"
            run = quicktrain.train(config, callback=self._look, every=self.every)
            self.runs.append(run)
            self.status.value = f"done: {html.escape(config.label())} {run.seconds:.1f} s"
            return run
        except Exception as e:  # shown in the view, not lost in a callback's log
            self.status.value = error_html(e, "Training stopped at an error")
            raise
        finally:
            if getattr(self, "train_button", None) is not None:
                self.train_button.disabled = False

    def _look(self, run) -> None:
        images, acc = quicktrain.preview(run, self.preview_n, steps=self.preview_steps)
        label = self._series or run.config.label()
        self.points.append({"run": label, "step": run.steps_done, "seconds": run.seconds, "class_accuracy": acc.value})
        add_point(self.figure, label, run.seconds, acc.value,
                  f"{label}<br>step {run.steps_done}, {run.seconds:.1f} s<br>class accuracy {acc.value:.2f}", mark=None)
        self.figure.layout.yaxis.range = [0, 1.02]
        _show_png(self.image, grid_png(images[:20].clamp(-1, 1), nrow=10, scale=4))
        self.caption.value = (f"{html.escape(label)}: step {run.steps_done} of {run.config.steps}, "
                              f"{run.seconds:.1f} s; loss {np.mean(run.losses[-50:]):.4f}")

    def run(self) -> list:
        """Train every config in turn, drawing as it goes; returns the finished runs (also kept in ``runs``)."""
        for i, cfg in enumerate(self.configs):
            self.status.value = f"<i>training {i + 1} of {len(self.configs)}: {html.escape(cfg.label())}…</i>"
            self._series = cfg.label()
            self.runs.append(quicktrain.train(cfg, callback=self._look, every=self.every))
        self.status.value = "done: " + ", ".join(f"{html.escape(r.config.label())} {r.seconds:.1f} s" for r in self.runs)
        return self.runs

    def show(self) -> list:
        """Display the view, then train (the figure grows while the cell runs); returns the finished runs."""
        from IPython.display import display

        handle = display(self, display_id=True)
        runs = self.run()
        if handle is not None:
            handle.update(self)  # the saved output (a headless run, the book) holds the finished view
        return runs

    def static_html(self) -> str:
        png = png_html(self.image.value) if self.image.value else ""
        return (f"<div><div>{self.status.value}</div><div style='display:flex;gap:12px;align-items:flex-start'>"
                f"<div style='flex:1'>{figure_html(self.figure)}</div><div>{png}<div>{self.caption.value}</div></div></div></div>")


# ------------------------------------------------------------------------------------------ forward process


class ForwardPanel(_Panel):
    """A t slider over the forward process q(x_t | x_0): the noised images and where t sits on the SNR curve."""

    def __init__(self, images: torch.Tensor, schedules: Iterable[str] = ("linear", "cosine"), t: int = 250, seed: int = 0):
        self.images, self.seed = images, seed
        self.schedules = list(schedules)
        self.t = w.IntSlider(value=t, min=0, max=999, description="t", continuous_update=False)
        self.schedule = w.Dropdown(options=self.schedules, value=self.schedules[0], description="schedule")
        self.image = _image_widget()
        self.info = w.HTML()
        self.figure = go.FigureWidget(layout=go.Layout(height=300, template="plotly_white", margin=dict(l=60, r=10, t=30, b=40),
                                                       xaxis_title="t", yaxis_title="log10 SNR(t)"))
        ts = np.arange(1000)
        for name in self.schedules:
            self.figure.add_scatter(x=ts, y=np.log10(sch.snr(name).numpy()), mode="lines", name=name)
        self.figure.add_scatter(x=[t], y=[0.0], mode="markers", marker=dict(size=14, color="black"), name="t")
        for c in (self.t, self.schedule):
            c.observe(lambda _: self.update(), names="value")
        self.widget = w.VBox([w.HTML(PIXELATED_STYLE), w.HBox([self.t, self.schedule]),
                              w.HBox([self.image, self.info], layout=w.Layout(align_items="flex-start")), self.figure])
        self.update()

    def update(self) -> None:
        t, name = self.t.value, self.schedule.value
        xt = sch.noise(self.images, t, seed=self.seed, schedule=name)
        abar = float(sch.alphas_cumprod(name)[t])
        _show_png(self.image, grid_png(xt.clamp(-1, 1), nrow=len(self.images)))
        self.info.value = (f"<table><tr><td>abar_t</td><td><b>{abar:.4g}</b></td></tr>"
                           f"<tr><td>SNR(t)</td><td><b>{abar / (1 - abar):.4g}</b></td></tr>"
                           f"<tr><td>signal share sqrt(abar_t)</td><td><b>{abar ** 0.5:.3f}</b></td></tr></table>")
        with self.figure.batch_update():
            self.figure.data[-1].x = (t,)
            self.figure.data[-1].y = (float(np.log10(abar / (1 - abar))),)

    def static_html(self) -> str:
        return f"<div>{png_html(self.image.value)}{self.info.value}{figure_html(self.figure)}</div>"


# ------------------------------------------------------------------------------------------ partial sampling


class PartialPanel(_Panel):
    """A ``t0`` slider and a start-image picker over :func:`companion.partial.sample_from`: the start images,
    their noised version at ``t0``, and what the reverse chain makes of them from there.

    ``sources``: label -> clean start images (B, C, H, W) in [-1, 1]; the first ``n`` of each are shown.
    ``class_labels``: their classes (a class-conditional model). The chain runs ``sampler`` with the step density
    of a ``full_steps``-step full chain, so starting lower costs proportionally fewer steps (at least one).
    Runs happen on the kernel thread when a control moves (``n`` images: a fraction of a second).
    """

    def __init__(self, model, sources: Mapping[str, torch.Tensor], class_labels=None, *, t0: int = 300,
                 source: str | None = None, n: int = 10, sampler: str = "ddpm", full_steps: int = 20, seed: int = 0,
                 scale: int = 3):
        if not sources:
            raise ValueError("sources is empty; give at least one label -> start images")
        if source is not None and source not in sources:
            raise ValueError(f"source={source!r} is not one of the start images; choose from {list(sources)}")
        self.model, self.sources, self.class_labels = model, dict(sources), class_labels
        self.n, self.sampler, self.full_steps, self.seed, self.scale = n, sampler, full_steps, seed, scale
        self.t0 = w.IntSlider(value=t0, min=50, max=950, step=50, description="t0", continuous_update=False)
        self.source = w.Dropdown(options=list(self.sources), value=source or next(iter(self.sources)), description="start")
        self.view = w.HTML()
        self.result = None
        for c in (self.t0, self.source):
            c.observe(lambda _: self.update(), names="value")
        self.widget = w.VBox([w.HBox([self.t0, self.source]), self.view])
        self.update()

    def steps(self, t0: float) -> int:
        """Steps for a chain from ``t0``: the full chain's step density over [0, t0], at least one."""
        return max(1, round(self.full_steps * (t0 + 1) / 1000))

    def update(self) -> None:
        t0 = self.t0.value
        start = self.sources[self.source.value][: self.n]
        labels = None if self.class_labels is None else self.class_labels[: self.n]
        res = sample_from(self.model, start, t0, self.sampler, self.steps(t0), class_labels=labels, seed=self.seed)
        self.result = res
        self.view.value = ImageRow({"start": start, f"noised to t={res.t_start:.0f}": res.x_start_noised.clamp(-1, 1),
                                    f"result ({res.record.nfe} NFE, {res.record.wall_s * 1000:.0f} ms)": res.images.clamp(-1, 1)},
                                   nrow=self.n, scale=self.scale)._repr_html_()

    def static_html(self) -> str:
        return self.view.value
