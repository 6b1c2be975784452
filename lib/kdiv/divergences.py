r"""Token-level divergences used as knowledge-distillation losses, on logits.

Every function has one signature::

    fn(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", chunk_size=None, **hyper)

- ``student_logits``, ``teacher_logits``: ``[..., V]``, same shape, any floating dtype. The student comes first
  (as in TRL and Liger-Kernel); ``q = softmax(student_logits / T)`` is the student, ``p = softmax(teacher_logits /
  T)`` the teacher. bf16/fp16 inputs are computed in fp32 (chunk by chunk), float64 in float64.
- No ``T**2`` factor is applied (as in TRL and Liger-Kernel); multiply by ``temperature**2`` yourself to follow
  Hinton et al.
- ``mask``: optional bool ``[...]``, True = the token counts (see :func:`mask_from_labels`).
- ``reduction``: ``"mean"`` over counted tokens (0 when no token counts), ``"sum"``, or ``"none"`` (per-token
  ``[...]``, 0 where masked). The result is fp32 (float64 for float64 inputs).
- Gradients reach the student only; the teacher is treated as a constant.
- ``chunk_size``: rows per chunk (default: chosen from the vocabulary size); see :mod:`kdiv.chunked`.

A ``-inf`` logit is a token outside that model's vocabulary. Its log-probability is taken as
``log(float32 tiny) = -87.34`` (:data:`kdiv.chunked.LOG_FLOOR`) so that a token masked by one model but not the
other gives a finite loss and a NaN-free gradient (exact ``KL(q||p)`` would be ``+inf`` there).
"""

from __future__ import annotations

import math

import torch

from ._checks import check_closed_unit, check_open_unit
from .chunked import rowwise_divergence
from .headtail import head_threshold

__all__ = [
    "forward_kl",
    "reverse_kl",
    "symmetric_kl",
    "js",
    "tvd",
    "skew_kl",
    "skew_reverse_kl",
    "akl",
    "mask_from_labels",
]


# ---------------------------------------------------------------------------------------------------------------
# Row kernels: (logq [n, V], logp [n, V], want_grad) -> (loss [n], d loss / d(student logits / T) [n, V] or None).
# For a loss L(q), the gradient through the softmax is q * (g - sum(q * g)) with g = dL/dq.
# ---------------------------------------------------------------------------------------------------------------


def _softmax_backward(q, g):
    return q * (g - (q * g).sum(-1, keepdim=True))


def _fkl_rkl(logq, logp, want_grad):
    """Both KL directions from one pass: (fkl, rkl, dz_fkl, dz_rkl)."""
    p, q = logp.exp(), logq.exp()
    log_ratio = logp - logq
    fkl = (p * log_ratio).sum(-1)
    rkl = -(q * log_ratio).sum(-1)
    if not want_grad:
        return fkl, rkl, None, None
    # d FKL / dz = q - p;  d RKL / dz = q * (log q/p - RKL), since sum(q * log q/p) = RKL
    return fkl, rkl, q - p, q * (-log_ratio - rkl.unsqueeze(-1))


def _forward_kl_rows(logq, logp, want_grad):
    p = logp.exp()
    loss = (p * (logp - logq)).sum(-1)
    return loss, (logq.exp() - p) if want_grad else None


def _reverse_kl_rows(logq, logp, want_grad):
    q = logq.exp()
    r = logq - logp
    loss = (q * r).sum(-1)
    return loss, (q * (r - loss.unsqueeze(-1))) if want_grad else None


def _symmetric_kl_rows(logq, logp, want_grad, *, w):
    fkl, rkl, dz_f, dz_r = _fkl_rkl(logq, logp, want_grad)
    loss = (1 - w) * fkl + w * rkl
    return loss, ((1 - w) * dz_f + w * dz_r) if want_grad else None


def _log_mix(loga, logb, weight_a):
    """log(weight_a * a + (1 - weight_a) * b), stably."""
    return torch.logaddexp(loga + math.log(weight_a), logb + math.log1p(-weight_a))


def _js_rows(logq, logp, want_grad, *, beta):
    if beta == 0.0:
        return _forward_kl_rows(logq, logp, want_grad)
    if beta == 1.0:
        return _reverse_kl_rows(logq, logp, want_grad)
    logm = _log_mix(logp, logq, beta)
    p, q = logp.exp(), logq.exp()
    r = logq - logm
    kl_qm = (q * r).sum(-1)
    loss = beta * (p * (logp - logm)).sum(-1) + (1 - beta) * kl_qm
    # dL/dq = (1 - beta) * log(q / m): the terms from m's dependence on q cancel
    return loss, ((1 - beta) * q * (r - kl_qm.unsqueeze(-1))) if want_grad else None


def _tvd_rows(logq, logp, want_grad):
    diff = logq.exp() - logp.exp()
    loss = 0.5 * diff.abs().sum(-1)
    if not want_grad:
        return loss, None
    return loss, _softmax_backward(logq.exp(), 0.5 * diff.sign())


