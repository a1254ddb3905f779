"""Sweeps and sample sets split over several processes, GPUs or machines, with Hugging Face accelerate.

The same code runs in one process or under a launcher (``accelerate launch``, ``torchrun``): every rank builds the
same grid, so no rank has to tell another what to do; ranks exchange only small objects (``gather_object``).

- :func:`distributed_sweep`: a grid of models x samplers x steps x guidance x modes x seeds. Each model's cache
  keys are worked out by one rank (model *i* by rank *i* mod world size), the runs no cache holds are dealt out in
  contiguous blocks of the model-major grid (so a rank loads each of its models once; block sizes differ by at most
  one), each rank measures its block on its own device and stores every finished run in the shared cache at once, and
  the main rank returns the whole table. A rank that dies loses only the run it was measuring: rerunning the same
  command serves the others from the cache.
- :func:`sharded_samples` / :func:`sharded_quality`: one large sample set for FD/KID/precision-recall split over
  ranks. Samples come in fixed chunks whose noise is seeded by ``(seed, chunk index)``, never by rank, so the same
  seed gives the same samples with any number of ranks; features are gathered and the metrics computed once.

A launcher must start real processes: on a machine without GPUs ``accelerate launch --cpu --num_processes N``
starts one process unless an MPI host file is given; ``accelerate launch --multi_gpu --num_processes N ... --device
cpu`` (or ``torchrun --nproc_per_node N``) starts N CPU processes that talk over gloo. :func:`check_launch` refuses
the first form rather than silently sweeping in one process.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd
import torch

from . import bench
from . import metrics as M
from .device import pick_device, randn
from .errors import DeviceError, ModelError
from .models import load
from .provenance import device_identity
from .sampling import sample

CHUNK = 64  # samples per chunk of a sharded sample set: part of what the samples are, never the number of ranks


class LaunchError(RuntimeError):
    """A launch that would not sweep as asked: a rank cannot write the cache or reach its device, or the launcher
    started fewer processes than requested."""


# --------------------------------------------------------------------------------------------- ranks
def check_launch(environ: Mapping[str, str] | None = None, parent_cmdline: str | None = None) -> None:
    """Refuse ``accelerate launch --cpu --num_processes N`` (N > 1) without an MPI host file: accelerate then starts
    one process, which would run the whole grid alone while the user believes N processes share it."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env or str(env.get("ACCELERATE_USE_CPU", "")).lower() not in ("1", "true"):
        return
    if parent_cmdline is None:
        try:
            parent_cmdline = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return  # not Linux: nothing to read the launcher's arguments from
    words = parent_cmdline.split()
    if "launch" not in words or "--mpirun_hostfile" in words:
        return
    n = None
    for i, w in enumerate(words):
        if w in ("--num_processes", "--num-processes") and i + 1 < len(words):
            n = words[i + 1]
        elif w.startswith(("--num_processes=", "--num-processes=")):
            n = w.split("=", 1)[1]
    if n is not None and n.isdigit() and int(n) > 1:
        raise LaunchError(f"`accelerate launch --cpu --num_processes {n}` started 1 process (accelerate needs "
                          f"--mpirun_hostfile for several CPU processes). For {n} CPU processes on this machine run "
                          f"`accelerate launch --multi_gpu --num_processes {n} -m companion bench ... --device cpu` "
                          f"or `torchrun --nproc_per_node {n} -m companion bench ... --device cpu`")


def state_for(device: str | None = None):
    """accelerate's ``PartialState`` for this process: CPU processes (gloo) when ``device`` is ``cpu`` or the machine
    has no CUDA device, else one GPU per process (NCCL). Without a launcher: a single process."""
    from accelerate import PartialState

    check_launch()
    cpu = (device is not None and str(device).split(":")[0] == "cpu") or not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def rank_device(state, requested: str | None) -> torch.device:
    """The device this rank computes on: ``requested`` (or ``auto``) resolved by :func:`companion.device.pick_device`;
    under a launcher an unnumbered ``cuda`` becomes this rank's own GPU."""
    dev = pick_device(requested)
    if state.num_processes > 1 and dev.type == "cuda" and (requested is None or ":" not in str(requested)):
        dev = torch.device(state.device) if torch.device(state.device).type == "cuda" else torch.device("cuda", state.local_process_index)
    return dev


