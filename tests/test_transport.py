"""kdiv.core.transport against independent references: scipy's 1-D Wasserstein, POT's exact and entropic OT, and a
plain float64 numpy SinKD written from its documented formula."""

from __future__ import annotations

import math
import warnings

import kdiv
import numpy as np
import ot
import pytest
import scipy.stats
import torch
from conftest import random_logits
from hypothesis import given
from hypothesis import strategies as st
from kdiv import transport

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # every tensor here is tiny: intra-op threads only add wake-ups, which cost milliseconds on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def softmax_np(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def dirichlet(rng, n, size=(), conc=1.0):
    return rng.dirichlet(np.full(n, conc), size=size)


# ---------------------------------------------------------------------------------------------------------------
# wasserstein_1d
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 7, 41), (2, 5, 1271), (1,), (4, 1)])
@pytest.mark.parametrize("with_support", [False, True])
def test_wasserstein_1d_matches_scipy(shape, with_support):
    s, t = random_logits(shape, seed=3, dtype=F64)
    vocab = shape[-1]
    rng = np.random.default_rng(4)
    support = np.cumsum(rng.uniform(0.1, 2.0, vocab)) - 5.0 if with_support else np.arange(vocab, dtype=float)
    got = kdiv.wasserstein_1d(s, t, support=torch.tensor(support) if with_support else None, reduction="none")
    q, p = softmax_np(s.numpy()).reshape(-1, vocab), softmax_np(t.numpy()).reshape(-1, vocab)
    want = [
        scipy.stats.wasserstein_distance(support, support, u_weights=qi, v_weights=pi)
        for qi, pi in zip(q, p, strict=True)
    ]
    assert got.shape == shape[:-1]
    np.testing.assert_allclose(got.numpy().reshape(-1), want, rtol=1e-10, atol=1e-12)


def test_wasserstein_1d_probs_matches_scipy_and_emd():
    rng = np.random.default_rng(5)
    vocab = 13
    a, b = dirichlet(rng, vocab, (6,), 0.3), dirichlet(rng, vocab, (6,), 0.3)
    a[:, 2] = 0.0  # exact zeros are allowed
    a /= a.sum(-1, keepdims=True)
    x = np.sort(rng.normal(size=vocab))
    got = kdiv.wasserstein_1d_probs(torch.tensor(a), torch.tensor(b), support=torch.tensor(x)).numpy()
    want = [scipy.stats.wasserstein_distance(x, x, ai, bi) for ai, bi in zip(a, b, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)
    cost = np.abs(x[:, None] - x[None, :])
    np.testing.assert_allclose(got, [ot.emd2(ai, bi, cost) for ai, bi in zip(a, b, strict=True)], rtol=1e-9, atol=1e-12)
    # symmetric
    back = kdiv.wasserstein_1d_probs(torch.tensor(b), torch.tensor(a), support=torch.tensor(x)).numpy()
    np.testing.assert_allclose(back, got, rtol=1e-12)


def test_wasserstein_1d_point_masses():
    # all mass on token 1 versus token 4: W1 is the distance between them
    s = torch.full((7,), -math.inf).index_fill(0, torch.tensor([1]), 0.0)
    t = torch.full((7,), -math.inf).index_fill(0, torch.tensor([4]), 0.0)
    assert kdiv.wasserstein_1d(s, t).item() == pytest.approx(3.0)
    support = torch.tensor([0.0, 0.5, 1.0, 2.0, 4.5, 5.0, 9.0])
    assert kdiv.wasserstein_1d(s, t, support=support).item() == pytest.approx(4.0)


def test_wasserstein_1d_reductions_and_mask():
    s, t = random_logits((3, 5, 9), seed=6, dtype=F64)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(0)) > 0.4
    rows = kdiv.wasserstein_1d(s, t, reduction="none")
    masked = kdiv.wasserstein_1d(s, t, mask=mask, reduction="none")
    assert torch.equal(masked, torch.where(mask, rows, 0))
    assert kdiv.wasserstein_1d(s, t, mask=mask).item() == pytest.approx(rows[mask].mean().item())
    assert kdiv.wasserstein_1d(s, t, mask=mask, reduction="sum").item() == pytest.approx(rows[mask].sum().item())
    none_counted = torch.zeros(3, 5, dtype=torch.bool)
    assert kdiv.wasserstein_1d(s, t, mask=none_counted).item() == 0.0
    # temperature divides both logits
    np.testing.assert_allclose(
        kdiv.wasserstein_1d(s, t, temperature=2.5, reduction="none"),
        kdiv.wasserstein_1d(s / 2.5, t / 2.5, reduction="none"),
        rtol=1e-12,
    )


