"""Speed options for the network call: reduced precision, channels_last, SDPA attention, torch.compile, CUDA graphs.

:class:`SpeedOptions` says what to use; :func:`accelerate` returns a model with the full
:class:`companion.models.DiffusionModel` interface whose ``predict_noise`` runs with those options. Samplers
never see a difference: outputs are cast back to float32 (and the standard memory layout) so every
scheduler keeps its arithmetic in float32.

What each option does (docs/gpu.md has the measured effect of each):

- ``precision``: ``"fp32"`` (IEEE float32; on CUDA TF32 is switched *off* for the call so that fp32 means
  fp32), ``"tf32"`` (CUDA only: float32 tensors, TF32 tensor-core matmuls and convolutions),
  ``"bf16"`` (autocast to bfloat16; CPU and CUDA) or ``"fp16"`` (autocast to float16; CUDA only).
- ``channels_last``: network weights and inputs in NHWC layout (faster convolutions on tensor cores).
- ``sdpa``: attention through PyTorch's fused ``scaled_dot_product_attention`` (diffusers'
  ``AttnProcessor2_0``, its default) instead of the classic matmul-softmax-matmul ``AttnProcessor``;
  ``sdpa=False`` exists to measure what the fused kernel buys.
- ``compile``: ``torch.compile`` of the network (``compile_mode``: default, reduce-overhead, max-autotune,
  max-autotune-no-cudagraphs; ``compile_backend``: inductor, or aot_eager/eager to check graph capture
  without code generation).
- ``cuda_graphs``: replay the whole network call as recorded CUDA graphs, one per input shape (removes the
  per-kernel launch cost that dominates small models); with ``compile`` it selects
  ``mode="reduce-overhead"`` (compiled kernels inside CUDA graphs).

Options that cannot work where they are asked for are refused with :class:`SpeedOptionError` naming the
option and what to use instead. On a model without a network (the exact-score oracles, which compute in
float64) the network options have nothing to act on: they are recorded as not applied, with the reason,
and a :class:`SpeedWarning` says so.
"""
from __future__ import annotations

import contextlib
import copy
import shutil
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .device import pick_device
from .errors import SpeedOptionError, SpeedWarning  # noqa: F401  (raised here; defined with the others)

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Precisions each device type runs; anything else is refused with these as the valid choices.
DEVICE_PRECISIONS = {"cpu": ("fp32", "bf16"), "cuda": PRECISIONS, "mps": ("fp32",)}