def gather(state, items: list) -> list:
    """Every rank's ``items`` concatenated in rank order, on every rank (a plain list in one process)."""
    if state.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(items)


def split_evenly(items: Sequence, parts: int) -> list[list]:
    """``items`` in ``parts`` contiguous blocks whose sizes differ by at most one (the first blocks take the rest)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return out


def preflight(state, cache: bench.RunCache, requested_device: str | None) -> tuple[torch.device, list[dict]]:
    """Check on every rank, before any work, that it can write the cache and reach its device; one rank's failure
    stops all of them with the reasons of each (a launch never half-sweeps). Returns this rank's device and every
    rank's description (host, pid, device)."""
    me = {"rank": state.process_index, "host": platform.node(), "pid": os.getpid(), "error": None}
    dev = None
    try:
        dev = rank_device(state, requested_device)
        me.update(device_identity(dev), device=str(dev))
    except DeviceError as e:
        me["error"] = f"device: {e}"
    if cache.folder is not None and me["error"] is None:
        probe = cache.folder / f".probe.{platform.node()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            if not cache.folder.is_dir():
                raise OSError(f"{cache.folder} does not exist and could not be created")
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            me["error"] = f"cache folder {cache.folder} is not writable ({type(e).__name__}: {e}); give --cache-dir a folder every rank can write"
    ranks = gather(state, [me])
    bad = [r for r in ranks if r["error"]]
    if bad:
        raise LaunchError("; ".join(f"rank {r['rank']} on {r['host']}: {r['error']}" for r in bad))
    return dev, ranks


# --------------------------------------------------------------------------------------------- distributed sweeps
@dataclass(frozen=True)
class Run:
    """One cell of a sweep grid; ``index`` is its place in the model-major grid every rank builds alike."""
    index: int
    model: str
    sampler: str
    steps: int
    guidance: float | None
    mode: tuple = field(default=())
    seed: int = 0


def build_grid(models: Sequence[str], samplers, steps, guidance=(None,), modes=({},), seeds=(0,)) -> list[Run]:
    """The runs of a sweep over several models, model-major (a model's runs are contiguous)."""
    if isinstance(models, str) or not models:
        raise TypeError(f"models must be a non-empty sequence of names or folders, got {models!r}")
    if len(set(models)) != len(models):
        raise ValueError(f"models listed twice: {sorted({m for m in models if list(models).count(m) > 1})}")
    cells = itertools.product(models, samplers, steps, guidance, modes, seeds)
    return [Run(i, m, s, int(n), g, tuple(sorted(dict(mode).items())), int(seed))
            for i, (m, s, n, g, mode, seed) in enumerate(cells)]


class RankLog:
    """``rank-<i>.jsonl`` in ``folder``: one line per event (start, each run cached or computed, done), appended, so a
    rerun's log follows the interrupted one's. None writes nothing."""

    def __init__(self, folder: str | Path | None, state):
        self.path = None if folder is None else Path(folder) / f"rank-{state.process_index}.jsonl"
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.base = {"rank": state.process_index, "world": state.num_processes, "pid": os.getpid(), "host": platform.node()}

    def write(self, event: str, **kw) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as f:  # one short line per write: whole lines even if the process is killed
            f.write(json.dumps(dict(self.base, event=event, time=time.time(), **kw), default=str) + "\n")


