"""kdiv.TopK: a top-k teacher in place of teacher logits, for every divergence and every treatment of the missing
mass; against the float64 references of tests/reference_topk.py, and against the dense path at k = V."""

from __future__ import annotations

import math

import kdiv
import numpy as np
import pytest
import reference_topk
import torch
from cases import DEFAULT_CASES, HYPER_CASES, NAMES
from conftest import random_logits
from kdiv.topk import topk_from_logits

F_DIVERGENCES = [n for n in NAMES if n != "akl"]


def _teacher(shape, k, *, seed=0, scale=2.0, temperature=1.0, dtype=torch.float64):
    """(student logits, teacher TopK of its own logits, the teacher's logits)."""
    s, t = random_logits(shape, seed=seed, scale=scale, dtype=dtype)
    return s, topk_from_logits(t, k, temperature=temperature), t


def _reference(name, s, top, missing, temperature=1.0, **hyper):
    return reference_topk.topk_divergence(
        name,
        s.double().numpy(),
        top.indices.numpy(),
        top.logprobs.double().numpy(),
        missing=missing,
        temperature=temperature,
        t0=top.temperature,
        **hyper,
    )


@pytest.mark.parametrize("name, hyper", DEFAULT_CASES + HYPER_CASES)
@pytest.mark.parametrize("missing", ["tail", "renorm"])
def test_matches_float64_reference(name, hyper, missing):
    s, top, _ = _teacher((3, 5, 41), 6, seed=1)
    got = kdiv.get(name)(s, top.with_missing(missing), reduction="none", **hyper)
    want = _reference(name, s, top, missing, **hyper)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("missing", ["tail", "renorm"])
def test_gradient_matches_finite_differences_of_the_reference(name, missing):
    s, top, _ = _teacher((2, 3, 9), 4, seed=2)
    s.requires_grad_(True)
    kdiv.get(name)(s, top.with_missing(missing), reduction="sum", temperature=1.5).backward()
    # AKL's weights carry no gradient: they are held at their values while the student moves
    w = None
    if name == "akl":
        cats = reference_topk.categories(
            s.detach().numpy(), top.indices.numpy(), top.logprobs.numpy(), missing=missing, temperature=1.5
        )
        w = reference_topk.akl_head_weight(*cats, 0.5, missing == "tail")
    want = reference_topk.numerical_gradient(
        lambda x: _reference(name, torch.from_numpy(x), top, missing, temperature=1.5, akl_weight=w),
        s.detach().numpy(),
    )
    np.testing.assert_allclose(s.grad.numpy(), want, rtol=1e-6, atol=1e-8)


