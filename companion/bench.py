"""Speed/quality sweeps with an on-disk cache and Pareto fronts (``companion bench``, in :mod:`companion.cli`, runs them).

:func:`sweep` runs every combination of sampler x steps x guidance x mode x seed through
:func:`companion.sampling.sample`, measures each run (NFE, wall/network/overhead time, FLOPs per sample,
peak memory, and quality metrics with intervals) and returns a tidy table, one row a run.

Each finished run is written to ``cache_dir`` (default: :func:`default_cache_dir`; ``False`` turns it off) at once (atomic: temporary file, then ``os.replace``), keyed
by a digest of the full configuration, the model's fingerprint and the metric/bench versions. A rerun reads the
rows back instantly; an interrupted sweep keeps every run it finished; a cache entry that cannot be read
back is reported (a warning naming the file) and recomputed.

Two keys per run: ``cache_key`` (everything, the host included: a row's timings are only valid there) and
``quality_key`` (what changes the samples and their metrics: weights as in memory, sampler configuration, seeds,
feature network, device kind and name, dtype, library versions). Rows of one ``quality_key`` from different hosts must
agree on every quality column; :func:`merge_caches` checks that when caches of several machines are combined.
Sweeps over several processes, GPUs or machines are in :mod:`companion.sharding`.

Measurement and its analysis only (tables, Pareto fronts): figures and the HTML report of a sweep are
drawn by :mod:`companion.plots`, which imports this module, never the other way round.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import threading
import uuid
import warnings
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from . import metrics as M
from .device import randn
from .errors import ModelError
from .features import default_feature_net_name, load_feature_net
from .models import feature_space_for, load
from .provenance import device_identity, machine, model_dtype, model_fingerprint, tensor_digest, versions
from .reference import reference
from .samplers import get as get_sampler
from .sampling import sample
from .errors import CacheWarning  # noqa: F401  (raised here; defined with the others)

BENCH_VERSION = "5"  # bump when a row's definition changes: old cache entries are then not reused
# ode_distance is opt-in: its reference is a DOP853 solve costing hundreds of network evaluations per seed.
DEFAULT_METRICS = ("fd", "prdc", "class_accuracy")
# clip_score is opt-in too: text-to-image pipelines only, scored against the run's prompt by a CLIP (the hub extra)
ALL_METRICS = (*M.IMAGE_METRICS, "ode_distance", "clip_score")
DEFAULT_N_SAMPLES = 256
DEFAULT_N_ODE = 64  # samples whose reference ODE solution is solved (the expensive part of ode_distance)
CONFIG_COLUMNS = ("model", "sampler", "steps", "guidance", "mode", "seed", "n_samples")
DEVICE_COLUMNS = ("device_kind", "device_name", "dtype")
# Parts of a run's configuration that change its timings but not its samples: left out of the quality key.
TIMING_ONLY = ("machine",)
# Metrics where a larger value is better; every other metric (fd, kid, ode_distance, ...) is lower-better.
HIGHER_IS_BETTER = frozenset({"precision", "recall", "density", "coverage", "class_accuracy", "log_likelihood",
                              "clip_score"})



# --------------------------------------------------------------------------------------------- configuration
def mode_label(mode: Mapping) -> str:
    """A short, stable label for a dict of extra ``sample`` arguments ("default" when empty)."""
    if not mode:
        return "default"
    return ",".join(f"{k}={mode[k]}" for k in sorted(mode))


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, torch.Tensor):
        return v.tolist()
    return v


def quality_space(model, metrics: Sequence[str], feature: str | None, reference_images=None) -> str | None:
    """The feature network a sweep's image metrics use (None without image metrics).

    Without ``reference_images`` (real images of the model's data) only the space trained on the model's own data
    is allowed (:func:`companion.models.feature_space_for`): a model from the Hub or a pipeline is refused rather
    than scored against the companion's data. With them, samples and real images meet in ``feature`` (default: by channel count).
    ``ode_distance`` is refused on text-to-image pipelines: its reference solver passes no prompt and integrates
    the variance-preserving ODE only.
    """
    if "ode_distance" in metrics and getattr(model, "text_conditional", False):
        raise ModelError(f"ode_distance is not available for pipeline model {getattr(model, 'name', '')!r}: the reference "
                         f"ODE solver carries no text conditioning (nor a flow-matching schedule); drop it from metrics")
    if not any(m in M.IMAGE_METRICS for m in metrics):
        return None
    if reference_images is None:
        return feature_space_for(model, feature)
    c = int(model.image_shape[0])
    if not torch.is_tensor(reference_images) or reference_images.ndim != 4 or reference_images.shape[1] != c:
        got = tuple(reference_images.shape) if torch.is_tensor(reference_images) else type(reference_images).__name__
        raise ValueError(f"reference_images must be real images of the model's data, a tensor (N, {c}, H, W) in [-1, 1]; "
                         f"got {got}")
    return feature or default_feature_net_name(model.image_shape)


def check_clip_score(model, metrics: Sequence[str], mode: Mapping) -> None:
    """``clip_score`` scores each image against the prompt it was drawn for: it needs a text-to-image model and a
    prompt in the run's mode."""
    if "clip_score" not in metrics:
        return
    if not getattr(model, "text_conditional", False):
        raise ModelError(f"clip_score needs a text-to-image model; {getattr(model, 'name', 'model')!r} takes no prompt. "
                         f"Image metrics for it: {', '.join(M.IMAGE_METRICS)}")
    if not isinstance(dict(mode).get("prompt"), str) or not dict(mode)["prompt"].strip():
        raise ValueError(f"clip_score scores images against their prompt: give one in the mode, e.g. "
                         f"modes=({{'prompt': 'a red car'}},); got mode {dict(mode)!r}")


def run_config(model, sampler: str, steps: int, guidance, mode: Mapping, seed: int, n_samples: int,
               metrics: Sequence[str], feature: str | None, n_ode: int, reference_images=None, clip=None) -> dict:
    """Everything a run's result depends on: the cache key is a digest of this.

    The model enters as its fingerprint as it is in memory (weights, class, schedule, speed wrapper), not the
    sha256 it was loaded with, so a model changed in place or wrapped with speed options is a new model; the
    feature network the image metrics use enters the same way, and a reference image set by its digest; library
    versions and the companion's own source digest, the device (kind and name) and dtype the model computes in, and
    the host (rows hold timings; :data:`TIMING_ONLY`) complete it. With ``clip_score``, the CLIP that scores enters by
    its fingerprint too (``clip``: a Hub id, folder or loaded pair; default :data:`companion.metrics.CLIP_DEFAULT`).
    """
    feature_name = quality_space(model, metrics, feature, reference_images)
    check_clip_score(model, metrics, mode)
    config = {
        "model": getattr(model, "name", "model"),
        "model_fingerprint": model_fingerprint(model),
        **device_identity(getattr(model, "device", "cpu")),
        "dtype": model_dtype(model),
        "sampler": sampler,
        "steps": int(steps),
        "guidance": None if guidance is None else float(guidance),
        "mode": {k: _jsonable(v) for k, v in sorted(dict(mode).items())},
        "seed": int(seed),
        "n_samples": int(n_samples),
        "metrics": sorted(metrics),
        "feature": feature,
        "feature_fingerprint": model_fingerprint(load_feature_net(feature_name)) if feature_name else None,
        "n_ode": int(n_ode),
        "bench_version": BENCH_VERSION,
        "metrics_version": M.METRICS_VERSION,
        "versions": versions(),
        "machine": machine(),
    }
    if reference_images is not None:  # only then: the keys of runs without one stay what they were
        config["reference"] = tensor_digest(reference_images)
    if "clip_score" in metrics:
        clip_model = M.clip_pair(clip or M.CLIP_DEFAULT)[0]
        config["clip"] = {"name": clip_name(clip), "fingerprint": model_fingerprint(clip_model)}
    return config


def clip_name(clip) -> str:
    if clip is None:
        return M.CLIP_DEFAULT
    return str(clip) if not isinstance(clip, tuple) else (getattr(clip[0], "name_or_path", "") or type(clip[0]).__name__)


def cache_key(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:32]


def quality_key(config: dict) -> str:
    """Digest of what changes a run's samples and metrics (the configuration without :data:`TIMING_ONLY`): rows
    of one quality key agree on every quality column on whatever host they were made."""
    return cache_key({k: v for k, v in config.items() if k not in TIMING_ONLY})


# --------------------------------------------------------------------------------------------- cache
CACHE_ENV = "COMPANION_CACHE"


def default_cache_dir() -> Path:
    """Where sweeps are cached unless told otherwise: ``$COMPANION_CACHE/sweeps`` or ``~/.cache/companion/sweeps``.

    Shared by every chapter on this machine, so a later chapter (or a rerun) reads the runs an earlier one made.
    """
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "companion") / "sweeps"


