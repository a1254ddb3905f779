"""The calibration helpers the metrics chapter uses (the coverage itself is tested in test_metrics_coverage.py)."""
import pytest
import torch

from companion import calibration as C
from companion import metrics as M


def test_clopper_pearson_matches_the_exact_binomial_interval():
    lo, hi = C.clopper_pearson(95, 100)
    assert lo == pytest.approx(0.8872, abs=1e-4) and hi == pytest.approx(0.9836, abs=1e-4)
    assert C.clopper_pearson(0, 10)[0] == 0.0 and C.clopper_pearson(10, 10)[1] == 1.0
    with pytest.raises(ValueError, match="k=11, n=10"):
        C.clopper_pearson(11, 10)


def test_coverage_trials_refuse_bad_input():
    with pytest.raises(ValueError, match="unknown metric 'fid'; choose one of fd, kid"):
        C.coverage_trials("fid", 128, 2)
    with pytest.raises(ValueError, match="trials must be a positive integer, got 0"):
        C.coverage_trials("fd", 128, 0)
    with pytest.raises(ValueError, match="fd needs at least 128 samples, got 20"):
        C.coverage_trials("fd", 20, 2)


def test_identical_gaussians_plug_in_fd_shrinks_with_n_and_the_correction_removes_its_bias():
    ref_pop, _ = C.digits_like_gaussians()
    g = torch.Generator().manual_seed(1)
    ref = M.Reference("gaussian-64", "test", C.draw(ref_pop, 1438, g), None)
    rows = C.fd_by_sample_size(C.draw(ref_pop, 1024, g), ref, (128, 1024), n_boot=20)
    small, large = rows
    # the plug-in bias is ~ tr-terms / n: 8x the samples, several times smaller; the correction removes it
    assert small["plug-in FD"] > 3 * large["plug-in FD"] > 0
    bias = [r["plug-in FD"] - r["FD"] for r in rows]
    assert bias[0] > 3 * bias[1] > 0
    with pytest.raises(ValueError, match="at most the 1024 features"):
        C.fd_by_sample_size(C.draw(ref_pop, 1024, g), ref, (2048,))