@pytest.mark.divergences("chosen", reason="fkl_topk is forward KL's top-k form")
@pytest.mark.parametrize("temperature, t0", [(1.0, 1.0), (2.0, 1.0), (0.7, 0.7)])
def test_fkl_topk_matches_reference_values_and_gradient(temperature, t0):
    s, top, _ = _teacher((3, 4, 23), 5, seed=3, temperature=t0)
    top = top.with_missing("fkl_topk")
    s.requires_grad_(True)
    got = kdiv.forward_kl(s, top, reduction="none", temperature=temperature)
    want = _reference("forward_kl", s.detach(), top, "fkl_topk", temperature=temperature)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-9, atol=1e-12)
    got.sum().backward()
    grad = reference_topk.numerical_gradient(
        lambda x: _reference("forward_kl", torch.from_numpy(x), top, "fkl_topk", temperature=temperature),
        s.detach().numpy(),
    )
    np.testing.assert_allclose(s.grad.numpy(), grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("missing", ["tail", "renorm", "fkl_topk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_k_equal_to_vocab_reproduces_the_dense_result(name, missing, dtype):
    if missing == "fkl_topk" and name != "forward_kl":
        return  # refused (see test_fkl_topk_is_forward_kl_only)
    s, t = random_logits((4, 6, 37), seed=4, dtype=dtype)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    for temperature, t0 in [(1.0, 1.0), (0.5, 1.3)]:
        top = topk_from_logits(t, 37, missing=missing, temperature=t0)
        a = s.clone().requires_grad_(True)
        b = s.clone().requires_grad_(True)
        fn = kdiv.get(name)
        for reduction in ["sum", "none"]:
            dense = fn(a, t, mask=mask, temperature=temperature, reduction=reduction)
            got = fn(b, top, mask=mask, temperature=temperature, reduction=reduction)
            assert got.dtype == dense.dtype and got.shape == dense.shape
            tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(got, dense, **tol)
        (ga,) = torch.autograd.grad(fn(a, t, mask=mask, temperature=temperature), a)
        (gb,) = torch.autograd.grad(fn(b, top, mask=mask, temperature=temperature), b)
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_student_and_fp16_logprobs(name):
    s, top, _ = _teacher((2, 5, 300), 16, seed=5, dtype=torch.float32)
    top16 = kdiv.TopK(top.indices.int(), top.logprobs.half())
    s16 = s.bfloat16().requires_grad_(True)
    got = kdiv.get(name)(s16, top16, reduction="none")
    assert got.dtype == torch.float32
    want = _reference(name, s16.detach().float(), top16, "tail")
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-4, atol=1e-6)
    got.sum().backward()
    assert s16.grad.dtype == torch.bfloat16 and bool(torch.isfinite(s16.grad).all())


@pytest.mark.divergences("chosen", reason="the data-processing bound holds for f-divergences; AKL is not one")
@pytest.mark.parametrize("name", F_DIVERGENCES)
def test_tail_is_a_lower_bound_of_the_dense_f_divergence(name):
    for seed, scale in [(6, 1.0), (7, 3.0), (8, 6.0)]:
        s, top, t = _teacher((8, 200), 10, seed=seed, scale=scale)
        dense = kdiv.get(name)(s, t, reduction="none")
        tail = kdiv.get(name)(s, top, reduction="none")
        assert bool((tail <= dense + 1e-12).all())


def test_akl_head_inside_the_top_k_is_the_dense_head():
    # a peaked teacher: the top 8 ids hold far more than mu, so the head (and the weights) are the dense ones
    s, top, t = _teacher((6, 300), 8, seed=9, scale=6.0)
    p = torch.softmax(t, -1)
    assert bool((p.topk(8).values.sum(-1) > 0.5).all())
    head = kdiv.head_mask(p, 0.5)
    assert bool(torch.gather(head, 1, top.indices).sum(-1).eq(head.sum(-1)).all())
    got = kdiv.akl(s, top, reduction="none")
    want = _reference("akl", s, top, "tail")
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9)


def test_akl_head_that_needs_more_than_k_ids_is_the_k_ids():
    # a flat teacher: the 4 ids hold less than mu = 0.5, so the dense head would need more than 4 ids; on the
    # top-k teacher the head is the 4 ids and the tail category is AKL's tail
    s, top, t = _teacher((5, 100), 4, seed=10, scale=0.5)
    assert bool((top.logprobs.exp().sum(-1) < 0.5).all())
    got = kdiv.akl(s, top, reduction="none")
    q = torch.softmax(s, -1)
    p_ids, q_ids = top.logprobs.exp(), q.gather(1, top.indices)
    p_tail, q_tail = 1 - p_ids.sum(-1), 1 - q_ids.sum(-1)
    g_head = (p_ids - q_ids).abs().sum(-1)
    w = g_head / (g_head + (p_tail - q_tail).abs())
    p_c = torch.cat([p_ids, p_tail[:, None]], 1)
    q_c = torch.cat([q_ids, q_tail[:, None]], 1)
    fkl = (p_c * (p_c / q_c).log()).sum(-1)
    rkl = (q_c * (q_c / p_c).log()).sum(-1)
    torch.testing.assert_close(got, w * fkl + (1 - w) * rkl, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got.numpy(), _reference("akl", s, top, "tail"), rtol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_masked_tokens_are_never_read(name):
    s, top, _ = _teacher((3, 4, 50), 5, seed=11)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1, 2] = mask[2, 0] = False
    s_bad, ids, lp = s.clone(), top.indices.clone(), top.logprobs.clone()
    s_bad[1, 2] = math.nan
    ids[1, 2] = 0  # duplicated, and out of range below
    ids[2, 0, 0] = 10**6
    lp[1, 2] = 5.0
    for missing in ["tail", "renorm"]:
        a = s.clone().requires_grad_(True)
        b = s_bad.clone().requires_grad_(True)
        want = kdiv.get(name)(a, top.with_missing(missing), mask=mask, reduction="none")
        got = kdiv.get(name)(b, kdiv.TopK(ids, lp, missing), mask=mask, reduction="none")
        torch.testing.assert_close(got, want)
        want.sum().backward()
        got.sum().backward()
        torch.testing.assert_close(b.grad, a.grad)
        assert float(b.grad[1, 2].abs().sum()) == 0.0


def test_no_counted_token_gives_zero():
    s, top, _ = _teacher((2, 3, 20), 4)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for missing in kdiv.topk.TREATMENTS:
        assert float(kdiv.forward_kl(s, top.with_missing(missing), mask=mask)) == 0.0


@pytest.mark.divergences("chosen", reason="the divergences fkl_topk refuses")
@pytest.mark.parametrize("name", [n for n in NAMES if n != "forward_kl"])
def test_fkl_topk_is_forward_kl_only(name):
    s, top, _ = _teacher((2, 10), 3)
    with pytest.raises(ValueError, match="fkl_topk.*forward_kl only"):
        kdiv.get(name)(s, top.with_missing("fkl_topk"))


def test_teacher_given_as_logprobs_at_another_temperature():
    # logprobs taken at T0 = 2 and used at T = 2 are exact for any k ("tail" on the k + 1 categories)
    s, t = random_logits((3, 60), seed=12, dtype=torch.float64)
    top = topk_from_logits(t, 7, temperature=2.0)
    got = kdiv.reverse_kl(s, top, temperature=2.0, reduction="none")
    want = _reference("reverse_kl", s, top, "tail", temperature=2.0)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9)


