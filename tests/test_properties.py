"""Property tests (hypothesis) over extreme logits: +-1e4, -inf in the teacher, the student, both at the same
positions or at different ones (never a whole row). Every divergence must stay finite, give a NaN-free gradient,
be non-negative, and agree with the float64 reference wherever the reference is finite."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import kdiv
import numpy as np
import pytest
import reference
import torch
from cases import NAMES, WITH_HYPER, in_range
from hypothesis import assume, given, settings
from hypothesis import strategies as st

MODES = ("none", "teacher", "student", "same", "different")

# Ordinary logits mixed with the extremes a vocabulary mask or an over-confident model produces.
ENTRIES = st.one_of(
    st.floats(-30.0, 30.0, allow_nan=False, width=32),
    st.sampled_from([1e4, -1e4, 0.0, 1e-30]),
)


@st.composite
def logit_pairs(draw):
    """(student, teacher, mode): float64 arrays [n, V] (float32-representable) with -inf placed by `mode`."""
    n = draw(st.integers(1, 3))
    vocab = draw(st.integers(1, 9))
    s = draw(hnp.arrays(np.float64, (n, vocab), elements=ENTRIES))
    t = draw(hnp.arrays(np.float64, (n, vocab), elements=ENTRIES))
    mode = draw(st.sampled_from(MODES))
    holes_s = draw(hnp.arrays(np.bool_, (n, vocab)))
    holes_t = draw(hnp.arrays(np.bool_, (n, vocab)))
    if mode in ("none", "teacher"):
        holes_s[:] = False
    if mode in ("none", "student"):
        holes_t[:] = False
    if mode == "same":
        holes_t = holes_s.copy()
    if mode == "different":
        holes_t &= ~holes_s
    # never a whole row of -inf: keep one drawn position of every row finite
    for holes in (holes_s, holes_t):
        for row in range(n):
            if holes[row].all():
                holes[row, draw(st.integers(0, vocab - 1))] = False
    s[holes_s] = -np.inf
    t[holes_t] = -np.inf
    return s, t, mode


TEMPERATURES = st.sampled_from([0.5, 1.0, 2.0])


def _hyper(name, draw_value):
    """Every hyper-parameter of the divergence at the drawn value, moved inside its range where it must be."""
    return {h.name: in_range(h, draw_value) for h in WITH_HYPER.get(name, ())}


HYPER_VALUES = st.sampled_from([0.0, 1e-6, 0.01, 0.1, 0.5, 0.9, 0.999, 1.0])


def _loss_and_grad(name, hyper, s, t, temperature, dtype):
    x = torch.tensor(s, dtype=dtype, requires_grad=True)
    y = torch.tensor(t, dtype=dtype)
    loss = kdiv.get(name, **hyper)(x, y, temperature=temperature, reduction="none")
    loss.sum().backward()
    return loss.detach(), x.grad


DTYPES = st.sampled_from([torch.float32, torch.float64, torch.bfloat16])


# arbitrary logits: some rows look like probabilities, some like a padded top-k teacher (see test_misuse)
@pytest.mark.filterwarnings("ignore::kdiv.KdivWarning")
@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=50)
@given(pair=logit_pairs(), temperature=TEMPERATURES, value=HYPER_VALUES, dtype=DTYPES)
def test_extreme_logits(name, pair, temperature, value, dtype):
    s, t, _ = pair
    hyper = _hyper(name, value)
    loss, grad = _loss_and_grad(name, hyper, s, t, temperature, dtype)
    assert torch.isfinite(loss).all(), loss
    assert not torch.isnan(grad).any(), grad
    assert torch.isfinite(grad).all(), grad

    # non-negative up to rounding: the log-probabilities of logits of size |z| = |logit| / T are only known to
    # about eps * |z| in the compute dtype (fp32 for bf16 inputs), e.g. 2e-3 for z = 2e4 in fp32
    finite = np.concatenate([s, t])
    z_max = max(1.0, np.abs(finite[np.isfinite(finite)]).max() / temperature)
    assert (loss >= -8 * torch.finfo(loss.dtype).eps * z_max).all(), loss

    # agreement with the reference wherever the reference is finite: on the values actually passed (bf16 rounds
    # them) within the compute dtype's rounding, and in float64 within 1e-9
    _assert_matches_reference(name, hyper, s, t, temperature, dtype, loss, z_max)
    if dtype != torch.float64:
        loss64, _ = _loss_and_grad(name, hyper, s, t, temperature, torch.float64)
        _assert_matches_reference(name, hyper, s, t, temperature, torch.float64, loss64, z_max)


def _assert_matches_reference(name, hyper, s, t, temperature, dtype, loss, z_max):
    s = torch.tensor(s, dtype=dtype).double().numpy()
    t = torch.tensor(t, dtype=dtype).double().numpy()
    eps = torch.finfo(loss.dtype).eps
    p = reference.softmax_t(t, temperature)
    if name == "akl" and not reference.head_is_robust(p, hyper["mu"], 1e3 * eps).all():
        return  # the head split jumps at ties and at mass mu: rounding near either can move a token across
    with np.errstate(all="ignore"):
        want = reference.DIVERGENCES[name](s, t, temperature=temperature, **hyper)
    ok = np.isfinite(want)
    # log-probabilities of logits of size z_max are known to about eps * z_max each
    tol = 1e-9 if dtype == torch.float64 else 32 * eps * z_max
    np.testing.assert_allclose(loss.double().numpy()[ok], want[ok], rtol=tol, atol=tol)


@pytest.mark.filterwarnings("ignore::kdiv.KdivWarning")  # arbitrary logits, as above
@given(name=st.sampled_from(NAMES), pair=logit_pairs(), temperature=TEMPERATURES, value=HYPER_VALUES)
def test_equal_distributions_give_zero(name, pair, temperature, value):
    s, _, _ = pair
    loss, grad = _loss_and_grad(name, _hyper(name, value), s, s, temperature, torch.float64)
    np.testing.assert_allclose(loss.numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(grad.numpy(), 0.0, atol=1e-12)


@given(
    p_logits=hnp.arrays(np.float64, (2, 8), elements=st.integers(-3, 3).map(float)),
    mu=st.sampled_from([0.1, 0.25, 0.5, 0.75, 0.9]),
    perm=st.permutations(range(8)),
)
def test_head_split_with_ties(p_logits, mu, perm):
    # small integer logits produce many ties; the split must match the reference and ignore vocabulary order
    p = torch.softmax(torch.from_numpy(p_logits), -1)
    assume(reference.head_margin(p.numpy(), mu).min() > 1e-9)
    head = kdiv.head_mask(p, mu)
    assert np.array_equal(head.numpy(), reference.head_set(p.numpy(), mu))
    assert head.any(-1).all()  # the top-1 token is always in the head
    perm = list(perm)
    assert torch.equal(kdiv.head_mask(p[:, perm], mu), head[:, perm])


# ---------------------------------------------------------------------------------------------------------------
# Why kdiv takes care with -inf: the "multiply, then mask" pattern
# ---------------------------------------------------------------------------------------------------------------


def multiply_then_mask_reverse_kl(student_logits, teacher_logits):
    """Reverse KL written the way several KD code bases write it: form q * log q and q * log p over the whole
    vocabulary, then zero the entries at -inf logits with masked_fill. (Written here for the test.)"""
    q = torch.softmax(student_logits, -1)
    logq = torch.log_softmax(student_logits, -1)
    logp = torch.log_softmax(teacher_logits, -1)
    outside = torch.isinf(student_logits) | torch.isinf(teacher_logits)
    # at an -inf logit q = 0 and log q = -inf: the products are 0 * (-inf) = NaN, removed only afterwards
    plogq = (q * logq).masked_fill(outside, 0.0)
    plogp = (q * logp).masked_fill(outside, 0.0)
    return (plogq - plogp).sum(-1)


def test_multiply_then_mask_gives_nan_gradient_kdiv_does_not():
    torch.manual_seed(0)
    s, t = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    # the last three tokens are outside the vocabulary of both models (padding of the embedding matrix)
    s[:, 7:] = -torch.inf
    t[:, 7:] = -torch.inf

    x = s.clone().requires_grad_()
    naive = multiply_then_mask_reverse_kl(x, t)
    assert torch.isfinite(naive).all()  # the forward value looks fine ...
    naive.sum().backward()
    assert torch.isnan(x.grad).all(dim=-1).all()  # ... but the NaN of 0 * (-inf) fills every row of the gradient

    y = s.clone().requires_grad_()
    ours = kdiv.reverse_kl(y, t, reduction="none")
    ours.sum().backward()
    torch.testing.assert_close(ours, naive.detach())
    assert torch.isfinite(y.grad).all()
    # the tokens outside the vocabulary have probability float32-tiny, hence a gradient of that size
    torch.testing.assert_close(y.grad[:, 7:], torch.zeros(4, 3, dtype=torch.float64), rtol=0, atol=1e-30)
    # and the gradient is the one of the reverse KL restricted to the shared vocabulary
    z = s[:, :7].clone().requires_grad_()
    kdiv.reverse_kl(z, t[:, :7], reduction="none").sum().backward()
    torch.testing.assert_close(y.grad[:, :7], z.grad)
