"""Row kernels of the token-level divergences: ``kernel(chunk, **hyper) -> loss [n]``.

Each kernel computes one chunk of rows (a :class:`kdiv.core.engine.chunked.Chunk`) in closed form, loss and, when
the chunk carries a gradient buffer, the gradient with respect to the student's scaled logits. The public
functions that run them are in :mod:`kdiv.core.divergences`.
"""

from __future__ import annotations

import torch

from .head_selection import head_weight

# ---------------------------------------------------------------------------------------------------------------
# Row kernels: (chunk, **hyper) -> loss [n], for a Chunk of n rows (kdiv.core.engine). When chunk.grad is not None the
# kernel also writes chunk.scale * d loss / d zs there (zs = student logits / T).
#
# Notation: zs, zt are the logits shifted by their row maximum (the engine's fast path), so that zs - zt is exact
# to the size of the log-probabilities whatever offset separates the two models, and lse_s, lse_t are at most
# log V. log q = zs - lse_s and log p = zt - lse_t are never materialised: a sum such as sum_v q_v log(q_v/p_v) is a
# row dot product with zs - zt plus the row constant lse_t - lse_s (q sums to 1; the constant is small, so the
# rounding of that sum costs ~1e-7 * log V, not ~1e-7 * offset). Through the softmax a loss
# L(q) has the gradient q * (g - sum(q * g)) with g = dL/dq, so any row constant in g (lse_s, the +1 of
# d(q log q)/dq) cancels. Where a -inf logit (or an underflowing probability that a kernel divides by) would make a
# term wrong, the loss holds a product like p * (zt - zs) that is then NaN or inf, which sends exactly those rows to
# the engine's floored path (see the engine); where it would not (tvd; a -inf on the side a skew divergence only
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


def forward_kl_rows(c):
    d = torch.sub(c.zt, c.zs, out=c.scratch(0))  # log p/q - (lse_s - lse_t)
    loss = c.dot(c.p, d) + (c.lse_s - c.lse_t).squeeze(-1)
    if c.grad is not None:
        torch.sub(c.q, c.p, out=c.grad)  # d FKL / dz = q - p
        if c.scale != 1.0:
            c.grad.mul_(c.scale)
    return loss


def reverse_kl_rows(c):
    d = torch.sub(c.zs, c.zt, out=c.scratch(0))  # log q/p - k
    k = c.lse_t - c.lse_s
    loss = c.dot(c.q, d) + k.squeeze(-1)
    if c.grad is not None:
        # d RKL / dz = q * (log q/p - RKL), since sum(q * log q/p) = RKL
        torch.mul(c.q, c.scale * (k - loss.unsqueeze(-1)), out=c.grad)
        c.grad.addcmul_(c.q, d, value=c.scale)
    return loss


def symmetric_kl_rows(c, *, w):
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


def js_rows(c, *, beta):
    if beta == 0.0:
        return forward_kl_rows(c)
    if beta == 1.0:
        return reverse_kl_rows(c)
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


def tvd_rows(c):
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


def skew_kl_rows(c, *, alpha):
    if alpha == 0.0:
        return forward_kl_rows(c)
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


def skew_reverse_kl_rows(c, *, alpha):
    if alpha == 0.0:
        return reverse_kl_rows(c)
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


def akl_rows(c, *, mu):
    w_head = head_weight(c.q, c.p, mu, c).unsqueeze(-1)
    w_tail = 1 - w_head
    d = torch.sub(c.zs, c.zt, out=c.scratch(0))
    k = c.lse_t - c.lse_s
    fkl = -c.dot(c.p, d) - k.squeeze(-1)
    rkl = c.dot(c.q, d) + k.squeeze(-1)
    if c.grad is not None:
        _mix_kl_grad(c, d, k, rkl, w_head, w_tail)
    return w_head.squeeze(-1) * fkl + w_tail.squeeze(-1) * rkl


# Kernels with a reverse-KL term sum_v q_v log(q_v / p_v), +inf wherever the teacher has p_v = 0 (a -inf logit) and
# the student mass: on the floored path that term is finite but dominated by the floor (about 87 q_v per token), and
# the engine warns when the teacher looks like a top-k teacher padded with -inf. Values: which hyper-parameters
# give the kernel such a term.
REVERSE_TERM = {
    reverse_kl_rows: lambda hyper: True,
    symmetric_kl_rows: lambda hyper: hyper["w"] > 0,
    akl_rows: lambda hyper: True,
}
