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

import torch

from ._checks import check_closed_unit, check_open_unit
from .chunked import Scratch, rowwise_divergence
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
# Row kernels: (chunk, **hyper) -> loss [n], for a kdiv.chunked.Chunk of n rows. When chunk.grad is not None the
# kernel also writes chunk.scale * d loss / d zs there (zs = student logits / T).
#
# Notation: log q = zs - lse_s and log p = zt - lse_t are never materialised: a sum such as sum_v q_v log(q_v/p_v)
# is a row dot product with zs - zt plus the row constant lse_t - lse_s (q sums to 1). Through the softmax a loss
# L(q) has the gradient q * (g - sum(q * g)) with g = dL/dq, so any row constant in g (lse_s, the +1 of
# d(q log q)/dq) cancels. Where a -inf logit (or an underflowing probability that a kernel divides by) would make a
# term wrong, the loss holds a product like p * (zt - zs) that is then NaN or inf, which sends exactly those rows to
# the engine's floored path (see kdiv.chunked); where it would not (tvd; a -inf on the side a skew divergence only
# mixes in), the fast path's result already equals the floored one to within float32 tiny.
# ---------------------------------------------------------------------------------------------------------------


def _mix_kl_grad(c, d, k, rkl, w_f, w_r):
    """grad = scale * (w_f * (q - p) + w_r * q * (log q/p - rkl)), with log q/p = d + k; w_f, w_r float or [n, 1].

    Both brackets are formed before anything multiplies them, so the gradient is exactly 0 where q == p."""
    s = c.scale
    torch.sub(c.q, c.p, out=c.grad).mul_(s * w_f)
    d.add_(k - rkl.unsqueeze(-1))
    if isinstance(w_r, float):
        c.grad.addcmul_(c.q, d, value=s * w_r)
    else:
        c.grad.addcmul_(c.q, d.mul_(s * w_r))


def _forward_kl_rows(c):
    d = torch.sub(c.zt, c.zs, out=c.scratch(0))  # log p/q - (lse_s - lse_t)
    loss = c.dot(c.p, d) + (c.lse_s - c.lse_t).squeeze(-1)
    if c.grad is not None:
        torch.sub(c.q, c.p, out=c.grad)  # d FKL / dz = q - p
        if c.scale != 1.0:
            c.grad.mul_(c.scale)
    return loss


def _reverse_kl_rows(c):
    d = torch.sub(c.zs, c.zt, out=c.scratch(0))  # log q/p - k
    k = c.lse_t - c.lse_s
    loss = c.dot(c.q, d) + k.squeeze(-1)
    if c.grad is not None:
        # d RKL / dz = q * (log q/p - RKL), since sum(q * log q/p) = RKL
        torch.mul(c.q, c.scale * (k - loss.unsqueeze(-1)), out=c.grad)
        c.grad.addcmul_(c.q, d, value=c.scale)
    return loss


def _symmetric_kl_rows(c, *, w):
    d = torch.sub(c.zs, c.zt, out=c.scratch(0))
    k = c.lse_t - c.lse_s
    fkl = -c.dot(c.p, d) - k.squeeze(-1)
    rkl = c.dot(c.q, d) + k.squeeze(-1)
    if c.grad is not None:
        _mix_kl_grad(c, d, k, rkl, 1.0 - w, w)
    return (1 - w) * fkl + w * rkl


# log(p/q) is clamped at this value on the floored path: beyond it q < exp(-80) p, and every term the mixture
# kernels take from it is within 1e-34 of its limit (log(p/m) -> -log(weight of p in m), q log(q/m) -> 0).
_MAX_LOG_RATIO = 80.0


