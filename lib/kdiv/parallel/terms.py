r"""The token-level divergences as sums over the vocabulary, for rows of which this rank holds a shard.

Once the row log-normalisers are global (:mod:`kdiv.parallel.vocab`), every divergence is
:math:`L = \sum_v f_v` over the vocabulary, and so the sum over ranks of the sum over this rank's shard. Its
gradient with respect to the student's scaled logits is, through the softmax,

.. math::  \frac{\partial L}{\partial z_w} = h_w - q_w \sum_{v\ \text{finite}} h_v, \qquad
           h_v = q_v \frac{\partial L}{\partial q_v} = \frac{\partial L}{\partial \log q_v},

and 0 where the student's logit is ``-inf``: that log-probability is floored at ``LOG_FLOOR`` and held constant,
as the single-process engine does. A constant added to ``dL/dq`` changes ``h`` by a multiple of ``q`` and cancels,
so the functions below drop such constants. Each divergence here is a function of a :class:`Rows` returning its
per-row partial sums and its ``h`` terms; they follow the floored path of the row kernels of
:mod:`kdiv.core.kernels` (log-ratios from the log-probabilities, clamped at 80; the mixtures through ``log1p``),
which for rows without ``-inf`` equals the fast path to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# beyond this log(p/q) every term of the mixture divergences is within 1e-34 of its limit (as in kdiv.core.kernels)
_MAX_LOG_RATIO = 80.0
# mixture weights above this take m/b = (1 - w) + w a/b directly where the log1p form cancels (as the kernels do)
_NEAR_ONE = 0.95


@dataclass
class Rows:
    """This rank's shard of n rows, in the compute dtype: ``ls``, ``lt`` [n, V_rank] the student's and teacher's
    log-probabilities of the full rows (``-inf`` floored), ``q``, ``p`` their exponentials; ``head(mu)`` the AKL head
    threshold on ``lt`` of the full rows (collectives)."""

    ls: torch.Tensor
    lt: torch.Tensor
    q: torch.Tensor
    p: torch.Tensor
    head: object = None


@dataclass
class Terms:
    """What a divergence needs summed over the ranks: ``partials`` [k] per-row partial sums (each [n]); ``h`` the
    gradient terms [n, V_rank]; ``combine(totals)`` -> (loss [n], weights of the ``h`` terms), from the partials
    summed over the ranks (totals [k, n])."""

    partials: list
    h: list
    combine: object


def _single(loss, h):
    return Terms([loss], [h], lambda totals: (totals[0], [1.0]))


def forward_kl(r):
    return _single((r.p * (r.lt - r.ls)).sum(-1), -r.p)


def reverse_kl(r):
    h = r.q * (r.ls - r.lt)
    return _single(h.sum(-1), h)


def symmetric_kl(r, *, w):
    f_fkl, f_rkl = r.p * (r.lt - r.ls), r.q * (r.ls - r.lt)
    return _single(((1 - w) * f_fkl + w * f_rkl).sum(-1), w * f_rkl - (1 - w) * r.p)


def _log_mix_ratio(log_ratio, w):
    """(m/b, log m/b) for m = w a + (1 - w) b, from log(a/b) (clamped at _MAX_LOG_RATIO)."""
    log_ratio = log_ratio.clamp_max(_MAX_LOG_RATIO)
    x = torch.expm1(log_ratio).mul_(w)
    log_mb, mb = torch.log1p(x), x.add_(1.0)
    if w > _NEAR_ONE:
        direct = torch.exp(log_ratio).mul_(w).add_(1.0 - w)
        far = direct < 0.5
        mb = torch.where(far, direct, mb)
        log_mb = torch.where(far, direct.log(), log_mb)
    return mb, log_mb, log_ratio


def js(r, *, beta):
    if beta == 0.0:
        return forward_kl(r)
    if beta == 1.0:
        return reverse_kl(r)
    _, log_mq, log_pq = _log_mix_ratio(r.lt - r.ls, beta)
    f = beta * r.p * (log_pq - log_mq) - (1 - beta) * r.q * log_mq
    return _single(f.sum(-1), -(1 - beta) * r.q * log_mq)


def tvd(r):
    d = r.q - r.p
    return _single(0.5 * d.abs().sum(-1), 0.5 * r.q * d.sign())


def _zero(r):
    zero = r.q.new_zeros(r.q.shape[0])
    return _single(zero, torch.zeros_like(r.q))


def skew_kl(r, *, alpha):
    if alpha == 0.0:
        return forward_kl(r)
    if alpha == 1.0:
        return _zero(r)
    mp, log_mp, _ = _log_mix_ratio(r.ls - r.lt, 1.0 - alpha)  # m/p = alpha + (1 - alpha) q/p
    # dL/dq = -(1 - alpha) p/m, taken as -(1 - alpha) (p/m - 1), exactly 0 where p == q
    return _single(-(r.p * log_mp).sum(-1), -(1 - alpha) * r.q * mp.reciprocal().sub_(1.0))


def skew_reverse_kl(r, *, alpha):
    if alpha == 0.0:
        return reverse_kl(r)
    if alpha == 1.0:
        return _zero(r)
    mq, log_mq, _ = _log_mix_ratio(r.lt - r.ls, 1.0 - alpha)  # m/q = alpha + (1 - alpha) p/q
    # dL/dq = log(q/m) + 1 - alpha q/m, taken as alpha (1 - q/m) - log(m/q)
    g = mq.reciprocal().sub_(1.0).mul_(-alpha).sub_(log_mq)
    return _single(-(r.q * log_mq).sum(-1), r.q * g)


def akl(r, *, mu):
    tau = r.head(mu)
    err = (r.p - r.q).abs()
    g_head = (err * (r.lt >= tau.unsqueeze(-1))).sum(-1)
    f_fkl, h_rkl = r.p * (r.lt - r.ls), r.q * (r.ls - r.lt)

    def combine(totals):
        fkl, rkl, g_total, g_head = totals
        # the reference code divides 0 by 0 where p == q; any weights give loss 0 and gradient 0 there
        exact = g_total == 0
        w_head = torch.where(exact, 0.5, g_head / torch.where(exact, 1, g_total))
        return w_head * fkl + (1 - w_head) * rkl, [w_head.unsqueeze(-1), (1 - w_head).unsqueeze(-1)]

    return Terms([f_fkl.sum(-1), h_rkl.sum(-1), err.sum(-1), g_head], [-r.p, h_rkl], combine)


TERMS = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "symmetric_kl": symmetric_kl,
    "js": js,
    "tvd": tvd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "akl": akl,
}
