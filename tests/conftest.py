"""Shared fixtures and helpers: seeded random logits (`random_logits`, `small_pair`), one small, deterministic
hypothesis profile for the whole suite, and the check that every parametrised test covers every divergence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

# Deterministic examples (no example database, no random seed per run) so that CI sees what a developer saw;
# a few dozen examples per property keep the suite to seconds on a small CPU.
settings.register_profile(
    "kdiv",
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("kdiv")


def random_logits(shape, *, seed=0, scale=2.0, dtype=torch.float32):
    """(student, teacher): two independent Gaussian logit tensors of `shape` [..., V], times `scale`."""
    rng = np.random.default_rng(seed)
    s = torch.from_numpy(scale * rng.standard_normal(shape)).to(dtype)
    t = torch.from_numpy(scale * rng.standard_normal(shape)).to(dtype)
    return s, t


@pytest.fixture
def small_pair():
    """float64 (student, teacher) of shape (2, 3, 6): small enough for finite differences."""
    return random_logits((2, 3, 6), seed=1, dtype=torch.float64)


# Which divergence names each test parametrised over "name" was collected with, and which it should cover:
# tests/test_registry.py checks them, so that a new divergence is tested everywhere or the suite says where not.
# Without a marker a test must cover every registered divergence; @pytest.mark.divergences("with_hyper") those with
# hyper-parameters, ("prob_form") those with a probability formula in tests/reference.py; ("chosen", reason=...)
# marks a test written for a few divergences on purpose.
NAMES_BY_TEST = pytest.StashKey[dict]()


def pytest_configure(config):
    config.addinivalue_line("markers", "divergences(kind, reason=''): which divergences a test over names covers")


def pytest_collection_modifyitems(session, config, items):
    seen: dict[str, tuple[str, set]] = {}
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if not isinstance(params.get("name"), str):
            continue
        marker = item.get_closest_marker("divergences")
        kind = marker.args[0] if marker else "all"
        key = f"{item.module.__name__}::{item.originalname}"
        seen.setdefault(key, (kind, set()))[1].add(params["name"])
    config.stash[NAMES_BY_TEST] = seen