def _log_ratio(c, over_p=False):
    """log(p/q) (log(q/p) if over_p) per element from the logits, in scratch(0); clamped at _MAX_LOG_RATIO on the
    floored path. -inf or NaN where a logit is -inf: that row's loss is then non-finite (see the module comment)."""
    if over_p:
        ratio = torch.sub(c.zs, c.zt, out=c.scratch(0)).add_(c.lse_t - c.lse_s)
    else:
        ratio = torch.sub(c.zt, c.zs, out=c.scratch(0)).add_(c.lse_s - c.lse_t)
    return ratio.clamp_max_(_MAX_LOG_RATIO) if c.floored else ratio


_ZERO = {}


def _zero(x):
    """A 0-dim zero of x's dtype and device (the `input` of an addcdiv that only divides)."""
    key = (x.dtype, x.device)
    if key not in _ZERO:
        _ZERO[key] = torch.zeros((), dtype=x.dtype, device=x.device)
    return _ZERO[key]


# The mixture kernels (js, skew_kl, skew_reverse_kl) need, for m = w a + (1 - w) b with (a, b) = (p, q) or (q, p),
# log(m/b) = log1p(x) with x = w (a/b - 1). In that form every log term is exactly 0 where p == q and keeps its
# precision where p ~ q, and no log-probability of magnitude ~|logit| is subtracted from another (which costs ~1e-6
# in float32). The fast path forms x = w (a - b) / b from the probabilities (a division, where an expm1 would cost
# about a third of the whole kernel); a b that underflows to 0 makes that row's loss non-finite, and the engine's
# floored path, which forms x = w expm1(log a/b) from the logits instead, recomputes it. 1 + x >= 1 - w: when w is
# close to 1 the sum cancels where a << b, so there m/b = (1 - w) + w a/b is formed directly (a few more passes,
# for w > _NEAR_ONE only).
_NEAR_ONE = 0.95


def _log_mix_ratio(c, w, over_p=False, want_ratio=True):
    """(m/q in scratch(1), log m/q in scratch(2)) for m = w p + (1 - w) q; or, if over_p, (m/p, log m/p) for
    m = w q + (1 - w) p. Uses scratch(0) on the floored path and scratch(3) for w > _NEAR_ONE. Without
    want_ratio, scratch(1) holds m/b - 1 instead of m/b."""
    a, b = (c.q, c.p) if over_p else (c.p, c.q)
    if c.floored:
        x = torch.expm1(_log_ratio(c, over_p), out=c.scratch(1)).mul_(w)
    else:
        x = torch.sub(a, b, out=c.scratch(1))
        torch.addcdiv(_zero(x), x, b, value=w, out=x)  # w (a - b) / b in one pass
    log_mb = torch.log1p(x, out=c.scratch(2))
    mb = x.add_(1.0) if want_ratio or w > _NEAR_ONE else x
    if w > _NEAR_ONE:
        if c.floored:
            direct = torch.exp(c.scratch(0), out=c.scratch(3))
        else:
            direct = torch.div(a, b, out=c.scratch(3))
        direct.mul_(w).add_(1.0 - w)
        far = direct < 0.5
        torch.where(far, direct, mb, out=mb)
        torch.where(far, direct.log_(), log_mb, out=log_mb)
    return mb, log_mb


def _js_rows(c, *, beta):
    if beta == 0.0:
        return _forward_kl_rows(c)
    if beta == 1.0:
        return _reverse_kl_rows(c)
    _, log_mq = _log_mix_ratio(c, beta, want_ratio=False)
    kl_qm = -c.dot(c.q, log_mq)
    if c.floored:
        kl_pm = c.dot(c.p, _log_ratio(c).sub_(log_mq))  # log(p/m) = log(p/q) - log(m/q)
    else:
        # the same, with log(p/q)'s row constant lse_s - lse_t added after the sum (p sums to 1): one pass less
        d = torch.sub(c.zt, c.zs, out=c.scratch(0)).sub_(log_mq)
        kl_pm = c.dot(c.p, d) + (c.lse_s - c.lse_t).squeeze(-1)
    if c.grad is not None:
        # dL/dq = (1 - beta) * log(q / m): the terms from m's dependence on q cancel
        s = (1 - beta) * c.scale
        torch.mul(c.q, -s * kl_qm.unsqueeze(-1), out=c.grad)
        c.grad.addcmul_(c.q, log_mq, value=-s)
    return beta * kl_pm + (1 - beta) * kl_qm