@dataclass(frozen=True)
class SpeedOptions:
    """How the network is run. The defaults are eager float32 with PyTorch's fused attention (diffusers' default)."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    cuda_graphs: bool = False
    sdpa: bool = True

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise SpeedOptionError(f"unknown precision {self.precision!r}; valid choices: {', '.join(PRECISIONS)}")
        if self.compile_mode not in COMPILE_MODES:
            raise SpeedOptionError(f"unknown compile_mode {self.compile_mode!r}; valid choices: {', '.join(COMPILE_MODES)}")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise SpeedOptionError(f"unknown compile_backend {self.compile_backend!r}; valid choices: {', '.join(COMPILE_BACKENDS)}")
        for name in ("channels_last", "compile", "cuda_graphs", "sdpa"):
            if not isinstance(getattr(self, name), bool):
                raise SpeedOptionError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not self.compile and (self.compile_mode != "default" or self.compile_backend != "inductor"):
            raise SpeedOptionError(
                f"compile_mode={self.compile_mode!r} / compile_backend={self.compile_backend!r} given with compile=False; "
                "set compile=True or leave them at 'default' / 'inductor'")
        if self.cuda_graphs and self.compile and self.compile_mode == "max-autotune-no-cudagraphs":
            raise SpeedOptionError(
                "cuda_graphs=True contradicts compile_mode='max-autotune-no-cudagraphs'; use compile_mode='reduce-overhead' "
                "or 'max-autotune' (both record CUDA graphs), or cuda_graphs=False")
        if self.cuda_graphs and self.compile and self.compile_backend != "inductor":
            raise SpeedOptionError(
                f"cuda_graphs with compile=True needs compile_backend='inductor' (got {self.compile_backend!r}); "
                "or use cuda_graphs with compile=False (graphs of the eager network)")

    @property
    def effective_compile_mode(self) -> str | None:
        """The mode handed to ``torch.compile`` (``cuda_graphs`` turns "default" into "reduce-overhead")."""
        if not self.compile:
            return None
        return "reduce-overhead" if self.cuda_graphs and self.compile_mode == "default" else self.compile_mode

    def uses_cuda_graphs(self, device_type: str = "cuda") -> bool:
        """Whether the network call is replayed from CUDA graphs on ``device_type`` (compiled modes
        "reduce-overhead" and "max-autotune" record them on CUDA only)."""
        if device_type != "cuda":
            return False
        return self.cuda_graphs or self.effective_compile_mode in ("reduce-overhead", "max-autotune")

    def label(self) -> str:
        """A short name: the precision, then every non-default option (e.g. ``"bf16+channels_last+compile"``)."""
        parts = [self.precision]
        if self.channels_last:
            parts.append("channels_last")
        if not self.sdpa:
            parts.append("classic_attention")
        if self.compile:
            parts.append("compile" if self.compile_mode == "default" else f"compile:{self.compile_mode}")
            if self.compile_backend != "inductor":
                parts[-1] += f"@{self.compile_backend}"
        if self.cuda_graphs:
            parts.append("cuda_graphs")
        return "+".join(parts)

    def describe(self) -> dict:
        """The options as a plain dict for run records (JSON-ready), with their label."""
        return dict(asdict(self), label=self.label())

    @classmethod
    def from_dict(cls, d: dict) -> "SpeedOptions":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known - {"label"})
        if unknown:
            raise SpeedOptionError(f"unknown speed option(s) {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_label(cls, label: str) -> "SpeedOptions":
        """The inverse of :meth:`label`: ``"bf16+channels_last+compile:reduce-overhead"`` -> options."""
        parts = [p.strip() for p in str(label).split("+") if p.strip()]
        if not parts:
            raise SpeedOptionError(f"empty speed label {label!r}; e.g. 'fp32', 'bf16+channels_last+compile'")
        kw: dict = {"precision": parts[0]}
        flags = {"channels_last": ("channels_last", True), "classic_attention": ("sdpa", False), "cuda_graphs": ("cuda_graphs", True)}
        for part in parts[1:]:
            if part in flags:
                key, value = flags[part]
                kw[key] = value
            elif part.split(":")[0].split("@")[0] == "compile":
                head, _, backend = part.partition("@")
                kw["compile"] = True
                kw["compile_mode"] = head.partition(":")[2] or "default"
                kw["compile_backend"] = backend or "inductor"
            else:
                raise SpeedOptionError(f"unknown part {part!r} in speed label {label!r}; after the precision use "
                                       "channels_last, classic_attention, cuda_graphs, compile[:mode][@backend]")
        return cls(**kw)

    def check_device(self, device: torch.device) -> None:
        """Refuse options that cannot run on ``device``, naming the option and what to use instead."""
        kind = torch.device(device).type
        allowed = DEVICE_PRECISIONS.get(kind, ("fp32",))
        if self.precision not in allowed:
            hint = {"fp16": "fp16 autocast needs CUDA", "tf32": "TF32 exists only on NVIDIA GPUs (Ampere or newer)",
                    "bf16": f"bf16 autocast is not supported by the companion on {kind}"}[self.precision]
            raise SpeedOptionError(f"precision={self.precision!r} cannot run on {kind}: {hint}; "
                                   f"on {kind} use precision in {allowed}")
        if kind == "cuda" and self.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise SpeedOptionError(f"precision='bf16' needs a GPU with bfloat16 support; {torch.cuda.get_device_name(device)} "
                                   "has none: use precision='fp16'")
        if kind != "cuda" and (self.cuda_graphs or self.effective_compile_mode == "reduce-overhead"):
            what = "cuda_graphs=True" if self.cuda_graphs else "compile_mode='reduce-overhead' (it records CUDA graphs)"
            raise SpeedOptionError(f"{what} needs CUDA, the device is {kind}; use cuda_graphs=False"
                                   + (" and compile_mode='default'" if self.compile else ""))
        if self.compile:
            reason = compile_unsupported_reason(kind, self.compile_backend)
            if reason:
                raise SpeedOptionError(f"compile=True cannot work here: {reason}; use compile=False")


EAGER_FP32 = SpeedOptions()


def compile_unsupported_reason(device_type: str = "cpu", backend: str = "inductor") -> str | None:
    """Why ``torch.compile`` cannot work on this platform, or ``None`` when nothing is known to stop it."""
    try:
        import torch._dynamo as dynamo
    except Exception as e:  # a broken or stripped torch install
        return f"torch._dynamo does not import ({type(e).__name__}: {e})"
    if not dynamo.is_dynamo_supported():
        import sys

        return f"TorchDynamo does not support this platform (Python {sys.version.split()[0]} on {sys.platform})"
    if backend == "inductor" and device_type == "cpu":
        from torch._inductor import config as inductor_config

        cxx = inductor_config.cpp.cxx
        names = [c for c in (cxx if isinstance(cxx, (tuple, list)) else (cxx,)) if c]
        if not any(shutil.which(c) for c in names or ("g++", "c++", "clang++")):
            return f"TorchInductor on CPU needs a C++ compiler and none of {names or ['g++']} is on PATH"
    if backend == "inductor" and device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "TorchInductor on CUDA needs the triton package, which is not installed"
    return None


def cpu_bf16_reason() -> str | None:
    """Why bf16 on this CPU would not be native arithmetic, or ``None`` when it has bf16 instructions (AVX512-BF16 or
    AMX-BF16). Without them PyTorch still runs bf16 autocast, converting in software, which is slower than float32:
    a measurement of "bf16 speed" there measures the emulation."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError as e:
        return f"the CPU's instruction flags cannot be read ({e})"
    if any(f in flags for f in ("avx512_bf16", "amx_bf16")):
        return None
    return "this CPU has neither AVX512-BF16 nor AMX-BF16 instructions (bf16 would be emulated in software)"


