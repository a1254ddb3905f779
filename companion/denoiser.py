"""The one guided network call every sampler makes, and the record of what a run did and cost.

A sampler (diffusers' scheduler loop in :mod:`companion.sampling`, the SDE samplers in :mod:`companion.sde`, partial
chains in :mod:`companion.partial`, the reference ODE in :mod:`companion.reference`) never calls the network itself.
It calls a :class:`Denoiser`: ``eps = denoiser(x, t)``, which

* passes the :class:`Conditioning` bundle (class labels, a low-resolution image, text embeddings, extra keyword
  inputs) to the model's ``predict_noise``;
* applies classifier-free guidance (conditional and unconditional halves in one batched call, counted as 2 NFE)
  and classifier guidance (the gradient of a noise-aware classifier's log p(y | x_t));
* counts network evaluations per sample (NFE) and classifier evaluations, and times them;
* checks a state for non-finite values on the sampler's behalf (:meth:`Denoiser.check_finite`).

The network call itself is ``denoiser.network`` — by default ``model.predict_noise`` — and :meth:`Denoiser.wrap`
is the one seam where a lever (a feature cache, a quantised or compiled network, a pipeline's UNet/transformer)
replaces it for every sampler at once. :class:`RunRecord` is built in one place, :meth:`Denoiser.record`.
"""
from __future__ import annotations

import math
import numbers
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping

import torch

from . import samplers as registry
from .device import network_slices
from .errors import SamplingError
from .models import DiffusionModel
from .schedules import sigma_map
from .speed import describe as describe_speed

def sliced(network: Callable[..., torch.Tensor], limit: int | None = None) -> Callable[..., torch.Tensor]:
    """``network`` called on :func:`network_slices` of its batch and the outputs concatenated. Keyword inputs that
    are tensors with the batch's length are sliced alike; a call with any other batched input (a pipeline's
    keyword dictionaries) goes through whole."""

    def call(x: torch.Tensor, t, **kw):
        n = x.shape[0]
        parts = network_slices(n, x[0].numel(), x.device, limit)
        if len(parts) == 1 or not all(v is None or (torch.is_tensor(v) and v.ndim and v.shape[0] == n) for v in kw.values()):
            return network(x, t, **kw)
        per_sample_t = torch.is_tensor(t) and t.ndim > 0 and t.shape[0] == n
        return torch.cat([network(x[p], t[p] if per_sample_t else t, **{k: None if v is None else v[p] for k, v in kw.items()})
                          for p in parts])

    return call


# ---------------------------------------------------------------------------------------------- conditioning


@dataclass(frozen=True)
class Conditioning:
    """What a denoiser is conditioned on, for a batch of B samples.

    ``class_labels``: (B,) int64, ``num_classes`` meaning "no class". ``image``: the low-resolution image of a
    super-resolution stage (the model's ``cond``). ``text`` / ``null_text``: text-encoder embeddings of the prompt
    and of the empty (or negative) prompt, for pipelines; classifier-free guidance pairs ``text`` with
    ``null_text``. ``extra``: any further keyword inputs a pipeline's network needs (passed unchanged; for guidance
    a tensor is stacked with its unconditional counterpart in ``null_extra`` — SDXL's pooled negative-prompt
    embedding — or with itself when ``null_extra`` has none, e.g. SDXL's size ids).
    """

    class_labels: torch.Tensor | None = None
    image: torch.Tensor | None = None
    text: torch.Tensor | None = None
    null_text: torch.Tensor | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    null_extra: Mapping[str, Any] = field(default_factory=dict)

    def kwargs(self) -> dict:
        """Keyword arguments of ``predict_noise``: only what is set (unconditional models take none)."""
        kw = dict(self.extra)
        if self.class_labels is not None:
            kw["class_labels"] = self.class_labels
        if self.image is not None:
            kw["cond"] = self.image
        if self.text is not None:
            kw["encoder_hidden_states"] = self.text
        return kw

    def with_null(self, null_class: int | None) -> "Conditioning":
        """The conditional and the unconditional half stacked along the batch (classifier-free guidance)."""
        labels = None
        if self.class_labels is not None:
            if null_class is None:
                raise SamplingError("classifier-free guidance on class labels needs the model's null class")
            labels = torch.cat([self.class_labels, torch.full_like(self.class_labels, null_class)])
        text = None
        if self.text is not None:
            if self.null_text is None:
                raise SamplingError("classifier-free guidance on text needs null_text (the empty prompt's embeddings)")
            text = torch.cat([self.text, self.null_text.expand_as(self.text)])
        image = torch.cat([self.image, self.image]) if self.image is not None else None
        extra = {k: torch.cat([v, self.null_extra.get(k, v)]) if torch.is_tensor(v) else v for k, v in self.extra.items()}
        return Conditioning(class_labels=labels, image=image, text=text, extra=extra)


