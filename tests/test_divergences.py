"""Every token-level divergence against the float64 reference in tests/reference.py, its identities, and its
gradient (gradcheck, closed forms, the student-only rule)."""

from __future__ import annotations

import inspect
import math

import kdiv
import numpy as np
import pytest
import reference
import torch
from cases import DEFAULT_CASES, HYPER_CASES, NAMES, case
from conftest import random_logits

SHAPES = [(3, 7, 1271), (1, 1), (5, 2), (4, 33)]
TEMPERATURES = [0.5, 1.0, 2.0]
# float32 compute: the error grows with |log p| (up to ~20 at T=0.5), hence an absolute term
TOL = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 1e-4, "atol": 1e-5},
    torch.float16: {"rtol": 1e-4, "atol": 1e-5},
}


def ref(name, s, t, **kw):
    """The reference per-token values for torch inputs (bf16 / fp16 values are exact in float64)."""
    return reference.DIVERGENCES[name](s.double().numpy(), t.double().numpy(), **kw)


# ---------------------------------------------------------------------------------------------------------------
# Values against the reference
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_matches_float64_reference(name, shape, temperature):
    s, t = random_logits(shape, seed=sum(shape))
    got = kdiv.get(name)(s, t, temperature=temperature, reduction="none")
    assert got.shape == shape[:-1] and got.dtype == torch.float32
    want = ref(name, s, t, temperature=temperature)
    np.testing.assert_allclose(got.numpy(), want, **TOL[torch.float32])


@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.divergences("with_hyper")
@pytest.mark.parametrize("name, hyper", HYPER_CASES)
def test_hyperparameters_match_reference(name, hyper, temperature):
    s, t = random_logits((6, 50), seed=3, dtype=torch.float64)
    got = kdiv.get(name, **hyper)(s, t, temperature=temperature, reduction="none")
    np.testing.assert_allclose(got.numpy(), ref(name, s, t, temperature=temperature, **hyper), **TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_dtypes(name, dtype):
    s, t = random_logits((3, 7, 1271), seed=5, dtype=dtype)
    got = kdiv.get(name)(s, t, temperature=2.0, reduction="none")
    # half precision is computed (and returned) in float32, float64 stays float64
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    np.testing.assert_allclose(got.double().numpy(), ref(name, s, t, temperature=2.0), **TOL[dtype])


def test_mixed_dtypes_compute_in_float64():
    s, t = random_logits((4, 9), dtype=torch.float64)
    got = kdiv.forward_kl(s, t.float(), reduction="none")
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), reference.forward_kl(s.numpy(), t.float().double().numpy()), rtol=1e-12)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", NAMES)
def test_reductions(name, reduction, masked):
    s, t = random_logits((4, 5, 17), seed=7, dtype=torch.float64)
    mask = torch.from_numpy(np.random.default_rng(8).random((4, 5)) < 0.6) if masked else None
    got = kdiv.get(name)(s, t, mask=mask, reduction=reduction)
    want = reference.reduce(ref(name, s, t), None if mask is None else mask.numpy(), reduction)
    assert got.shape == np.shape(want)
    np.testing.assert_allclose(got.numpy(), want, **TOL[torch.float64])