# ----------------------------------------------------------------------------------------- the wrapper


@contextlib.contextmanager
def _fp32_math(device_type: str, allow_tf32: bool):
    """On CUDA: TF32 for matmuls and cuDNN convolutions on or off for the duration (restored afterwards)."""
    if device_type != "cuda":
        yield
        return
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    old = (matmul.fp32_precision, conv.fp32_precision)
    value = "tf32" if allow_tf32 else "ieee"
    matmul.fp32_precision, conv.fp32_precision = value, value
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = old


def _attention_layers(net: torch.nn.Module) -> list:
    from diffusers.models.attention_processor import Attention

    return [m for m in net.modules() if isinstance(m, Attention)]


def _attention_is(net: torch.nn.Module, sdpa: bool) -> bool:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    want = AttnProcessor2_0 if sdpa else AttnProcessor
    return all(type(a.processor) is want for a in _attention_layers(net))


def _set_attention(net: torch.nn.Module, sdpa: bool) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for a in _attention_layers(net):
        a.set_processor(AttnProcessor2_0() if sdpa else AttnProcessor())


class NetworkView:
    """The base model as its own ``predict_noise`` sees it, except that ``unet`` is the accelerated network."""

    def __init__(self, base, unet):
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "unet", unet)

    def __getattr__(self, name):
        return getattr(self._base, name)