def test_student_with_minus_inf_outside_and_inside_the_ids():
    s, top, _ = _teacher((2, 30), 5, seed=13)
    s[0, top.indices[0, 0]] = -math.inf  # a teacher id outside the student's vocabulary
    s[1, :] = -math.inf
    s[1, top.indices[1]] = 0.0  # the student has no mass outside the ids
    for name in ["forward_kl", "reverse_kl", "js", "akl"]:
        x = s.clone().requires_grad_(True)
        loss = kdiv.get(name)(x, top)
        loss.backward()
        assert math.isfinite(float(loss.detach())) and bool(torch.isfinite(x.grad).all())


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a ValueError naming the argument
# ---------------------------------------------------------------------------------------------------------------


def test_bad_topk_construction():
    ids = torch.tensor([[0, 1, 2]])
    lp = torch.log(torch.tensor([[0.5, 0.2, 0.1]]))
    with pytest.raises(ValueError, match="same k"):
        kdiv.TopK(ids, lp[:, :2])
    with pytest.raises(ValueError, match="logprobs must have the shape of indices"):
        kdiv.TopK(ids, lp.expand(2, 3))
    with pytest.raises(ValueError, match="indices must be an int64 or int32"):
        kdiv.TopK(ids.float(), lp)
    with pytest.raises(ValueError, match="logprobs must be a floating"):
        kdiv.TopK(ids, ids)
    with pytest.raises(ValueError, match="k >= 1"):
        kdiv.TopK(ids[:, :0], lp[:, :0])
    with pytest.raises(ValueError, match="missing must be one of"):
        kdiv.TopK(ids, lp, missing="zero")
    with pytest.raises(ValueError, match="temperature"):
        kdiv.TopK(ids, lp, temperature=0.0)


@pytest.mark.parametrize("name", NAMES)
def test_bad_topk_against_the_student(name):
    fn = kdiv.get(name)
    s = torch.randn(2, 3, 10)
    ids = torch.stack([torch.randperm(10)[:4] for _ in range(6)]).reshape(2, 3, 4)
    lp = torch.log_softmax(torch.randn(2, 3, 10), -1)[..., :4]
    fn(s, kdiv.TopK(ids, lp))
    with pytest.raises(ValueError, match="indices of teacher_logits must lie in"):
        fn(s, kdiv.TopK(ids.clone().index_fill_(2, torch.tensor([0]), 10), lp))
    with pytest.raises(ValueError, match="indices of teacher_logits must lie in"):
        fn(s, kdiv.TopK(ids.clone().index_fill_(2, torch.tensor([1]), -1), lp))
    dup = ids.clone()
    dup[1, 2, 3] = dup[1, 2, 0]
    with pytest.raises(ValueError, match="distinct"):
        fn(s, kdiv.TopK(dup, lp))
    with pytest.raises(ValueError, match="logprobs of teacher_logits must be log-probabilities"):
        fn(s, kdiv.TopK(ids, lp + 3.0))  # raw logits, not log-probabilities
    with pytest.raises(ValueError, match="sum to"):
        fn(s, kdiv.TopK(ids, torch.full_like(lp, -0.5)))  # each <= 0 but 4 * exp(-0.5) > 1
    lp_nan = lp.clone()
    lp_nan[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="logprobs of teacher_logits contains NaN"):
        fn(s, kdiv.TopK(ids, lp_nan))
    with pytest.raises(ValueError, match="same leading shape"):
        fn(s[:, :2], kdiv.TopK(ids, lp))
    with pytest.raises(ValueError, match="more than the student's vocabulary"):
        fn(s[..., :3], kdiv.TopK(ids.clamp_max(2), lp))
    s_nan = s.clone()
    s_nan[0, 1, 7] = math.nan
    with pytest.raises(ValueError, match="student_logits contains NaN"):
        fn(s_nan, kdiv.TopK(ids, lp))
    with pytest.raises(ValueError, match="mask"):
        fn(s, kdiv.TopK(ids, lp), mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="reduction"):
        fn(s, kdiv.TopK(ids, lp), reduction="avg")


def test_rounding_above_zero_is_accepted():
    s = torch.randn(1, 5)
    lp = torch.tensor([[1e-6, -20.0]])
    loss = kdiv.forward_kl(s, kdiv.TopK(torch.tensor([[1, 3]]), lp))
    assert math.isfinite(float(loss))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_k_equal_to_vocab_on_cuda(name):
    s, t = random_logits((4, 6, 1000), seed=14)
    s, t = s.cuda(), t.cuda()
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    fn = kdiv.get(name)
    dense = fn(a, t, temperature=1.5)
    got = fn(b, topk_from_logits(t, 1000), temperature=1.5)
    torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-6)
    dense.backward()
    got.backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)