# ---------------------------------------------------------------------------------------------- the run record


@dataclass
class RunRecord:
    """What one sampling call did and cost.

    ``nfe``: network evaluations per sample (a classifier-free-guided call counts 2: its two halves).
    ``classifier_evals``: noise-aware classifier gradient evaluations per sample (classifier guidance).
    ``wall_s``: the whole call (noise, scheduler set-up, loop, decoding); ``network_s``: inside the diffusion
    network (and the guidance classifier); ``overhead_s`` = wall - network: everything else (the solver).
    ``step_s``: wall time of each loop iteration. ``peak_mem_bytes``: on CUDA ``torch.cuda.max_memory_allocated``
    during the call; on CPU the growth of the process's peak resident set size (``ru_maxrss``) during the call,
    which is 0 when the run stayed below an earlier peak — ``peak_mem_kind`` says which.
    ``network_step_s``: the time of each network call of the denoising loop (one per loop iteration);
    ``encode_s``: the text encoders (a pipeline's prompt), ``decode_s``: the latent decoder — network time outside
    the loop, both included in ``network_s``, so the loop's own network time is network_s - encode_s - decode_s.
    ``prompt`` / ``negative_prompt``: what a text-conditioned model was asked for (None: its unconditional, empty
    prompt); ``guidance_embedded``: the guidance scale went into the network as an input (LCM), not into a
    classifier-free combination (then a step is 1 NFE).
    """

    sampler: str
    steps: int
    nfe: int
    wall_s: float
    network_s: float
    overhead_s: float
    step_s: list
    peak_mem_bytes: int
    peak_mem_kind: str
    scheduler_class: str
    scheduler_config: dict
    seed: int
    batch: int
    guidance: float | None
    eta: float | None
    spacing: str
    stochastic: bool
    classifier_scale: float | None = None
    classifier_evals: int = 0
    device: str = "cpu"
    model: str = ""
    speed: dict = field(default_factory=dict)
    network_step_s: list = field(default_factory=list)
    encode_s: float = 0.0
    decode_s: float = 0.0
    prompt: str | list | None = None
    negative_prompt: str | list | None = None
    guidance_embedded: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def overhead_fraction(self) -> float:
        return self.overhead_s / self.wall_s if self.wall_s > 0 else float("nan")


@dataclass
class SampleResult:
    images: torch.Tensor
    samples: torch.Tensor
    record: RunRecord
    trajectory: list | None = field(default=None)
    x_T: torch.Tensor | None = None  # the initial noise (unit variance, VP scaling, CPU): the reference ODE's start
    class_labels: torch.Tensor | None = None  # the labels sampled with (None for unconditional runs)


def peak_rss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class MemoryProbe:
    """Peak memory of a stretch of work: CUDA's allocator peak, or the growth of the CPU process's peak RSS."""

    def __init__(self, dev: torch.device):
        self.dev = dev
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        self.rss0 = peak_rss_bytes()

    def read(self) -> tuple[int, str]:
        if self.dev.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.dev)), "cuda_max_memory_allocated"
        return max(0, peak_rss_bytes() - self.rss0), "cpu_peak_rss_growth"