def test_default_reduction_is_mean():
    s, t = random_logits((3, 11), seed=2, dtype=torch.float64)
    for name in NAMES:
        fn = kdiv.get(name)
        torch.testing.assert_close(fn(s, t), fn(s, t, reduction="none").mean())


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
@pytest.mark.parametrize("name", NAMES)
def test_chunk_size_does_not_change_result(name, chunk_size):
    s, t = random_logits((3, 7, 300), seed=11)
    mask = torch.arange(21).reshape(3, 7) % 4 != 0
    fn = kdiv.get(name)
    results = []
    for cs in (None, chunk_size):
        x = s.clone().requires_grad_()
        loss = fn(x, t, mask=mask, chunk_size=cs, temperature=1.5, reduction="none")
        (loss * torch.linspace(0.5, 2.0, 7)).sum().backward()
        results.append((loss.detach(), x.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_and_broadcast_inputs(name):
    s, t = random_logits((9, 4, 6), seed=12, dtype=torch.float64)
    s_view = s.transpose(0, 2)  # [6, 4, 9], vocab axis not contiguous
    t_view = t.transpose(0, 2)
    fn = kdiv.get(name)
    got = fn(s_view, t_view, reduction="none")
    np.testing.assert_allclose(got.numpy(), ref(name, s_view, t_view), **TOL[torch.float64])
    # the gradient reaches the original (non-contiguous) layout unchanged
    x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    fn(x1.transpose(0, 2), t_view).backward()
    fn(x2.transpose(0, 2).contiguous(), t_view.contiguous()).backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    # one teacher row broadcast (stride 0) over the batch
    s_rows, t_row = s.reshape(-1, 6)[:5], t.reshape(-1, 6)[0].expand(5, 6)
    got = fn(s_rows, t_row, reduction="none")
    np.testing.assert_allclose(got.numpy(), ref(name, s_rows, t_row), **TOL[torch.float64])


# ---------------------------------------------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, hyper", DEFAULT_CASES + HYPER_CASES)
def test_zero_iff_equal(name, hyper):
    fn = kdiv.get(name, **hyper)
    s, t = random_logits((8, 40), seed=13)
    # equal distributions: the same logits, and logits shifted by a constant per row (softmax is shift-invariant)
    shift = torch.linspace(-3, 3, 8).unsqueeze(-1)
    for other in (s, s + shift):
        value = fn(s, other, reduction="none")
        torch.testing.assert_close(value, torch.zeros(8), rtol=0, atol=2e-6)
    # different distributions: strictly positive, except skew at alpha=1 which is identically 0
    value = fn(s, t, reduction="none")
    if hyper.get("alpha") == 1.0:
        torch.testing.assert_close(value, torch.zeros(8), rtol=0, atol=2e-6)
    else:
        assert (value > 1e-4).all()


@pytest.mark.parametrize("name, hyper", DEFAULT_CASES + HYPER_CASES)
def test_non_negative(name, hyper):
    for seed, scale in ((14, 1.0), (15, 5.0), (16, 0.01)):
        s, t = random_logits((50, 30), seed=seed, scale=scale)
        assert (kdiv.get(name, **hyper)(s, t, reduction="none") >= 0).all()


def test_bounds_js_and_tvd():
    # far-apart distributions push JSD towards log 2 and TVD towards 1
    s, t = random_logits((200, 10), seed=17, scale=30.0, dtype=torch.float64)
    jsd = kdiv.js(s, t, beta=0.5, reduction="none")
    tv = kdiv.tvd(s, t, reduction="none")
    assert jsd.max() <= math.log(2) + 1e-12 and jsd.max() > 0.99 * math.log(2)
    assert tv.max() <= 1.0 + 1e-12 and tv.max() > 0.99
    # generalized JSD is bounded by the binary entropy of beta
    for beta in (0.1, 0.3, 0.8):
        bound = -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))
        assert kdiv.js(s, t, beta=beta, reduction="none").max() <= bound + 1e-12


@pytest.mark.divergences("chosen", reason="the symmetric ones")
@pytest.mark.parametrize(
    "name, hyper",
    [("tvd", {}), ("js", {"beta": 0.5}), ("symmetric_kl", {"w": 0.5})],
)
def test_symmetric_divergences_are_symmetric(name, hyper):
    s, t = random_logits((6, 70), seed=18, dtype=torch.float64)
    fn = kdiv.get(name, **hyper)
    torch.testing.assert_close(fn(s, t, reduction="none"), fn(t, s, reduction="none"), rtol=1e-12, atol=1e-14)