class _CudaGraphed:
    """A tensor function replayed from CUDA graphs: one recorded graph per input signature (shapes and dtypes).

    Inputs are copied into the graph's static buffers and the output is cloned out of it, because the next
    replay overwrites it and multistep schedulers keep earlier outputs.
    """

    def __init__(self, fn: Callable, device: torch.device, warmup: int = 2):
        self.fn = fn
        self.device = device
        self.warmup = warmup
        self.graphs: dict = {}

    @staticmethod
    def _signature(args) -> tuple:
        return tuple(None if a is None else (tuple(a.shape), a.dtype) for a in args)

    def __call__(self, *args):
        key = self._signature(args)
        if key not in self.graphs:
            self.graphs[key] = self._record(args)
        graph, static_in, static_out = self.graphs[key]
        for buf, a in zip(static_in, args):
            if a is not None:
                buf.copy_(a)
        graph.replay()
        return static_out.clone()

    def _record(self, args):
        static_in = [None if a is None else a.detach().clone() for a in args]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up (cuDNN algorithm choice, lazy init) off the capture
            for _ in range(self.warmup):
                self.fn(*static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.fn(*static_in)
        return graph, static_in, static_out


class AcceleratedModel:
    """A diffusion model whose network call runs with :class:`SpeedOptions`; everything else is the base model's.

    Attribute reads that are not defined here (``scheduler_config``, ``sample_shape``, ``decode``, ``sha256``,
    ...) go to ``base``. ``unet`` is the network as prepared (layout, attention), before compilation.
    ``applied`` says which options act, ``notes`` why others do not.
    """

    def __init__(self, base, options: SpeedOptions, device: torch.device):
        self.base = base
        self.options = options
        self.applied: dict[str, bool] = {}
        self.notes: list[str] = []
        self._prepare(device)

    def __getattr__(self, name):
        if name == "base":  # not yet set: avoid infinite recursion during construction/unpickling
            raise AttributeError(name)
        return getattr(self.base, name)

    def __repr__(self) -> str:
        return f"AcceleratedModel({getattr(self.base, 'name', type(self.base).__name__)!r}, {self.options.label()}, {self._device})"

    # ------------------------------------------------------------------ preparation
    def _prepare(self, device: torch.device) -> None:
        opts = self.options
        opts.check_device(device)
        self._device = torch.device(device)
        self._graphs = opts.uses_cuda_graphs(self._device.type)
        self.base.to(self._device)
        net = getattr(self.base, "unet", None)
        self.applied, self.notes = {}, []
        if net is None:
            self._prepare_without_network()
        else:
            self._prepare_network(net)
        self._forward = self._graphed_or_plain()

    def _prepare_without_network(self) -> None:
        opts = self.options
        name = getattr(self.base, "name", type(self.base).__name__)
        asked = {"precision": opts.precision != "fp32", "channels_last": opts.channels_last, "sdpa": not opts.sdpa,
                 "compile": opts.compile}
        for option, on in asked.items():
            self.applied[option] = False
            if on:
                self.notes.append(f"{option}: model {name!r} has no network (it computes its noise prediction exactly, "
                                  "in float64): nothing to apply it to")
        self.applied["cuda_graphs"] = False
        if opts.cuda_graphs:
            self.notes.append(f"cuda_graphs: model {name!r} has no network to record; it runs eagerly")
        self.unet = None
        self._call_net = None
        if self.notes:
            warnings.warn("; ".join(self.notes), SpeedWarning, stacklevel=4)

    def _prepare_network(self, net: torch.nn.Module) -> None:
        opts = self.options
        has_attention = bool(_attention_layers(net))
        change_attention = has_attention and not _attention_is(net, opts.sdpa)
        if opts.channels_last or change_attention:
            net = copy.deepcopy(net)  # the base model stays as it was: other runs compare against it
        if opts.channels_last:
            net = net.to(memory_format=torch.channels_last)
        if change_attention:
            _set_attention(net, opts.sdpa)
        if not has_attention:
            self.notes.append("sdpa: the network has no attention layers; the option has no effect")
        self.applied = {"precision": True, "channels_last": opts.channels_last, "sdpa": has_attention and opts.sdpa,
                        "compile": opts.compile, "cuda_graphs": self._graphs}
        self.unet = net
        call = net
        if opts.compile:
            call = torch.compile(net, mode=opts.effective_compile_mode, backend=opts.compile_backend)
        self._call_net = call

    def _graphed_or_plain(self) -> Callable:
        if self.options.cuda_graphs and not self.options.compile and self._call_net is not None:
            return _CudaGraphed(self._network_call, self._device)
        return self._network_call

    # ------------------------------------------------------------------ the network call
    def _autocast(self):
        dtype = AUTOCAST_DTYPES.get(self.options.precision)
        if dtype is None or self._call_net is None:
            return contextlib.nullcontext()
        # CUDA graphs replay recorded kernels: autocast's weight-cast cache would hold tensors outside the graph
        return torch.autocast(self._device.type, dtype=dtype, cache_enabled=not self._graphs)

    def _network_call(self, x, t, class_labels, cond):
        if self._call_net is None:
            return self.base.predict_noise(x, t, class_labels=class_labels, cond=cond)
        if self.options.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        predict = type(self.base).predict_noise
        with _fp32_math(self._device.type, self.options.precision == "tf32"), self._autocast():
            eps = predict(NetworkView(self.base, self._call_net), x, t, class_labels=class_labels, cond=cond)
        return eps.to(torch.float32).contiguous()

    def predict_noise(self, x: torch.Tensor, t, class_labels: torch.Tensor | None = None, cond: torch.Tensor | None = None):
        """eps(x_t, t) computed with the speed options; float32, standard layout, on the model's device."""
        if self._call_net is None:
            return self._forward(x, t, class_labels, cond)
        if isinstance(self._forward, _CudaGraphed):
            t = torch.as_tensor(t, device=x.device)
            if t.ndim == 0:
                t = t.expand(x.shape[0])
            if class_labels is not None:
                class_labels = class_labels.to(x.device)
        if self.options.compile and self._graphs:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            eps = self._forward(x, t, class_labels, cond)
        except Exception as e:
            if self.options.compile and _from_compiler(e):
                raise SpeedOptionError(
                    f"torch.compile (mode={self.options.effective_compile_mode!r}, backend={self.options.compile_backend!r}) "
                    f"failed on {self._device}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}; "
                    "use compile=False") from e
            raise
        if self.options.compile and self._graphs:
            eps = eps.clone()  # compiled CUDA graphs reuse their output memory on the next replay
        return eps

    # ------------------------------------------------------------------ module-like behaviour
    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device=None, *args, **kwargs):
        """Move to another device (re-preparing the network there); dtype changes go through ``precision``."""
        if args or kwargs or isinstance(device, torch.dtype):
            raise SpeedOptionError("an accelerated model only moves between devices; set the dtype with "
                                   "SpeedOptions(precision=...) instead of .to(dtype)")
        dev = pick_device(device)
        if dev != self._device:
            self._prepare(dev)
        return self

    def eval(self):
        self.base.eval()
        return self

    def describe(self) -> dict:
        """The options, where they run, and which of them act (with the reasons for those that do not)."""
        return dict(self.options.describe(), device=str(self._device), applied=dict(self.applied), notes=list(self.notes))


