"""Cheaper arithmetic in the network: int8 quantisation of a UNet's convolutions and linear layers.

A quantised layer keeps its weights as 8-bit integers with one float scale per output channel (symmetric,
``w ~ scale * q``, ``q`` in [-127, 127]). Three ways to run such a layer, each a *mode*:

- ``"int8-weight"``: weight-only. Weights are stored in int8 and turned back into floats on every call (in the
  input's dtype, so it composes with bf16 autocast, channels_last and torch.compile). It saves memory, not
  arithmetic: the convolution itself still runs in floating point. Any device.
- ``"int8-dynamic"``: PyTorch's dynamic quantisation (``torch.ao.quantization.quantize_dynamic``): int8 weights and
  activations quantised on the fly, per call. PyTorch implements it for ``nn.Linear`` only, so a UNet's
  convolutions stay float32 (:func:`quantise` records how many layers and which share of the FLOPs it covers).
  CPU only (fbgemm / oneDNN kernels).
- ``"int8-static"``: static quantisation, eager mode: every convolution and linear layer is fenced by a quantise /
  dequantise pair with activation scales calibrated on the network inputs of real sampling runs, and runs as an
  int8 kernel (``torch.ao.nn.quantized``). CPU only.

Not offered, with the reason (measured on torch 2.13 CPU): PT2E static quantisation (``prepare_pt2e`` with the x86
inductor quantizer) is no longer part of torch (``torch.ao.quantization.quantize_pt2e`` does not exist; it moved to
torchao); torchao's int8 configurations (``quantize_``) quantise ``nn.Linear`` only, leaving every convolution of
these UNets in float32, which ``"int8-dynamic"`` already shows.

:func:`quantise` returns a copy of the model whose ``unet`` is quantised; every sampler, the speed options
(:func:`companion.speed.accelerate`) and the feature cache (:class:`companion.caching.DeepCache`) use it unchanged.
:func:`layer_errors` quantises one layer at a time and measures how far the network's noise prediction moves: that
is where quantisation hurts. A mode that cannot run where it is asked for is refused with the reason
(:class:`companion.errors.SpeedOptionError`); nothing falls back to float silently.
"""
from __future__ import annotations

import copy
import hashlib
import warnings

import torch
import torch.nn.functional as F

from .errors import SpeedOptionError
from .sampling import sample
from .speed import AcceleratedModel

QUANT_MODES = ("int8-weight", "int8-dynamic", "int8-static")
# Layer types each mode quantises (the others stay float32).
MODE_LAYERS = {"int8-weight": (torch.nn.Conv2d, torch.nn.Linear), "int8-dynamic": (torch.nn.Linear,),
               "int8-static": (torch.nn.Conv2d, torch.nn.Linear)}
CPU_ONLY = ("int8-dynamic", "int8-static")


def check_mode(mode: str, device=None) -> None:
    """Refuse a mode that does not exist or cannot run on ``device``, naming the valid choices."""
    if mode not in QUANT_MODES:
        raise SpeedOptionError(f"unknown quantisation mode {mode!r}; valid choices: {', '.join(QUANT_MODES)}")
    kind = torch.device(device).type if device is not None else "cpu"
    if mode in CPU_ONLY and kind != "cpu":
        raise SpeedOptionError(f"quantisation mode {mode!r} runs on CPU only (PyTorch's int8 kernels are fbgemm / oneDNN); "
                               f"the model is on {kind}: use 'int8-weight' there, or move the model to the CPU")
    if mode in CPU_ONLY:
        engines = torch.backends.quantized.supported_engines
        if not any(e in engines for e in ("x86", "fbgemm", "onednn")):
            raise SpeedOptionError(f"quantisation mode {mode!r} needs PyTorch's x86 / fbgemm / oneDNN int8 engine; this "
                                   f"build has {engines}: use 'int8-weight'")


def _engine() -> str:
    engines = torch.backends.quantized.supported_engines
    return next(e for e in ("x86", "fbgemm", "onednn") if e in engines)


