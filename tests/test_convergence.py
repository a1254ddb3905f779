"""Measured convergence orders on the exact-score oracle (error inside the trajectory vs a DOP853 reference).

Step range N = 200, 250, 500, 1000 (trailing spacing, error at t = 199): N divides 1000 so every run lands on
t = 199 (DDIM/PNDM step to t - 1000//N); N >= 200 keeps multistep warm-up and the pre-asymptotic range out of
the fit — between N = 5 and 100 stock DPM-Solver++ 3M's slope passes through 3 on its way down to 2, so a fit
there could wrongly "confirm" order 3; N <= 1000 is the training grid. Scheduler arithmetic runs in float64 so
the smallest errors (~2e-8) stay far above rounding.
"""
from __future__ import annotations

import pytest
import torch

from companion import assets
from companion import oracle as O
from companion.orders import convergence_order
from companion.reference import solve_ode
from companion.sampling import sample


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: 2 shared cores, tiny nets


@pytest.fixture(scope="module")
def mixture():
    return O.toy_mixture((1, 4, 4))


# Theory: DDIM 1, Euler 1, Heun 2, DPM-Solver++ 2M 2, UniPC (bh2, solver order 2) 2 + 1 = 3, corrected 3M 3.
# Stock DPM-Solver++ 3M measures 2, NOT 3: its third-order update halves the f'' term (docs/dpmpp-3m-order.md).
EXPECTED = {"ddim": 1, "euler": 1, "heun": 2, "dpmpp_2m": 2, "unipc": 3, "dpmpp_3m": 2, "dpmpp_3m_corrected": 3}


@pytest.mark.parametrize("key", list(EXPECTED))
def test_measured_order_matches_theory(mixture, key):
    r = convergence_order(key, model=mixture, steps=(200, 250, 500, 1000), t_stop=199, batch=32)
    assert abs(r["order"] - EXPECTED[key]) <= 0.3, r
    assert all(a > b for a, b in zip(r["errors"], r["errors"][1:])), r  # errors fall monotonically


def test_convergence_order_refuses_what_it_cannot_measure(mixture):
    with pytest.raises(ValueError, match="stochastic"):
        convergence_order("euler_a", model=mixture)
    with pytest.raises(ValueError, match="never reaches t=198"):
        convergence_order("ddim", model=mixture, steps=(200, 250), t_stop=198)


_REFS: dict = {}


def distance_at(model, key, steps, t_stop=199, batch=32, tol=1e-7):
    """Mean per-sample RMS distance at timestep t_stop between the sampler (trailing steps) and a reference ODE
    solution from the sampler's own initial state. Inside the trajectory: at the final output the last
    first-order jump to sigma = 0 (the same in both 3M variants) dominates and hides the difference."""
    res = sample(model, key, steps, batch=batch, seed=0, spacing="trailing", return_trajectory=True)
    (t0, x0), = [(t, x) for t, x in res.trajectory[:1]]
    x_stop = [x for t, x in res.trajectory if t == t_stop][0]
    key = (id(model), t0, t_stop, tol, x0.numpy().tobytes())
    if key not in _REFS:  # both 3M variants start from the same state: solve once
        _REFS[key] = solve_ode(model, x0.double(), t_end=t_stop, t_start=t0, rtol=tol, atol=tol)
    ref = _REFS[key]
    return float(((x_stop.double() - ref) ** 2).flatten(1).mean(1).sqrt().mean())


@pytest.mark.parametrize("steps", [20, 50])
def test_corrected_3m_is_closer_to_the_ode_solution_at_20_plus_steps(mixture, steps):
    stock = distance_at(mixture, "dpmpp_3m", steps)
    fixed = distance_at(mixture, "dpmpp_3m_corrected", steps)
    assert fixed < stock, (fixed, stock)


BUNDLED = [n for n, c in assets.manifest().items() if c.get("kind") == "diffusion" and not c.get("num_classes")
           and not c.get("cond_shape") and not c.get("vae_class")]


@pytest.mark.parametrize("name", BUNDLED[:1] or [pytest.param("none", marks=pytest.mark.skip(reason="no bundled pixel model"))])
def test_both_3m_variants_on_a_bundled_model(name):
    from companion.models import load

    model = load(name, device="cpu")
    q = lambda im: float(torch.quantile(im.abs().flatten(), 0.99))  # noqa: E731
    base = q(sample(model, "ddim", 100, batch=8).images)  # bounded relative to the model itself (see test_samplers)
    if base > 1.5:
        pytest.skip(f"{name}: 100-step DDIM leaves its 99th percentile |x| at {base:.2f}: model not trained enough")
    for steps in (10, 20, 50):
        for key in ("dpmpp_3m", "dpmpp_3m_corrected"):
            im = sample(model, key, steps, batch=8).images
            assert torch.isfinite(im).all() and q(im) <= max(1.2, 3 * base), (key, steps, q(im), base)
    assert distance_at(model, "dpmpp_3m_corrected", 20, batch=4, tol=1e-6) < distance_at(model, "dpmpp_3m", 20, batch=4, tol=1e-6)
