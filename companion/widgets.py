"""Interactive panels: move a control, see the images change and the speed/quality curve grow.

Panels are composed from small parts so a chapter builds the one it needs in a line or two::

    panel = SamplerPanel(load("digits-cond"), controls=("sampler", "steps", "guidance", "seed"))
    panel                      # shows the controls, the image grid, the run record and the curve

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
"""
from __future__ import annotations

import base64
import html
import io
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import ipywidgets as w
import numpy as np
import plotly.graph_objects as go
import torch

from .samplers import REGISTRY, SPACINGS
from .sampling import sample

# ------------------------------------------------------------------------------------------ runner


class LatestOnlyRunner:
    """Run ``fn(request)`` on one worker thread; a newer request replaces a queued one.

    ``on_done(request, result)`` and ``on_error(request, exc)`` are called on the worker thread.
    ``runs`` counts started runs; :meth:`wait_idle` blocks until nothing is running or queued.
    """

    def __init__(self, fn: Callable[[Any], Any], on_done: Callable[[Any, Any], None], on_error: Callable[[Any, BaseException], None]):
        self._fn, self._on_done, self._on_error = fn, on_done, on_error
        self._cond = threading.Condition()
        self._queued: Any = None
        self._has_queued = False
        self._busy = False
        self._thread: threading.Thread | None = None
        self.runs = 0

    def request(self, req: Any) -> None:
        with self._cond:
            self._queued, self._has_queued = req, True
            if not self._busy:
                self._busy = True
                self._thread = threading.Thread(target=self._loop, daemon=True, name="companion-panel-runner")
                self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._has_queued:
                    self._busy = False
                    self._cond.notify_all()
                    return
                req, self._queued, self._has_queued = self._queued, None, False
                self.runs += 1
            try:
                result = self._fn(req)
            except BaseException as e:  # shown in the panel; the worker keeps serving requests
                self._on_error(req, e)
            else:
                self._on_done(req, result)

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
    from .device import pick_device
    from .speed import DEVICE_PRECISIONS

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


# ------------------------------------------------------------------------------------------ images