def test_asymmetric_ones_are_not():
    s, t = random_logits((6, 70), seed=18, dtype=torch.float64)
    for name, hyper in [("forward_kl", {}), ("js", {"beta": 0.2}), ("skew_kl", {}), ("symmetric_kl", {"w": 0.2})]:
        fn = kdiv.get(name, **hyper)
        assert not torch.allclose(fn(s, t, reduction="none"), fn(t, s, reduction="none"))


def test_reverse_kl_is_forward_kl_with_roles_swapped():
    s, t = random_logits((6, 70), seed=19, dtype=torch.float64)
    torch.testing.assert_close(kdiv.reverse_kl(s, t, reduction="none"), kdiv.forward_kl(t, s, reduction="none"))


@pytest.mark.parametrize(
    "name, hyper, endpoint",
    [
        ("js", {"beta": 0.0}, "forward_kl"),
        ("js", {"beta": 1.0}, "reverse_kl"),
        ("skew_kl", {"alpha": 0.0}, "forward_kl"),
        ("skew_reverse_kl", {"alpha": 0.0}, "reverse_kl"),
        ("symmetric_kl", {"w": 0.0}, "forward_kl"),
        ("symmetric_kl", {"w": 1.0}, "reverse_kl"),
    ],
)
@pytest.mark.divergences("chosen", reason="the divergences with KL endpoints")
def test_endpoints_are_the_kls(name, hyper, endpoint):
    s, t = random_logits((5, 7, 40), seed=20)
    fn, kl = kdiv.get(name, **hyper), kdiv.get(endpoint)
    torch.testing.assert_close(fn(s, t, reduction="none"), kl(s, t, reduction="none"))
    xs, xk = s.clone().requires_grad_(), s.clone().requires_grad_()
    fn(xs, t).backward()
    kl(xk, t).backward()
    torch.testing.assert_close(xs.grad, xk.grad)


def test_js_jumps_at_the_endpoints():
    """As beta -> 0 the generalized JSD shrinks like beta * KL(p||q), then equals KL(p||q) at beta = 0."""
    s, t = random_logits((4, 30), seed=21, scale=1.0, dtype=torch.float64)
    fkl = kdiv.forward_kl(s, t, reduction="none")
    rkl = kdiv.reverse_kl(s, t, reduction="none")
    for eps in (1e-4, 1e-6):
        torch.testing.assert_close(kdiv.js(s, t, beta=eps, reduction="none"), eps * fkl, rtol=20 * eps, atol=0)
        torch.testing.assert_close(kdiv.js(s, t, beta=1 - eps, reduction="none"), eps * rkl, rtol=20 * eps, atol=0)
    torch.testing.assert_close(kdiv.js(s, t, beta=0.0, reduction="none"), fkl)
    torch.testing.assert_close(kdiv.js(s, t, beta=1.0, reduction="none"), rkl)


# skew_reverse_kl once formed m/q as 1 + (1 - alpha)(p/q - 1), which cancels in float32 where p << q and alpha is
# small (1e-2 relative error at alpha=1e-7); skew_kl has the mirror-image risk where q << p
@pytest.mark.parametrize("alpha", [1e-7, 1e-6, 1e-4])
def test_skew_small_alpha_float32(alpha):
    flat = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    one_sided = torch.tensor([[0.0, -30.0], [0.0, -math.inf]])
    for s, t in ((flat, one_sided), (one_sided, flat)):
        for name in ("skew_kl", "skew_reverse_kl"):
            got = kdiv.get(name, alpha=alpha)(s, t, reduction="none")
            np.testing.assert_allclose(got.numpy(), ref(name, s, t, alpha=alpha), rtol=1e-5, err_msg=name)