def _from_compiler(e: BaseException) -> bool:
    """True when an exception comes from TorchDynamo / TorchInductor (or a backend compiler they called)."""
    for err in (e, e.__cause__, e.__context__):
        if err is not None and type(err).__module__.startswith(("torch._dynamo", "torch._inductor", "triton")):
            return True
    return False


def accelerate(model, options: SpeedOptions | dict | None = None, device=None) -> AcceleratedModel:
    """``model`` with its network call run under ``options`` on ``device`` (default: the model's own device).

    Returns an :class:`AcceleratedModel` (the full model interface, by delegation). The base model is moved to
    ``device`` but its network is not changed: layout and attention changes are made on a copy. Passing an
    already accelerated model re-accelerates its base. Raises :class:`SpeedOptionError` for options that cannot
    work on the device or platform.
    """
    if options is None:
        options = EAGER_FP32
    elif isinstance(options, dict):
        options = SpeedOptions.from_dict(options)
    elif not isinstance(options, SpeedOptions):
        raise SpeedOptionError(f"options must be SpeedOptions or a dict, got {type(options).__name__}")
    base = model.base if isinstance(model, AcceleratedModel) else model
    if device is None:
        dev = getattr(base, "device", None)
        dev = torch.device(dev) if dev is not None else pick_device(None)
    else:
        dev = pick_device(device)
    return AcceleratedModel(base, options, dev)


def describe(model) -> dict:
    """The speed options a model runs with (eager fp32 for a model that was never accelerated)."""
    if isinstance(model, AcceleratedModel):
        return model.describe()
    device = torch.device(getattr(model, "device", "cpu"))
    notes = []
    if device.type == "cuda":  # not accelerated: PyTorch's own TF32 settings apply, which may not be IEEE fp32
        notes.append("not accelerated: PyTorch's default float32 math (matmul fp32_precision="
                     f"{torch.backends.cuda.matmul.fp32_precision!r}, cuDNN conv {torch.backends.cudnn.conv.fp32_precision!r})")
    return dict(EAGER_FP32.describe(), device=str(device), applied={}, notes=notes)