def _skew_kl_rows(logq, logp, want_grad, *, alpha):
    if alpha == 0.0:
        return _forward_kl_rows(logq, logp, want_grad)
    logm = _log_mix(logp, logq, alpha)
    loss = (logp.exp() * (logp - logm)).sum(-1)
    if not want_grad:
        return loss, None
    # dL/dq = -(1 - alpha) p / m, bounded by (1 - alpha) / alpha
    return loss, _softmax_backward(logq.exp(), -(1 - alpha) * (logp - logm).exp())


def _skew_reverse_kl_rows(logq, logp, want_grad, *, alpha):
    if alpha == 0.0:
        return _reverse_kl_rows(logq, logp, want_grad)
    logm = _log_mix(logq, logp, alpha)
    q = logq.exp()
    r = logq - logm
    loss = (q * r).sum(-1)
    if not want_grad:
        return loss, None
    # dL/dq = log(q / m) + 1 - alpha q / m; the constant 1 cancels through the softmax
    return loss, _softmax_backward(q, r - alpha * r.exp())


def akl_weights(logq, logp, mu):
    """AKL's (head weight, tail weight) per row from log-probabilities; (1/2, 1/2) where the student is exact."""
    p, q = logp.exp(), logq.exp()
    head = p >= head_threshold(p, mu).unsqueeze(-1)
    err = (p - q).abs()
    g_head = torch.where(head, err, 0).sum(-1)
    g_total = err.sum(-1)
    # The reference code divides 0 by 0 when p == q; any weights give loss 0 and gradient 0 there.
    exact = g_total == 0
    w_head = torch.where(exact, 0.5, g_head / torch.where(exact, 1, g_total))
    return w_head, 1 - w_head


def _akl_rows(logq, logp, want_grad, *, mu):
    w_head, w_tail = akl_weights(logq, logp, mu)
    fkl, rkl, dz_f, dz_r = _fkl_rkl(logq, logp, want_grad)
    loss = w_head * fkl + w_tail * rkl
    if not want_grad:
        return loss, None
    return loss, w_head.unsqueeze(-1) * dz_f + w_tail.unsqueeze(-1) * dz_r


# ---------------------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------------------


def forward_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", chunk_size=None):
    r"""Forward KL, :math:`\mathrm{KL}(p\,\|\,q) = \sum_v p_v \log(p_v / q_v)`: the standard KD loss.

    This is the true KL divergence, 0 when the student equals the teacher. DistiLLM's and MiniLLM's
    ``forward_kl`` return the cross-entropy :math:`-\sum_v p_v \log q_v`, which differs by the teacher's entropy
    (same gradient, different value). Gradient with respect to the student logits: ``(q - p) / T``.

    Shapes: logits [..., V]; mask [...]; returns [] or [...] with reduction="none".
    Reference: Hinton et al., "Distilling the Knowledge in a Neural Network", 2015.
    """
    return rowwise_divergence(_forward_kl_rows, student_logits, teacher_logits, temperature=temperature,
                              mask=mask, reduction=reduction, chunk_size=chunk_size, hyper={})


def reverse_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", chunk_size=None):
    r"""Reverse KL, :math:`\mathrm{KL}(q\,\|\,p) = \sum_v q_v \log(q_v / p_v)`.

    Shapes: logits [..., V]; mask [...]; returns [] or [...] with reduction="none".
    Reference: Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024.
    """
    return rowwise_divergence(_reverse_kl_rows, student_logits, teacher_logits, temperature=temperature,
                              mask=mask, reduction=reduction, chunk_size=chunk_size, hyper={})


def symmetric_kl(student_logits, teacher_logits, *, w=0.5, temperature=1.0, mask=None, reduction="mean",
                 chunk_size=None):
    r"""Weighted sum of both KL directions: :math:`(1-w)\,\mathrm{KL}(p\|q) + w\,\mathrm{KL}(q\|p)`.

    ``w=0.5`` is (half of) the "FKL+RKL" baseline of the AKL paper; w=0 gives forward KL, w=1 reverse KL.

    Shapes: logits [..., V]; mask [...]; returns [] or [...] with reduction="none".
    Reference: Wu et al., arXiv 2404.02657 (COLING 2025), Table 2 "FKL+RKL".
    """
    w = check_closed_unit("w", w)
    return rowwise_divergence(_symmetric_kl_rows, student_logits, teacher_logits, temperature=temperature,
                              mask=mask, reduction=reduction, chunk_size=chunk_size, hyper={"w": w})


