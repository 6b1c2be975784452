r"""Plain float64 numpy / scipy formulas for the token-level divergences, written a second time.

Nothing here imports kdiv: these are the independent computations the library is checked against. They favour
the obvious formula over speed (probabilities, ``scipy.special.rel_entr``, an explicit head set for AKL).

Conventions shared with kdiv's documentation (not its code):

- q = softmax(student / T) is the student, p = softmax(teacher / T) the teacher, over the last axis.
- A ``-inf`` logit (a token outside a model's vocabulary) has probability exactly 0, and its log-probability is
  taken as log of the smallest normal float32, so its probability is used as that number (about 1.2e-38).
  A probability that merely underflows in float64 is left as 0; the formulas may then be +inf, and the tests
  compare only where the reference is finite.

Every divergence is ``fn(student, teacher, *, temperature=1.0, **hyper) -> per-token array`` of shape [...]
for logits [..., V]; ``DIVERGENCES`` maps the library's names to them.
"""

from __future__ import annotations

import numpy as np
from scipy.special import log_softmax, rel_entr

# log of the smallest positive normal float32, 2**-126, written from the IEEE format rather than read from kdiv
FLOAT32_TINY = np.float64(np.finfo(np.float32).tiny)
LOG_ZERO_PROB = float(np.log(FLOAT32_TINY))
assert FLOAT32_TINY == 2.0**-126


def log_softmax_t(logits, temperature=1.0):
    """log softmax(logits / T) in float64, with the -inf convention above. Shapes: [..., V] -> [..., V]."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    out = log_softmax(z, axis=-1)
    return np.where(np.isneginf(z), LOG_ZERO_PROB, out)


def softmax_t(logits, temperature=1.0):
    """softmax(logits / T) in float64; a -inf logit gets probability FLOAT32_TINY (see the module docstring)."""
    return np.exp(log_softmax_t(logits, temperature))


def _pq(student, teacher, temperature):
    return softmax_t(student, temperature), softmax_t(teacher, temperature)


def forward_kl(student, teacher, *, temperature=1.0):
    """KL(p || q)."""
    q, p = _pq(student, teacher, temperature)
    return rel_entr(p, q).sum(-1)


def reverse_kl(student, teacher, *, temperature=1.0):
    """KL(q || p)."""
    q, p = _pq(student, teacher, temperature)
    return rel_entr(q, p).sum(-1)


def symmetric_kl(student, teacher, *, w=0.5, temperature=1.0):
    """(1 - w) KL(p || q) + w KL(q || p)."""
    q, p = _pq(student, teacher, temperature)
    return (1 - w) * rel_entr(p, q).sum(-1) + w * rel_entr(q, p).sum(-1)


def js(student, teacher, *, beta=0.5, temperature=1.0):
    """Generalized JSD, GKD / TRL convention: beta=0 -> KL(p||q), beta=1 -> KL(q||p), else the mixture form."""
    q, p = _pq(student, teacher, temperature)
    if beta == 0:
        return rel_entr(p, q).sum(-1)
    if beta == 1:
        return rel_entr(q, p).sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * rel_entr(p, m).sum(-1) + (1 - beta) * rel_entr(q, m).sum(-1)


def tvd(student, teacher, *, temperature=1.0):
    """1/2 sum |p - q|."""
    q, p = _pq(student, teacher, temperature)
    return 0.5 * np.abs(p - q).sum(-1)


def skew_kl(student, teacher, *, alpha=0.1, temperature=1.0):
    """KL(p || alpha p + (1 - alpha) q)."""
    q, p = _pq(student, teacher, temperature)
    return rel_entr(p, alpha * p + (1 - alpha) * q).sum(-1)


def skew_reverse_kl(student, teacher, *, alpha=0.1, temperature=1.0):
    """KL(q || alpha q + (1 - alpha) p)."""
    q, p = _pq(student, teacher, temperature)
    return rel_entr(q, alpha * q + (1 - alpha) * p).sum(-1)


# ---------------------------------------------------------------------------------------------------------------
# AKL
# ---------------------------------------------------------------------------------------------------------------


def mass_at_or_above(p):
    """For every token j, the total teacher mass of the tokens at least as probable as j. Shapes: [..., V]."""
    p = np.asarray(p, dtype=np.float64)
    flat = p.reshape(-1, p.shape[-1])
    out = np.empty_like(flat)
    for i, row in enumerate(flat):
        ascending = np.sort(row)
        # suffix[k] = sum(ascending[k:]); a token's mass starts at the first entry equal to it
        suffix = np.concatenate([np.cumsum(ascending[::-1])[::-1], [0.0]])
        out[i] = suffix[np.searchsorted(ascending, row, side="left")]
    return out.reshape(p.shape)


def head_set(p, mu):
    """Bool [..., V]: token j is in the head when its mass at-or-above is <= mu, or it is a most probable token."""
    p = np.asarray(p, dtype=np.float64)
    return (mass_at_or_above(p) <= mu) | (p == p.max(-1, keepdims=True))


def head_margin(p, mu):
    """How far the closest tie group's mass is from mu, per row: a tiny margin means rounding can move the split."""
    return np.abs(mass_at_or_above(p) - mu).min(-1)