class RunCache:
    """One JSON file per finished run: ``<key>.json`` holding the configuration and the row.

    ``folder=None`` means the default cache (:func:`default_cache_dir`); ``folder=False`` turns caching off.
    """

    def __init__(self, folder: str | Path | None | bool):
        if folder is None:
            folder = default_cache_dir()
        self.folder = Path(folder) if folder is not False else None
        if self.folder is not None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                raise ValueError(f"cache folder {self.folder} exists and is not a folder; give a folder or False (no cache)") from None
            except OSError as e:  # read-only parent: still read what is there, never write
                warnings.warn(f"cannot create cache folder {self.folder} ({e}); runs will not be cached", CacheWarning, stacklevel=2)

    def path(self, key: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}.json"

    def get(self, key: str, config: dict) -> dict | None:
        """The cached row, or None when absent; an unreadable or mismatching entry warns and returns None."""
        p = self.path(key)
        if p is None or not p.exists():
            return None
        try:
            entry = json.loads(p.read_text())
            if entry.get("config") != json.loads(json.dumps(config, default=str)):
                raise ValueError("its configuration does not match its key")
            row = entry["row"]
            if not isinstance(row, dict) or "nfe" not in row:
                raise ValueError("it holds no result row")
            return row
        except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            warnings.warn(f"corrupted cache entry {p} ({type(e).__name__}: {e}); recomputing it", CacheWarning, stacklevel=3)
            return None

    def put(self, key: str, config: dict, row: dict) -> None:
        """Store a finished run. A folder that cannot be written (read-only, full) warns and keeps going: the
        sweep's results are returned all the same, only not kept for next time."""
        p = self.path(key)
        if p is None:
            return
        # unique per process *and* thread: two sweeps of one grid in one kernel may write the same key at once
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            tmp.write_text(json.dumps({"config": config, "row": row}, indent=1, default=str))  # row keeps its column order
            os.replace(tmp, p)  # atomic: a reader sees the old entry or the whole new one, never half
        except OSError as e:
            warnings.warn(f"could not write cache entry {p} ({type(e).__name__}: {e}); this run is not cached",
                          CacheWarning, stacklevel=3)
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass


