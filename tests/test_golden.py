"""Behaviour pinned across refactors: every sampling path against a golden file recorded before the change.

Each case below is a deterministic run (fixed seeds, one torch thread) whose outputs were saved in
``tests/golden/`` from the code as it was before the sampling core was unified. After any restructuring the same
calls must give the same numbers: bit-identical where the arithmetic did not change, within 1e-6 otherwise.
Regenerate only on purpose (a behaviour change that the commit explains)::

    .venv/bin/python tests/test_golden.py --record
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

GOLDEN = Path(__file__).resolve().parent / "golden"
TENSORS = GOLDEN / "sampling.safetensors"
NUMBERS = GOLDEN / "numbers.json"
ATOL = 1e-6

SEEDS = (0, 1, 2)
GUIDANCE = {0: None, 1: 2.0, 2: 3.0}  # seed -> classifier-free guidance scale (None: the conditional model alone)


def _steps(spec) -> int:
    return max(6, spec.min_steps)


def cases():
    """name -> a function returning a dict of tensors (the run's outputs)."""
    from companion import load, samplers, sde
    from companion.data import digits
    from companion.partial import sample_from
    from companion.sampling import sample

    out = {}
    cond = lambda: load("digits-cond")  # noqa: E731
    labels = torch.tensor([0, 3, 5, 7])
    for key in samplers.names():
        spec = samplers.get(key)
        for seed in SEEDS:
            def run(key=key, seed=seed, spec=spec):
                res = sample(cond(), key, _steps(spec), guidance=GUIDANCE[seed], seed=seed, batch=4, class_labels=labels)
                return {"images": res.images, "nfe": torch.tensor(res.record.nfe)}
            out[f"sampler/{key}/seed{seed}"] = run
    out["sampler/ddim-eta/seed0"] = lambda: {"images": sample(cond(), "ddim", 8, eta=0.5, seed=0, batch=4).images}
    out["sampler/trajectory"] = lambda: {f"x{i}": x for i, (_, x) in
                                         enumerate(sample(cond(), "dpmpp_2m", 5, seed=0, batch=2, return_trajectory=True).trajectory)}

    def classifier_guided():
        clf = load("digits-noisy-clf")
        res = sample(cond(), "ddim", 6, seed=0, batch=4, class_labels=labels, classifier=clf, classifier_scale=5.0)
        return {"images": res.images, "classifier_evals": torch.tensor(res.record.classifier_evals)}
    out["classifier-guidance/ddim"] = classifier_guided
    out["latent/shapes-latent/ddim"] = lambda: {"images": sample(load("shapes-latent"), "ddim", 5, seed=0, batch=2).images}

    def cascade():
        low = sample(load("shapes-base16"), "ddim", 5, seed=0, batch=2)
        high = sample(load("shapes-sr32"), "ddim", 4, seed=1, batch=2, cond=low.images.clamp(-1, 1))
        return {"low": low.images, "high": high.images}
    out["cascade/shapes"] = cascade

    start = digits(16, "test")[0][:4]
    out["partial/start"] = lambda: {"images": sample_from(cond(), start, 300, "ddpm", 4, class_labels=labels, seed=0).images}
    out["partial/stop"] = lambda: {"images": sample_from(cond(), None, None, "ddim", 8, batch=4, stop_at=400, seed=1).images}
    out["partial/guided"] = lambda: {"images": sample_from(cond(), start, 500, "dpmpp_2m", 5, class_labels=labels, guidance=2.0,
                                                         seed=2).images}
    for name in sde.SAMPLERS:
        out[f"sde/{name}"] = lambda name=name: {"images": sde.sample_sde(cond(), name, 6, seed=0, batch=4, class_labels=labels).images}
        out[f"sde/{name}/guided"] = lambda name=name: {"images": sde.sample_sde(cond(), name, 5, seed=1, batch=4, class_labels=labels,
                                                                              guidance=2.0).images}
    return out


def card_quality_samples() -> dict:
    """The samples a card's quality is measured on (class-guided DDIM, and super-resolution with a low-res condition)."""
    from companion import load
    from companion.data import shapes
    from companion.quality import ddim_samples

    labels = torch.arange(10).repeat_interleave(2)
    guided = ddim_samples(load("digits-cond"), 20, steps=10, guidance=2.0, class_labels=labels, seed=1, batch=8)
    low = torch.nn.functional.avg_pool2d(shapes("test", 32)[0][:3], 2)
    sr = ddim_samples(load("shapes-sr32"), 3, steps=4, cond=low, seed=1, batch=2)
    return {"guided": guided, "sr": sr}


def numbers() -> dict:
    """Scalar results: the order lab's measured orders and a reference ODE solution's summary."""
    from companion import oracle, orders

    mix = oracle.toy_mixture((1, 2, 2), components=3)
    tab = orders.measure_orders(["ddim", "heun", "dpmpp_2m"], model=mix, steps=(100, 200), batch=8, progress=False)
    return {"order_errors": {f"{r.sampler}/{r.steps}": float(r.error) for r in tab.itertuples()}}


def _all_tensors() -> dict:
    flat = {}
    for name, fn in cases().items():
        for k, v in fn().items():
            flat[f"{name}/{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    for k, v in card_quality_samples().items():
        flat[f"card/{k}"] = v.detach().cpu().contiguous()
    return flat


def record() -> None:
    torch.set_num_threads(1)
    GOLDEN.mkdir(exist_ok=True)
    save_file(_all_tensors(), str(TENSORS))
    NUMBERS.write_text(json.dumps(numbers(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {TENSORS} and {NUMBERS}")


@pytest.fixture(scope="module")
def golden():
    if not TENSORS.is_file():
        pytest.fail(f"golden file {TENSORS} missing: record it with `python {__file__} --record`")
    return load_file(str(TENSORS))


@pytest.fixture(scope="module")
def fresh():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _all_tensors()
    finally:
        torch.set_num_threads(before)


def test_same_cases_as_recorded(golden, fresh):
    assert sorted(fresh) == sorted(golden)


@pytest.mark.parametrize("key", sorted(load_file(str(TENSORS))) if TENSORS.is_file() else [])
def test_matches_golden(golden, fresh, key):
    want, got = golden[key], fresh[key]
    assert got.shape == want.shape and got.dtype == want.dtype
    if not want.is_floating_point():
        assert torch.equal(got, want)
    else:
        diff = float((got.double() - want.double()).abs().max()) if want.numel() else 0.0
        assert diff <= ATOL, f"{key}: max |difference| {diff:.3g} > {ATOL}"


def test_order_lab_matches_golden():
    want = json.loads(NUMBERS.read_text())
    got = numbers()
    assert got.keys() == want.keys()
    for k, v in want["order_errors"].items():
        assert got["order_errors"][k] == pytest.approx(v, rel=1e-6, abs=1e-12), k


if __name__ == "__main__":
    if "--record" in sys.argv:
        record()
    else:
        print(__doc__)