def test_dtypes():
    s, t = random_logits((2, 3, 17), seed=7, dtype=torch.bfloat16)
    for fn in (kdiv.wasserstein_1d, kdiv.sorted_wasserstein, kdiv.sinkd):
        assert fn(s, t).dtype == torch.float32
        assert fn(s.double(), t.double()).dtype == F64
        assert fn(s.float(), t.float()).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# sorted_wasserstein (ULD)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 7, 1271), (5, 2), (1,)])
def test_sorted_wasserstein_matches_numpy_and_scipy(shape):
    s, t = random_logits(shape, seed=8, dtype=F64)
    vocab = shape[-1]
    got = kdiv.sorted_wasserstein(s, t, reduction="none").numpy().reshape(-1)
    q, p = softmax_np(s.numpy()).reshape(-1, vocab), softmax_np(t.numpy()).reshape(-1, vocab)
    plain = np.abs(-np.sort(-q, axis=-1) - -np.sort(-p, axis=-1)).sum(-1)
    np.testing.assert_allclose(got, plain, rtol=1e-12, atol=1e-15)
    # V times the W1 between the probability values seen as two point clouds of mass 1/V each
    clouds = [vocab * scipy.stats.wasserstein_distance(qi, pi) for qi, pi in zip(q, p, strict=True)]
    np.testing.assert_allclose(got, clouds, rtol=1e-9, atol=1e-12)
    # never more than the unsorted L1 distance (2 TVD)
    assert (got <= np.abs(q - p).sum(-1) + 1e-12).all()


def test_sorted_wasserstein_ignores_permutations():
    s, _ = random_logits((4, 50), seed=9, dtype=F64)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    assert kdiv.sorted_wasserstein(s, s[:, perm]).item() == pytest.approx(0.0, abs=1e-15)
    assert kdiv.wasserstein_1d(s, s[:, perm]).item() > 0.1
    a = torch.softmax(s, -1)
    assert kdiv.sorted_wasserstein_probs(a, a[:, perm]).abs().max().item() < 1e-15


# ---------------------------------------------------------------------------------------------------------------
# sinkhorn, sinkhorn_plan
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sinkhorn_log", "sinkhorn"])
@pytest.mark.parametrize("epsilon", [0.05, 0.3, 2.0])
def test_sinkhorn_matches_pot(method, epsilon):
    rng = np.random.default_rng(10)
    n, m = 7, 11
    a, b, cost = dirichlet(rng, n), dirichlet(rng, m), rng.random((n, m))
    want = ot.sinkhorn2(a, b, cost, epsilon, method=method, numItermax=20_000, stopThr=1e-12)
    got = kdiv.sinkhorn(
        torch.tensor(a), torch.tensor(b), torch.tensor(cost), epsilon=epsilon, max_iter=20_000, tol=1e-12
    )
    assert got.item() == pytest.approx(float(want), rel=1e-9, abs=1e-12)
    plan = kdiv.sinkhorn_plan(
        torch.tensor(a), torch.tensor(b), torch.tensor(cost), epsilon=epsilon, max_iter=20_000, tol=1e-12
    ).numpy()
    want_plan = ot.sinkhorn(a, b, cost, epsilon, method=method, numItermax=20_000, stopThr=1e-12)
    np.testing.assert_allclose(plan, want_plan, rtol=1e-7, atol=1e-13)
    np.testing.assert_allclose(plan.sum(1), a, atol=1e-11)
    np.testing.assert_allclose(plan.sum(0), b, atol=1e-11)


def test_sinkhorn_batched_and_broadcast():
    rng = np.random.default_rng(11)
    n, m = 5, 9
    a, b = dirichlet(rng, n, (2, 3), 0.5), dirichlet(rng, m, (3,), 0.5)  # b broadcasts over a's first dim
    costs = rng.random((3, n, m)) * 3
    got = kdiv.sinkhorn(torch.tensor(a), torch.tensor(b), torch.tensor(costs), epsilon=0.2, max_iter=50_000, tol=1e-12)
    assert got.shape == (2, 3)
    want = [
        [
            ot.sinkhorn2(a[i, j], b[j], costs[j], 0.2, method="sinkhorn_log", numItermax=50_000, stopThr=1e-13)
            for j in range(3)
        ]
        for i in range(2)
    ]
    np.testing.assert_allclose(got.numpy(), np.array(want, dtype=float), rtol=1e-8)