def _teacher_logits(kind, shape, rng):
    """Teacher logits whose head is one token, a few tokens, or a large part of the vocabulary; or full of ties."""
    vocab = shape[-1]
    if kind == "peaked":  # the top token alone holds more than mu
        t = rng.normal(0, 1, shape)
        t[..., 0] += 12
    elif kind == "zipf":  # a head of a few dozen tokens
        t = -1.1 * np.log(np.arange(1, vocab + 1)) + rng.normal(0, 0.05, shape)
    elif kind == "flat":  # a head of hundreds of tokens
        t = rng.normal(0, 0.3, shape)
    elif kind == "ties":  # four distinct values, large tie groups
        t = rng.integers(0, 4, shape).astype(float)
    else:  # "masked": half the vocabulary at -inf
        t = np.where(rng.random(shape) < 0.5, -np.inf, rng.normal(0, 2, shape))
        t[..., 0] = 0.0
    return torch.from_numpy(t)


@pytest.mark.parametrize("vocab", [50, 1000, 4000])
@pytest.mark.parametrize("kind", ["peaked", "zipf", "flat", "ties", "masked"])
def test_akl_head_split_on_every_kind_of_row(kind, vocab):
    rng = np.random.default_rng(vocab)
    t = _teacher_logits(kind, (6, vocab), rng)
    s = torch.from_numpy(rng.normal(0, 1, (6, vocab)))
    for mu in (0.1, 0.5, 0.9):
        p = reference.softmax_t(t.numpy())
        robust = reference.head_is_robust(p, mu, 1e-12)
        assert robust.any()
        head = kdiv.head_mask(torch.from_numpy(p), mu).numpy()
        assert np.array_equal(head[robust], reference.head_set(p, mu)[robust])
        got = kdiv.akl(s, t, mu=mu, reduction="none").numpy()
        np.testing.assert_allclose(got[robust], reference.akl(s.numpy(), t.numpy(), mu=mu)[robust], rtol=1e-10)
        got32 = kdiv.akl(s.float(), t.float(), mu=mu, reduction="none").numpy()
        robust32 = reference.head_is_robust(reference.softmax_t(t.float().numpy()), mu, 1e-4)
        want32 = reference.akl(s.float().numpy(), t.float().numpy(), mu=mu)
        np.testing.assert_allclose(got32[robust32], want32[robust32], rtol=1e-5, atol=1e-6)


def test_akl_lies_between_fkl_and_rkl():
    s, t = random_logits((30, 25), seed=22, dtype=torch.float64)
    fkl = kdiv.forward_kl(s, t, reduction="none")
    rkl = kdiv.reverse_kl(s, t, reduction="none")
    for mu in (0.05, 0.5, 0.95):
        a = kdiv.akl(s, t, mu=mu, reduction="none")
        assert (a >= torch.minimum(fkl, rkl) - 1e-12).all() and (a <= torch.maximum(fkl, rkl) + 1e-12).all()


def test_akl_equal_distributions_are_defined():
    s, _ = random_logits((3, 4, 12), seed=23)
    x = s.clone().requires_grad_()
    loss = kdiv.akl(x, s.clone())
    loss.backward()
    assert loss.item() == 0.0
    torch.testing.assert_close(x.grad, torch.zeros_like(x), rtol=0, atol=1e-6)  # zero up to rounding, no NaN


# ---------------------------------------------------------------------------------------------------------------
# The AKL head / tail split
# ---------------------------------------------------------------------------------------------------------------


def _probs(rows):
    p = torch.tensor(rows, dtype=torch.float64)
    return p / p.sum(-1, keepdim=True)


def test_head_mask_matches_reference_on_random_rows():
    _, t = random_logits((40, 60), seed=24, dtype=torch.float64)
    p = torch.softmax(t, -1)
    for mu in (0.05, 0.3, 0.5, 0.9):
        assert np.array_equal(kdiv.head_mask(p, mu).numpy(), reference.head_set(p.numpy(), mu))


