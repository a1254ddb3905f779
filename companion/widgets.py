"""Interactive panels: move a control, see the images change and the speed/quality curve grow.

Panels are composed from small parts so a chapter builds the one it needs in a line or two::

    panel = SamplerPanel(load("digits-cond"), controls=("sampler", "steps", "guidance", "seed"))
    panel                      # shows the controls, the image grid, the run record and the curve

    ComparePanel(model, a=dict(sampler="ddim", steps=10), b=dict(sampler="dpmpp_2m", steps=10))
    SweepView(model, ["ddim", "dpmpp_2m"], [5, 10, 20])   # a bench sweep whose curve grows as runs finish
    ForwardPanel(images)                                   # the forward process q(x_t | x_0) under a t slider
    PartialPanel(model, {"real": x, "prior": p}, labels)   # the reverse chain started part-way, from t0

This module holds only panels and their parts: the control factories (:data:`CONTROL_FACTORIES`,
:func:`make_controls`), :class:`SamplingSetup` (parameters -> ``sample`` call -> measured run),
:class:`LatestOnlyRunner`, and the curve's marks (:func:`add_point` / :func:`move_mark` on a
:func:`speed_quality_widget`). What a panel draws comes from elsewhere: image grids, PNGs and HTML fragments
from :mod:`companion.plots`, the run record table from :mod:`companion.report`.

Design choices, and why:

* Runs happen on one background worker thread (:class:`LatestOnlyRunner`) so the kernel stays responsive.
  At most one run is in flight; a request made while one runs *replaces* any queued request, so a burst of
  slider moves costs at most two runs and always ends on the last value.
* Images go to an ``ipywidgets.Image`` and the record to an ``HTML`` widget (not an ``Output`` widget:
  output capture from a worker thread is unreliable), the curve to a plotly ``FigureWidget``.
* The first run happens synchronously when the panel is built, so a notebook executed headless (nbval,
  nbconvert, the HTML report) already holds a result; each panel also carries a static HTML
  representation (image grid + figure) for readers without a live widget front end.
* Errors from a run are shown inside the panel in plain words; the panel keeps working.
* A sweep (:class:`SweepView`) runs on its own thread through :func:`companion.bench.iter_sweep`; Stop takes
  effect between runs, so every finished run is kept (and cached).
"""
from __future__ import annotations

import abc
import html
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import ipywidgets as w
import numpy as np
import plotly.graph_objects as go
import torch

from . import bench
from . import schedules as sch
from .device import pick_device, release_cpu_threads
from .models import load
from .partial import sample_from
from .plots import AXIS_LABELS, difference_png, error_html, figure_html, grid_png, png_html
from .reference import ReferenceDistance
from .report import ImageRow, record_table
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


CONTROL_FACTORIES: dict[str, Callable[..., w.Widget]] = {
    "sampler": sampler_control, "steps": steps_control, "guidance": guidance_control, "eta": eta_control,
    "spacing": spacing_control, "seed": seed_control, "batch": batch_control, "speed": speed_control,
}


# ------------------------------------------------------------------------------------------ figure

MARK_COLORS = {"current": "black", "A": "#b2182b", "B": "#2166ac"}
MARK_TEXT_POSITIONS = {"A": "top left", "B": "top right"}  # A and B often sit close together: labels on either side


def speed_quality_widget(x_title: str, y_title: str, marks: Iterable[str] = ("current",)) -> go.FigureWidget:
    """An empty speed/quality figure whose first traces are highlight marks, one per name in ``marks``.

    The mark ``"current"`` is an unlabelled ring; any other mark (e.g. ``"A"``, ``"B"``) also shows its name.
    """
    fig = go.FigureWidget(layout=go.Layout(
        height=320, margin=dict(l=60, r=10, t=30, b=50), xaxis_title=x_title, yaxis_title=y_title,
        legend=dict(orientation="h", y=-0.25), template="plotly_white"))
    for name in marks:
        ring = dict(size=18, symbol="circle-open", line=dict(width=3), color=MARK_COLORS.get(name, "black"))
        if name == "current":
            fig.add_scatter(x=[], y=[], mode="markers", name=name, marker=ring, hoverinfo="skip")
        else:
            fig.add_scatter(x=[], y=[], text=[], mode="markers+text", name=name, marker=ring, hoverinfo="skip",
                            textposition=MARK_TEXT_POSITIONS.get(name, "top center"), textfont=dict(size=16, color=ring["color"]))
    return fig