class CacheConflictError(ValueError):
    """Two sweep caches disagree about one run: merging them would put two different answers under one name."""


QUALITY_NAMES = ("fd", "kid", "kid_normalised", "precision", "recall", "density", "coverage", "class_accuracy",
                 "ode_distance", "out_of_range_fraction", "clip_score")


def _cache_folder(folder: Path) -> Path:
    """A sweep cache folder, or the ``cache`` folder inside a ``companion bench`` output folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder; give sweep cache folders (or `companion bench --out` folders)")
    if not any(folder.glob("*.json")) and (folder / "cache").is_dir():
        return folder / "cache"
    return folder


def _differing_fields(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def merge_caches(folders: Sequence[str | Path], out: str | Path) -> pd.DataFrame:
    """Combine the sweep caches of several machines (or ranks) into ``out``; returns the table of all their rows.

    Rows from different devices or hosts are all kept (each names its device). Refused, with a
    :class:`CacheConflictError` naming the field and both files, before anything is written: an entry whose
    configuration no longer digests to its key (edited); one ``quality_key`` with different quality values (the
    samples were meant to be identical); one run (model, sampler, steps, guidance, mode, seed, n_samples, metrics on
    one device kind and name and dtype) under keys that differ in anything but the host, e.g. two different weights
    that share a model name: the CSV could not tell them apart.
    """
    found: list[tuple[Path, dict, dict]] = []
    for folder in folders:
        src = _cache_folder(folder)
        for f in sorted(src.glob("*.json")):
            try:
                entry = json.loads(f.read_text())
                config, row = entry["config"], entry["row"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"cannot read cache entry {f} ({type(e).__name__}: {e}); remove it or rerun the sweep that wrote it") from None
            if not isinstance(config, dict) or not isinstance(row, dict) or "nfe" not in row:
                continue  # not a sweep row (e.g. a reference solution kept in the same folder)
            if cache_key(config) != f.stem:
                raise CacheConflictError(f"{f}: its configuration does not match its key {f.stem}; the entry was edited")
            found.append((f, config, row))
    # same key: same configuration by construction (the key is its digest); checked with the quality key below
    by_quality: dict[str, tuple[Path, dict]] = {}
    by_run: dict[tuple, tuple[Path, dict]] = {}
    for f, config, row in found:
        q = quality_key(config)
        if q in by_quality:
            g, other = by_quality[q]
            bad = [c for c in QUALITY_NAMES if (c in row or c in other) and not _same_value(row.get(c), other.get(c))]
            if bad:
                raise CacheConflictError(f"{g} and {f} sampled the same thing (quality key {q}) but disagree on "
                                         f"{', '.join(bad)}: the samples were not reproducible across these hosts")
        by_quality.setdefault(q, (f, row))
        run = tuple(json.dumps(config.get(c), sort_keys=True, default=str)
                    for c in ("model", "sampler", "steps", "guidance", "mode", "seed", "n_samples", "metrics", *DEVICE_COLUMNS))
        if run in by_run:
            g, other = by_run[run]
            fields = [k for k in _differing_fields(other, config) if k not in TIMING_ONLY]
            if fields:
                raise CacheConflictError(f"{g} and {f} are the same run of model {config.get('model')!r} on "
                                         f"{config.get('device_name')} but their keys differ in {', '.join(fields)}; "
                                         f"rename one model or rerun both sweeps with the same code and weights")
        by_run.setdefault(run, (f, config))
    target = RunCache(out)
    if target.folder is None:
        raise ValueError("merge needs an output folder")
    rows, seen = [], set()
    for f, config, row in found:
        key = f.stem
        if key in seen:
            continue  # the same run on the same host, copied into two caches
        seen.add(key)
        if target.path(key).resolve() != f.resolve():
            target.put(key, config, row)
        rows.append(dict(row, cached=True, cache_key=key, quality_key=quality_key(config)))
    return pd.DataFrame(rows)


def _same_value(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return a == b


# --------------------------------------------------------------------------------------------- measuring
_FLOPS: dict[tuple, int] = {}


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter():
    """torch's ``FlopCounterMode`` (no printout) that also counts the fused attention kernel used on CPUs.

    torch's formula table covers the CUDA attention kernels but not ``_scaled_dot_product_flash_attention_for_cpu``,
    so on a CPU every self-attention layer's QK^T and softmax-V products would count as zero FLOPs.
    """
    from torch.utils.flop_counter import FlopCounterMode

    extra = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        extra[op] = _cpu_sdpa_flops
    return FlopCounterMode(display=False, custom_mapping=extra)


def example_inputs(model, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(x_t, t, keyword arguments) for one ``predict_noise`` call on ``batch`` samples: zeros at t = 500, class 0,
    and a zero low-resolution image for a super-resolution stage."""
    dev = model.device
    kw = {}
    if getattr(model, "conditional", False):
        kw["class_labels"] = torch.zeros(batch, dtype=torch.long, device=dev)
    if getattr(model, "cond_shape", None):
        kw["cond"] = torch.zeros(batch, *model.cond_shape, device=dev)
    return torch.zeros(batch, *model.sample_shape, device=dev), torch.full((batch,), 500, device=dev), kw


