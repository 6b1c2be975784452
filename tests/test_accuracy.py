"""float32 accuracy of every token-level divergence against float64, at the logit offsets and magnitudes of real
models.

Adding a constant to a row of logits changes no softmax, so a divergence must not care how far apart the two
models' logits sit (a student and a teacher trained separately differ by row offsets of tens to thousands). Values
and student gradients are held to 1e-5 relative (1e-7 absolute) of float64 computations on the same float32 inputs:
values against tests/reference.py (numpy / scipy), gradients against the plain autograd versions run in float64.
Logits of huge magnitude give the right finite, non-negative answer or a ValueError that says why.
"""

from __future__ import annotations

import kdiv
import numpy as np
import pytest
import reference
import torch
from cases import DEFAULT_CASES, HYPER_CASES, NAMES
from kdiv.testing import plain

RTOL, ATOL = 1e-5, 1e-7
# Gradient elements of size ~0.5 (q - p at a head token) carry the rounding of q and p themselves, 3e-8 each:
# 2e-7 is two float32 ulps of 1, the resolution of any float32 computation there.
GRAD_ATOL = 2e-7
VOCAB = 8192
# an offset c, applied as (student - c, teacher + c), or per-row offsets drawn up to +-1e4 for each model
OFFSETS = [0.0, 30.0, 1e2, 1e3, 1e4, "per-row"]


def _pair(rows, vocab, seed=0):
    """Student and teacher logits in the style of two related LMs: std-3 Gaussian, the teacher correlated."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    t = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3 + 0.5 * s
    return s, t


def _offset(s, t, offset, seed=1):
    if offset == "per-row":
        g = torch.Generator().manual_seed(seed)
        a, b = (torch.rand(s.shape[0], 1, generator=g, dtype=torch.float64) * 2e4 - 1e4 for _ in range(2))
        return (s + a).float(), (t + b).float()
    return (s - offset).float(), (t + offset).float()


def _check(name, hyper, s, t, where):
    """kdiv in float32 against float64 on the same float32 inputs: per-row values, per-element gradients."""
    x = s.clone().requires_grad_()
    got = kdiv.get(name)(x, t, reduction="none", **hyper)
    got.sum().backward()
    want = reference.DIVERGENCES[name](s.double().numpy(), t.double().numpy(), **hyper)
    np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=RTOL, atol=ATOL, err_msg=where)
    assert (got >= 0).all(), where
    xd = s.double().requires_grad_()
    plain.DIVERGENCES[name](xd, t.double(), reduction="sum", **hyper).backward()
    np.testing.assert_allclose(x.grad.double().numpy(), xd.grad.numpy(), rtol=RTOL, atol=GRAD_ATOL, err_msg=where)


@pytest.mark.parametrize("name, hyper", DEFAULT_CASES + HYPER_CASES)
def test_offsets_between_the_models(name, hyper):
    s0, t0 = _pair(4, VOCAB)
    # every offset at the defaults; the largest ones for the other hyper-parameter values (other code paths)
    for offset in OFFSETS if not hyper else OFFSETS[-2:]:
        s, t = _offset(s0, t0, offset)
        _check(name, hyper, s, t, f"{name} {hyper} offset {offset}")


@pytest.mark.parametrize("name", NAMES)
def test_llm_vocabulary_with_per_row_offsets(name):
    s, t = _offset(*_pair(2, 256000, seed=2), "per-row", seed=3)
    _check(name, {}, s, t, f"{name} V=256000")


@pytest.mark.parametrize("name", NAMES)
def test_logits_of_any_magnitude(name):
    # spreads within a row of 1e3 to 1e30 (one-hot softmaxes, divergences as large as the spread), a common offset
    # of 1e30 (every logit rounds to a few values), and spreads near float32's limit (the log-probabilities
    # themselves overflow: a ValueError)
    s0, t0 = _pair(3, 1000, seed=4)
    for label, s, t in [
        *((f"scale {k:g}", s0 * k / 3, t0 * k / 3) for k in (1e3, 1e8, 1e30)),
        ("offset 1e30", s0 * 1e23 + 1e30, t0 * 1e23 - 1e30),
        ("scale 1e37", s0.clamp(-3, 3) * 1e37 / 3, t0.clamp(-3, 3) * 1e37 / 3),
        ("scale 1e38", s0.clamp(-3, 3) * 1e38, t0.clamp(-3, 3) * 1e38),
    ]:
        s, t = s.float(), t.float()
        assert torch.isfinite(s).all() and torch.isfinite(t).all()
        x = s.clone().requires_grad_()
        try:
            got = kdiv.get(name)(x, t, reduction="none")
        except ValueError as err:
            assert "float64" in str(err), (label, err)
            continue
        got.sum().backward()
        want = reference.log_domain(name, s.double().numpy(), t.double().numpy())
        assert torch.isfinite(got).all() and (got >= 0).all(), (name, label, got)
        np.testing.assert_allclose(got.detach().double().numpy(), want, rtol=RTOL, atol=ATOL, err_msg=label)
        assert torch.isfinite(x.grad).all(), (name, label)