def distributed_sweep(models: Sequence[str], samplers, steps, guidance=(None,), modes=({},), seeds=(0,), *,
                      n_samples: int = bench.DEFAULT_N_SAMPLES, metrics=bench.DEFAULT_METRICS, feature: str | None = None,
                      cache_dir: str | Path | None = None, n_ode: int = bench.DEFAULT_N_ODE, device: str | None = None,
                      log_dir: str | Path | None = None, progress: bool = True, state=None,
                      loader: Callable = load, clip=None) -> pd.DataFrame | None:
    """Sweep ``models`` x the grid over every rank of this launch; the main rank returns the table (grid order), the
    others None. In one process it is :func:`companion.bench.sweep` over several models.

    ``models``: bundled names or asset folders; ``loader(name, device=...)`` loads one (default
    :func:`companion.models.load`). ``cache_dir`` must be a folder every rank can write (a shared file system across
    machines); it is checked on every rank before any work (:func:`preflight`). ``log_dir``: where each rank appends
    its events (``rank-<i>.jsonl``: pid, device, each run cached or computed). ``clip``: the CLIP of the
    ``clip_score`` metric (:func:`companion.bench.sweep`). Each table row names the device it
    was measured on (``device_kind``, ``device_name``, ``host``) and carries ``rank``.
    """
    from tqdm.auto import tqdm

    state = state or state_for(device)
    samplers, steps, guidance, modes, seeds, metrics = bench.check_grid(samplers, steps, guidance, modes, seeds,
                                                                        n_samples=n_samples, metrics=metrics)
    grid = build_grid(list(models), samplers, steps, guidance, modes, seeds)
    if cache_dir is False:
        raise ValueError("a distributed sweep needs a cache folder (ranks share finished runs through it); give cache_dir")
    cache = bench.RunCache(cache_dir)
    dev, _ = preflight(state, cache, device)
    rank, world = state.process_index, state.num_processes
    log = RankLog(log_dir, state)
    log.write("start", device=str(dev), **device_identity(dev), runs=len(grid))
    names = list(dict.fromkeys(r.model for r in grid))
    loaded: dict[str, object] = {}

    def model_for(name: str):
        if name not in loaded:
            try:
                loaded[name] = loader(name, device=dev)
            except (ModelError, ValueError, OSError) as e:
                raise ModelError(f"rank {rank}: cannot load model {name!r}: {e}") from e
            bench.quality_space(loaded[name], metrics, feature)  # a model the metrics refuse fails before its runs
            for mode in modes:
                bench.check_clip_score(loaded[name], metrics, mode)
        return loaded[name]

    def measure(run: Run) -> dict:
        row = bench.run_one(model_for(run.model), run.sampler, run.steps, run.guidance, dict(run.mode), run.seed,
                            n_samples=n_samples, metrics=metrics, feature=feature, n_ode=n_ode, cache=cache, clip=clip)
        return dict(row, rank=rank)

    # 1. which runs are cached: model i's keys are worked out by rank i mod world (it loads that model once)
    rows: dict[int, dict] = {}
    errors: list[str] = []
    for i, name in enumerate(names):
        if i % world != rank:
            continue
        try:
            model = model_for(name)
        except (ModelError, ValueError) as e:
            errors.append(str(e))
            continue
        for run in (r for r in grid if r.model == name):
            config = bench.run_config(model, run.sampler, run.steps, run.guidance, dict(run.mode), run.seed, n_samples,
                                      metrics, feature, n_ode, clip=clip)
            key = bench.cache_key(config)
            row = cache.get(key, config)
            if row is not None:
                rows[run.index] = dict(row, cached=True, cache_key=key, quality_key=bench.quality_key(config), rank=rank)
                log.write("cached", index=run.index, key=key)
    errors = gather(state, errors)
    if errors:
        raise ModelError("; ".join(errors))
    known = set(gather(state, sorted(rows)))
    # 2. the rest in contiguous blocks of the model-major grid: a rank's models are few and each is loaded once
    pending = [r for r in grid if r.index not in known]
    share = split_evenly(pending, world)[rank]
    keep = {r.model for r in share}
    for name in [n for n in loaded if n not in keep]:
        del loaded[name]  # a model this rank only fingerprinted: free its memory before loading others
    bar = tqdm(share, desc=f"rank {rank}/{world}" if world > 1 else "sweep", disable=not progress, unit="run")
    for run in bar:
        bar.set_postfix_str(f"{run.model} {run.sampler} {run.steps} steps", refresh=False)
        t0 = time.perf_counter()
        log.write("begin", index=run.index, model=run.model, sampler=run.sampler, steps=run.steps)
        row = measure(run)
        rows[run.index] = row
        log.write("cached" if row["cached"] else "computed", index=run.index, key=row["cache_key"],
                  seconds=round(time.perf_counter() - t0, 3))
    # 3. every rank's rows to the main rank; a missing run is an error, never a shorter table
    gathered = gather(state, sorted(rows.items()))
    log.write("done", measured=len(share))
    if not state.is_main_process:
        return None
    table = dict(gathered)
    missing = [r.index for r in grid if r.index not in table]
    if missing:
        raise LaunchError(f"runs {missing} of {len(grid)} came back from no rank; nothing written")
    return pd.DataFrame([table[r.index] for r in grid])