# ------------------------------------------------------------------------------------------ int8 weights


def int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q, scale) with ``w ~ q * scale``, q in [-127, 127]."""
    flat = w.detach().float().reshape(w.shape[0], -1)
    scale = flat.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(w.shape)
    return q, scale.reshape(-1, *([1] * (w.dim() - 1)))


class Int8WeightConv2d(torch.nn.Module):
    """A Conv2d whose weight is stored in int8 (per-channel scales) and dequantised on every call."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        if conv.padding_mode != "zeros":
            raise SpeedOptionError(f"int8-weight supports zero-padded convolutions; this one pads with {conv.padding_mode!r}")
        q, scale = int8_per_channel(conv.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(conv.weight.dtype))
        self.bias = None if conv.bias is None else torch.nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels

    def forward(self, x):
        w = self.qweight.to(x.dtype) * self.scale.to(x.dtype)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Int8WeightLinear(torch.nn.Module):
    """A Linear whose weight is stored in int8 (per-row scales) and dequantised on every call."""

    def __init__(self, lin: torch.nn.Linear):
        super().__init__()
        q, scale = int8_per_channel(lin.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(lin.weight.dtype))
        self.bias = None if lin.bias is None else torch.nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = lin.in_features, lin.out_features

    def forward(self, x):
        return F.linear(x, self.qweight.to(x.dtype) * self.scale.to(x.dtype), self.bias)


def _plain_state(value, key: str, out: dict) -> None:
    """torch.ao's int8 modules put packed tuples, dtypes and quantised tensors in their state dicts; written out
    as plain tensors (int8 values, scales, zero points), so the copy's weights can be hashed like any model's."""
    if isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            _plain_state(v, f"{key}.{i}", out)
    elif torch.is_tensor(value) and value.is_quantized:
        out[f"{key}.int8"] = value.int_repr()
        if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            out[f"{key}.scales"] = value.q_per_channel_scales()
            out[f"{key}.zero_points"] = value.q_per_channel_zero_points()
        else:
            out[f"{key}.scales"] = torch.tensor([value.q_scale()])
            out[f"{key}.zero_points"] = torch.tensor([value.q_zero_point()])
    elif torch.is_tensor(value):
        out[key] = value
    # dtypes and None carry no weights: left out


class Float32Island(torch.nn.Module):
    """Runs an int8 kernel module on float32 input outside autocast (PyTorch's quantised kernels take float32 and
    autocast does not know them); the output is float32, which a surrounding autocast casts on as usual.
    Its state dict holds plain tensors only (see :func:`_plain_state`); it is for hashing, not for reloading."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self._register_state_dict_hook(Float32Island._plain)

    @staticmethod
    def _plain(module, state_dict, prefix, local_metadata):
        keys = [k for k in state_dict if k.startswith(prefix)]
        items = {k: state_dict.pop(k) for k in keys}
        for k, v in items.items():
            _plain_state(v, k, state_dict)
        return state_dict

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return self.inner(x.float())


class _Fenced(torch.nn.Module):
    """quantise -> layer -> dequantise: eager-mode static quantisation of one layer."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant, self.layer, self.dequant = QuantStub(), layer, DeQuantStub()

    def forward(self, x):
        return self.dequant(self.layer(self.quant(x)))


# ------------------------------------------------------------------------------------------ the model copy


def quantisable_layers(net: torch.nn.Module, mode: str = "int8-weight") -> list[str]:
    """Names (``net.named_modules`` style) of the layers ``mode`` quantises, in forward-definition order."""
    check_mode(mode)
    return [name for name, m in net.named_modules() if type(m) in MODE_LAYERS[mode]]


def _set(net: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, module)


