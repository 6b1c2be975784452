r"""The token-level divergences written the usual way, for the benchmark and as the tests' plain versions.

Each builds its temporaries over the whole [N, V] logits (log_softmax, softmax, elementwise products, a sum over
the vocabulary) and lets autograd do the backward, as DistiLLM's, MiniLLM's and TRL's losses do. Same signature,
conventions and results as :mod:`kdiv.core.divergences` (``-inf`` logits get log-probability ``LOG_FLOOR``;
masked tokens count 0; ``"mean"`` over counted tokens), so that ``tests/test_chunked.py`` can hold the chunked
kernels against them.

Shapes: logits [..., V]; mask [...]; returns [] or [...] with reduction="none".
"""

from __future__ import annotations

import math

import torch

from ..core.engine.chunked import LOG_FLOOR
from ..core.headtail import head_threshold


def _log_probs(logits, temperature):
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return torch.log_softmax(z / temperature, dim=-1).nan_to_num(neginf=LOG_FLOOR)


def _reduce(rows, mask, reduction):
    if mask is not None:
        rows = rows * mask
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    n = rows.numel() if mask is None else mask.sum()
    return rows.sum() / (n.clamp_min(1) if isinstance(n, torch.Tensor) else max(n, 1))


def _kls(student_logits, teacher_logits, temperature):
    logq = _log_probs(student_logits, temperature)
    logp = _log_probs(teacher_logits.detach(), temperature)
    q, p = logq.exp(), logp.exp()
    return (p * (logp - logq)).sum(-1), (q * (logq - logp)).sum(-1)


def forward_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean"):
    """KL(p || q)."""
    logq = _log_probs(student_logits, temperature)
    logp = _log_probs(teacher_logits.detach(), temperature)
    return _reduce((logp.exp() * (logp - logq)).sum(-1), mask, reduction)


def reverse_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean"):
    """KL(q || p)."""
    logq = _log_probs(student_logits, temperature)
    logp = _log_probs(teacher_logits.detach(), temperature)
    return _reduce((logq.exp() * (logq - logp)).sum(-1), mask, reduction)


def symmetric_kl(student_logits, teacher_logits, *, w=0.5, temperature=1.0, mask=None, reduction="mean"):
    """(1 - w) KL(p || q) + w KL(q || p)."""
    fkl, rkl = _kls(student_logits, teacher_logits, temperature)
    return _reduce((1 - w) * fkl + w * rkl, mask, reduction)


def _log_mix(loga, logb, weight_a):
    """log(weight_a * a + (1 - weight_a) * b) from log a, log b."""
    if weight_a == 1.0:
        return loga + 0 * logb  # (keeps the student in the graph, with gradient 0)
    return torch.logaddexp(loga + math.log(weight_a), logb + math.log1p(-weight_a))


def js(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, mask=None, reduction="mean"):
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q; KL(p||q) at beta=0, KL(q||p) at 1."""
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature=temperature, mask=mask, reduction=reduction)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature=temperature, mask=mask, reduction=reduction)
    logq = _log_probs(student_logits, temperature)
    logp = _log_probs(teacher_logits.detach(), temperature)
    logm = _log_mix(logp, logq, beta)
    rows = beta * (logp.exp() * (logp - logm)).sum(-1) + (1 - beta) * (logq.exp() * (logq - logm)).sum(-1)
    return _reduce(rows, mask, reduction)


def tvd(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean"):
    """1/2 sum |p - q|."""
    q = _log_probs(student_logits, temperature).exp()
    p = _log_probs(teacher_logits.detach(), temperature).exp()
    return _reduce(0.5 * (p - q).abs().sum(-1), mask, reduction)


def skew_kl(student_logits, teacher_logits, *, alpha=0.1, temperature=1.0, mask=None, reduction="mean"):
    """KL(p || alpha p + (1 - alpha) q)."""
    if alpha == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature=temperature, mask=mask, reduction=reduction)
    logq = _log_probs(student_logits, temperature)
    logp = _log_probs(teacher_logits.detach(), temperature)
    logm = _log_mix(logp, logq, alpha)
    return _reduce((logp.exp() * (logp - logm)).sum(-1), mask, reduction)


def skew_reverse_kl(student_logits, teacher_logits, *, alpha=0.1, temperature=1.0, mask=None, reduction="mean"):
    """KL(q || alpha q + (1 - alpha) p)."""
    if alpha == 0.0:
        return reverse_kl(student_logits, teacher_logits, temperature=temperature, mask=mask, reduction=reduction)
    logq = _log_probs(student_logits, temperature)
    logp = _log_probs(teacher_logits.detach(), temperature)
    logm = _log_mix(logq, logp, alpha)
    return _reduce((logq.exp() * (logq - logm)).sum(-1), mask, reduction)


def akl(student_logits, teacher_logits, *, mu=0.5, temperature=1.0, mask=None, reduction="mean"):
    """Adaptive KL: head/tail error weights (no gradient) times FKL and RKL; the head by a full sort."""
    logq = _log_probs(student_logits, temperature)
    logp = _log_probs(teacher_logits.detach(), temperature)
    q, p = logq.exp(), logp.exp()
    with torch.no_grad():
        head = p >= head_threshold(p, mu).unsqueeze(-1)
        err = (p - q).abs()
        g_head = (err * head).sum(-1)
        g_total = err.sum(-1)
        w_head = torch.where(g_total == 0, 0.5, g_head / g_total.clamp_min(torch.finfo(g_total.dtype).tiny))
    fkl = (p * (logp - logq)).sum(-1)
    rkl = (q * (logq - logp)).sum(-1)
    return _reduce(w_head * fkl + (1 - w_head) * rkl, mask, reduction)


def soft_cross_entropy(student_logits, teacher_probs):
    """torch's cross-entropy with soft targets (probabilities), mean over tokens: the yardstick."""
    return torch.nn.functional.cross_entropy(student_logits, teacher_probs)


DIVERGENCES = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "symmetric_kl": symmetric_kl,
    "js": js,
    "tvd": tvd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "akl": akl,
}