# ---------------------------------------------------------------------------------------------- arguments


def model_device(model) -> torch.device:
    d = getattr(model, "device", None)
    return torch.device(d) if d is not None else torch.device("cpu")


def as_int(v):
    """numpy / torch integers as plain ints (bools are left alone, to be refused by the checks)."""
    return int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v


def require_diffusion(model, what: str) -> None:
    """Refuse a flow-matching model in code written for a diffusion (VP noise-level) schedule: it would run and be
    wrong, silently. ``what`` names the caller for the message."""
    if getattr(model, "prediction", None) == "flow":
        name = getattr(model, "name", type(model).__name__)
        raise SamplingError(f"{what} follows a diffusion model's noise schedule; {name!r} is a flow-matching model "
                            "(velocity on a linear path): sample it with companion.sample and a flow sampler")


def check_args(model, spec, steps, guidance, eta, class_labels, classifier, classifier_scale, batch, cond, *,
               prompt=None, negative_prompt=None) -> None:
    """Refuse bad sampling arguments with a message that names the bad value and the valid choices."""
    n_train = int(model.scheduler_config["num_train_timesteps"])
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= n_train:
        raise SamplingError(f"steps must be an int in [1, {n_train}] (the model's training steps), got {steps!r}")
    if steps < spec.min_steps:
        raise SamplingError(f"sampler {spec.key!r} needs at least {spec.min_steps} steps (got {steps}): {spec.steps_reason}")
    if spec.max_steps is not None and steps > spec.max_steps:
        raise SamplingError(f"sampler {spec.key!r} takes at most {spec.max_steps} steps (got {steps}): {spec.steps_reason}")
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
        raise SamplingError(f"batch must be a positive int, got {batch!r}")
    if guidance is not None:
        if isinstance(guidance, bool) or not isinstance(guidance, numbers.Real):
            raise SamplingError(f"guidance must be a number (the classifier-free guidance scale) or None, got {guidance!r}")
        if not (getattr(model, "conditional", False) or getattr(model, "text_conditional", False)):
            raise SamplingError(
                f"guidance={guidance} needs a class-conditional model; {getattr(model, 'name', 'this model')!r} is unconditional "
                "(use guidance=None, or classifier guidance with classifier=...; text-to-image pipelines take guidance too)"
            )
        if not math.isfinite(float(guidance)):
            raise SamplingError(f"guidance must be a finite number, got {guidance!r}")
    if eta is not None:
        if not spec.has_eta:
            with_eta = [s.key for s in registry.REGISTRY.values() if s.has_eta]
            raise SamplingError(f"sampler {spec.key!r} has no eta parameter; samplers with eta: {', '.join(with_eta)}")
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= float(eta) <= 1.0:
            raise SamplingError(f"eta must lie in [0, 1], got {eta!r}")
    if classifier_scale is not None and (isinstance(classifier_scale, bool) or not isinstance(classifier_scale, numbers.Real)
                                         or not math.isfinite(float(classifier_scale))):
        raise SamplingError(f"classifier_scale must be a finite number, got {classifier_scale!r}")
    if classifier is None and classifier_scale is not None:
        raise SamplingError("classifier_scale given without classifier=")
    if classifier is not None and class_labels is None:
        raise SamplingError("classifier guidance needs class_labels= (the class each sample is steered towards)")
    if class_labels is not None and not getattr(model, "conditional", False) and classifier is None:
        raise SamplingError(f"model {getattr(model, 'name', '')!r} is unconditional: class_labels need classifier= guidance")
    check_prompt(model, guidance, prompt, negative_prompt)
    if getattr(model, "cond_shape", None) is not None and cond is None:
        raise SamplingError(f"model {model.name!r} is a super-resolution stage: pass cond=<low-resolution images of shape {model.cond_shape}>")