def move_mark(fig: go.FigureWidget, mark: str, x: float | None, y: float | None) -> None:
    """Move the highlight trace named ``mark`` to (x, y); ``None`` hides it (a run without a quality value)."""
    trace = next((t for t in fig.data if t.name == mark), None)
    if trace is None:
        raise ValueError(f"the figure has no mark {mark!r}; marks: {[t.name for t in fig.data if not t.hovertemplate]}")
    shown = x is not None and y is not None
    trace.x, trace.y = ((x,), (y,)) if shown else ((), ())
    if "text" in (trace.mode or ""):
        trace.text = (mark,) if shown else ()


def add_point(fig: go.FigureWidget, series: str, x: float, y: float, text: str, *, mark: str | None = "current",
              error: tuple[float, float] | None = None) -> None:
    """Append a point to the trace named ``series`` (created on first use) and move the highlight ``mark`` there.

    ``error``: the point's interval (low, high), drawn as an error bar.
    """
    with fig.batch_update():
        trace = next((t for t in fig.data if t.name == series), None)
        plus, minus = (error[1] - y, y - error[0]) if error is not None else (None, None)
        if trace is None:
            err = None if error is None else dict(type="data", symmetric=False, array=[plus], arrayminus=[minus], thickness=1)
            fig.add_scatter(x=[x], y=[y], text=[text], mode="markers+lines", name=series, error_y=err,
                            hovertemplate="%{text}<extra></extra>")
        else:
            trace.x = tuple(trace.x) + (x,)
            trace.y = tuple(trace.y) + (y,)
            trace.text = tuple(trace.text or ()) + (text,)
            if error is not None:
                trace.error_y.array = tuple(trace.error_y.array or ()) + (plus,)
                trace.error_y.arrayminus = tuple(trace.error_y.arrayminus or ()) + (minus,)
        if mark is not None:
            move_mark(fig, mark, x, y)


def series_points(fig: go.FigureWidget) -> int:
    """How many points the figure's series hold (highlight marks not counted)."""
    return sum(len(t.x) for t in fig.data if t.hovertemplate)


# ------------------------------------------------------------------------------------------ panel


@dataclass
class PanelRun:
    params: dict
    result: Any
    quality: float | None
    wall_s: float


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