def flops_per_eval(model) -> int:
    """Floating-point operations of one network evaluation for one sample (torch's FlopCounterMode)."""
    key = (model.sha256, tuple(model.sample_shape))
    if key not in _FLOPS:
        x, t, kw = example_inputs(model)
        counter = flop_counter()
        with torch.no_grad(), counter:
            model.predict_noise(x, t, **kw)
        _FLOPS[key] = int(counter.get_total_flops())
    return _FLOPS[key]


def decode_flops(model) -> int:
    """FLOPs to decode one sample (latent models; 0 for pixel models)."""
    if not getattr(model, "is_latent", False):
        return 0
    key = ("decode", model.sha256)
    if key not in _FLOPS:
        counter = flop_counter()
        with torch.no_grad(), counter:
            model.decode(torch.zeros(1, *model.sample_shape, device=model.device))
        _FLOPS[key] = int(counter.get_total_flops())
    return _FLOPS[key]


def class_labels_for(model, n: int) -> torch.Tensor | None:
    """Balanced class labels (0, 1, ..., K-1, 0, ...) for a class-conditional model, else None."""
    if not getattr(model, "conditional", False):
        return None
    return torch.arange(n) % int(model.num_classes)


def _reference_solution(model, x_T, class_labels, guidance, cache: RunCache) -> torch.Tensor:
    """The reference ODE solution from ``x_T`` (DOP853 to the data end, rtol 1e-6), shared by every deterministic
    sampler of one seed: from :mod:`companion.reference`'s cache, kept on disk in the sweep's cache folder."""
    return reference(model, x_T, class_labels=class_labels, guidance=guidance, rtol=1e-6, atol=1e-6,
                     folder=cache.folder).float()


