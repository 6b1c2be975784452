r"""The head / tail split of a teacher distribution that AKL (Wu et al., 2024) is built on.

Sort the teacher's probabilities in descending order. The *head* is the run of top tokens whose cumulative mass
stays at or below ``mu``; the top-1 token always belongs to it. The *tail* is everything else. AKL weighs forward KL
by the student's error on the head and reverse KL by its error on the tail.

Ties are split symmetrically: tokens of equal teacher probability are all in the head or all in the tail, so the
split does not depend on how a sort orders equal values. Formally, token j is in the head when

.. math::  \sum_{k:\, p_k \ge p_j} p_k \le \mu \quad\text{or}\quad p_j = \max_k p_k .

For distinct probabilities this is exactly the reference AKL code's ``cumsum(sorted p) <= mu`` with the first
token forced into the head. The head is therefore ``{j : p_j >= tau}`` for one threshold ``tau`` per row, which is
what :func:`head_threshold` returns.
"""

from __future__ import annotations

import torch

from .checks import check_open_unit

__all__ = ["head_threshold", "head_mask", "head_tail_error"]


# Rows must sum to 1 within this (summed in float64), looser for half-precision probabilities.
_SUM_TOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2}
_DEFAULT_SUM_TOL = 1e-3


def check_probabilities(name: str, x) -> None:
    """x is a floating tensor [..., V], V >= 1, of probabilities: no NaN, none negative or above 1, each row summing
    to 1; otherwise a ValueError naming the argument (and saying so where x looks like logits)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
        raise ValueError(f"{name} must be a floating torch.Tensor of shape [..., V] (probabilities)")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(x.shape)}")
    if x.numel() == 0:
        return
    low, high, nan = torch.stack([x.min().double(), x.max().double(), x.isnan().any().double()]).tolist()
    if nan:
        raise ValueError(f"{name} contains NaN")
    if low < 0 or high > 1:
        raise ValueError(
            f"{name} must hold probabilities in [0, 1], got values in [{low:.3g}, {high:.3g}]: logits? pass "
            f"softmax(logits, -1)"
        )
    error = (x.sum(-1, dtype=torch.float64) - 1).abs().max().item()
    tol = _SUM_TOL.get(x.dtype, _DEFAULT_SUM_TOL)
    if error > tol:
        raise ValueError(
            f"{name} must be probability rows that sum to 1, but a row's sum is off by {error:.3g} (more than {tol:g})"
        )


def threshold(teacher_probs: torch.Tensor, mu: float) -> torch.Tensor:
    """:func:`head_threshold` without the argument checks, for callers that made sure of them (the engine)."""
    with torch.no_grad():
        values, _ = teacher_probs.sort(dim=-1, descending=True)
        mass = values.cumsum(dim=-1)
        # Tie-aware cumulative mass: a token's mass counts every token at least as probable, so read the cumsum
        # at the last member of its tie group. searchsorted needs ascending order, hence the negation.
        neg = -values.contiguous()
        last_of_group = torch.searchsorted(neg, neg, right=True) - 1
        mass = mass.gather(-1, last_of_group)
        n_head = (mass <= mu).sum(dim=-1, keepdim=True).clamp_min(1)
        return values.gather(-1, n_head - 1).squeeze(-1)


def head_threshold(teacher_probs: torch.Tensor, mu: float = 0.5) -> torch.Tensor:
    """The smallest teacher probability that is still in the head, per row.

    Shapes: teacher_probs [..., V] -> [...]. The head is ``teacher_probs >= head_threshold(teacher_probs, mu)``.
    ``teacher_probs`` must be probabilities (rows in [0, 1] summing to 1): a ValueError otherwise.
    """
    check_probabilities("teacher_probs", teacher_probs)
    return threshold(teacher_probs, check_open_unit("mu", mu))


def head_mask(teacher_probs: torch.Tensor, mu: float = 0.5) -> torch.Tensor:
    """Bool mask of the head tokens (see the module docstring). Shapes: [..., V] -> [..., V]."""
    tau = head_threshold(teacher_probs, mu)
    return teacher_probs >= tau.unsqueeze(-1)


def head_tail_error(student_probs: torch.Tensor, teacher_probs: torch.Tensor, mu: float = 0.5):
    r"""The student's absolute error on the teacher's head and on its tail.

    :math:`g_\text{head} = \sum_{j \in \text{head}} |p_j - q_j|`, :math:`g_\text{tail}` likewise over the tail,
    so ``g_head + g_tail`` is twice the total variation distance.

    Shapes: student_probs, teacher_probs [..., V] -> (g_head [...], g_tail [...]). No gradient flows through it.
    Reference: Wu et al., "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large Language
    Models", COLING 2025 (arXiv 2404.02657), Eq. 8-9.
    """
    check_probabilities("student_probs", student_probs)
    if student_probs.shape != teacher_probs.shape:
        raise ValueError(
            f"student_probs and teacher_probs must have the same shape, got "
            f"{tuple(student_probs.shape)} and {tuple(teacher_probs.shape)}"
        )
    head = head_mask(teacher_probs, mu)
    with torch.no_grad():
        err = (teacher_probs - student_probs).abs()
        g_head = torch.where(head, err, 0).sum(-1)
        g_tail = torch.where(head, 0, err).sum(-1)
    return g_head, g_tail