class SamplingSetup:
    """Turns a panel's parameter dict into a ``sample`` call and a measured :class:`PanelRun`.

    Shared by every panel: the models (one, or several chosen by a ``mode`` parameter), one accelerated copy
    per speed label, the quality measure and the curve's x axis (``"wall_s"`` or ``"nfe"``).
    """

    def __init__(self, models, quality: Callable | None = None, quality_label: str | None = None, x: str = "wall_s"):
        self.models = dict(models) if isinstance(models, Mapping) else {"model": models}
        if x not in ("wall_s", "nfe"):
            raise ValueError(f"x={x!r} is not valid; choose 'wall_s' or 'nfe'")
        self.x = x
        self.x_title = "wall time (s)" if x == "wall_s" else "NFE per sample"
        self.quality = quality if quality is not None else ReferenceDistance()
        self.quality_label = quality_label or getattr(self.quality, "label", "quality")
        self._speed_cache: dict = {}

    def model(self, p: Mapping) -> Any:
        return self.models[p.get("mode", next(iter(self.models)))]

    def sample_kwargs(self, p: Mapping) -> tuple[Any, dict]:
        model = self.model(p)
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

    def run(self, p: dict) -> PanelRun:
        model, kw = self.sample_kwargs(p)
        t0 = time.perf_counter()
        res = sample(model, **kw)
        q = self.quality(model, res, kw) if isinstance(self.quality, ReferenceDistance) else self.quality(model, res)
        return PanelRun(p, res, q, time.perf_counter() - t0)

    def point(self, run: PanelRun) -> tuple[float, float] | None:
        """Where a run sits on the curve: (x, quality), or None when it has no quality value."""
        if run.quality is None:
            return None
        rec = run.result.record
        return (rec.wall_s if self.x == "wall_s" else rec.nfe), run.quality

    def series(self, run: PanelRun) -> tuple[str, str]:
        """The curve a run belongs to (one per sampler, and per model when there are several) and its hover text."""
        rec = run.result.record
        name = REGISTRY[rec.sampler].name + (f" [{run.params['mode']}]" if "mode" in run.params else "")
        return name, f"{name}<br>steps {rec.steps}, NFE {rec.nfe}<br>{rec.wall_s * 1000:.0f} ms"

    def sync_enabled(self, controls: Mapping[str, w.Widget], p: Mapping, quiet: _Quiet) -> None:
        """Disable controls the current sampler/model cannot use (e.g. eta for a sampler without it)."""
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
    controls, errors shown in plain words, and run now / wait / count runs.

    A panel calls ``_watch(controls)`` once its controls exist, and defines ``_request()`` (its current
    parameters), ``_compute(request)`` (on the worker thread), ``_draw(out)`` (put a finished run on screen)
    and ``_sync_enabled()``.
    """

    def __init__(self, models, quality: Callable | None, quality_label: str | None, x: str):
        self.setup = SamplingSetup(models, quality, quality_label, x)
        self.error = w.HTML()
        self.status = w.HTML()
        self.history: list = []
        self._quiet = _Quiet()
        self._runner = LatestOnlyRunner(self._compute, self._show, self._show_error)

    def _watch(self, controls: Iterable[w.Widget]) -> None:
        """Start a run whenever one of ``controls`` changes (not while the panel changes them itself)."""
        for c in controls:
            c.observe(self._on_change, names="value")
        self._sync_enabled()

    def _on_change(self, change) -> None:
        if self._quiet.on:
            return
        self._sync_enabled()
        self.status.value = "<i>running…</i>"
        self._runner.request(self._request())

    def _show(self, req, out) -> None:
        """A run finished: keep it (the last :data:`HISTORY_MAX`), draw it, clear the running note and any error."""
        self.history.append(out)
        del self.history[:-HISTORY_MAX]
        self._draw(out)
        self.error.value = ""
        self.status.value = ""

    def _show_error(self, req, exc: BaseException) -> None:
        self.status.value = ""
        self.error.value = error_html(exc)

    def close(self) -> None:
        """End the panel's worker thread and close its widgets (the panel stops responding)."""
        self._runner.close()
        widget = getattr(self, "widget", None)
        if widget is not None:
            _close_tree(widget)

    def run(self):
        """Run the current configuration now, on the calling thread (used when the panel is built)."""
        req = self._request()
        try:
            out = self._compute(req)
        except Exception as e:
            self._show_error(req, e)
            return None
        self._show(req, out)
        return out

    def wait(self, timeout: float = 120.0) -> bool:
        """Block until queued runs are done (for scripts and tests)."""
        return self._runner.wait_idle(timeout)

    @property
    def runs(self) -> int:
        return self._runner.runs