def grid_png(images: torch.Tensor, nrow: int | None = None, scale: int = 4) -> bytes:
    """PNG bytes of a grid of images in [-1, 1] (N, C, H, W), each pixel scaled up ``scale`` times."""
    from PIL import Image

    x = images.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    n, c, h, wd = x.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    pad = 1
    canvas = torch.full((c, ncol * (h + pad) + pad, nrow * (wd + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (wd + pad): pad + q * (wd + pad) + wd] = x[i]
    arr = canvas.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ quality


class RefDistance:
    """Per-run quality: RMS distance to a converged solution of the same probability-flow ODE from the same noise.

    Separates deterministic solvers where sample-based metrics on a small batch cannot. The reference is a
    ``reference_steps``-step run of a third-order solver (UniPC) from the same seed: on the bundled digits model
    it moves by < 0.01 RMS between 100 and 200 steps, an order below the 10-50-step errors it is compared with,
    and it costs seconds where scipy's adaptive DOP853 needs hundreds of network calls even at rtol 1e-3
    (``companion.metrics.ode_reference_distance`` uses that one for tables). Stochastic samplers do not follow
    the ODE: they get no value, and the record says why. References are cached per model, seed, batch,
    classes and guidance.
    """

    def __init__(self, reference_sampler: str = "unipc", reference_steps: int = 200):
        self.reference_sampler, self.reference_steps = reference_sampler, reference_steps
        self.label = f"distance to {reference_steps}-step {REGISTRY[reference_sampler].name.split(' (')[0]} (RMS, lower is better)"
        self._cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, model, result, sample_kwargs: dict | None = None) -> float | None:
        rec = result.record
        if rec.stochastic:
            return None
        kw = dict(sample_kwargs or {})
        kw.pop("sampler", None), kw.pop("steps", None), kw.pop("eta", None), kw.pop("spacing", None)
        labels = kw.get("class_labels")
        key = (model.sha256, rec.seed, rec.batch, rec.guidance, None if labels is None else tuple(int(v) for v in labels))
        if key not in self._cache:
            self._cache[key] = sample(model, sampler=self.reference_sampler, steps=self.reference_steps, **kw).samples
        ref = self._cache[key]
        return float((result.samples.float() - ref.float()).pow(2).mean().sqrt())


# ------------------------------------------------------------------------------------------ figure


def speed_quality_widget(x_title: str, y_title: str) -> go.FigureWidget:
    fig = go.FigureWidget(layout=go.Layout(
        height=320, margin=dict(l=60, r=10, t=30, b=50), xaxis_title=x_title, yaxis_title=y_title,
        legend=dict(orientation="h", y=-0.25), template="plotly_white"))
    fig.add_scatter(x=[], y=[], mode="markers", name="current", marker=dict(size=18, symbol="circle-open", line=dict(width=3), color="black"), hoverinfo="skip")
    return fig


def add_point(fig: go.FigureWidget, series: str, x: float, y: float, text: str) -> None:
    """Append a point to the trace named ``series`` (created on first use) and move the highlight there."""
    with fig.batch_update():
        trace = next((t for t in fig.data if t.name == series), None)
        if trace is None:
            fig.add_scatter(x=[x], y=[y], text=[text], mode="markers+lines", name=series, hovertemplate="%{text}<extra></extra>")
        else:
            trace.x = tuple(trace.x) + (x,)
            trace.y = tuple(trace.y) + (y,)
            trace.text = tuple(trace.text or ()) + (text,)
        fig.data[0].x, fig.data[0].y = (x,), (y,)


_PLOTLYJS_EMBEDDED = False


def figure_html(fig: go.Figure) -> str:
    """Static HTML of a figure; plotly.js is embedded once per kernel (offline readers have no CDN)."""
    global _PLOTLYJS_EMBEDDED
    include = not _PLOTLYJS_EMBEDDED
    _PLOTLYJS_EMBEDDED = True
    return go.Figure(fig).to_html(include_plotlyjs=include, full_html=False)


# ------------------------------------------------------------------------------------------ panel


def record_table(rec, quality: float | None, quality_label: str) -> str:
    q = "n/a (stochastic sampler: no ODE reference)" if quality is None else f"{quality:.4f}"
    rows = [
        ("sampler", f"{REGISTRY[rec.sampler].name if rec.sampler in REGISTRY else rec.sampler} ({'stochastic' if rec.stochastic else 'deterministic'})"),
        ("steps / NFE per sample", f"{rec.steps} / {rec.nfe}"),
        ("wall time", f"{rec.wall_s * 1000:.0f} ms"),
        ("network / solver overhead", f"{rec.network_s * 1000:.0f} ms / {rec.overhead_s * 1000:.1f} ms"),
        ("seed / batch", f"{rec.seed} / {rec.batch}"),
        ("speed options", str(getattr(rec, "speed", {}).get("label", "fp32"))),
        (quality_label, q),
    ]
    cells = "".join(f"<tr><td style='padding-right:1em'>{html.escape(k)}</td><td><b>{html.escape(v)}</b></td></tr>" for k, v in rows)
    return f"<table style='font-size:0.9em'>{cells}</table>"


@dataclass
class PanelRun:
    params: dict
    result: Any
    quality: float | None
    wall_s: float


class SamplerPanel:
    """Sampler dropdown, sliders and toggles over one model (or several, switched by a mode toggle).

    ``models``: a model, or a mapping label -> model (e.g. ``{"pixel": ..., "latent": ...}``; a toggle appears).
    ``controls``: which parts to show, from ``sampler, steps, guidance, eta, spacing, seed, batch, class``.
    ``defaults``: initial values, e.g. ``{"sampler": "ddim", "steps": 10}``.
    ``x``: ``"wall_s"`` or ``"nfe"`` for the curve's x axis. ``quality``: callable (model, result) -> float | None.
    """

    def __init__(self, models, controls: Iterable[str] = ("sampler", "steps", "seed"), defaults: Mapping[str, Any] | None = None,
                 *, x: str = "wall_s", quality: Callable | None = None, quality_label: str | None = None, run: bool = True):
        self.models = dict(models) if isinstance(models, Mapping) else {"model": models}
        if x not in ("wall_s", "nfe"):
            raise ValueError(f"x={x!r} is not valid; choose 'wall_s' or 'nfe'")
        self.x = x
        self.quality = quality if quality is not None else RefDistance()
        self.quality_label = quality_label or getattr(self.quality, "label", "quality")
        defaults = dict(defaults or {})
        unknown = set(controls) - set(CONTROL_FACTORIES) - {"class"}
        if unknown:
            raise ValueError(f"unknown control(s) {sorted(unknown)}; valid: {sorted(CONTROL_FACTORIES) + ['class']}")
        self.controls: dict[str, w.Widget] = {}
        for name in controls:
            if name == "class":
                nc = next((m.num_classes for m in self.models.values() if m.num_classes), None)
                if nc is None:
                    raise ValueError("control 'class' needs a class-conditional model")
                self.controls[name] = class_control(nc, defaults.pop("class", None))
            elif name in defaults:
                self.controls[name] = CONTROL_FACTORIES[name](defaults.pop(name))
            else:
                self.controls[name] = CONTROL_FACTORIES[name]()
        if len(self.models) > 1:
            self.controls["mode"] = mode_control(self.models, defaults.pop("mode", None))
        self.fixed = defaults  # values without a control (e.g. batch=16 when no batch slider)
        self.image = w.Image(format="png", layout=w.Layout(max_width="100%"))
        self.record = w.HTML()
        self.error = w.HTML()
        self.status = w.HTML()
        self.figure = speed_quality_widget("wall time (s)" if x == "wall_s" else "NFE per sample", self.quality_label)
        self.history: list[PanelRun] = []
        self._syncing = False
        self._speed_cache: dict = {}
        self._runner = LatestOnlyRunner(self._compute, self._show, self._show_error)
        for c in self.controls.values():
            c.observe(self._on_change, names="value")
        self._sync_enabled()
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
        model = self.models[p.get("mode", next(iter(self.models)))]
        if p.get("speed", "fp32") != "fp32":
            model = self._accelerated(model, p["speed"])
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

    def _accelerated(self, model, label: str):
        """One accelerated copy per (model, speed label): preparing (or compiling) once, not every run."""
        from .speed import SpeedOptions, accelerate

        key = (id(model), label)
        if key not in self._speed_cache:
            self._speed_cache[key] = accelerate(model, SpeedOptions.from_label(label))
        return self._speed_cache[key]

    def _sync_enabled(self) -> None:
        """Disable controls the current sampler/model cannot use (e.g. eta for a sampler without it)."""
        p = self.params()
        spec = REGISTRY[p.get("sampler", "dpmpp_2m")]
        if "eta" in self.controls:
            self.controls["eta"].disabled = not spec.has_eta
        if "spacing" in self.controls:
            sp = self.controls["spacing"]
            allowed = list(spec.spacings)
            if list(sp.options) != allowed:
                self._syncing = True
                try:
                    keep = sp.value if sp.value in allowed else spec.default_spacing
                    sp.options = allowed
                    sp.value = keep if keep in allowed else allowed[0]
                finally:
                    self._syncing = False
        model = self.models[p.get("mode", next(iter(self.models)))]
        for name in ("guidance", "class"):
            if name in self.controls:
                self.controls[name].disabled = not model.conditional

    # -- running
    def _compute(self, p: dict) -> PanelRun:
        model, kw = self._sample_kwargs(p)
        t0 = time.perf_counter()
        res = sample(model, **kw)
        q = self.quality(model, res, kw) if isinstance(self.quality, RefDistance) else self.quality(model, res)
        return PanelRun(p, res, q, time.perf_counter() - t0)

    def _show(self, p: dict, run: PanelRun) -> None:
        rec = run.result.record
        self.history.append(run)
        self.image.value = grid_png(run.result.images)
        self.record.value = record_table(rec, run.quality, self.quality_label)
        self.error.value = ""
        self.status.value = ""
        if run.quality is not None:
            x = rec.wall_s if self.x == "wall_s" else rec.nfe
            series = REGISTRY[rec.sampler].name + (f" [{p['mode']}]" if "mode" in p else "")
            add_point(self.figure, series, x, run.quality, f"{series}<br>steps {rec.steps}, NFE {rec.nfe}<br>{rec.wall_s * 1000:.0f} ms")

    def _show_error(self, p: dict, exc: BaseException) -> None:
        self.status.value = ""
        self.error.value = (f"<div style='color:#a00;border:1px solid #a00;padding:4px'><b>This run failed</b> "
                            f"({html.escape(type(exc).__name__)}): {html.escape(str(exc))}</div>")

    def _on_change(self, change) -> None:
        if self._syncing:
            return
        self._sync_enabled()
        self.status.value = "<i>running…</i>"
        self._runner.request(self.params())

    def run(self) -> PanelRun | None:
        """Run the current configuration now, on the calling thread (used when the panel is built)."""
        p = self.params()
        try:
            run = self._compute(p)
        except Exception as e:
            self._show_error(p, e)
            return None
        self._show(p, run)
        return run

    def wait(self, timeout: float = 120.0) -> bool:
        """Block until queued runs are done (for scripts and tests)."""
        return self._runner.wait_idle(timeout)

    @property
    def runs(self) -> int:
        return self._runner.runs

    # -- display
    def static_html(self) -> str:
        parts = ["<div>"]
        if self.history:
            png = base64.b64encode(self.image.value).decode()
            parts.append(f"<img src='data:image/png;base64,{png}' style='image-rendering:pixelated'/>")
        parts.append(self.error.value + self.record.value)
        parts.append(figure_html(self.figure))
        parts.append("</div>")
        return "".join(parts)

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = self.widget._repr_mimebundle_(include=include, exclude=exclude) or {}
        bundle["text/html"] = self.static_html()
        return bundle


# ------------------------------------------------------------------------------------------ forward process


class ForwardPanel:
    """A t slider over the forward process q(x_t | x_0): the noised images and where t sits on the SNR curve."""

    def __init__(self, images: torch.Tensor, schedules: Iterable[str] = ("linear", "cosine"), t: int = 250, seed: int = 0):
        from . import schedules as sch

        self._sch, self.images, self.seed = sch, images, seed
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
        xt = self._sch.noise(self.images, t, seed=self.seed, schedule=name)
        abar = float(self._sch.alphas_cumprod(name)[t])
        self.image.value = grid_png(xt.clamp(-1, 1), nrow=len(self.images))
        self.info.value = (f"<table><tr><td>abar_t</td><td><b>{abar:.4g}</b></td></tr>"
                           f"<tr><td>SNR(t)</td><td><b>{abar / (1 - abar):.4g}</b></td></tr>"
                           f"<tr><td>signal share sqrt(abar_t)</td><td><b>{abar ** 0.5:.3f}</b></td></tr></table>")
        with self.figure.batch_update():
            self.figure.data[-1].x = (t,)
            self.figure.data[-1].y = (float(np.log10(abar / (1 - abar))),)

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = self.widget._repr_mimebundle_(include=include, exclude=exclude) or {}
        png = base64.b64encode(self.image.value).decode()
        bundle["text/html"] = f"<div><img src='data:image/png;base64,{png}'/>{self.info.value}{figure_html(self.figure)}</div>"
        return bundle
