"""Where tensors live and where randomness comes from: the one place that decides both.

Device order: an explicit argument, then the ``COMPANION_DEVICE`` environment variable, then CUDA, MPS, CPU.
Noise is always drawn from a *CPU* ``torch.Generator`` and then moved, so a seed gives the same noise
on every device (GPU generators produce different streams from CPU ones).
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import threading
import time

import torch

from .errors import DeviceError  # noqa: F401  (raised here; defined with the others)

ENV_VAR = "COMPANION_DEVICE"
VALID_DEVICES = ("cpu", "cuda", "mps")



def _available(kind: str) -> bool:
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    return False


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """Return the device to compute on.

    ``requested`` (or ``$COMPANION_DEVICE``) may be ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"mps"``;
    ``None``/``"auto"`` picks CUDA, then MPS, then CPU. A device that is not present raises
    :class:`DeviceError` naming it and the devices that are.
    """
    source = "argument"
    if requested is None or str(requested) == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            requested, source = env, f"${ENV_VAR}"
    if requested is None or str(requested) == "auto":
        for kind in ("cuda", "mps"):
            if _available(kind):
                return torch.device(kind)
        return torch.device("cpu")
    text = str(requested)
    kind = text.split(":")[0]
    if kind not in VALID_DEVICES:
        raise DeviceError(
            f"unknown device {text!r} (from {source}); valid choices: auto, {', '.join(VALID_DEVICES)}"
        )
    if not _available(kind):
        present = ", ".join(k for k in VALID_DEVICES if _available(k))
        raise DeviceError(
            f"device {text!r} (from {source}) is not available on this machine; available: {present}. "
            f"Unset {ENV_VAR} or pass device='auto'."
        )
    dev = torch.device(text)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device {text!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return dev


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (an int >= 0)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(shape, seed_or_generator, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the CPU (device-independent), then moved to ``device``."""
    g = seed_or_generator if isinstance(seed_or_generator, torch.Generator) else generator(seed_or_generator)
    x = torch.randn(tuple(shape), generator=g, dtype=torch.float32)
    return x.to(device=device or "cpu", dtype=dtype)


def describe(device: str | torch.device | None = None) -> dict:
    """Facts about the compute environment, for ``companion info``: the chosen device, threads and accelerators."""
    dev = pick_device(device)
    return {
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
        "accelerators": accelerators(),
        "torch_cuda": torch.version.cuda,  # the CUDA runtime torch was built with; None for a CPU-only build
        "nvidia_driver": nvidia_driver(),
        "cuda_driver": cuda_driver_version(),
    }


def accelerators() -> list[dict]:
    """One row per accelerator torch can use: name, memory in bytes and (CUDA) compute capability; empty on CPU."""
    rows = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append({"device": f"cuda:{i}", "name": p.name, "memory_bytes": int(p.total_memory),
                         "compute_capability": f"{p.major}.{p.minor}"})
    elif _available("mps"):
        # MPS shares the machine's memory; what Metal recommends as this process's working set is the useful limit
        rows.append({"device": "mps", "name": "Apple GPU (MPS)", "memory_bytes": int(torch.mps.recommended_max_memory()),
                     "compute_capability": None})
    return rows


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version (e.g. ``550.54.15``), or None without one. torch does not report it; NVML, which
    ships with the driver, does (and Linux's ``/proc/driver/nvidia/version`` where NVML cannot be loaded)."""
    try:
        import ctypes

        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() == 0:
            buf = ctypes.create_string_buffer(96)
            ok = nvml.nvmlSystemGetDriverVersion(buf, ctypes.c_uint(96)) == 0
            nvml.nvmlShutdown()
            if ok and buf.value:
                return buf.value.decode()
    except (OSError, AttributeError):  # no driver installed, or not Linux
        pass
    try:
        with open("/proc/driver/nvidia/version") as f:
            m = re.search(r"Kernel Module\s+([0-9][0-9.]*)", f.read())
        return m.group(1) if m else None
    except OSError:
        return None


def cuda_driver_version() -> str | None:
    """The newest CUDA version the installed driver supports (``cuDriverGetVersion``, e.g. ``12.4``), or None.
    A torch built for a newer CUDA runtime than this cannot use the GPU."""
    try:
        import ctypes

        v = ctypes.c_int(0)
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(v)) == 0 and v.value > 0:
            return f"{v.value // 1000}.{v.value % 1000 // 10}"
    except (OSError, AttributeError):
        pass
    return None