@pytest.mark.parametrize(
    "row, mu, head",
    [
        ([0.6, 0.3, 0.1], 0.5, [1, 0, 0]),  # top-1 is in the head although its mass exceeds mu
        ([0.3, 0.3, 0.2, 0.2], 0.5, [1, 1, 0, 0]),  # a tie at the top: both, though 0.6 > mu
        ([0.4, 0.2, 0.2, 0.2], 0.5, [1, 0, 0, 0]),  # a tie that straddles mu: all out, never one of them
        ([0.4, 0.2, 0.2, 0.2], 0.85, [1, 0, 0, 0]),
        ([0.4, 0.2, 0.2, 0.2], 0.99, [1, 0, 0, 0]),
        ([0.25, 0.25, 0.25, 0.25], 0.1, [1, 1, 1, 1]),  # uniform: everything is top-1
        ([0.2, 0.5, 0.05, 0.25], 0.8, [0, 1, 0, 1]),  # order of the vocabulary does not matter
        ([0.2, 0.5, 0.05, 0.25], 0.96, [1, 1, 0, 1]),
    ],
)
def test_head_mask_examples(row, mu, head):
    p = _probs(row)
    assert kdiv.head_mask(p, mu).tolist() == [bool(h) for h in head]
    assert reference.head_set(p.numpy(), mu).tolist() == [bool(h) for h in head]


def test_head_mask_is_permutation_invariant_with_ties():
    rng = np.random.default_rng(25)
    # few distinct values, many ties
    p = _probs(rng.integers(1, 5, size=(30, 16)).tolist())
    for mu in (0.2, 0.5, 0.8):
        head = kdiv.head_mask(p, mu)
        assert np.array_equal(head.numpy(), reference.head_set(p.numpy(), mu))
        perm = torch.from_numpy(rng.permutation(16))
        assert torch.equal(kdiv.head_mask(p[:, perm], mu), head[:, perm])


def test_head_threshold_and_head_tail_error():
    s, t = random_logits((5, 3, 20), seed=26, dtype=torch.float64)
    q, p = torch.softmax(s, -1), torch.softmax(t, -1)
    tau = kdiv.head_threshold(p, 0.5)
    assert tau.shape == (5, 3)
    assert torch.equal(p >= tau.unsqueeze(-1), kdiv.head_mask(p, 0.5))
    g_head, g_tail = kdiv.head_tail_error(q, p, 0.5)
    want_head, want_tail = reference.head_tail_error(q.numpy(), p.numpy(), 0.5)
    np.testing.assert_allclose(g_head.numpy(), want_head, rtol=1e-12)
    np.testing.assert_allclose(g_tail.numpy(), want_tail, rtol=1e-12)
    # together they are twice the total variation distance
    torch.testing.assert_close(g_head + g_tail, 2 * kdiv.tvd(s, t, reduction="none"))


# ---------------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------------

GRAD_CASES = [c for c in DEFAULT_CASES + HYPER_CASES if c.values[0] != "akl"] + [case("js", {"beta": 0.5})]


@pytest.mark.divergences("chosen", reason="AKL's weights carry no gradient: see test_akl_gradient_has_detached_weights")
@pytest.mark.parametrize("name, hyper", GRAD_CASES)
def test_gradcheck(name, hyper, small_pair):
    s, t = small_pair
    fn = kdiv.get(name, **hyper)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    x = s.clone().requires_grad_()
    # the full Jacobian at the defaults; fast mode (a random projection of the Jacobian, a few evaluations) for
    # other hyper-parameter values and for the variants
    assert torch.autograd.gradcheck(lambda z: fn(z, t, reduction="none"), (x,), fast_mode=bool(hyper))
    assert torch.autograd.gradcheck(lambda z: fn(z, t, temperature=0.7, mask=mask), (x,), fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda z: fn(z, t, temperature=2.0, chunk_size=1, reduction="sum"), (x,), fast_mode=True
    )