def initial_noise(model, n: int, seed: int) -> torch.Tensor:
    """The x_T that :func:`companion.sampling.sample` draws for ``seed`` (unit-variance, VP scaling)."""

    return randn((n, *model.sample_shape), seed)


def measure_run(model, sampler: str, steps: int, guidance, mode: Mapping, seed: int, n_samples: int,
                metrics: Sequence[str], feature: str | None, n_ode: int, cache: RunCache, config: dict,
                reference_images=None, clip=None) -> dict:
    """Sample once and measure everything: one row of the sweep table."""

    labels = class_labels_for(model, n_samples)
    res = sample(model, sampler=sampler, steps=steps, guidance=guidance, seed=seed, batch=n_samples,
                 class_labels=labels, **dict(mode))
    rec = res.record
    row = {
        "model": config["model"], "sampler": sampler, "steps": int(steps), "guidance": config["guidance"],
        "mode": mode_label(mode), "seed": int(seed), "n_samples": int(n_samples),
        **{c: config[c] for c in DEVICE_COLUMNS}, "host": platform.node(),
        "nfe": int(rec.nfe), "wall_s": float(rec.wall_s), "network_s": float(rec.network_s),
        "overhead_s": float(rec.overhead_s), "peak_mem_bytes": int(rec.peak_mem_bytes or 0),
        "stochastic": bool(rec.stochastic), "scheduler_class": rec.scheduler_class,
        "flops_per_sample": int(rec.nfe) * flops_per_eval(model) + decode_flops(model),
    }
    image_metrics = [m for m in metrics if m in M.IMAGE_METRICS]
    if image_metrics:
        # images are judged as a reader sees them: clamped to the data range [-1, 1], as diffusers' pipelines do
        # before display (a few wild pixels of an undertrained model would otherwise dominate the FD)
        space = quality_space(model, metrics, feature, reference_images)
        against = {"reference": reference_images} if reference_images is not None else {}
        found = M.evaluate_images(res.images.clamp(-1, 1), labels, metrics=image_metrics, feature=space, seed=seed, **against)
        row["out_of_range_fraction"] = float((res.images.abs() > 1.0).float().mean())
        row.update(M.as_columns(found))
    if "ode_distance" in metrics:
        stochastic = bool(rec.stochastic) or get_sampler(sampler).stochastic or bool(dict(mode).get("eta"))
        if stochastic:
            row["ode_distance"] = float("nan")  # undefined: the sampler does not approximate the ODE
        else:
            k = min(n_ode, n_samples)
            x_T = initial_noise(model, n_samples, seed)[:k]
            ref = _reference_solution(model, x_T, None if labels is None else labels[:k], guidance, cache)
            row.update(M.as_columns({"ode_distance": M.ode_distance(res.samples[:k], ref, seed=seed)}))
    if "clip_score" in metrics:  # as a reader sees the images: clamped to [-1, 1], then 8 bits
        score = M.clip_score(res.images.clamp(-1, 1), dict(mode)["prompt"], clip=M.clip_pair(clip or M.CLIP_DEFAULT), seed=seed)
        row.update(M.as_columns({"clip_score": score}))
        row["clip"] = config["clip"]["name"]
    return row