def js(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, mask=None, reduction="mean", chunk_size=None):
    r"""Generalized Jensen-Shannon divergence in the GKD / TRL convention.

    .. math:: \mathrm{JSD}_\beta = \beta\,\mathrm{KL}(p\,\|\,m) + (1-\beta)\,\mathrm{KL}(q\,\|\,m),
              \qquad m = \beta p + (1-\beta) q,

    with beta=0 defined as forward KL(p||q) and beta=1 as reverse KL(q||p), as TRL's ``generalized_jsd_loss``
    does. beta=0.5 is the symmetric JSD, bounded by log 2.

    Near the endpoints the formula does *not* approach the KLs: as beta -> 0, m -> q and the value shrinks like
    beta * KL(p||q) towards 0, then jumps to KL(p||q) at exactly beta=0 (symmetrically at beta=1).

    Shapes: logits [..., V]; mask [...]; returns [] or [...] with reduction="none".
    Reference: Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated
    Mistakes" (GKD), ICLR 2024.
    """
    beta = check_closed_unit("beta", beta)
    return rowwise_divergence(_js_rows, student_logits, teacher_logits, temperature=temperature, mask=mask,
                              reduction=reduction, chunk_size=chunk_size, hyper={"beta": beta})


def tvd(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", chunk_size=None):
    r"""Total variation distance, :math:`\tfrac12 \sum_v |p_v - q_v|`, in [0, 1].

    Its gradient with respect to q is bounded (``sign(q - p) / 2``), the robustness TaiLr argues for.

    Shapes: logits [..., V]; mask [...]; returns [] or [...] with reduction="none".
    Reference: Ji et al., "Tailoring Language Generation Models under Total Variation Distance" (TaiLr),
    ICLR 2023; Wen et al., "f-Divergence Minimization for Sequence-Level Knowledge Distillation", ACL 2023.
    """
    return rowwise_divergence(_tvd_rows, student_logits, teacher_logits, temperature=temperature, mask=mask,
                              reduction=reduction, chunk_size=chunk_size, hyper={})


def skew_kl(student_logits, teacher_logits, *, alpha=0.1, temperature=1.0, mask=None, reduction="mean",
            chunk_size=None):
    r"""Skew forward KL (DistiLLM): :math:`\mathrm{KL}(p\,\|\,\alpha p + (1-\alpha) q)`.

    alpha=0 gives forward KL, alpha=1 gives 0. For alpha > 0 the gradient on classes the student under-weights
    is bounded by (1 - alpha) / alpha. DistiLLM's code computes the cross-entropy form
    :math:`-\sum p \log m` (differs by the teacher's entropy).

    Shapes: logits [..., V]; mask [...]; returns [] or [...] with reduction="none".
    Reference: Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models", ICML 2024.
    """
    alpha = check_closed_unit("alpha", alpha)
    return rowwise_divergence(_skew_kl_rows, student_logits, teacher_logits, temperature=temperature, mask=mask,
                              reduction=reduction, chunk_size=chunk_size, hyper={"alpha": alpha})


def skew_reverse_kl(student_logits, teacher_logits, *, alpha=0.1, temperature=1.0, mask=None, reduction="mean",
                    chunk_size=None):
    r"""Skew reverse KL (DistiLLM): :math:`\mathrm{KL}(q\,\|\,\alpha q + (1-\alpha) p)`.

    alpha=0 gives reverse KL, alpha=1 gives 0.

    Shapes: logits [..., V]; mask [...]; returns [] or [...] with reduction="none".
    Reference: Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models", ICML 2024.
    """
    alpha = check_closed_unit("alpha", alpha)
    return rowwise_divergence(_skew_reverse_kl_rows, student_logits, teacher_logits, temperature=temperature,
                              mask=mask, reduction=reduction, chunk_size=chunk_size, hyper={"alpha": alpha})


def akl(student_logits, teacher_logits, *, mu=0.5, temperature=1.0, mask=None, reduction="mean", chunk_size=None):
    r"""Adaptive KL (AKL): forward and reverse KL weighted per token by the student's error on head and tail.

    .. math:: \mathrm{AKL} = \frac{g_\text{head}}{g_\text{head} + g_\text{tail}}\,\mathrm{KL}(p\|q)
                           + \frac{g_\text{tail}}{g_\text{head} + g_\text{tail}}\,\mathrm{KL}(q\|p)

    where the head is the teacher's top tokens with cumulative mass <= mu (the top-1 token always included) and
    g_head, g_tail are the summed |p - q| over head and tail (:func:`kdiv.headtail.head_tail_error`). The weights
    carry no gradient. Where the student equals the teacher both errors are 0: the reference code divides 0 by 0;
    kdiv uses weights (1/2, 1/2), which give loss 0 and gradient 0, as any weights would.

    Shapes: logits [..., V]; mask [...]; returns [] or [...] with reduction="none".
    Reference: Wu et al., "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large Language
    Models", COLING 2025 (arXiv 2404.02657).
    """
    mu = check_open_unit("mu", mu)
    return rowwise_divergence(_akl_rows, student_logits, teacher_logits, temperature=temperature, mask=mask,
                              reduction=reduction, chunk_size=chunk_size, hyper={"mu": mu})


def mask_from_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The bool mask of counted tokens from language-model labels: True where ``labels != ignore_index``.

    Shapes: labels [...] (integer) -> [...] (bool), to pass as ``mask=`` with logits [..., V].
    """
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError("labels must be an integer torch.Tensor")
    return labels != ignore_index