def _check_model(model) -> torch.nn.Module:
    name = getattr(model, "name", type(model).__name__)
    if isinstance(model, AcceleratedModel):
        raise SpeedOptionError(f"model {name!r} already runs with speed options ({model.options.label()}); quantise the plain "
                               "model, then accelerate the quantised copy")
    if getattr(model, "quantisation", None):
        raise SpeedOptionError(f"model {name!r} is already quantised ({model.quantisation['mode']}); quantise the original")
    net = getattr(model, "unet", None)
    if not isinstance(net, torch.nn.Module):
        raise SpeedOptionError(f"model {name!r} has no network to quantise (an exact-score oracle computes its noise "
                               "prediction exactly, in float64)")
    return net


def _with_network(model, net: torch.nn.Module, mode: str, info: dict):
    """A shallow copy of ``model`` whose ``unet`` is ``net`` (the original's modules and weights are untouched)."""
    q = copy.copy(model)
    if isinstance(model, torch.nn.Module):
        q._modules = dict(model._modules)  # a shallow copy shares the module dict: give the copy its own
    q.unet = net
    q.name = f"{getattr(model, 'name', type(model).__name__)}+{mode}"
    q.quantisation = info
    # the float model it approximates (references are computed on it); kept outside nn.Module's registry, so it is
    # not a submodule of the copy (no second set of weights in its state dict, parameters or .to())
    q.__dict__["original"] = getattr(model, "original", model)
    base_sha = getattr(model, "sha256", None)
    if base_sha is not None:  # the identity of a quantised copy: the weights it came from and how it was made
        q._sha256 = hashlib.sha256(f"{base_sha}|{sorted(info.items())}".encode()).hexdigest()
    return q


def _flops(net: torch.nn.Module, model, names: list[str]) -> tuple[float, dict]:
    """Total forward FLOPs of one sample and each named layer's share (torch's FLOP counter, module hooks)."""
    from torch.utils.flop_counter import FlopCounterMode

    shares = {}
    hooks = []
    counter = FlopCounterMode(display=False)

    def pre(name):
        def hook(mod, args):
            shares[name] = shares.get(name, 0) - counter.get_total_flops()
        return hook

    def post(name):
        def hook(mod, args, out):
            shares[name] += counter.get_total_flops()
        return hook

    for n in names:
        m = net.get_submodule(n)
        hooks += [m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post(n))]
    x = torch.zeros((1, *model.sample_shape), device=next(net.parameters()).device)
    labels = torch.zeros(1, dtype=torch.long, device=x.device) if getattr(model, "num_classes", None) else None
    try:
        with torch.no_grad(), counter:
            model.predict_noise(x, torch.tensor([500], device=x.device), class_labels=labels)
    finally:
        for h in hooks:
            h.remove()
    total = counter.get_total_flops()
    return float(total), {n: shares.get(n, 0) / total for n in names}


def _calibrate(model, net: torch.nn.Module, sampler: str, steps: int, batch: int, seed: int) -> None:
    """Run the prepared (observer-carrying) network through real sampling runs: the activation ranges of every
    step and class are what the static scales must cover."""
    probe = _with_network(model, net, "calibrating", {"mode": "calibrating"})
    labels = torch.arange(batch) % model.num_classes if getattr(model, "num_classes", None) else None
    sample(probe, sampler, steps, seed=seed, batch=batch, class_labels=labels)


