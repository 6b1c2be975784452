"""Test parametrisations read off the divergences' specs (kdiv.SPECS): a divergence is tested everywhere by being
registered. tests/test_registry.py checks that every test parametrised over divergence names covers all of them."""

from __future__ import annotations

import kdiv
import pytest

NAMES = sorted(kdiv.SPECS)
# name -> its hyper-parameters (kdiv.Hyper), for the divergences that have any
WITH_HYPER = {name: s.hyper for name, s in sorted(kdiv.SPECS.items()) if s.hyper}


def case(name: str, hyper: dict):
    return pytest.param(name, hyper, id=name + ("-" + ",".join(f"{k}={v}" for k, v in hyper.items()) if hyper else ""))


# every divergence at its defaults; and with each hyper-parameter at its spec's example values (endpoints included)
DEFAULT_CASES = [case(name, {}) for name in NAMES]
HYPER_CASES = [case(name, hyper) for name in NAMES for hyper in kdiv.spec(name).examples()]


def in_range(hyper: kdiv.Hyper, value: float) -> float:
    """value if the hyper-parameter admits it, else the nearest admitted value a little inside an open end."""
    low = hyper.low + (0.05 if hyper.low_open else 0.0)
    high = hyper.high - (0.05 if hyper.high_open else 0.0)
    return value if hyper.contains(value) else min(max(value, low), high)


def out_of_range(hyper: kdiv.Hyper) -> list[float]:
    """Values a hyper-parameter must refuse: just outside each end (the end itself where it is open)."""
    span = hyper.high - hyper.low
    values = [hyper.low - 0.1 * span, hyper.high + 0.1 * span, hyper.low - 1e-12, hyper.high + 1e-12]
    values += [hyper.low] if hyper.low_open else []
    values += [hyper.high] if hyper.high_open else []
    return values