def _tvd_rows(c):
    d = torch.sub(c.q, c.p, out=c.scratch(0))
    loss = 0.5 * torch.abs(d, out=c.scratch(1)).sum(-1)
    if c.grad is not None:
        sign = d.sign_()  # dL/dq = sign(q - p) / 2
        k = c.dot(c.q, sign)
        torch.mul(c.q, (-0.5 * c.scale) * k.unsqueeze(-1), out=c.grad)
        c.grad.addcmul_(c.q, sign, value=0.5 * c.scale)
    return loss


def _zero_rows(c):
    """KL(x || x) = 0: skew divergences at alpha = 1."""
    if c.grad is not None:
        c.grad.zero_()
    return c.q.new_zeros(c.q.shape[0])


def _skew_kl_rows(c, *, alpha):
    if alpha == 0.0:
        return _forward_kl_rows(c)
    if alpha == 1.0:
        return _zero_rows(c)
    mp, log_mp = _log_mix_ratio(c, 1.0 - alpha, over_p=True)  # m/p = alpha + (1 - alpha) q/p
    loss = -c.dot(c.p, log_mp)  # sum p log(p/m)
    if c.grad is not None:
        # dL/dq = -(1 - alpha) p/m = -(1 - alpha) (p/m - 1) + a constant, which cancels through the softmax;
        # p/m - 1 is exactly 0 where p == q
        t = mp.reciprocal_().sub_(1.0)
        s = (1 - alpha) * c.scale
        torch.mul(c.q, s * c.dot(c.q, t).unsqueeze(-1), out=c.grad)
        c.grad.addcmul_(c.q, t, value=-s)
    return loss


def _skew_reverse_kl_rows(c, *, alpha):
    if alpha == 0.0:
        return _reverse_kl_rows(c)
    if alpha == 1.0:
        return _zero_rows(c)
    mq, log_mq = _log_mix_ratio(c, 1.0 - alpha)
    loss = -c.dot(c.q, log_mq)  # sum q log(q/m)
    if c.grad is not None:
        # dL/dq = log(q/m) + 1 - alpha q/m = alpha (1 - q/m) - log(m/q) + (1 - alpha); the constant cancels
        # through the softmax, and what is left is exactly 0 where p == q
        g = mq.reciprocal_().sub_(1.0).mul_(-alpha).sub_(log_mq)
        torch.mul(c.q, -c.scale * c.dot(c.q, g).unsqueeze(-1), out=c.grad)
        c.grad.addcmul_(c.q, g, value=c.scale)
    return loss


def _akl_rows(c, *, mu):
    w_head = _head_weight(c.q, c.p, mu, c).unsqueeze(-1)
    w_tail = 1 - w_head
    d = torch.sub(c.zs, c.zt, out=c.scratch(0))
    k = c.lse_t - c.lse_s
    fkl = -c.dot(c.p, d) - k.squeeze(-1)
    rkl = c.dot(c.q, d) + k.squeeze(-1)
    if c.grad is not None:
        _mix_kl_grad(c, d, k, rkl, w_head, w_tail)
    return w_head.squeeze(-1) * fkl + w_tail.squeeze(-1) * rkl


# ---------------------------------------------------------------------------------------------------------------
# AKL's head threshold without sorting whole rows
# ---------------------------------------------------------------------------------------------------------------

# Most rows are settled by their top _TOP_K probabilities; rows of at most _SORT_BELOW tokens are simply sorted.
_TOP_K = 32
_SORT_BELOW = 4 * _TOP_K
_SEGMENT = 64


