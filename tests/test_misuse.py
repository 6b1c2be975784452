"""Likely misuse gets a clear message: a KdivWarning for calls that compute but are probably wrong (swapped arguments,
probabilities for logits, a top-k teacher padded with -inf, a Sinkhorn solver that stopped early), a ValueError
naming the argument for input that has no meaning (head splits of non-probabilities, a non-integer ignore_index)."""

from __future__ import annotations

import math
import warnings

import kdiv
import pytest
import torch
from cases import NAMES


def pair(shape=(3, 4, 50), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def kdiv_warnings(fn, *args, **kwargs):
    """The KdivWarning messages `fn(*args, **kwargs)` emits."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(*args, **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, kdiv.KdivWarning)]


# ---------------------------------------------------------------------------------------------------------------
# Swapped arguments
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_swapped_arguments_warn(name):
    student, teacher = pair()
    teacher.requires_grad_(True)  # the "teacher" is being trained: the arguments are the wrong way round
    with pytest.warns(kdiv.KdivWarning, match="swapped"):
        loss = kdiv.get(name)(student, teacher)
    assert not loss.requires_grad  # ... which is why: nothing would get a gradient


@pytest.mark.parametrize("name", NAMES)
def test_correct_calls_do_not_warn(name):
    student, teacher = pair()
    student.requires_grad_(True)
    assert kdiv_warnings(kdiv.get(name), student, teacher) == []
    # both require grad (the teacher is trained too, elsewhere): no reason to think they were swapped
    assert kdiv_warnings(kdiv.get(name), student, teacher.requires_grad_(True)) == []
    # log-probabilities are logits
    assert kdiv_warnings(kdiv.get(name), student.log_softmax(-1), teacher.detach().log_softmax(-1)) == []
    with torch.no_grad():  # a loss only logged: the teacher's requires_grad does not matter
        assert kdiv_warnings(kdiv.get(name), student.detach(), teacher) == []


def test_the_warning_points_at_the_callers_line():
    student, teacher = pair()
    with pytest.warns(kdiv.KdivWarning) as record:
        kdiv.forward_kl(student, teacher.requires_grad_(True))
    assert record[0].filename == __file__


def test_distillation_loss_warns_on_swapped_arguments():
    student, teacher = pair((2, 5, 30))
    labels = torch.randint(0, 30, (2, 5))
    with pytest.warns(kdiv.KdivWarning, match="swapped"):
        kdiv.DistillationLoss("forward_kl", kd_ratio=1.0)(student, teacher.requires_grad_(True), labels)


# ---------------------------------------------------------------------------------------------------------------
# Probabilities where logits are expected
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
def test_probabilities_for_logits_warn(name, which):
    student, teacher = pair()
    args = [student, teacher]
    i = ["student_logits", "teacher_logits"].index(which)
    args[i] = args[i].softmax(-1)
    with pytest.warns(kdiv.KdivWarning, match=f"{which} looks like probabilities"):
        kdiv.get(name)(*args)


def test_probabilities_warning_reads_one_row_only():
    student, teacher = pair()
    teacher[0, 0] = teacher[0, 0].softmax(-1)  # only the first row is read: cheap, and enough for softmax output
    with pytest.warns(kdiv.KdivWarning, match="teacher_logits looks like probabilities"):
        kdiv.forward_kl(student, teacher)
    student, teacher = pair()
    teacher[1:] = teacher[1:].softmax(-1)
    assert kdiv_warnings(kdiv.forward_kl, student, teacher) == []


def test_probabilities_warning_on_a_topk_student():
    student, teacher = pair()
    topk = kdiv.topk_from_logits(teacher, 8)
    with pytest.warns(kdiv.KdivWarning, match="student_logits looks like probabilities"):
        kdiv.reverse_kl(student.softmax(-1), topk)
    assert kdiv_warnings(kdiv.reverse_kl, student, topk) == []


def test_no_false_alarm_on_logits_that_happen_to_be_non_negative():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.rand(4, 100, generator=g), torch.rand(4, 100, generator=g)  # non-negative, sum ~50
    assert kdiv_warnings(kdiv.js, student, teacher) == []
    # a vocabulary of one token: every row "sums to 1"; nothing to warn about
    assert kdiv_warnings(kdiv.forward_kl, torch.ones(3, 1), torch.ones(3, 1)) == []


# ---------------------------------------------------------------------------------------------------------------
# A top-k teacher padded with -inf
# ---------------------------------------------------------------------------------------------------------------


def padded_topk(teacher, k):
    idx = teacher.topk(k, dim=-1).indices
    return torch.full_like(teacher, -math.inf).scatter(-1, idx, teacher.gather(-1, idx))


@pytest.mark.divergences("chosen", reason="those with a reverse-KL term (kernels.REVERSE_TERM), and w=1 without")
@pytest.mark.parametrize(
    "name,hyper", [("reverse_kl", {}), ("symmetric_kl", {"w": 0.5}), ("akl", {"mu": 0.5}), ("symmetric_kl", {"w": 1})]
)
def test_padded_topk_teacher_warns_for_reverse_terms(name, hyper):
    student, teacher = pair()
    padded = padded_topk(teacher, 4)
    with pytest.warns(kdiv.KdivWarning, match="top-k teacher padded with -inf") as record:
        value = kdiv.get(name, **hyper)(student, padded)
    assert "kdiv.topk_from_logits" in str(record[0].message)
    # the warning is right: the floor dominates; the top-k teacher gives the divergence of what k ids carry
    assert value > 10 * kdiv.get(name, **hyper)(student, kdiv.topk_from_logits(teacher, 4))


@pytest.mark.divergences("chosen", reason="those without a reverse-KL term")
@pytest.mark.parametrize("name", ["forward_kl", "js", "tvd", "skew_kl", "skew_reverse_kl"])
def test_padded_teacher_does_not_warn_where_the_floor_does_not_matter(name):
    student, teacher = pair()
    # no reverse-KL term: -inf teacher tokens contribute nothing (or a bounded mixture term)
    assert kdiv_warnings(kdiv.get(name), student, padded_topk(teacher, 4)) == []
    assert kdiv_warnings(kdiv.symmetric_kl, student, padded_topk(teacher, 4), w=0.0) == []


def test_few_masked_teacher_ids_do_not_warn():
    # a teacher vocabulary a little smaller than the student's (DistillationLoss's vocab="pad"): a few -inf ids are
    # kdiv's documented convention, not a padded top-k teacher
    student, teacher = pair()
    teacher[..., -3:] = -math.inf
    assert kdiv_warnings(kdiv.reverse_kl, student, teacher) == []


# ---------------------------------------------------------------------------------------------------------------
# Sinkhorn that did not converge
# ---------------------------------------------------------------------------------------------------------------


def far_apart(n=50, dtype=torch.float32):
    x = torch.linspace(0, 10, n, dtype=dtype)
    cost = (x[:, None] - x[None]).abs()
    return torch.softmax(-((x - 1) ** 2), 0), torch.softmax(-((x - 9) ** 2), 0), cost


@pytest.mark.parametrize("fn", [kdiv.sinkhorn, kdiv.sinkhorn_plan, kdiv.sinkhorn_divergence])
def test_sinkhorn_warns_when_it_stops_before_converging(fn):
    a, b, cost = far_apart()
    with pytest.warns(kdiv.KdivWarning, match=rf"{fn.__name__} did not converge.*off by .* in L1") as record:
        fn(a, b, cost, epsilon=1e-6, max_iter=100)
    assert "max_iter" in str(record[0].message) and "epsilon" in str(record[0].message)


def test_sinkhorn_unconverged_value_is_the_reason_for_the_warning():
    a, b, cost = far_apart(dtype=torch.float64)
    exact = 7.822919737  # ot.emd2 of this pair (see test_transport for the POT comparisons)
    assert kdiv_warnings(kdiv.sinkhorn, a, b, cost, epsilon=0.1) == []
    assert kdiv.sinkhorn(a, b, cost, epsilon=0.1) == pytest.approx(exact, rel=1e-5)
    with pytest.warns(kdiv.KdivWarning):
        assert kdiv.sinkhorn(a, b, cost, epsilon=1e-6) < 0.5 * exact  # the value it warns about is far off


def test_sinkhorn_converged_or_fixed_iterations_do_not_warn():
    a, b, cost = far_apart()
    assert kdiv_warnings(kdiv.sinkhorn, a, b, cost, epsilon=1.0) == []
    # tol=0: a fixed number of iterations by request (SinKD's way), nothing to check
    assert kdiv_warnings(kdiv.sinkhorn, a, b, cost, epsilon=1e-6, max_iter=5, tol=0) == []
    s, t = pair((8, 20))
    assert kdiv_warnings(kdiv.sinkd, s, t) == []


# ---------------------------------------------------------------------------------------------------------------
# The head split of things that are not probabilities; mask_from_labels
# ---------------------------------------------------------------------------------------------------------------

HEAD_FUNCTIONS = [kdiv.head_mask, kdiv.head_threshold, lambda p, mu=0.5: kdiv.head_tail_error(p, p, mu)]


@pytest.mark.parametrize("fn", HEAD_FUNCTIONS)
def test_head_split_refuses_nan(fn):
    p = torch.softmax(torch.randn(3, 6), -1)
    p[1, 2] = math.nan
    with pytest.raises(ValueError, match="_probs contains NaN"):
        fn(p, 0.5)


@pytest.mark.parametrize("fn", HEAD_FUNCTIONS)
def test_head_split_refuses_logits(fn):
    logits = torch.randn(3, 6)
    with pytest.raises(ValueError, match=r"_probs must hold probabilities in \[0, 1\].*logits\?"):
        fn(logits, 0.5)


@pytest.mark.parametrize("fn", HEAD_FUNCTIONS)
def test_head_split_refuses_rows_that_do_not_sum_to_one(fn):
    p = torch.softmax(torch.randn(3, 6), -1)
    p[2] *= 0.9
    with pytest.raises(ValueError, match="sum to 1.*off by 0.1"):
        fn(p, 0.5)


@pytest.mark.parametrize("fn", HEAD_FUNCTIONS)
def test_head_split_of_empty_tensors(fn):
    with pytest.raises(ValueError, match="V >= 1"):
        fn(torch.empty(0), 0.5)
    with pytest.raises(ValueError, match="V >= 1"):
        fn(torch.empty(3, 0), 0.5)
    fn(torch.empty(0, 6), 0.5)  # no rows: nothing to split, no error


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_head_split_accepts_rounded_probabilities(dtype):
    # softmax output in any dtype passes, however its rounding makes the rows sum
    p = torch.softmax(torch.randn(16, 4000, dtype=torch.float64) * 3, -1).to(dtype)
    assert kdiv.head_mask(p, 0.5).any(-1).all()


@pytest.mark.parametrize("value", [None, 1.5, "-100", True, torch.tensor([-100])])
def test_mask_from_labels_needs_an_integer_ignore_index(value):
    with pytest.raises(ValueError, match="ignore_index must be an int"):
        kdiv.mask_from_labels(torch.tensor([1, -100, 3]), ignore_index=value)


def test_mask_from_labels_integer_kinds():
    import numpy as np

    labels = torch.tensor([1, -100, 3, 0])
    assert kdiv.mask_from_labels(labels).tolist() == [True, False, True, True]
    assert kdiv.mask_from_labels(labels, ignore_index=np.int64(0)).tolist() == [True, True, True, False]


def test_fused_linear_warns_on_swapped_arguments():
    g = torch.Generator().manual_seed(3)
    h_s, w_s = torch.randn(6, 8, generator=g), torch.randn(40, 8, generator=g)
    h_t, w_t = torch.randn(6, 12, generator=g), torch.randn(40, 12, generator=g)
    with pytest.warns(kdiv.KdivWarning, match="swapped"):
        kdiv.fused_linear("reverse_kl", h_s, w_s, h_t, w_t.requires_grad_(True))
    assert kdiv_warnings(kdiv.fused_linear, "reverse_kl", h_s, w_s.requires_grad_(True), h_t, w_t) == []