def _akl_with_detached_weights(s, t, mu, temperature):
    """AKL in plain torch autograd; the weights come from the numpy reference, so they carry no gradient."""
    w_head, w_tail = reference.akl_weights(s.detach().numpy(), t.numpy(), mu=mu, temperature=temperature)
    logq = torch.log_softmax(s / temperature, -1)
    logp = torch.log_softmax(t / temperature, -1)
    fkl = (logp.exp() * (logp - logq)).sum(-1)
    rkl = (logq.exp() * (logq - logp)).sum(-1)
    return torch.from_numpy(w_head) * fkl + torch.from_numpy(w_tail) * rkl


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("mu", [0.1, 0.5, 0.9])
def test_akl_gradient_has_detached_weights(mu, temperature):
    s, t = random_logits((4, 6, 23), seed=27, dtype=torch.float64)
    upstream = torch.from_numpy(np.random.default_rng(28).random((4, 6)))
    x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    got = kdiv.akl(x1, t, mu=mu, temperature=temperature, reduction="none")
    want = _akl_with_detached_weights(x2, t, mu, temperature)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_forward_kl_gradient_is_q_minus_p(temperature):
    s, t = random_logits((3, 5, 31), seed=29, dtype=torch.float64)
    x = s.clone().requires_grad_()
    kdiv.forward_kl(x, t, temperature=temperature, reduction="sum").backward()
    q = torch.softmax(s / temperature, -1)
    p = torch.softmax(t / temperature, -1)
    torch.testing.assert_close(x.grad, (q - p) / temperature, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_gradient(name, dtype):
    s, t = random_logits((4, 50), seed=30, dtype=dtype)
    x = s.clone().requires_grad_()
    fn = kdiv.get(name)
    fn(x, t).backward()
    assert x.grad.dtype == dtype
    x64 = s.double().requires_grad_()
    fn(x64, t.double()).backward()
    atol = 1e-7 if dtype == torch.float32 else 2e-4  # the gradient is rounded to the input's dtype
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-2, atol=atol)


@pytest.mark.parametrize("name", NAMES)
def test_teacher_gets_no_gradient(name):
    s, t = random_logits((3, 4, 9), seed=31)
    x, y = s.clone().requires_grad_(), t.clone().requires_grad_()
    loss = kdiv.get(name)(x, y)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert y.grad is None


@pytest.mark.parametrize("name", NAMES)
def test_teacher_only_requires_grad(name):
    s, t = random_logits((3, 9), seed=32)
    y = t.clone().requires_grad_()
    with pytest.warns(kdiv.KdivWarning, match="swapped"):  # the likely reason for such a call (see test_misuse)
        loss = kdiv.get(name)(s, y)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, kdiv.get(name)(s, t))


@pytest.mark.parametrize("name", NAMES)
def test_backward_twice_gives_the_same_gradient(name):
    s, t = random_logits((3, 4, 9), seed=33)
    x = s.clone().requires_grad_()
    loss = kdiv.get(name)(x, t, temperature=1.3)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    g1_copy = g1.clone()
    (g2,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g3,) = torch.autograd.grad(2 * loss, x)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=0)
    torch.testing.assert_close(g3, 2 * g2, rtol=1e-6, atol=0)
    assert torch.equal(g1, g1_copy)  # the second backward did not overwrite the first result


