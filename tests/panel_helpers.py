"""Small helpers shared by the panel tests (the tiny model itself is a fixture in conftest.py)."""


def mean_abs(model, result):
    """A cheap, deterministic per-run quality for tests."""
    return float(result.images.abs().mean())