# --------------------------------------------------------------------------------------------- sharded sample sets
def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of chunk ``chunk`` of a sample set with seed ``seed``: a digest of both (distinct for every pair,
    whatever the number of ranks)."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{int(chunk)}".encode()).digest()[:7], "big")


def chunks_of(n: int, chunk: int = CHUNK) -> list[tuple[int, int, int]]:
    """``(chunk index, start, stop)`` of ``n`` samples in chunks of ``chunk`` (the last may be shorter)."""
    if n < 1 or chunk < 1:
        raise ValueError(f"n and chunk must be positive, got n={n}, chunk={chunk}")
    return [(c, s, min(s + chunk, n)) for c, s in enumerate(range(0, n, chunk))]


def sharded_samples(model, sampler: str, steps: int, n: int, seed: int = 0, *, rank: int = 0, world: int = 1,
                    chunk: int = CHUNK, **sample_kw) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """This rank's share of ``n`` samples: ``[(chunk index, images, class labels), ...]``.

    Chunk ``c`` draws its initial noise and every later noise from seed :func:`chunk_seed` ``(seed, c)`` with a
    batch of the chunk's own size, so chunk ``c`` is the same tensor on any rank of any world size. Class labels of
    a conditional model are balanced over the whole set (sample ``i`` asks for class ``i mod K``).
    """
    mine = split_evenly(chunks_of(n, chunk), world)[rank]
    out = []
    for c, start, stop in mine:
        labels = bench.class_labels_for(model, stop)
        labels = None if labels is None else labels[start:stop]
        s = chunk_seed(seed, c)
        x_T = randn((stop - start, *model.sample_shape), s)
        res = sample(model, sampler=sampler, steps=steps, seed=s, batch=stop - start, class_labels=labels, x_T=x_T, **sample_kw)
        out.append((c, res.images.clamp(-1, 1).cpu(), labels))
    return out


def sharded_quality(model, sampler: str, steps: int, n: int, seed: int = 0, *, metrics=("fd", "prdc", "class_accuracy"),
                    feature: str | None = None, state=None, chunk: int = CHUNK, **sample_kw) -> dict | None:
    """Image metrics of ``n`` samples drawn across every rank of this launch (:func:`sharded_samples`): each rank
    extracts the features of its chunks, the main rank gathers them in chunk order and computes each metric once.
    Returns ``{"measurements": {...}, "features": tensor, "logits": tensor, "labels": tensor | None}`` on the main
    rank, None on the others."""
    if state is None:
        state = state_for(str(getattr(model, "device", "cpu")))
    metrics = tuple(metrics)
    bad = [m for m in metrics if m not in M.IMAGE_METRICS]
    if bad:
        raise ValueError(f"unknown image metric(s) {bad}; valid: {', '.join(M.IMAGE_METRICS)}")
    for m in metrics:
        M.require_samples(n, m)
    space = bench.quality_space(model, metrics, feature)
    mine = []
    for c, images, labels in sharded_samples(model, sampler, steps, n, seed, rank=state.process_index,
                                             world=state.num_processes, chunk=chunk, **sample_kw):
        feats, logits, _ = M.extract(images, space)
        mine.append((c, feats.cpu(), logits.cpu(), labels))
    parts = gather(state, mine)
    if not state.is_main_process:
        return None
    parts.sort(key=lambda p: p[0])
    if [p[0] for p in parts] != list(range(len(chunks_of(n, chunk)))):
        raise LaunchError(f"chunks {[p[0] for p in parts]} came back for {n} samples; expected each of "
                          f"{len(chunks_of(n, chunk))} once")
    feats = torch.cat([p[1] for p in parts])
    logits = torch.cat([p[2] for p in parts])
    labels = None if parts[0][3] is None else torch.cat([p[3] for p in parts])
    out = M.evaluate_features(feats, logits, space, labels, metrics=metrics, seed=seed)
    return {"measurements": out, "features": feats, "logits": logits, "labels": labels}