def quantise(model, mode: str = "int8-weight", *, layers: list[str] | None = None, calibration_sampler: str = "dpmpp_2m",
             calibration_steps: int = 10, calibration_batch: int = 32, seed: int = 0):
    """A copy of ``model`` whose network runs with ``mode`` (one of :data:`QUANT_MODES`).

    ``layers``: names of the layers to quantise (default: every layer the mode covers; see
    :func:`quantisable_layers`). ``calibration_*``: the sampling runs that set static activation scales
    (``"int8-static"`` only). The copy's ``quantisation`` dict records the mode, the layers, how many of the
    network's convolution and linear layers that is and their share of the FLOPs.
    """
    check_mode(mode, getattr(model, "device", None))
    net = _check_model(model)
    covered = quantisable_layers(net, mode)
    if layers is None:
        layers = covered
    unknown = sorted(set(layers) - set(covered))
    if unknown:
        raise SpeedOptionError(f"layer(s) {unknown[:5]} cannot be quantised with {mode!r}; it covers "
                               f"{len(covered)} layers of type {[t.__name__ for t in MODE_LAYERS[mode]]}, e.g. {covered[:3]}")
    if not layers:
        raise SpeedOptionError(f"{mode!r} finds no {[t.__name__ for t in MODE_LAYERS[mode]]} layer in model "
                               f"{getattr(model, 'name', '?')!r}: nothing to quantise")
    all_layers = quantisable_layers(net, "int8-weight")
    _, share = _flops(net, model, all_layers)
    qnet = copy.deepcopy(net).eval()
    if mode == "int8-weight":
        for n in layers:
            m = qnet.get_submodule(n)
            _set(qnet, n, Int8WeightConv2d(m) if isinstance(m, torch.nn.Conv2d) else Int8WeightLinear(m))
    elif mode == "int8-dynamic":
        from torch.ao.quantization import quantize_dynamic

        torch.backends.quantized.engine = _engine()
        with warnings.catch_warnings():  # torch.ao.quantization warns that it is deprecated in favour of torchao
            warnings.simplefilter("ignore")
            for n in layers:
                wrapped = torch.nn.Sequential(qnet.get_submodule(n))
                _set(qnet, n, Float32Island(quantize_dynamic(wrapped, {torch.nn.Linear}, dtype=torch.qint8)[0]))
    else:  # int8-static
        from torch.ao.quantization import convert, get_default_qconfig, prepare

        engine = _engine()
        torch.backends.quantized.engine = engine
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for n in layers:
                fenced = _Fenced(qnet.get_submodule(n))
                fenced.qconfig = get_default_qconfig(engine)
                _set(qnet, n, fenced)
            prepare(qnet, inplace=True)
            _calibrate(model, qnet, calibration_sampler, calibration_steps, calibration_batch, seed)
            convert(qnet, inplace=True)
            for n in layers:
                _set(qnet, n, Float32Island(qnet.get_submodule(n)))
    info = {"mode": mode, "layers": len(layers), "of_layers": len(all_layers),
            "flops_share": float(sum(share[n] for n in layers)),
            "layer_types": [t.__name__ for t in MODE_LAYERS[mode]]}
    if mode == "int8-static":
        info["calibration"] = {"sampler": calibration_sampler, "steps": calibration_steps, "batch": calibration_batch,
                               "seed": seed}
    if len(layers) < len(covered) or mode == "int8-dynamic":
        info["names"] = list(layers)
    return _with_network(model, qnet, mode, info)


def weight_bytes(net: torch.nn.Module) -> int:
    """Bytes the network's weights occupy (int8 buffers at one byte, packed int8 kernels by their state)."""
    total = 0
    for t in list(net.parameters()) + list(net.buffers()):
        total += t.numel() * t.element_size()
    for m in net.modules():  # torch.ao's quantised modules keep packed weights outside parameters()
        if callable(getattr(m, "weight", None)) and not isinstance(getattr(m, "weight"), torch.Tensor):
            try:
                w = m.weight()
            except Exception:  # noqa: BLE001 - a module whose weight() needs arguments is not a packed one
                continue
            if torch.is_tensor(w):
                total += w.numel() * w.element_size()
    return total


# ------------------------------------------------------------------------------------------ where it hurts