def accelerator_summary(info: dict) -> str:
    """One line for ``companion info``: each accelerator's name and memory with the driver and CUDA versions, or
    ``none: CPU only`` and why (a CPU-only torch build, or a CUDA build that sees no GPU)."""
    rows = info["accelerators"]
    if not rows:
        why = ("torch is a CPU-only build" if info["torch_cuda"] is None
               else f"torch is built for CUDA {info['torch_cuda']} but sees no GPU (driver: {info['nvidia_driver'] or 'none found'})")
        return f"none: CPU only ({why})"
    parts = [f"{r['device']} {r['name']}, {r['memory_bytes'] / 2**30:.1f} GiB"
             + (f", compute capability {r['compute_capability']}" if r["compute_capability"] else "") for r in rows]
    if rows[0]["device"].startswith("cuda"):
        parts.append(f"driver {info['nvidia_driver'] or 'unknown'} (supports CUDA {info['cuda_driver'] or 'unknown'}), "
                     f"torch built with CUDA {info['torch_cuda']}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------- CPU threads
_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t (OpenMP 5.0): free the calling thread's pool; state is rebuilt on demand
_omp_pause = None


def _gnu_openmp():
    """``omp_pause_resource_all`` of the GNU OpenMP runtime torch loaded into this process, or None."""
    global _omp_pause
    if _omp_pause is None:
        _omp_pause = False
        try:
            import ctypes

            with open("/proc/self/maps") as f:
                paths = {line.split()[-1] for line in f if "libgomp" in line and line.rstrip().endswith(".so.1")}
            for path in sorted(paths):
                fn = getattr(ctypes.CDLL(path), "omp_pause_resource_all", None)
                if fn is not None:
                    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
                    _omp_pause = fn
                    break
        except (OSError, AttributeError):  # not Linux, or no GNU OpenMP runtime: nothing to release
            pass
    return _omp_pause or None


def release_cpu_threads() -> bool:
    """Let the calling thread's idle OpenMP worker threads exit (they are recreated on its next parallel op).

    Why: on a machine with few cores, GNU OpenMP (the runtime of the CPU builds of torch) stops spin-waiting
    between parallel regions as soon as it manages more threads than there are CPUs; every operator then pays a
    sleep/wake-up. Two threads that both ran torch (a notebook's kernel thread and a panel's worker) keep two
    pools alive, which is enough on 2 CPUs: the network ran about 1.5x slower on the worker than on the kernel
    thread. A thread that hands work to another calls this first. Returns False where there is nothing to
    release (another OpenMP runtime, another OS); a no-op inside a parallel region.
    """
    fn = _gnu_openmp()
    return bool(fn is not None and fn(_OMP_PAUSE_SOFT) == 0)


THREADS_ENV = "COMPANION_THREADS"


def cpu_idle_fraction(interval: float = 0.15) -> float | None:
    """Fraction of all CPUs' time that was idle over ``interval`` seconds (``/proc/stat``; None elsewhere)."""
    def snapshot():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return fields[3] + (fields[4] if len(fields) > 4 else 0), sum(fields)  # idle + iowait, total

    try:
        idle0, total0 = snapshot()
        time.sleep(interval)
        idle1, total1 = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    return (idle1 - idle0) / (total1 - total0) if total1 > total0 else None


def fit_threads(interval: float = 0.15) -> int:
    """Size torch's intra-op threads to the CPUs that are free now, and return the number chosen.

    Why: a torch process that asks for every core while another process is busy does not get a fair share, it
    collapses — on a 2-core machine a 2-thread sampling run took 5.7x as long beside one busy neighbour, where
    fair sharing would give about 2x — because OpenMP's threads wait on each other across a core they do not
    have. So a free core gets a thread and a busy one does not (at least one). ``$COMPANION_THREADS`` fixes the
    number instead, and an explicit ``$OMP_NUM_THREADS`` is left as it is. Called once when the companion is
    imported; chapters may call it again.
    """
    env = os.environ.get(THREADS_ENV)
    if not env and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()  # the user (or a harness) chose already
    if env:
        try:
            n = int(env)
            if n < 1:
                raise ValueError
        except ValueError:
            raise DeviceError(f"${THREADS_ENV} must be a positive int (torch threads), got {env!r}") from None
        torch.set_num_threads(n)
        return n
    total = os.cpu_count() or 1
    idle = cpu_idle_fraction(interval)
    if idle is None:
        return torch.get_num_threads()
    n = max(1, min(total, round(idle * total)))  # this process is idle while it measures: the busy cores are others'
    torch.set_num_threads(n)
    return n


# On a CPU a convolutional network runs fastest on calls whose activations fit the caches. On the 2-core machine,
# sampling 256 images of the 32x32 shapes UNet (DDIM-20) took about half the time when each network call saw 19-20
# images instead of all 256, and the feature network's pass over 5000 shapes a third (benchmarks/network_batch.py,
# benchmarks/results/network_batch.json). So a batch larger than CPU_CALL_ELEMENTS input elements is passed to a
# network in slices of at most that size (21 RGB images of 32x32, 256 digits of 16x16). Every sample is computed as
# it would be alone; only the batch size the kernels see changes.
CPU_CALL_ELEMENTS = 2 ** 16


def network_slices(n: int, per_sample: int, device: torch.device, limit: int | None = None) -> list[slice]:
    """How a batch of ``n`` samples of ``per_sample`` elements is split into network calls on ``device``:
    one call on an accelerator, slices of at most ``limit`` (default :data:`CPU_CALL_ELEMENTS`) elements on a CPU,
    near-equal in size (so 256 samples of 21 go as 13 calls of 19-20, not 12 of 21 and one of 4)."""
    limit = CPU_CALL_ELEMENTS if limit is None else int(limit)
    if device.type != "cpu" or n * per_sample <= limit:
        return [slice(0, n)]
    calls = math.ceil(n / max(1, limit // per_sample))
    edges = [round(i * n / calls) for i in range(calls + 1)]
    return [slice(a, b) for a, b in zip(edges, edges[1:])]


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def signals_interrupt():
    """While inside: Ctrl-C, SIGTERM and SIGHUP raise KeyboardInterrupt (named by the signal) in the main thread, so
    training saves its checkpoint and a command stops what it started on the way out; the previous handlers come back
    afterwards. Only the main thread can install signal handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    saved = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