# --------------------------------------------------------------------------------------------- sweeps
def _check_metrics(metrics) -> tuple[str, ...]:
    metrics = tuple(metrics)
    bad = [m for m in metrics if m not in ALL_METRICS]
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; valid: {', '.join(ALL_METRICS)}")
    return metrics


def check_grid(samplers: Sequence[str], steps: Sequence[int], guidance=(None,), modes=({},), seeds=(0,), *,
               n_samples: int = DEFAULT_N_SAMPLES, metrics=DEFAULT_METRICS) -> tuple:
    """Validate a sweep's axes before any work; returns ``(samplers, steps, guidance, modes, seeds, metrics)`` as tuples."""
    if isinstance(samplers, str) or isinstance(steps, int):
        raise TypeError("samplers and steps must be sequences, e.g. samplers=['ddim'], steps=[10, 20]")
    for s in samplers:
        get_sampler(s)  # unknown names fail before any work, listing the valid ones
    for n in steps:
        if int(n) < 1:
            raise ValueError(f"steps must be positive integers, got {n}")
    metrics = _check_metrics(metrics)
    if guidance is None or isinstance(guidance, (int, float)):
        guidance = (guidance,)
    if isinstance(modes, Mapping):
        modes = (modes,)
    if isinstance(seeds, int):
        seeds = (seeds,)
    for m in metrics:  # fail before sampling anything
        M.require_samples(n_samples, "prdc" if m == "prdc" else m)
    return tuple(samplers), tuple(steps), tuple(guidance), tuple(modes), tuple(seeds), metrics


def run_one(model, sampler: str, steps: int, guidance, mode: Mapping, seed: int, *, n_samples: int, metrics,
            feature: str | None, n_ode: int, cache: RunCache, reference_images=None, clip=None) -> dict:
    """One run of a sweep: its row from ``cache`` when there, else measured and stored at once. The row carries
    ``cached``, ``cache_key`` and ``quality_key``."""
    config = run_config(model, sampler, steps, guidance, mode, seed, n_samples, metrics, feature, n_ode, reference_images,
                        clip)
    key = cache_key(config)
    row = cache.get(key, config)
    cached = row is not None
    if not cached:
        row = measure_run(model, sampler, steps, guidance, mode, seed, n_samples, metrics, feature, n_ode, cache, config,
                          reference_images, clip)
        cache.put(key, config, row)
    return dict(row, cached=cached, cache_key=key, quality_key=quality_key(config))


def iter_sweep(model, samplers: Sequence[str], steps: Sequence[int], guidance=(None,), modes=({},), seeds=(0,), *,
               n_samples: int = DEFAULT_N_SAMPLES, metrics=DEFAULT_METRICS, feature: str | None = None,
               cache_dir: str | Path | None = None, n_ode: int = DEFAULT_N_ODE, progress: bool = True,
               on_result: Callable[[dict], None] | None = None, reference_images=None, clip=None) -> Iterator[dict]:
    """Yield one result row per run as it finishes (cached runs first appear instantly)."""
    from tqdm.auto import tqdm

    if isinstance(model, str):
        model = load(model)
    samplers, steps, guidance, modes, seeds, metrics = check_grid(samplers, steps, guidance, modes, seeds,
                                                                  n_samples=n_samples, metrics=metrics)
    quality_space(model, metrics, feature, reference_images)
    for mode in modes:
        check_clip_score(model, metrics, mode)
    cache = RunCache(cache_dir)
    grid = list(itertools.product(samplers, steps, guidance, modes, seeds))
    bar = tqdm(grid, desc=f"sweep {getattr(model, 'name', '')}", disable=not progress, unit="run")
    for sampler, n, g, mode, seed in bar:
        bar.set_postfix_str(f"{sampler} {n} steps", refresh=False)
        row = run_one(model, sampler, n, g, mode, seed, n_samples=n_samples, metrics=metrics, feature=feature,
                      n_ode=n_ode, cache=cache, reference_images=reference_images, clip=clip)
        if on_result is not None:
            on_result(row)
        yield row