def test_sinkhorn_tends_to_emd():
    rng = np.random.default_rng(12)
    n, m = 6, 8
    a, b, cost = dirichlet(rng, n), dirichlet(rng, m), rng.random((n, m))
    exact = ot.emd2(a, b, cost)
    gaps = []
    for eps in (0.5, 0.05, 0.005, 1e-3):
        w = kdiv.sinkhorn(
            torch.tensor(a), torch.tensor(b), torch.tensor(cost), epsilon=eps, max_iter=20_000, tol=1e-10
        ).item()
        gaps.append(w - exact)
    assert all(g >= -1e-9 for g in gaps)  # the entropic plan is feasible, so it costs at least the optimum
    assert gaps == sorted(gaps, reverse=True)
    assert abs(gaps[-1]) < 1e-6 * exact


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("epsilon", [1e-3, 1e-4])
def test_sinkhorn_small_epsilon_stays_finite(dtype, epsilon):
    # a naive kernel exp(-C/eps) underflows to 0 here (exp(-1000) in float64, exp(-104) already in float32)
    rng = np.random.default_rng(13)
    n = 9
    x = np.sort(rng.random(n))
    cost = torch.tensor(np.abs(x[:, None] - x[None, :]), dtype=dtype)
    logits = torch.randn(2, n, dtype=dtype, generator=torch.Generator().manual_seed(2), requires_grad=True)
    a = torch.softmax(logits, -1)
    b = torch.tensor(dirichlet(rng, n), dtype=dtype)
    # 2000 iterations converge for 1e-3 in float64; 1e-4, or float32 (whose potentials, of size max C / eps, lose
    # precision), need many more, and say so: there the value only has to stay finite, with exact column marginals
    converges = epsilon == 1e-3 and dtype == F64
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = kdiv.sinkhorn_plan(a, b, cost, epsilon=epsilon, max_iter=2000)
    assert [issubclass(w.category, kdiv.KdivWarning) for w in caught] == ([] if converges else [True])
    w = (plan * cost).sum((-2, -1))  # what kdiv.sinkhorn returns
    assert torch.isfinite(w).all()
    if converges:
        exact = [ot.emd2(ai, b.numpy(), cost.numpy()) for ai in a.detach().numpy()]
        np.testing.assert_allclose(w.detach().numpy(), exact, rtol=1e-6)
    np.testing.assert_allclose(plan.sum(-2).detach(), b.expand(2, n), atol=1e-4)
    (grad,) = torch.autograd.grad(w.sum(), logits)
    assert torch.isfinite(grad).all()


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log")  # POT's, on the zeros of a
def test_sinkhorn_zero_mass_entries():
    # zeros in a or b: empty rows / columns of the plan, finite value and gradient
    a = torch.tensor([0.0, 0.5, 0.5, 0.0], dtype=F64, requires_grad=True)
    b = torch.tensor([0.25, 0.0, 0.25, 0.5], dtype=F64)
    cost = torch.tensor(np.abs(np.arange(4.0)[:, None] - np.arange(4.0)[None, :]))
    w = kdiv.sinkhorn(a, b, cost, epsilon=0.05, max_iter=5000, tol=1e-12)
    want = ot.sinkhorn2(
        a.detach().numpy(), b.numpy(), cost.numpy(), 0.05, method="sinkhorn_log", numItermax=5000, stopThr=1e-13
    )
    assert w.item() == pytest.approx(float(want), rel=1e-8)
    w.backward()
    assert torch.isfinite(a.grad).all()
    plan = kdiv.sinkhorn_plan(a.detach(), b, cost, epsilon=0.05)
    assert plan[0].abs().max() == 0 and plan[:, 1].abs().max() == 0