def check_prompt(model, guidance, prompt, negative_prompt) -> None:
    """A prompt needs a text-conditioned model; a negative prompt is the other half of classifier-free guidance."""
    name = getattr(model, "name", "this model")
    if prompt is not None and not getattr(model, "text_conditional", False):
        kind = "class-conditional (use class_labels=)" if getattr(model, "conditional", False) else "unconditional"
        raise SamplingError(f"model {name!r} is {kind}: it takes no prompt. Text-to-image pipelines (Stable Diffusion, "
                            f"SDXL, LCM, SD3: load('<folder or Hub id>')) take prompts")
    if negative_prompt is not None:
        if not getattr(model, "text_conditional", False):
            raise SamplingError(f"model {name!r} takes no negative_prompt: it is not text-conditioned")
        if getattr(model, "guidance_embedded", False):
            raise SamplingError(f"model {name!r} takes its guidance scale as a network input (no classifier-free "
                                f"guidance), so it has no use for negative_prompt; drop it")
        if guidance is None:
            raise SamplingError("negative_prompt is the unconditional half of classifier-free guidance: pass guidance=<scale>")


SEED_MAX = 2**63 - 2  # torch generators take 64-bit seeds; a run also uses seed + 1 (a stochastic sampler's stream)


def check_seed(seed) -> int:
    """A seed as a plain int: any integer type (Python, numpy, a 0-d integer tensor) in [0, 2**63 - 2]."""
    if torch.is_tensor(seed) and seed.ndim == 0 and not seed.is_floating_point() and seed.dtype != torch.bool:
        seed = int(seed)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) <= SEED_MAX:
        raise SamplingError(f"seed must be an int in [0, 2**63 - 2], got {seed!r}")
    return int(seed)


def resolve_labels(model, class_labels, batch: int, device) -> torch.Tensor | None:
    """The (B,) labels to sample with: given ones checked, or one of each class cycling for a conditional model."""
    if class_labels is None:
        if not getattr(model, "conditional", False):
            return None
        return (torch.arange(batch) % model.num_classes).to(device)
    y = torch.as_tensor(class_labels)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise SamplingError(f"class_labels must be integers (class indices), got {y.dtype} values {y.flatten()[:6].tolist()}")
    y = y.long()
    if y.ndim == 0:
        y = y.expand(batch)
    if y.shape != (batch,):
        raise SamplingError(f"class_labels must be one int or {batch} ints (batch={batch}), got shape {tuple(y.shape)}")
    n = getattr(model, "num_classes", None)
    if n is not None and (y.min() < 0 or y.max() > n):
        raise SamplingError(f"class_labels must lie in [0, {n}] ({n} = no class), got {y.min().item()}..{y.max().item()}")
    return y.to(device)


def resolve_cond(cond, batch: int, device) -> torch.Tensor | None:
    """A super-resolution stage's low-resolution images, one per sample."""
    if cond is None:
        return None
    cond = torch.as_tensor(cond, dtype=torch.float32).to(device)
    if cond.shape[0] != batch:
        raise SamplingError(f"cond holds {cond.shape[0]} images but batch={batch}")
    return cond


# ---------------------------------------------------------------------------------------------- the denoiser