class SamplerPanel(_RunnerPanel):
    """Sampler dropdown, sliders and toggles over one model (or several, switched by a mode toggle).

    ``models``: a model, or a mapping label -> model (e.g. ``{"pixel": ..., "latent": ...}``; a toggle appears).
    ``controls``: which parts to show, from ``sampler, steps, guidance, eta, spacing, seed, batch, class``.
    ``defaults``: initial values, e.g. ``{"sampler": "ddim", "steps": 10}``.
    ``x``: ``"wall_s"`` or ``"nfe"`` for the curve's x axis. ``quality``: callable (model, result) -> float | None.
    """

    def __init__(self, models, controls: Iterable[str] = ("sampler", "steps", "seed"), defaults: Mapping[str, Any] | None = None,
                 *, x: str = "wall_s", quality: Callable | None = None, quality_label: str | None = None, run: bool = True):
        super().__init__(models, quality, quality_label, x)
        self.models, self.x = self.setup.models, x
        self.quality, self.quality_label = self.setup.quality, self.setup.quality_label
        defaults = dict(defaults or {})
        self.controls = make_controls(controls, defaults, self.models)
        self.fixed = defaults  # values without a control (e.g. batch=16 when no batch slider)
        self.image = w.Image(format="png", layout=w.Layout(max_width="100%"))
        self.record = w.HTML()
        self.figure = speed_quality_widget(self.setup.x_title, self.quality_label)
        self.history: list[PanelRun] = []
        self._watch(self.controls.values())
        self.widget = w.VBox([
            w.HBox([w.VBox(list(self.controls.values())), w.VBox([self.image, self.status])]),
            self.error, w.HBox([self.record, self.figure]),
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
    def _compute(self, p: dict) -> PanelRun:
        return self.setup.run(p)

    def _draw(self, run: PanelRun) -> None:
        self.image.value = grid_png(run.result.images)
        self.record.value = record_table(run.result.record, run.quality, self.quality_label)
        point = self.setup.point(run)
        if point is not None:
            series, text = self.setup.series(run)
            add_point(self.figure, series, *point, text)

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


@dataclass
class Comparison:
    """One run of a :class:`ComparePanel`: both configurations and their difference.

    ``difference``: |A − B| per pixel of the displayed images (clamped to [−1, 1]), shape (N, C, H, W).
    ``reused``: the sides whose parameters had not changed, so their previous run was shown again.
    """

    a: PanelRun
    b: PanelRun
    difference: torch.Tensor
    reused: frozenset = frozenset()


def _params_key(p: Mapping) -> tuple:
    """A comparable key for a parameter dict (tensors, e.g. conditioning images, by identity)."""
    return tuple(sorted((k, ("tensor", id(v)) if isinstance(v, torch.Tensor) else v) for k, v in p.items()))


class ComparePanel(_RunnerPanel):
    """Two sampling configurations, A and B, side by side from the same seed (the same initial noise).

    Shows each configuration's image grid and run record, their difference image (|A − B| per pixel, with its
    scale stated) and both points on the speed/quality curve, labelled A and B::

        ComparePanel(model, a=dict(sampler="ddim", steps=10), b=dict(sampler="dpmpp_2m", steps=10))

    ``controls``: shared controls, one widget driving both (``seed``, ``batch``, ``class``, or any other).
    ``side_controls``: controls shown once per configuration (``sampler``, ``steps``, ``guidance``, ``eta``,
    ``spacing``, ``speed``); a mode toggle per side appears when ``models`` is a mapping of several models.
    ``a``, ``b``: each configuration's values (initial values of its controls, or fixed values without one).
    ``defaults``: shared values (e.g. ``{"batch": 8}``). ``diff_scale``: the |A − B| shown white (``None``: the
    largest in each run). ``x``, ``quality``, ``quality_label``: as for :class:`SamplerPanel`.
    Only the side whose parameters changed is sampled again.
    """

    def __init__(self, models, a: Mapping[str, Any] | None = None, b: Mapping[str, Any] | None = None,
                 controls: Iterable[str] = ("seed",), side_controls: Iterable[str] = ("sampler", "steps"),
                 defaults: Mapping[str, Any] | None = None, *, x: str = "wall_s", quality: Callable | None = None,
                 quality_label: str | None = None, diff_scale: float | None = None, run: bool = True):
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
        super().__init__(models, quality, quality_label, x)
        self.diff_scale = diff_scale
        defaults = dict(defaults or {})
        self.controls = make_controls(controls, defaults, self.setup.models, mode=False)
        self.side_controls = {s: make_controls(side_controls, sides[s], self.setup.models) for s in "AB"}
        self.fixed, self.side_fixed = defaults, sides  # values without a control
        self.images = {s: w.Image(format="png", layout=w.Layout(max_width="100%")) for s in "AB"}
        self.records = {s: w.HTML() for s in "AB"}
        self.diff_image = w.Image(format="png", layout=w.Layout(max_width="100%"))
        self.diff_caption = w.HTML()
        self.figure = speed_quality_widget(self.setup.x_title, self.setup.quality_label, marks=("A", "B"))
        self.history: list[Comparison] = []
        self._last: dict[str, tuple[tuple, PanelRun]] = {}
        self._watch([*self.controls.values(), *self.side_controls["A"].values(), *self.side_controls["B"].values()])
        column = lambda s: w.VBox([w.HTML(f"<b>{s}</b>"), *self.side_controls[s].values(), self.images[s], self.records[s]])
        self.widget = w.VBox([
            w.HBox(list(self.controls.values())),
            w.HBox([column("A"), column("B"), w.VBox([w.HTML("<b>|A − B|</b>"), self.diff_image, self.diff_caption],
                                                     layout=w.Layout(max_width="33%"))]),
            self.status, self.error, self.figure,
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
    def _compute(self, req: tuple[dict, dict]) -> Comparison:
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
        with self.figure.batch_update():
            for side, run in (("A", cmp.a), ("B", cmp.b)):
                self._last[side] = (_params_key(run.params), run)
                self.images[side].value = grid_png(run.result.images)
                self.records[side].value = record_table(run.result.record, run.quality, self.setup.quality_label)
                point = self.setup.point(run)
                if point is None:
                    move_mark(self.figure, side, None, None)
                elif side in cmp.reused:
                    move_mark(self.figure, side, *point)
                else:
                    series, text = self.setup.series(run)
                    add_point(self.figure, series, *point, f"{side}: {text}", mark=side)
        self.diff_image.value, caption = difference_png(cmp.difference, self.diff_scale)
        self.diff_caption.value = f"<span style='font-size:0.9em'>{html.escape(caption)}</span>"

    def _request(self) -> tuple[dict, dict]:
        return self.params("A"), self.params("B")

    # -- display
    def static_html(self) -> str:
        parts = ["<div>"]
        if self.history:
            parts.append("<div>")
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


class SweepView(_Panel):
    """A :mod:`companion.bench` sweep run on a background thread; the speed/quality curve grows as runs finish.

    Takes :func:`companion.bench.iter_sweep`'s arguments (runs come from, and go to, its on-disk cache).
    ``y``: the quality column to plot (default: the first one ``metrics`` produce), with its bootstrap interval
    as an error bar; ``x``: ``wall_s``, ``nfe``, ``network_s`` or ``flops_per_sample``. A progress bar counts
    finished runs; Stop ends the sweep after the current run and keeps what finished; Resume runs the rest
    (finished runs come back from the cache at once). Runs without a ``y`` value (e.g. the ODE distance of a
    stochastic sampler) appear in the table but not on the curve. ``start=False`` builds the view idle.
    A notebook run headless shows the runs finished when the cell ends: call :meth:`wait` first for all of them.
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

        self.figure = speed_quality_widget(AXIS_LABELS.get(x, x), AXIS_LABELS.get(y, y))
        if x in ("wall_s", "network_s", "flops_per_sample"):
            self.figure.layout.xaxis.type = "log"  # costs span orders of magnitude across step counts
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
            series = REGISTRY[row["sampler"]].name + "".join(f" {k}={row[k]}" for k in self._varying)
            low, high = row.get(f"{self.y}_low"), row.get(f"{self.y}_high")
            error = (low, high) if low is not None and high is not None and np.isfinite([low, high]).all() else None
            text = (f"{series}<br>steps {row['steps']}, NFE {row['nfe']}<br>{row['wall_s'] * 1000:.0f} ms"
                    f"{' (from the cache)' if row.get('cached') else ''}")
            add_point(self.figure, series, float(row[self.x]), float(y), text, error=error)
        self.progress.value = self.done
        self.table.value = self._table_html()
        self._show_status()

    # -- display
    def _table_html(self) -> str:
        if not self.rows:
            return ""
        table = bench.summary_table(self.frame())
        return table.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, na_rep="n/a")

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


# ------------------------------------------------------------------------------------------ forward process


class ForwardPanel(_Panel):
    """A t slider over the forward process q(x_t | x_0): the noised images and where t sits on the SNR curve."""

    def __init__(self, images: torch.Tensor, schedules: Iterable[str] = ("linear", "cosine"), t: int = 250, seed: int = 0):
        self.images, self.seed = images, seed
        self.schedules = list(schedules)
        self.t = w.IntSlider(value=t, min=0, max=999, description="t", continuous_update=False)
        self.schedule = w.Dropdown(options=self.schedules, value=self.schedules[0], description="schedule")
        self.image = w.Image(format="png")
        self.info = w.HTML()
        self.figure = go.FigureWidget(layout=go.Layout(height=300, template="plotly_white", margin=dict(l=60, r=10, t=30, b=40),
                                                       xaxis_title="t", yaxis_title="log10 SNR(t)"))
        ts = np.arange(1000)
        for name in self.schedules:
            self.figure.add_scatter(x=ts, y=np.log10(sch.snr(name).numpy()), mode="lines", name=name)
        self.figure.add_scatter(x=[t], y=[0.0], mode="markers", marker=dict(size=14, color="black"), name="t")
        for c in (self.t, self.schedule):
            c.observe(lambda _: self.update(), names="value")
        self.widget = w.VBox([w.HBox([self.t, self.schedule]), w.HBox([self.image, self.info]), self.figure])
        self.update()

    def update(self) -> None:
        t, name = self.t.value, self.schedule.value
        xt = sch.noise(self.images, t, seed=self.seed, schedule=name)
        abar = float(sch.alphas_cumprod(name)[t])
        self.image.value = grid_png(xt.clamp(-1, 1), nrow=len(self.images))
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