def test_sinkhorn_tol_and_max_iter():
    rng = np.random.default_rng(14)
    a, b, cost = (torch.tensor(v) for v in (dirichlet(rng, 6), dirichlet(rng, 6), rng.random((6, 6))))
    with pytest.warns(kdiv.KdivWarning, match="did not converge"):
        one = kdiv.sinkhorn_plan(a, b, cost, epsilon=0.1, max_iter=1)
    # after one iteration the columns are exact, the rows are not
    np.testing.assert_allclose(one.sum(0), b, atol=1e-14)
    assert (one.sum(1) - a).abs().sum() > 1e-3
    loose = kdiv.sinkhorn_plan(a, b, cost, epsilon=0.1, tol=1e-3)
    assert (loose.sum(1) - a).abs().sum() <= 1e-3


# ---------------------------------------------------------------------------------------------------------------
# sinkhorn_divergence
# ---------------------------------------------------------------------------------------------------------------


def test_sinkhorn_divergence_zero_iff_equal():
    rng = np.random.default_rng(15)
    n = 10
    x = rng.normal(size=(n, 2))
    for power in (1, 2):
        cost = torch.tensor(ot.dist(x, x, metric="euclidean") ** power)
        cost = cost / cost.max()
        for eps in (0.03, 0.3, 3.0):
            a = torch.tensor(dirichlet(rng, n, (8,)))
            b = torch.tensor(dirichlet(rng, n, (8,)))
            # tol=0: 300 iterations whether or not they converge; the identities below hold at any iteration
            same = kdiv.sinkhorn_divergence(a, a.clone(), cost, epsilon=eps, max_iter=300, tol=0)
            assert torch.equal(same, torch.zeros_like(same))
            assert (kdiv.sinkhorn_divergence(a, b, cost, epsilon=eps, max_iter=300, tol=0) > 0).all()
            # the raw entropic cost of a with itself is not 0: that is the bias the divergence removes
            assert (kdiv.sinkhorn(a, a, cost, epsilon=eps, max_iter=300, tol=0) > 0).all()