def head_is_robust(p, mu, tol):
    """True where rounding of relative size `tol` cannot change a row's head: no tie group's mass within tol of
    mu, and no two different probabilities so close that rounding could make them a tie (or undo one)."""
    p = np.asarray(p, dtype=np.float64)
    ascending = np.sort(p, axis=-1)
    gaps = np.diff(ascending, axis=-1)
    near_tie = ((gaps > 0) & (gaps <= tol * ascending[..., 1:])).any(-1)
    return (head_margin(p, mu) > tol) & ~near_tie


def head_tail_error(q, p, mu):
    """(g_head, g_tail): summed |p - q| over the teacher's head and over its tail. Shapes: [..., V] -> [...]."""
    head = head_set(p, mu)
    err = np.abs(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64))
    return (err * head).sum(-1), (err * ~head).sum(-1)


def akl_weights(student, teacher, *, mu=0.5, temperature=1.0):
    """(head weight, tail weight) per token: g_head / (g_head + g_tail) and its complement; 1/2 each if p == q."""
    q, p = _pq(student, teacher, temperature)
    g_head, g_tail = head_tail_error(q, p, mu)
    total = g_head + g_tail
    with np.errstate(invalid="ignore", divide="ignore"):
        w_head = np.where(total == 0, 0.5, g_head / total)
    return w_head, 1 - w_head


def akl(student, teacher, *, mu=0.5, temperature=1.0):
    """Adaptive KL (Wu et al., arXiv 2404.02657): w_head KL(p||q) + w_tail KL(q||p)."""
    w_head, w_tail = akl_weights(student, teacher, mu=mu, temperature=temperature)
    q, p = _pq(student, teacher, temperature)
    fkl = rel_entr(p, q).sum(-1)
    rkl = rel_entr(q, p).sum(-1)
    # a zero weight times an infinite KL is 0 here: that KL does not enter the loss
    return np.where(w_head == 0, 0.0, w_head * fkl) + np.where(w_tail == 0, 0.0, w_tail * rkl)


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


# Each divergence as a formula in probability vectors (q, p) [V], q taken as free variables off the simplex, for
# finite differences of the closed-form coefficients dL/dq (tests/test_gradients.py). AKL's weights read whole rows
# and have no such form. TVD is written sum max(p - q, 0), equal to sum |p - q| / 2 on the simplex, the form whose
# partial is the coefficient kdiv states (see kdiv.lab.gradients).
def _kl(a, b):
    return np.sum(a * np.log(a / b))


def _js_probs(q, p, beta=0.5):
    if beta == 0.0:
        return _kl(p, q)
    if beta == 1.0:
        return _kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