class Denoiser:
    """``eps = denoiser(x, t)``: the model's noise prediction with guidance, counted, timed and checked.

    ``model``: anything with the :class:`companion.models.DiffusionModel` interface. ``conditioning``: what every
    call is conditioned on (the labels are dropped for an unconditional model, whose classifier guidance uses
    them). ``guidance``: classifier-free guidance scale w, eps = eps_u + w (eps_c - eps_u). ``classifier`` /
    ``classifier_scale``: a noise-aware classifier ``clf(x_t, t) -> logits``; eps -= scale * sqrt(1 - abar_t) *
    grad log p(y | x_t) (default scale 1). ``sync``: called before and after each timed network stretch (CUDA's
    synchronise, so the time is the device's and not the launch's). ``events``: time each network call of the loop
    with device events instead (a factory of objects with ``record()`` and ``elapsed_time(end)`` in ms, e.g.
    ``functools.partial(torch.cuda.Event, enable_timing=True)``): no synchronisation per call, so the host keeps
    queueing work; the events are read once, after one ``sync``, when the times are first asked for.
    """

    def __init__(self, model, conditioning: Conditioning | None = None, *, guidance: float | None = None,
                 classifier=None, classifier_scale: float | None = None, sync: Callable[[], None] | None = None,
                 events: Callable[[], Any] | None = None):
        self.model = model
        self.conditioning = conditioning or Conditioning()
        self.guidance = None if guidance is None else float(guidance)
        self.classifier = classifier
        self.classifier_scale = (1.0 if classifier_scale is None else float(classifier_scale)) if classifier is not None else None
        self.sync = sync or (lambda: None)
        # a companion diffusion model's own network (not a pipeline's, nor an accelerated copy that a compiled graph
        # or CUDA graph would re-trace per slice size) is called in cache-sized slices on a CPU
        plain = isinstance(model, DiffusionModel) and type(model).predict_noise is DiffusionModel.predict_noise
        self.network: Callable[..., torch.Tensor] = sliced(model.predict_noise) if plain else model.predict_noise
        cond = self.conditioning
        if not getattr(model, "conditional", False) and cond.class_labels is not None:
            cond = replace(cond, class_labels=None)  # an unconditional network takes no labels (a classifier may)
        self._single = cond.kwargs()
        self._paired = cond.with_null(getattr(model, "null_class", None) if cond.class_labels is not None else None).kwargs() \
            if self.guidance is not None else None
        self.nfe = 0
        self.classifier_evals = 0
        self._network_s = 0.0
        self._call_s: list[float] = []  # each network call of the loop
        self._events = events
        self._pending: list[tuple[Any, Any]] = []  # (start, end) device events not read yet
        self.parts: dict[str, float] = {"encode": 0.0, "decode": 0.0}  # network time outside the loop

    def wrap(self, wrapper: Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]) -> "Denoiser":
        """Replace the network call by ``wrapper(network)`` (same signature as ``predict_noise``): the one place a
        cache, a quantised or compiled network, or a pipeline's own network plugs into every sampler."""
        self.network = wrapper(self.network)
        return self

    def eps(self, x: torch.Tensor, t) -> torch.Tensor:
        """The guided noise prediction, counted but not timed (see :meth:`__call__`)."""
        if self.guidance is None:
            eps = self.network(x, t, **self._single)
            self.nfe += 1
        else:
            eps_c, eps_u = self.network(torch.cat([x, x]), t, **self._paired).chunk(2)
            eps = eps_u + self.guidance * (eps_c - eps_u)
            self.nfe += 2
        if self.classifier is not None:
            eps = eps - self.classifier_scale * sigma_map(self.model).sqrt_one_minus_abar(t) * self.classifier_grad(x, t)
            self.classifier_evals += 1
        return eps

    def classifier_grad(self, x: torch.Tensor, t) -> torch.Tensor:
        """grad_x log p(y | x_t) of the guidance classifier for the conditioning's labels."""
        labels = self.conditioning.class_labels
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            tt = torch.as_tensor(t, device=x.device).expand(x.shape[0])
            logp = torch.log_softmax(self.classifier(xg, tt), dim=-1)
            return torch.autograd.grad(logp.gather(1, labels[:, None]).sum(), xg)[0]

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        if self._events is not None:
            start, end = self._events(), self._events()
            start.record()
            eps = self.eps(x, t)
            end.record()
            self._pending.append((start, end))
            return eps
        self.sync()
        n0 = time.perf_counter()
        eps = self.eps(x, t)
        self.sync()
        dt = time.perf_counter() - n0
        self._network_s += dt
        self._call_s.append(dt)
        return eps

    def _settle(self) -> None:
        """Read the device events recorded so far (one synchronisation for all of them)."""
        if self._pending:
            self.sync()
            for start, end in self._pending:
                dt = start.elapsed_time(end) / 1000.0
                self._network_s += dt
                self._call_s.append(dt)
            self._pending.clear()

    @property
    def network_s(self) -> float:
        """Seconds of network work so far: the loop's calls plus what :meth:`timed` and :meth:`account` booked."""
        self._settle()
        return self._network_s

    @property
    def call_s(self) -> list[float]:
        """Seconds of each network call of the loop so far."""
        self._settle()
        return self._call_s

    def timed(self, fn: Callable[[], Any], part: str | None = None) -> Any:
        """Run other network work (e.g. a VAE decode) inside the network-time account; ``part`` (``"encode"``,
        ``"decode"``) also books it apart from the loop."""
        n0 = time.perf_counter()
        out = fn()
        self.sync()
        self.account(time.perf_counter() - n0, part)
        return out

    def account(self, seconds: float, part: str | None = None) -> None:
        """Book ``seconds`` of network work done outside a call of this denoiser (e.g. the prompt's encoding)."""
        self._network_s += seconds
        if part is not None:
            self.parts[part] = self.parts.get(part, 0.0) + seconds

    @staticmethod
    def check_finite(x: torch.Tensor, what: str, where: str = "") -> None:
        """Refuse a diverged state: ``what`` names the sampler, ``where`` the step (and, ideally, the configuration)."""
        if not torch.isfinite(x).all():
            raise SamplingError(f"{what}: non-finite values (NaN/inf) {where}".rstrip())

    def record(self, *, sampler: str, steps: int, wall_s: float, step_s: list, scheduler_class: str, scheduler_config: dict,
               seed: int, batch: int, spacing: str, stochastic: bool, eta: float | None = None, device=None,
               peak: tuple[int, str] = (0, "not measured"), prompt=None, negative_prompt=None,
               embedded_guidance: float | None = None) -> RunRecord:
        """The :class:`RunRecord` of a run driven by this denoiser (its NFE, network time, guidance filled in).
        ``embedded_guidance``: the scale a network took as an input (recorded as the run's guidance)."""
        return RunRecord(
            sampler=sampler, steps=steps, nfe=self.nfe, wall_s=wall_s, network_s=self.network_s,
            overhead_s=wall_s - self._network_s, step_s=step_s, peak_mem_bytes=peak[0], peak_mem_kind=peak[1],
            scheduler_class=scheduler_class, scheduler_config=scheduler_config, seed=seed, batch=batch,
            guidance=self.guidance if embedded_guidance is None else float(embedded_guidance),
            eta=None if eta is None else float(eta), spacing=spacing, stochastic=stochastic,
            classifier_scale=self.classifier_scale, classifier_evals=self.classifier_evals,
            device=str(device if device is not None else model_device(self.model)), model=str(getattr(self.model, "name", "")),
            speed=describe_speed(self.model), network_step_s=list(self.call_s), encode_s=self.parts.get("encode", 0.0),
            decode_s=self.parts.get("decode", 0.0), prompt=prompt, negative_prompt=negative_prompt,
            guidance_embedded=embedded_guidance is not None,
        )

    def finish(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, samples) of a final state, on the CPU in ``dtype`` (float32 unless a float64 measurement asks):
        a latent model's samples are decoded (timed as network work), a pixel model's samples are its images."""
        samples = x.to(dtype)
        if getattr(self.model, "is_latent", False):
            images = self.timed(lambda: self.model.decode(samples), "decode")
            self.check_finite(images, f"the decoder of {getattr(self.model, 'name', 'the latent model')!r}",
                              "in the decoded images (the latents were finite)")
        else:
            images = samples
        images = images.detach().to("cpu", dtype)
        samples = samples.detach().cpu()
        self.sync()
        return images, samples