def _top_values(p, k):
    """p.topk(k).values for p [n, V] (contiguous rows), several times faster for long rows: the k largest values
    lie in the k segments of _SEGMENT tokens with the largest maxima (those k maxima are k values >= the k-th
    largest maximum, so every value above it is in one of those segments, and ties with it are there k - a times
    over), so only k * _SEGMENT candidates go through topk."""
    n, vocab = p.shape
    full = vocab // _SEGMENT * _SEGMENT
    if full < 4 * k * _SEGMENT:
        return p.topk(k, dim=-1).values
    segments = p.as_strided((n, full // _SEGMENT, _SEGMENT), (p.stride(0), _SEGMENT, 1))
    best = segments.amax(-1).topk(k, dim=-1).indices
    candidates = segments.gather(1, best.unsqueeze(-1).expand(n, k, _SEGMENT)).reshape(n, k * _SEGMENT)
    if full < vocab:
        candidates = torch.cat([candidates, p[:, full:]], dim=1)
    return candidates.topk(k, dim=-1).values


def _threshold_of_prefix(values, mu):
    """head_threshold's own arithmetic on a descending prefix values [n, k] of each row's sorted probabilities.

    Returns (tau [n], settled [n] bool). Where the prefix holds more than mu of the mass (``settled``) tau equals
    head_threshold of the whole row: every tie group in the prefix but the last is complete, so its tie-aware
    cumulative mass is the same number as in the full sort, and the last (maybe cut) group already has more than mu
    and is outside the head either way."""
    mass = values.cumsum(dim=-1)
    n_head = (mass.gather(-1, _last_of_tie_group(values)) <= mu).sum(dim=-1, keepdim=True).clamp_min(1)
    return values.gather(-1, n_head - 1).squeeze(-1), mass[:, -1] > mu


def _last_of_tie_group(values):
    """For rows sorted in descending order [n, k]: the index of the last entry equal to each entry."""
    n, k = values.shape
    if k <= 256:  # a binary search per entry (as head_threshold does) costs less than the passes below
        neg = -values
        return torch.searchsorted(neg, neg, right=True) - 1
    # the first group end at or after each entry, by a reversed running minimum: O(k) instead of O(k log k)
    ends = torch.ones(n, k, dtype=torch.bool, device=values.device)
    ends[:, :-1] = values[:, :-1] != values[:, 1:]
    index = torch.arange(k, device=values.device).expand(n, k)
    return torch.where(ends, index, k).flip(-1).cummin(-1).values.flip(-1)


# The bisection stops once the mass at or above its cutoff exceeds mu by at most _MASS_SLACK * (1 - mu), or the
# tokens at or above it are at most _FEW_CANDIDATES: a few more candidates to sort, but fewer passes over the rows.
_MASS_SLACK = 0.1
_FEW_CANDIDATES = 2048
_MAX_PASSES = 16


def _cutoff_above_mu(p, mu, hi, ws):
    """Per row a probability cutoff c with more than mu of the mass at or above it, and not much more: bisection
    on log c between (1 - mu) / V (the tokens below it hold less than 1 - mu) and hi. p [n, V], hi [n] -> [n];
    ws: a Scratch of p's shape."""
    n, vocab = p.shape
    best = torch.full((n,), (1 - mu) / vocab, dtype=p.dtype, device=p.device)
    log_lo, log_hi = best.log(), hi.log()
    done = torch.zeros(n, dtype=torch.bool, device=p.device)
    for _ in range(_MAX_PASSES):
        mid = (log_lo + log_hi) / 2
        cutoff = mid.exp()
        # a float 0/1 indicator and a dot product: one cheap pass (bool masks are slow on CPU)
        indicator = torch.ge(p, cutoff.unsqueeze(-1), out=ws.scratch(0))
        mass = ws.dot(p, indicator)
        above = mass > mu
        best = torch.where(above, torch.maximum(best, cutoff), best)
        log_lo = torch.where(above, mid, log_lo)
        log_hi = torch.where(above, log_hi, mid)
        done |= above & ((mass <= mu + _MASS_SLACK * (1 - mu)) | (indicator.sum(-1) <= _FEW_CANDIDATES))
        if bool(done.all()):
            break
    return best


def _threshold_large_head(p, mu, hi, ws):
    """head_threshold(p, mu) for rows [n, V] whose head has more than _TOP_K tokens, hi [n] a probability at or
    above the threshold: only the probabilities at or above a cutoff holding more than mu of the mass are sorted.
    ws: a Scratch of p's shape."""
    n, vocab = p.shape
    keep = p >= _cutoff_above_mu(p, mu, hi, ws).unsqueeze(-1)
    counts = keep.sum(-1)
    width = int(counts.max())
    if width > vocab // 4:
        return head_threshold(p, mu)  # flat rows: sorting them whole costs about the same
    row, col = keep.nonzero(as_tuple=True)
    start = counts.cumsum(0) - counts
    prefix = torch.zeros(n, width, dtype=p.dtype, device=p.device)
    prefix[row, torch.arange(row.numel(), device=p.device) - start[row]] = p[row, col]
    tau, settled = _threshold_of_prefix(prefix.sort(dim=-1, descending=True).values, mu)
    if not bool(settled.all()):
        # the bisection's sums and the cumsum's disagree about mu: only at a razor's edge, sort those rows whole
        redo = (~settled).nonzero().squeeze(1)
        tau[redo] = head_threshold(p[redo], mu)
    return tau


def _head_threshold_rows(p, mu, ws):
    """Exactly :func:`kdiv.headtail.head_threshold` (same ties, same float arithmetic) for p [n, V], without a
    full sort: a row whose top probability exceeds mu has that as its threshold; a top-_TOP_K settles the rows
    whose head is small; the rest go through :func:`_threshold_large_head`. ws: a Scratch of p's shape."""
    n, vocab = p.shape
    if vocab <= _SORT_BELOW:
        return head_threshold(p, mu)
    top1 = p.amax(-1)
    if bool((top1 > mu).all()):
        return top1  # the top group alone has more than mu: the head is that group
    top = _top_values(p, _TOP_K)
    tau, settled = _threshold_of_prefix(top, mu)
    if not bool(settled.all()):
        rows = (~settled).nonzero().squeeze(1)
        if rows.numel() == n:
            tau = _threshold_large_head(p, mu, top[:, -1], ws)
        else:
            tau[rows] = _threshold_large_head(p[rows], mu, top[rows, -1], ws.first_rows(rows.numel()))
    return tau


def _head_weight(q, p, mu, ws):
    """AKL's head weight g_head / (g_head + g_tail) per row [n] for probabilities [n, V]; 1/2 where q == p.
    ws: a Scratch of p's shape (its buffers 0 and 1 are overwritten)."""
    tau = _head_threshold_rows(p, mu, ws)
    err = torch.sub(p, q, out=ws.scratch(0)).abs_()
    g_total = err.sum(-1)
    # a float 0/1 head indicator and a dot product: much faster on CPU than a bool mask and masked_fill
    g_head = ws.dot(err, torch.ge(p, tau.unsqueeze(-1), out=ws.scratch(1)))
    # The reference code divides 0 by 0 when p == q; any weights give loss 0 and gradient 0 there.
    exact = g_total == 0
    return torch.where(exact, 0.5, g_head / torch.where(exact, 1, g_total))


def akl_weights(logq, logp, mu):
    """AKL's (head weight, tail weight) per row from log-probabilities [..., V] -> ([...], [...]); (1/2, 1/2) where
    the student is exact. The head is :func:`kdiv.headtail.head_mask` of p = exp(logp)."""
    p, q = logp.exp(), logq.exp()
    vocab = p.shape[-1]
    p2, q2 = p.reshape(-1, vocab).contiguous(), q.reshape(-1, vocab).contiguous()
    w_head = _head_weight(q2, p2, mu, Scratch.like(p2)).reshape(p.shape[:-1])
    return w_head, 1 - w_head


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