def probe_inputs(model, *, sampler: str = "dpmpp_2m", steps: int = 10, batch: int = 16, seed: int = 0,
                 every: int = 3) -> list[tuple]:
    """Network inputs from a float32 sampling run: ``(x_in, t, class_labels)`` of every ``every``-th network call
    (the states quantisation will actually see, from pure noise to nearly clean), recorded at the network-call seam."""
    labels = torch.arange(batch) % model.num_classes if getattr(model, "num_classes", None) else None
    kept: list[tuple] = []

    def record(network):
        def call(x, t, **kw):
            if len(kept) < 10_000 and record.calls % every == 0:
                kept.append((x.clone(), t, kw.get("class_labels")))
            record.calls += 1
            return network(x, t, **kw)
        return call

    record.calls = 0
    sample(model, sampler, steps, seed=seed, batch=batch, class_labels=labels, wrap=record)
    return kept


def predictions(model, probes) -> list[torch.Tensor]:
    """The model's float32 noise predictions on ``probes``."""
    with torch.no_grad():
        return [model.predict_noise(x, t, class_labels=labels).float() for x, t, labels in probes]


def relative_error(reference, model, probes) -> float:
    """RMS of the difference between ``model``'s noise predictions and ``reference``'s over ``probes``, relative to
    the reference's RMS. ``reference``: a model, or its :func:`predictions` on the same probes (computed once)."""
    ref = reference if isinstance(reference, list) else predictions(reference, probes)
    num = den = 0.0
    for a, b in zip(ref, predictions(model, probes)):
        num += (a - b).pow(2).sum().item()
        den += a.pow(2).sum().item()
    return (num / den) ** 0.5


def layer_errors(model, mode: str = "int8-weight", probes=None, *, layers: list[str] | None = None, quantised=None,
                 **quantise_kw) -> list[dict]:
    """Quantise one layer at a time (the rest float32) and measure the relative error of the noise prediction on
    ``probes`` (default :func:`probe_inputs`). ``layers``: the layers to try (default: every layer ``mode`` covers).
    ``quantised``: a :func:`quantise` copy of ``model`` in ``mode`` whose layers are taken (default: made here).
    Rows in forward order: layer, type, parameters, FLOPs share, relative error. The whole network quantised at
    once is :func:`quantise` plus :func:`relative_error`."""
    net = _check_model(model)
    covered = quantisable_layers(net, mode)
    names = covered if layers is None else [n for n in covered if n in set(layers)]
    if layers is not None and len(names) != len(set(layers)):
        raise SpeedOptionError(f"layer(s) {sorted(set(layers) - set(covered))[:5]} are not quantised by {mode!r}; "
                               f"it covers e.g. {covered[:3]}")
    probes = probe_inputs(model) if probes is None else probes
    if quantised is not None and (getattr(quantised, "original", None) is not model
                                  or quantised.quantisation.get("mode") != mode
                                  or quantised.quantisation["layers"] != quantised.quantisation["of_layers"] and mode != "int8-dynamic"):
        raise SpeedOptionError(f"quantised= must be a copy of this model with every layer in {mode!r}; got "
                               f"{getattr(quantised, 'name', type(quantised).__name__)!r}")
    # every layer once (static: calibrated once, with all fences); single layers are taken from it
    full = quantised if quantised is not None else quantise(model, mode, **quantise_kw)
    _, share = _flops(net, model, names)
    ref = predictions(model, probes)
    rows = []
    for n in names:
        one = copy.copy(net)  # only the path to the swapped layer is copied; the other layers are shared, unchanged
        _swap_copy(one, n, full.unet.get_submodule(n))
        view = _with_network(model, one, mode, {"mode": mode, "layers": 1})
        layer = net.get_submodule(n)
        rows.append({"layer": n, "type": type(layer).__name__, "params": sum(p.numel() for p in layer.parameters()),
                     "flops_share": share[n], "rel_error": relative_error(ref, view, probes)})
    return rows


def _swap_copy(net: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Replace ``name`` in a shallow copy of a network, copying each module on the path so the original keeps its own."""
    parts = name.split(".")
    node = net
    node._modules = dict(node._modules)
    for p in parts[:-1]:
        child = copy.copy(node._modules[p])
        child._modules = dict(child._modules)
        node._modules[p] = child
        node = child
    node._modules[parts[-1]] = module