def sweep(model, samplers: Sequence[str], steps: Sequence[int], guidance=(None,), modes=({},), seeds=(0,), *,
          n_samples: int = DEFAULT_N_SAMPLES, metrics=DEFAULT_METRICS, feature: str | None = None,
          cache_dir: str | Path | None = None, n_ode: int = DEFAULT_N_ODE, progress: bool = True,
          on_result: Callable[[dict], None] | None = None, reference_images=None, clip=None) -> pd.DataFrame:
    """Run (or read from the cache) every sampler x steps x guidance x mode x seed; one table row per run.

    ``model``: a loaded model or a bundled name. ``modes``: dicts of extra keyword arguments for ``sample``
    (e.g. ``{"spacing": "karras"}``), labelled in the ``mode`` column. ``metrics``: any of
    ``fd, kid, prdc, class_accuracy, ode_distance`` (each with ``_low``, ``_high``, ``_n`` columns;
    ``ode_distance`` is NaN for stochastic samplers and measures from the training schedule's first timestep,
    so a spacing that starts later counts as error). ``on_result(row)`` is called as each run finishes.
    Image metrics are measured in the feature space trained on the model's own data; a model from the Hub or a
    pipeline has none and is refused unless ``reference_images`` (real images of its data, (N, C, H, W) in [-1, 1]) is
    given, against which it is then scored in ``feature`` (:func:`quality_space`). A pipeline's prompt goes in a
    mode: ``modes=({"prompt": "a red car"},)``; ``clip_score`` (opt-in) scores its images against that prompt with
    ``clip`` (a Hub id, folder or loaded ``(model, processor)``; default :data:`companion.metrics.CLIP_DEFAULT`).
    """
    rows = list(iter_sweep(model, samplers, steps, guidance, modes, seeds, n_samples=n_samples, metrics=metrics,
                           feature=feature, cache_dir=cache_dir, n_ode=n_ode, progress=progress, on_result=on_result,
                           reference_images=reference_images, clip=clip))
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------- tables and Pareto fronts
def quality_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in ("fd", "kid", "precision", "recall", "density", "coverage", "class_accuracy", "ode_distance",
                        "clip_score")
            if c in df.columns and df[c].notna().any()]


def run_labels(df: pd.DataFrame) -> pd.Series:
    """One curve label per sampler, extended by model/device/mode/guidance/seed only where those vary in the table."""
    label = df["sampler"].astype(str)
    for col in ("model", "device_name", "mode", "guidance", "seed"):
        if col in df.columns and df[col].nunique(dropna=False) > 1:
            label = label + f" {col}=" + df[col].astype(str)
    return label


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    varying = [c for c in ("model", "device_name") if c in df.columns and df[c].nunique(dropna=False) > 1]
    cols = [c for c in (*varying, "sampler", "steps", "guidance", "mode", "seed", "nfe", "wall_s") if c in df.columns]
    out = df[cols + quality_columns(df)].copy()
    return out.sort_values([*varying, "sampler", "steps"]).reset_index(drop=True)


def pareto_mask(x: np.ndarray, y: np.ndarray, higher_is_better: bool = False) -> np.ndarray:
    """True for the points no other point beats in both (lower or equal x, better or equal y, one strictly)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    yy = -y if higher_is_better else y
    ok = np.isfinite(x) & np.isfinite(yy)
    mask = np.zeros(len(x), dtype=bool)
    best = np.inf
    # sweep by x (ties: best y first); a point is on the front when it improves on everything cheaper
    for i in np.lexsort((yy, x)):
        if ok[i] and yy[i] < best:
            mask[i] = True
            best = yy[i]
    return mask


def pareto_front(df: pd.DataFrame, x: str, y: str, higher_is_better: bool | None = None) -> pd.DataFrame:
    """The rows of ``df`` on the Pareto front of cost ``x`` (lower is better) and quality ``y``, sorted by ``x``.

    Whether larger ``y`` is better defaults to :data:`HIGHER_IS_BETTER`.
    """
    for col in (x, y):
        if col not in df.columns:
            raise ValueError(f"column {col!r} is not in the table; columns: {', '.join(map(str, df.columns))}")
    hib = (y in HIGHER_IS_BETTER) if higher_is_better is None else higher_is_better
    mask = pareto_mask(df[x].to_numpy(), df[y].to_numpy(), hib)
    return df[mask].sort_values(x)
