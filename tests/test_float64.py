"""float64 through the public sampling path: high measured orders are not floored by float32 rounding, and a
float64 measurement on one thread leaves a float32 run on another thread untouched."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from companion import oracle as O
from companion.errors import SamplingError
from companion.reference import solve_ode
from companion.sampling import sample

STEPS = (100, 125, 200, 250)  # trailing grids that all visit t = 199


def _order(model, sampler, dtype):
    errors = []
    for n in STEPS:
        res = sample(model, sampler, n, spacing="trailing", batch=16, seed=0, dtype=dtype, return_trajectory=True)
        (t0, x0), at = res.trajectory[0], dict(res.trajectory)[199.0]
        ref = solve_ode(model, x0.double(), t_end=199, t_start=t0, rtol=1e-10, atol=1e-10)
        errors.append(float(((at.double() - ref) ** 2).flatten(1).mean(1).sqrt().median()))
    return -np.polyfit(np.log(STEPS), np.log(errors), 1)[0]


@pytest.mark.slow
def test_float64_sampling_measures_third_order_where_float32_cannot():
    mix = O.toy_mixture((1, 8, 8), components=4)
    o64 = _order(mix, "dpmpp_3m_corrected", torch.float64)
    o32 = _order(mix, "dpmpp_3m_corrected", torch.float32)
    assert o64 > 2.7, o64      # the corrected third-order update, measured
    assert o32 < o64 - 0.3, (o32, o64)  # float32 rounding flattens the same measurement


def test_float64_on_one_thread_leaves_float32_on_another_alone():
    mix = O.toy_mixture((1, 4, 4))
    alone = sample(mix, "dpmpp_2m", 50, batch=8, seed=3).samples
    got = {}
    go = threading.Barrier(2)

    def f32():
        go.wait()
        got["f32"] = sample(mix, "dpmpp_2m", 50, batch=8, seed=3).samples

    def f64():
        go.wait()
        got["f64"] = sample(mix, "dpmpp_2m", 400, batch=8, seed=3, dtype=torch.float64).samples

    threads = [threading.Thread(target=f32), threading.Thread(target=f64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got["f32"].dtype == torch.float32 and torch.equal(got["f32"], alone)
    assert got["f64"].dtype == torch.float64


def test_float64_refuses_other_dtypes_and_runs_on_a_network(tiny_model):
    with pytest.raises(SamplingError, match="dtype must be torch.float32 or torch.float64"):
        sample(tiny_model, "ddim", 2, batch=2, dtype=torch.float16)
    res = sample(tiny_model, "dpmpp_2m", 3, batch=2, dtype=torch.float64)
    assert res.samples.dtype == torch.float64 and torch.isfinite(res.samples).all()