@pytest.mark.parametrize("name", NAMES)
def test_loss_used_twice_in_the_graph(name):
    s, t = random_logits((3, 9), seed=34, dtype=torch.float64)
    x1, x2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    fn = kdiv.get(name)
    loss = fn(x1, t, reduction="none")
    (loss.sum() + 3 * loss[1]).backward()
    (fn(x2, t, reduction="none") * torch.tensor([1.0, 4.0, 1.0], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", NAMES)
def test_mask_counting_no_token(name, reduction):
    s, t = random_logits((2, 3, 8), seed=35)
    x = s.clone().requires_grad_()
    loss = kdiv.get(name)(x, t, mask=torch.zeros(2, 3, dtype=torch.bool), reduction=reduction)
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("name", NAMES)
def test_masked_tokens_get_no_gradient(name):
    s, t = random_logits((2, 3, 8), seed=36)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    x = s.clone().requires_grad_()
    kdiv.get(name)(x, t, mask=mask).backward()
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    assert (x.grad[mask].abs().sum(-1) > 0).all()


# The gradient is computed in forward, with no graph back to the student logits. With create_graph=True (gradient
# penalties, Hessian-vector products) the divergence's second-order term would be silently dropped when another term
# of the loss does have a graph: kdiv refuses, with a message that says why.
@pytest.mark.parametrize("name", NAMES)
def test_double_backward_is_refused(name):
    s, t = random_logits((3, 5), seed=40, dtype=torch.float64)
    x = s.clone().requires_grad_()
    loss = kdiv.get(name)(x, t) + 0.01 * (x**3).sum()
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        torch.autograd.grad(loss, x, create_graph=True)
    # without create_graph the same loss differentiates once
    (g,) = torch.autograd.grad(kdiv.get(name)(x, t) + 0.01 * (x**3).sum(), x)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("name", NAMES)
def test_empty_batch(name):
    for shape in [(0, 5), (2, 0, 5)]:
        x = torch.zeros(shape, requires_grad=True)
        fn = kdiv.get(name)
        assert fn(x, torch.zeros(shape), reduction="none").shape == shape[:-1]
        loss = fn(x, torch.zeros(shape))
        loss.backward()
        assert loss.item() == 0.0 and x.grad.shape == shape


def test_no_grad_mode_and_detached_student():
    s, t = random_logits((3, 9), seed=37)
    x = s.clone().requires_grad_()
    with torch.no_grad():
        loss = kdiv.forward_kl(x, t)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, kdiv.forward_kl(s, t))


# ---------------------------------------------------------------------------------------------------------------
# Registry and masks
# ---------------------------------------------------------------------------------------------------------------


def test_registry_names():
    assert set(kdiv.DIVERGENCES) == set(kdiv.SPECS) == set(reference.DIVERGENCES)
    for name, fn in kdiv.DIVERGENCES.items():
        assert fn is getattr(kdiv, name) is kdiv.spec(name).fn
        assert kdiv.get(name) is fn
        assert name in kdiv.__all__


@pytest.mark.parametrize("name", NAMES)
def test_hyperparameters_and_signature(name):
    spec = kdiv.spec(name)
    assert kdiv.hyperparameters(name) == {h.name: h.default for h in spec.hyper}
    params = inspect.signature(kdiv.DIVERGENCES[name]).parameters
    assert list(params)[:2] == ["student_logits", "teacher_logits"]
    common = {"temperature": 1.0, "mask": None, "reduction": "mean", "chunk_size": None, "vocab_group": None}
    keyword_only = {k: p.default for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keyword_only == {**kdiv.hyperparameters(name), **common}
    assert kdiv.DIVERGENCES[name].__doc__
    assert spec.label and spec.color.startswith("#") and spec.marker[0]


def test_get_binds_hyperparameters():
    s, t = random_logits((3, 9), seed=38)
    fn = kdiv.get("js", beta=0.2, temperature=2.0)
    torch.testing.assert_close(fn(s, t), kdiv.js(s, t, beta=0.2, temperature=2.0))
    assert fn.__name__ == "js" and fn.__doc__ == kdiv.js.__doc__
    # a bound keyword can still be overridden at call time
    torch.testing.assert_close(fn(s, t, beta=0.7), kdiv.js(s, t, beta=0.7, temperature=2.0))


def test_mask_from_labels():
    labels = torch.tensor([[5, -100, 7], [-100, -100, 0]])
    mask = kdiv.mask_from_labels(labels)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[True, False, True], [False, False, True]]
    assert kdiv.mask_from_labels(labels, ignore_index=0).tolist() == [[True, True, True], [True, True, False]]
    # used as the mask, it is the same as dropping the ignored tokens
    s, t = random_logits((2, 3, 10), seed=39, dtype=torch.float64)
    for name in NAMES:
        fn = kdiv.get(name)
        torch.testing.assert_close(fn(s, t, mask=mask), fn(s[mask], t[mask]))