PROB_FORMS = {
    "forward_kl": lambda q, p: _kl(p, q),
    "reverse_kl": lambda q, p: _kl(q, p),
    "symmetric_kl": lambda q, p, w=0.5: (1 - w) * _kl(p, q) + w * _kl(q, p),
    "js": _js_probs,
    "tvd": lambda q, p: np.sum(np.maximum(p - q, 0)),
    "skew_kl": lambda q, p, alpha=0.1: _kl(p, alpha * p + (1 - alpha) * q),
    "skew_reverse_kl": lambda q, p, alpha=0.1: _kl(q, alpha * q + (1 - alpha) * p),
}


# ---------------------------------------------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------------------------------------------


def reduce(per_token, mask=None, reduction="mean"):
    """Masked reduction of a per-token array [...]: "none" (0 where masked), "sum", or "mean" over counted tokens
    (0 when none counts)."""
    per_token = np.asarray(per_token, dtype=np.float64)
    keep = np.ones(per_token.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    masked = np.where(keep, per_token, 0.0)
    if reduction == "none":
        return masked
    if reduction == "sum":
        return masked.sum()
    if reduction == "mean":
        n = keep.sum()
        return masked.sum() / n if n else 0.0
    raise ValueError(f"reduction {reduction!r}")


# ---------------------------------------------------------------------------------------------------------------
# Log-domain forms, for logits of any magnitude (tests/test_accuracy.py)
# ---------------------------------------------------------------------------------------------------------------
# The forms above take log(p / q) of probabilities, which is +inf where a probability underflows even in float64
# (logits 1e30 apart). These take every logarithm from log_softmax, and weigh by the probability only at the end
# (0 * anything = 0: a token of probability exactly 0 contributes nothing), so that huge but finite divergences are
# finite numbers.


def _weighted(prob, log_ratio):
    return np.where(prob == 0, 0.0, prob * log_ratio).sum(-1)


def _log_mix(log_a, log_b, w):
    """log(w a + (1 - w) b) from log a, log b."""
    return np.logaddexp(np.log(w) + log_a, np.log1p(-w) + log_b)


def log_domain(name, student, teacher, **hyper):
    """The divergence `name` per token, every log term from log_softmax (float64). Shapes: [..., V] -> [...]."""
    lq, lp = log_softmax_t(student), log_softmax_t(teacher)
    q, p = np.exp(lq), np.exp(lp)
    fkl, rkl = _weighted(p, lp - lq), _weighted(q, lq - lp)
    if name == "forward_kl":
        return fkl
    if name == "reverse_kl":
        return rkl
    if name == "symmetric_kl":
        w = hyper.get("w", 0.5)
        return (1 - w) * fkl + w * rkl
    if name == "js":
        beta = hyper.get("beta", 0.5)
        if beta in (0.0, 1.0):
            return fkl if beta == 0.0 else rkl
        lm = _log_mix(lp, lq, beta)
        return beta * _weighted(p, lp - lm) + (1 - beta) * _weighted(q, lq - lm)
    if name == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    if name == "skew_kl":
        alpha = hyper.get("alpha", 0.1)
        return _weighted(p, lp - _log_mix(lp, lq, alpha)) if alpha < 1 else np.zeros(lp.shape[:-1])
    if name == "skew_reverse_kl":
        alpha = hyper.get("alpha", 0.1)
        return _weighted(q, lq - _log_mix(lq, lp, alpha)) if alpha < 1 else np.zeros(lp.shape[:-1])
    if name == "akl":
        g_head, g_tail = head_tail_error(q, p, hyper.get("mu", 0.5))
        total = g_head + g_tail
        with np.errstate(invalid="ignore", divide="ignore"):
            w_head = np.where(total == 0, 0.5, g_head / total)
        return np.where(w_head == 0, 0.0, w_head * fkl) + np.where(w_head == 1, 0.0, (1 - w_head) * rkl)
    raise KeyError(name)