def test_sinkhorn_divergence_matches_pot_terms():
    rng = np.random.default_rng(16)
    n = 8
    x = np.sort(rng.random(n))
    cost = np.abs(x[:, None] - x[None, :])
    a, b = dirichlet(rng, n), dirichlet(rng, n)
    w = lambda u, v: ot.sinkhorn2(u, v, cost, 0.1, method="sinkhorn_log", numItermax=10_000, stopThr=1e-10)
    want = w(a, b) - 0.5 * w(a, a) - 0.5 * w(b, b)
    got = kdiv.sinkhorn_divergence(
        torch.tensor(a), torch.tensor(b), torch.tensor(cost), epsilon=0.1, max_iter=10_000, tol=1e-10
    )
    assert got.item() == pytest.approx(float(want), rel=1e-7)
    # tends to the exact OT cost as epsilon -> 0
    small = kdiv.sinkhorn_divergence(
        torch.tensor(a), torch.tensor(b), torch.tensor(cost), epsilon=3e-3, max_iter=2000, tol=1e-7
    )
    assert small.item() == pytest.approx(ot.emd2(a, b, cost), rel=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# sinkd
# ---------------------------------------------------------------------------------------------------------------


def sinkd_numpy(s, t, *, epsilon, iters, temperature=1.0, mass=None):
    """SinKD from its documented formula, plainly: L1 cost between samples, kernel exp(-C/eps), `iters` rounds of
    (row scaling to `mass`, column scaling to `mass`), loss = sum(plan * cost). mass=None is kdiv's 1/b;
    mass=1 is the doubly stochastic plan of the authors' code."""
    q, p = softmax_np(s / temperature), softmax_np(t / temperature)
    b = q.shape[0]
    mass = 1.0 / b if mass is None else mass
    cost = np.abs(q[:, None, :] - p[None, :, :]).sum(-1)
    plan = np.exp(-cost / epsilon)
    for _ in range(iters):
        plan = plan / plan.sum(1, keepdims=True) * mass
        plan = plan / plan.sum(0, keepdims=True) * mass
    return (plan * cost).sum(), b * (plan * cost).sum(1)


@pytest.mark.parametrize("b,vocab", [(1, 5), (6, 11), (13, 301)])
@pytest.mark.parametrize("epsilon,iters", [(0.1, 20), (0.5, 3), (0.05, 200)])
def test_sinkd_matches_numpy(b, vocab, epsilon, iters):
    s, t = random_logits((b, vocab), seed=17, dtype=F64)
    want, want_rows = sinkd_numpy(s.numpy(), t.numpy(), epsilon=epsilon, iters=iters, temperature=2.0)
    got = kdiv.sinkd(s, t, epsilon=epsilon, max_iter=iters, temperature=2.0)
    assert got.item() == pytest.approx(want, rel=1e-10)
    rows = kdiv.sinkd(s, t, epsilon=epsilon, max_iter=iters, temperature=2.0, reduction="none")
    np.testing.assert_allclose(rows.numpy(), want_rows, rtol=1e-10)
    total = kdiv.sinkd(s, t, epsilon=epsilon, max_iter=iters, temperature=2.0, reduction="sum")
    assert total.item() == pytest.approx(b * want, rel=1e-10)
    # "sum" is the scale of the authors' doubly stochastic plan (total mass b), iteration for iteration
    unit_mass, _ = sinkd_numpy(s.numpy(), t.numpy(), epsilon=epsilon, iters=iters, temperature=2.0, mass=1.0)
    assert total.item() == pytest.approx(unit_mass, rel=1e-10)


def test_sinkd_batch_size_invariance():
    s, t = random_logits((5, 40), seed=18, dtype=F64)
    one = kdiv.sinkd(s, t)
    for copies in (2, 3):
        many = kdiv.sinkd(s.repeat(copies, 1), t.repeat(copies, 1))
        assert many.item() == pytest.approx(one.item(), rel=1e-12)
    # the leading dims are flattened into one batch of tokens
    assert kdiv.sinkd(s.reshape(1, 5, 40), t.reshape(1, 5, 40)).item() == pytest.approx(one.item(), rel=1e-14)
    # a batch of one token: the cost is the L1 distance (2 TVD)
    assert kdiv.sinkd(s[:1], t[:1]).item() == pytest.approx(2 * kdiv.tvd(s[:1], t[:1]).item(), rel=1e-12)


def test_sinkd_mask_drops_tokens():
    s, t = random_logits((2, 4, 30), seed=19, dtype=F64)
    mask = torch.tensor([[True, False, True, True], [False, True, False, True]])
    kept = kdiv.sinkd(s[mask], t[mask])
    assert kdiv.sinkd(s, t, mask=mask).item() == pytest.approx(kept.item(), rel=1e-14)
    rows = kdiv.sinkd(s, t, mask=mask, reduction="none")
    assert rows.shape == (2, 4) and (rows[~mask] == 0).all()
    np.testing.assert_allclose(rows[mask].numpy(), kdiv.sinkd(s[mask], t[mask], reduction="none").numpy())
    # masked tokens may hold anything, even all -inf logits
    s2 = s.clone()
    s2[0, 1] = -math.inf
    assert kdiv.sinkd(s2, t, mask=mask).item() == pytest.approx(kept.item(), rel=1e-14)
    nothing = torch.zeros(2, 4, dtype=torch.bool)
    s3 = s.clone().requires_grad_()
    zero = kdiv.sinkd(s3, t, mask=nothing)
    zero.backward()
    assert zero.item() == 0.0 and (s3.grad == 0).all()


def test_sinkd_not_zero_for_equal_distributions():
    s, _ = random_logits((6, 20), seed=20, dtype=F64)
    same = kdiv.sinkd(s, s)
    assert same.item() > 0  # the entropic plan pays for pairs i != j
    assert kdiv.sinkd(s, s, epsilon=1e-3, max_iter=2000).item() < 1e-6 * same.item()


def test_sinkd_gradient_reaches_student_only():
    s, t = random_logits((4, 9), seed=21)
    s.requires_grad_()
    t.requires_grad_()
    kdiv.sinkd(s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


# ---------------------------------------------------------------------------------------------------------------
# gradients, -inf logits, properties
# ---------------------------------------------------------------------------------------------------------------


def test_gradcheck_logit_losses():
    s, t = random_logits((2, 3, 5), seed=22, dtype=F64)
    s.requires_grad_()
    support = torch.tensor([0.0, 0.3, 1.1, 1.5, 2.8], dtype=F64)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    for fn in (
        lambda x: kdiv.wasserstein_1d(x, t, support=support, temperature=1.7, mask=mask),
        lambda x: kdiv.wasserstein_1d(x, t, reduction="none"),
        lambda x: kdiv.sorted_wasserstein(x, t, temperature=0.8, mask=mask),
        lambda x: kdiv.sinkd(x, t, epsilon=0.2, max_iter=7, mask=mask, reduction="none"),
        lambda x: kdiv.sinkd(x, t, temperature=2.0),
    ):
        assert torch.autograd.gradcheck(fn, (s,))


def test_gradcheck_sinkhorn():
    rng = np.random.default_rng(23)
    la = torch.tensor(rng.normal(size=(2, 4)), requires_grad=True)
    lb = torch.tensor(rng.normal(size=(2, 4)), requires_grad=True)
    cost = torch.tensor(rng.random((4, 4)), requires_grad=True)
    # tol=0: a fixed number of iterations, so the value is a smooth function of the inputs
    kw = dict(epsilon=0.3, max_iter=12, tol=0.0)
    assert torch.autograd.gradcheck(
        lambda x, y, c: kdiv.sinkhorn(x.softmax(-1), y.softmax(-1), c, **kw), (la, lb, cost)
    )
    assert torch.autograd.gradcheck(
        lambda x, y: kdiv.sinkhorn_divergence(x.softmax(-1), y.softmax(-1), cost.detach() + cost.detach().T, **kw),
        (la, lb),
    )
    assert torch.autograd.gradcheck(lambda x, y: kdiv.wasserstein_1d_probs(x.softmax(-1), y.softmax(-1)), (la, lb))


@pytest.mark.parametrize("where", ["student", "teacher", "both"])
def test_neg_inf_logits_give_finite_values_and_gradients(where):
    s, t = random_logits((3, 4, 12), seed=24)
    if where in ("student", "both"):
        s[..., :3] = -math.inf
    if where in ("teacher", "both"):
        t[..., 5:9] = -math.inf
    for fn in (kdiv.wasserstein_1d, kdiv.sorted_wasserstein, kdiv.sinkd):
        x = s.clone().requires_grad_()
        value = fn(x, t)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(x.grad).all(), fn.__name__


@given(
    st.lists(st.sampled_from([-1e4, -3.0, 0.0, 2.5, 1e4, -math.inf]), min_size=5, max_size=5),
    st.lists(st.sampled_from([-1e4, -3.0, 0.0, 2.5, 1e4, -math.inf]), min_size=5, max_size=5),
)
def test_properties_extreme_logits(s_list, t_list):
    s, t = torch.tensor(s_list, dtype=F64), torch.tensor(t_list, dtype=F64)
    if (s == -math.inf).all() or (t == -math.inf).all():
        with pytest.raises(ValueError, match="all -inf"):
            kdiv.wasserstein_1d(s, t)
        return
    support = torch.tensor([-2.0, -1.0, 0.5, 3.0, 3.5], dtype=F64)
    w = kdiv.wasserstein_1d(s, t, support=support)
    assert 0 <= w.item() <= 5.5 + 1e-12
    assert w.item() == pytest.approx(kdiv.wasserstein_1d(t, s, support=support).item(), abs=1e-12)
    u = kdiv.sorted_wasserstein(s, t)
    assert 0 <= u.item() <= 2 * kdiv.tvd(s, t).item() + 1e-12
    k = kdiv.sinkd(torch.stack([s, t]), torch.stack([t, s]), max_iter=5)
    assert math.isfinite(k.item()) and 0 <= k.item() <= 2
    if torch.equal(s, t):
        assert w.item() == 0 and u.item() == 0


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


def _probs(n=4):
    return torch.full((n,), 1.0 / n, dtype=F64)


BAD_SINKHORN = [
    (dict(epsilon=0.0), "epsilon"),
    (dict(epsilon=-1.0), "epsilon"),
    (dict(epsilon=float("nan")), "epsilon"),
    (dict(max_iter=0), "max_iter"),
    (dict(max_iter=2.5), "max_iter"),
    (dict(tol=-1e-3), "tol"),
    (dict(tol=float("inf")), "tol"),
    (dict(cost=torch.zeros(4, 5, dtype=F64)), "cost"),
    (dict(cost=torch.zeros(4, dtype=F64)), "cost"),
    (dict(cost=torch.full((4, 4), float("nan"), dtype=F64)), "cost"),
    (dict(cost=np.zeros((4, 4))), "cost"),
    (
        dict(
            cost=torch.zeros(3, 4, 4, dtype=F64),
            a=torch.full((2, 4), 0.25, dtype=F64),
            b=torch.full((2, 4), 0.25, dtype=F64),
        ),
        "do not broadcast",
    ),
    (dict(a=torch.tensor([0.5, 0.6, -0.1, 0.0], dtype=F64)), "a has negative"),
    (dict(a=torch.tensor([0.5, 0.6, 0.1, 0.0], dtype=F64)), "a must sum to 1"),
    (dict(b=torch.tensor([0.5, 0.5, float("nan"), 0.0], dtype=F64)), "b contains NaN"),
    (dict(b=torch.ones(4, dtype=torch.int64)), "b must be a floating"),
]


@pytest.mark.parametrize("fn", [kdiv.sinkhorn, kdiv.sinkhorn_plan, kdiv.sinkhorn_divergence])
@pytest.mark.parametrize("override,message", BAD_SINKHORN)
def test_sinkhorn_bad_input(fn, override, message):
    args = dict(a=_probs(), b=_probs(), cost=torch.ones(4, 4, dtype=F64))
    args.update(override)
    with pytest.raises(ValueError, match=message):
        fn(args.pop("a"), args.pop("b"), args.pop("cost"), **args)


def test_sinkhorn_divergence_needs_one_support():
    with pytest.raises(ValueError, match="a and b must have the same shape"):
        kdiv.sinkhorn_divergence(_probs(4), _probs(5), torch.ones(4, 5, dtype=F64))


@pytest.mark.parametrize(
    "support,message",
    [
        (torch.tensor([0.0, 1.0, 1.0, 2.0]), "strictly increasing"),
        (torch.tensor([3.0, 2.0, 1.0, 0.0]), "strictly increasing"),
        (torch.arange(5.0), "length 4"),
        (torch.zeros(2, 2), "1-D"),
        (torch.tensor([0.0, 1.0, float("inf"), 4.0]), "support contains"),
    ],
)
def test_support_bad_input(support, message):
    s, t = random_logits((3, 4), seed=25)
    with pytest.raises(ValueError, match=message):
        kdiv.wasserstein_1d(s, t, support=support)
    with pytest.raises(ValueError, match=message):
        kdiv.wasserstein_1d_probs(s.softmax(-1), t.softmax(-1), support=support)


@pytest.mark.parametrize("fn", [kdiv.wasserstein_1d, kdiv.sorted_wasserstein, kdiv.sinkd])
def test_logit_losses_bad_input(fn):
    s, t = random_logits((3, 4), seed=26)
    cases = [
        ((s, t[:, :3]), {}, "different vocabulary sizes"),
        ((s.long(), t), {}, "student_logits must have a floating dtype"),
        ((s, t.clone().fill_(float("nan"))), {}, "teacher_logits contains NaN"),
        ((s.clone().fill_(-math.inf), t), {}, "student_logits has a counted token whose logits are all -inf"),
        ((s, t), {"temperature": 0.0}, "temperature"),
        ((s, t), {"reduction": "batchmean"}, "reduction"),
        ((s, t), {"mask": torch.ones(4, dtype=torch.bool)}, "mask"),
        ((s, t), {"mask": torch.ones(3)}, "mask"),
    ]
    if fn is kdiv.sinkd:
        cases += [
            ((s, t), {"epsilon": 0.0}, "epsilon"),
            ((s, t), {"max_iter": 0}, "max_iter"),
            ((s, t), {"tol": -1.0}, "tol"),
        ]
    for args, kw, message in cases:
        with pytest.raises(ValueError, match=message):
            fn(*args, **kw)


def test_probs_level_shape_mismatch():
    for fn in (kdiv.wasserstein_1d_probs, kdiv.sorted_wasserstein_probs):
        with pytest.raises(ValueError, match="a and b must have the same shape"):
            fn(_probs(4), _probs(5))


def test_exports_and_docs():
    for name in transport.__all__:
        fn = getattr(kdiv, name)
        assert fn is getattr(transport, name)
        assert "Shapes:" in fn.__doc__ and "Reference:" in fn.__doc__
    # the registry holds the chunked token-level divergences; the transport losses are called directly
    assert not set(transport.__all__) & set(kdiv.DIVERGENCES)
