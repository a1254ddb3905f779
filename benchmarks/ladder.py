"""The system ladder, measured: speed levers applied cumulatively, each rung's speed-up and how far it moves the images.

CPU (``--device cpu``, a bundled model): fp32 with classic attention -> bf16 (refused on a CPU without bf16
instructions) -> channels_last -> SDPA attention -> torch.compile -> DeepCache (full call every 2nd step) -> int8.
Every rung keeps the levers below it, except where two cannot be combined (the rung then records which lever it
drops and why). For each rung, from the same noise as the fp32 rung:

* speed: wall time of a batch, the rungs interleaved within each repeat (a busy moment of the shared machine hits
  every rung alike), reported as the ratio of medians against fp32 with a bootstrap interval
  (companion.verdicts.ratio_of_medians), plus the median and range of the wall times; load average recorded;
* image difference: RMS and max |difference| of the final images against the fp32 rung's (mean with a bootstrap
  interval over ``--n`` samples);
* FD (features-digits) with its 95 % interval on the same ``--n`` samples, and a verdict stated before the run: the
  rung keeps quality if its FD is at most 25 % worse than fp32's (non-inferiority, companion.verdicts).

GPU (``--device cuda``): the full-size SD-1.5 (512 px) and SDXL (1024 px) UNets, random weights from the published
configurations (benchmarks/pipeline_overhead.py; no network), Euler, 30 steps, classifier-free guidance (batch 2):
fp32 -> bf16 -> SDPA -> torch.compile -> fused QKV -> dynamic int8 (torchao; refused with the reason when it is
missing), the rungs of diffusers' published SDXL ladder. The network time is measured with CUDA events around each
call and one synchronisation per run (not a synchronisation per call); the image difference is taken on the final
latents.

    python benchmarks/ladder.py --device cpu --out benchmarks/results/ladder_cpu_2core
    python benchmarks/ladder.py --device cuda --time-limit 240 --out benchmarks/results/ladder_gpu
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from _machine import machine  # noqa: E402

from companion import load, sample  # noqa: E402
from companion.caching import DeepCache  # noqa: E402
from companion.errors import CompanionError  # noqa: E402
from companion.metrics import frechet_distance, mean_measurement  # noqa: E402
from companion.quantise import quantise  # noqa: E402
from companion.speed import SpeedOptions, accelerate, cpu_bf16_reason  # noqa: E402
from companion.verdicts import Rule, judge, ratio_of_medians  # noqa: E402


@dataclass(frozen=True)
class Rung:
    name: str
    speed: str  # a companion.speed label
    cache: int = 1  # DeepCache interval (1: none)
    quant: str | None = None  # a companion.quantise mode
    dropped: str = ""  # a lower lever this rung cannot keep, and why


CPU_RUNGS = (
    Rung("fp32", "fp32+classic_attention"),
    Rung("+bf16", "bf16+classic_attention"),
    Rung("+channels_last", "bf16+channels_last+classic_attention"),
    Rung("+SDPA", "bf16+channels_last"),
    Rung("+compile", "bf16+channels_last+compile"),
    Rung("+DeepCache N=2", "bf16+channels_last+compile", cache=2),
    Rung("+int8 (static)", "bf16+channels_last", cache=2, quant="int8-static",
         dropped="compile: TorchDynamo cannot trace torch.ao's int8 kernels (fake-tensor propagation: 'quantized nyi in "
                 "meta tensors'), so every fenced layer is a graph break; the rung runs eagerly"),
)


class Autocast:
    """A network-call wrapper (the ``wrap`` seam) that runs an inner wrapper under autocast and returns float32,
    as :class:`companion.speed.AcceleratedModel` does for its own calls."""

    def __init__(self, inner, dtype, device_type: str):
        self.inner, self.dtype, self.device_type = inner, dtype, device_type

    def __call__(self, network):
        call = self.inner(network)

        def run(x, t, **kw):
            with torch.autocast(self.device_type, dtype=self.dtype):
                return call(x, t, **kw).to(torch.float32).contiguous()
        return run


def build(base, rung: Rung):
    """(model, a function giving a fresh ``wrap`` per run or None) for one rung."""
    model = quantise(base, rung.quant) if rung.quant else base
    opts = SpeedOptions.from_label(rung.speed)
    acc = accelerate(model, opts)
    if rung.cache == 1:
        return acc, None
    # DeepCache splits the UNet's forward, so it runs on the prepared network (layout, attention) directly; with
    # compile, each block is compiled in place (the cache calls blocks, not the whole forward)
    plain = copy.copy(model)
    plain._modules = dict(model._modules)
    plain.unet = acc.unet
    if opts.compile:
        net = plain.unet
        for blk in (*net.down_blocks, net.mid_block, *net.up_blocks):
            if blk is not None:
                blk.compile()
    dtype = {"bf16": torch.bfloat16}.get(opts.precision)
    if dtype is None:
        return plain, lambda: DeepCache(plain, rung.cache)
    return plain, lambda: Autocast(DeepCache(plain, rung.cache), dtype, "cpu")


def run_cpu(args) -> dict:
    torch.set_num_threads(args.threads)
    at_start = machine()  # the load average before the run, not after it
    base = load(args.model)
    rungs = list(CPU_RUNGS)
    refused = []
    if (reason := cpu_bf16_reason()) is not None:
        raise SystemExit(f"the CPU ladder's bf16 rungs are refused: {reason}")
    if args.skip_compile:
        refused.append({"rung": "+compile", "reason": "--skip-compile given"})
        rungs = [Rung(r.name, r.speed.replace("+compile", ""), r.cache, r.quant, r.dropped) for r in rungs if r.name != "+compile"]
    labels_of = (lambda b: torch.arange(b) % base.num_classes) if base.num_classes else (lambda b: None)
    kw = dict(sampler=args.sampler, steps=args.steps)
    built, warm_s = {}, {}
    for r in rungs:
        t0 = time.perf_counter()
        try:
            m, wrap = build(base, r)
            sample(m, batch=args.batch, seed=99, class_labels=labels_of(args.batch), wrap=wrap() if wrap else None, **kw)
        except Exception as e:  # noqa: BLE001 - a rung that cannot run here is reported with its reason, not skipped silently
            refused.append({"rung": r.name, "reason": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"})
            print(f"{r.name}: refused: {refused[-1]['reason']}", flush=True)
            continue
        built[r.name] = (r, m, wrap)
        warm_s[r.name] = time.perf_counter() - t0
        print(f"{r.name}: ready in {warm_s[r.name]:.1f} s", flush=True)

    times = {name: [] for name in built}
    loads = []
    for rep in range(args.repeats):
        order = list(built) if rep % 2 == 0 else list(built)[::-1]  # alternate the order: no rung always runs first
        for name in order:
            r, m, wrap = built[name]
            t0 = time.perf_counter()
            sample(m, batch=args.batch, seed=rep, class_labels=labels_of(args.batch), wrap=wrap() if wrap else None, **kw)
            times[name].append(time.perf_counter() - t0)
        loads.append(os.getloadavg()[0])
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in built), flush=True)

    # quality: --n samples in chunks of the timed batch (a compiled rung sees no new shape), same seeds on every rung
    chunks = -(-args.n // args.batch)
    images = {}
    for name, (r, m, wrap) in built.items():
        out = [sample(m, batch=args.batch, seed=1000 + k, class_labels=labels_of(args.batch),
                      wrap=wrap() if wrap else None, **kw).images for k in range(chunks)]
        images[name] = torch.cat(out)[: args.n].clamp(-1, 1)
    first = next(iter(built))
    base_fd = frechet_distance(images[first])
    rows, prev = [], None
    for name, (r, m, wrap) in built.items():
        diff = (images[name] - images[first]).flatten(1)
        fd = base_fd if name == first else frechet_distance(images[name])
        t = np.asarray(times[name])
        row = {"rung": name, "speed": r.speed, "cache_interval": r.cache, "quantisation": r.quant, "dropped": r.dropped or None,
               "wall_s_median": float(np.median(t)), "wall_s_min": float(t.min()), "wall_s_max": float(t.max()),
               "warmup_s": warm_s[name],
               "speedup_vs_fp32": ratio_of_medians(times[first], times[name], name="speed-up vs fp32").as_dict(),
               "speedup_vs_previous": None if prev is None else
               ratio_of_medians(times[prev], times[name], name=f"speed-up vs {prev}").as_dict(),
               "rms_diff_vs_fp32": mean_measurement("rms image difference vs fp32", diff.pow(2).mean(1).sqrt()).as_dict(),
               "max_abs_diff_vs_fp32": float(diff.abs().max()), "fd": fd.as_dict()}
        if name != first:
            rule = Rule(f"{name} keeps quality", "FD (features-digits)", "non-inferiority", False, args.n, margin=0.25)
            v = judge(rule, fd, base_fd)
            row["verdict"] = {"rule": rule.describe(), "outcome": v.outcome, "interval": [v.statistic.low, v.statistic.high],
                              "power": v.power()}
        rows.append(row)
        prev = name
        s = row["speedup_vs_fp32"]
        print(f"{name}: {s['value']:.2f}x [{s['low']:.2f}, {s['high']:.2f}] vs fp32, median {row['wall_s_median']:.2f} s, "
              f"RMS diff {row['rms_diff_vs_fp32']['value']:.4f}, FD {fd.value:.3f} [{fd.low:.3f}, {fd.high:.3f}]"
              + (f", keeps quality: {row['verdict']['outcome']}" if name != first else ""), flush=True)
    return {"benchmark": "the system ladder on CPU: cumulative speed levers, speed-up and image difference vs fp32",
            "machine": at_start, "device": "cpu", "model": args.model, "sampler": args.sampler, "steps": args.steps,
            "batch_timed": args.batch, "repeats": args.repeats, "n_quality": args.n, "threads": args.threads,
            "load_average_1m_per_repeat": loads, "load_average_1m_at_end": os.getloadavg()[0],
            "refused": refused, "rows": rows}


# --------------------------------------------------------------------------------------------- GPU


GPU_RUNGS = ("fp32", "+bf16", "+SDPA", "+compile", "+fused QKV", "+dynamic int8")


def gpu_unet(kind: str, device, rung: str):
    """The full-size UNet (random weights, seed 0) prepared for ``rung``: (unet, dtype, extra kwargs)."""
    import diffusers
    from pipeline_overhead import FULL  # the published configurations, written there (needs transformers)

    from companion.speed import _set_attention

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**FULL[kind]["unet"]).eval()
    upto = GPU_RUNGS.index(rung)
    dtype = torch.float32 if upto < 1 else torch.bfloat16
    unet = unet.to(device, dtype)
    _set_attention(unet, sdpa=upto >= 2)
    if upto >= 4:
        unet.fuse_qkv_projections()
    if upto >= 5:
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        except ImportError as e:
            raise CompanionError(f"dynamic int8 on the GPU needs torchao ({e}); pip install torchao") from e
        quantize_(unet, Int8DynamicActivationInt8WeightConfig())
    call = torch.compile(unet) if upto >= 3 else unet  # default mode: max-autotune would spend the budget tuning
    return unet, call, dtype


def gpu_run(kind, call, dtype, device, steps, seed=0):
    """Euler, ``steps`` steps, classifier-free guidance 5.0 (batch 2): final latents and the network time from CUDA
    events (one synchronisation at the end)."""
    import diffusers

    from pipeline_overhead import FULL, SCALED_LINEAR

    cfg = FULL[kind]["unet"]
    sched = diffusers.EulerDiscreteScheduler(**SCALED_LINEAR)
    sched.set_timesteps(steps, device=device)
    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((1, 4, cfg["sample_size"], cfg["sample_size"]), generator=g).to(device) * sched.init_noise_sigma
    text = torch.randn((2, 77, cfg["cross_attention_dim"]), generator=g).to(device, dtype)
    extra = {}
    if cfg.get("addition_embed_type") == "text_time":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn((2, 1280), generator=g).to(device, dtype),
                                      "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * 2, device=device, dtype=dtype)}
    events = []
    with torch.no_grad():
        for t in sched.timesteps:
            xin = sched.scale_model_input(torch.cat([x, x]), t).to(dtype)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            eps = call(xin, t, encoder_hidden_states=text, **extra).sample
            end.record()
            events.append((start, end))
            eps_c, eps_u = eps.float().chunk(2)
            x = sched.step(eps_u + 5.0 * (eps_c - eps_u), t, x).prev_sample
    torch.cuda.synchronize(device)
    return x, sum(s.elapsed_time(e) for s, e in events) / 1000


def _gpu_rows(args, device, deadline, rows: list, refused: list) -> None:
    for kind in ("sd15", "sdxl"):
        base = None
        for rung in GPU_RUNGS:
            if time.monotonic() > deadline:
                refused.append({"model": kind, "rung": rung, "reason": "time limit reached"})
                continue
            try:
                unet, call, dtype = gpu_unet(kind, device, rung)
                t0 = time.perf_counter()
                gpu_run(kind, call, dtype, device, 2)  # warm-up (compilation happens here)
                warm = time.perf_counter() - t0
                walls, nets = [], []
                for rep in range(args.repeats):
                    t0 = time.perf_counter()
                    x, net_s = gpu_run(kind, call, dtype, device, args.gpu_steps)
                    walls.append(time.perf_counter() - t0)
                    nets.append(net_s)
            except (CompanionError, RuntimeError) as e:
                refused.append({"model": kind, "rung": rung, "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
                print(f"{kind} {rung}: refused: {refused[-1]['reason']}", flush=True)
                continue
            if base is None:
                base = (x, walls)
            diff = (x - base[0]).flatten()
            row = {"model": kind, "rung": rung, "wall_s_median": float(np.median(walls)), "wall_s_min": min(walls),
                   "wall_s_max": max(walls), "network_s_median": float(np.median(nets)), "warmup_s": warm,
                   "speedup_vs_fp32": float(np.median(base[1]) / np.median(walls)),
                   "rel_latent_diff_vs_fp32": float(diff.norm() / base[0].norm()),
                   "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20}
            rows.append(row)
            print(f"{kind} {rung}: {row['wall_s_median']:.2f} s ({row['speedup_vs_fp32']:.2f}x), network "
                  f"{row['network_s_median']:.2f} s, latent diff {row['rel_latent_diff_vs_fp32']:.3g}", flush=True)
            del unet, call
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)


def run_gpu(args) -> dict:
    device = torch.device("cuda")
    deadline = time.monotonic() + args.time_limit
    rows, refused = [], []
    try:
        _gpu_rows(args, device, deadline, rows, refused)
    except KeyboardInterrupt:  # the device check's timeout sends SIGINT: keep and write what was measured
        refused.append({"model": "-", "rung": "-", "reason": "interrupted (time limit of the caller); later rungs not run"})
    return {"benchmark": "the system ladder on a GPU: full-size SD-1.5 and SDXL UNets (random weights), cumulative levers",
            "machine": machine(), "device": torch.cuda.get_device_name(0), "steps": args.gpu_steps, "guidance": 5.0,
            "batch": 2, "repeats": args.repeats, "refused": refused, "rows": rows,
            "published": {"source": "diffusers 'Accelerate inference of text-to-image diffusion models', SDXL, A100, 30 steps",
                          "seconds": {"fp32": 7.36, "+bf16": 4.63, "+SDPA": 3.32, "+compile": 2.54, "+fused QKV": 2.52,
                                      "+dynamic int8": 2.43}}}


# --------------------------------------------------------------------------------------------- output


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"# {doc['benchmark']}", "",
             f"Measured {m['date_utc']} with `{m['command']}`; torch {m['torch']}, {m['cpu']}, {m['cpu_count']} cores, "
             f"{m['torch_threads']} torch threads; load average (1 min) {m['load_average_1m_at_start']:.2f} "
             f"{doc.get('machine_recorded_at', 'at the start')}"
             + (f", {min(doc['load_average_1m_per_repeat']):.2f}-{max(doc['load_average_1m_per_repeat']):.2f} over the repeats"
                if doc.get("load_average_1m_per_repeat") else "") + ".", ""]
    if doc["device"] == "cpu":
        lines += [f"Model {doc['model']}, {doc['sampler']} {doc['steps']} steps, batch {doc['batch_timed']}, {doc['repeats']} "
                  f"interleaved repeats after a warm-up; quality on {doc['n_quality']} samples from the same noise on every rung.",
                  "Verdict rule (stated before the run): a rung keeps quality if its FD is at most 25 % worse than fp32's "
                  "(non-inferiority on the 95 % interval of the margin-adjusted difference).", "",
                  "| rung | speed options | wall s (median, range) | speed-up vs fp32 [95 % CI] | vs previous rung | "
                  "RMS image diff vs fp32 | max abs diff | FD [95 % CI] | keeps quality |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in doc["rows"]:
            s, p, d, fd = r["speedup_vs_fp32"], r["speedup_vs_previous"], r["rms_diff_vs_fp32"], r["fd"]
            extra = (f" (DeepCache N={r['cache_interval']})" if r["cache_interval"] > 1 else "") + \
                    (f" + {r['quantisation']}" if r["quantisation"] else "")
            lines.append(f"| {r['rung']} | {r['speed']}{extra} | {r['wall_s_median']:.2f} ({r['wall_s_min']:.2f}-{r['wall_s_max']:.2f}) | "
                         f"{s['value']:.2f} [{s['low']:.2f}, {s['high']:.2f}] | "
                         + ("" if p is None else f"{p['value']:.2f} [{p['low']:.2f}, {p['high']:.2f}]")
                         + f" | {d['value']:.4f} [{d['low']:.4f}, {d['high']:.4f}] | {r['max_abs_diff_vs_fp32']:.3f} | "
                         f"{fd['value']:.3f} [{fd['low']:.3f}, {fd['high']:.3f}] | {r.get('verdict', {}).get('outcome', 'baseline')} |")
        for r in doc["rows"]:
            if r["dropped"]:
                lines += ["", f"{r['rung']} drops {r['dropped']}."]
    else:
        lines += [f"{doc['device']}: Euler {doc['steps']} steps, classifier-free guidance (batch 2), median of {doc['repeats']}; "
                  "network time from CUDA events (one synchronisation per run).", "",
                  "| model | rung | wall s (median, range) | network s | speed-up vs fp32 | rel. latent diff vs fp32 | peak MiB |",
                  "|---|---|---|---|---|---|---|"]
        for r in doc["rows"]:
            lines.append(f"| {r['model']} | {r['rung']} | {r['wall_s_median']:.2f} ({r['wall_s_min']:.2f}-{r['wall_s_max']:.2f}) | "
                         f"{r['network_s_median']:.2f} | {r['speedup_vs_fp32']:.2f} | {r['rel_latent_diff_vs_fp32']:.3g} | "
                         f"{r['peak_memory_mib']:.0f} |")
        pub = doc["published"]
        lines += ["", f"Published ({pub['source']}): " + " -> ".join(f"{k} {v} s" for k, v in pub["seconds"].items())]
    for r in doc["refused"]:
        lines.append(f"- refused: {r.get('model', '')} {r['rung']}: {r['reason']}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--model", default="digits-cond")
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, default=512, help="samples per rung for FD and the image difference (CPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-compile", action="store_true", help="leave torch.compile out (it takes minutes on a CPU)")
    ap.add_argument("--gpu-steps", type=int, default=30)
    ap.add_argument("--time-limit", type=float, default=240, help="GPU: seconds after which no new rung starts")
    ap.add_argument("--out", default=None, help="path without extension: writes .json and .md")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible (torch.cuda.is_available() is False)")
    doc = run_cpu(args) if args.device == "cpu" else run_gpu(args)
    if args.out:
        out = Path(args.out)
        out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(doc))
        print("written", out.with_suffix(".json"), out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
