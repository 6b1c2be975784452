r"""Closed-form gradients of the token-level divergences, for one token.

Two views of the same gradient, both as plain formulas (no autograd), so that the notebooks can plot them and the
tests can hold them against autograd through :mod:`kdiv.core.divergences`:

- :func:`prob_gradient`: :math:`g_i = \partial L / \partial q_i`, the partial derivative with respect to the
  student's probability of class i, treating the q_i as free variables. For every divergence here except AKL it
  depends on (q_i, p_i) alone, the per-class "coefficient" the KD papers argue about:

  - forward_kl       ``-p/q``                                      explodes like 1/q as q -> 0
  - reverse_kl       ``log(q/p) + 1``                              explodes like log(1/p) as p -> 0
  - js (beta)        ``(1-beta) log(q/m)``, m = beta p + (1-beta) q  (the terms through m cancel)
  - tvd              ``-1[q < p]``                                 bounded; 0 once q >= p (see below)
  - skew_kl (alpha)  ``-(1-alpha) p/m``, m = alpha p + (1-alpha) q   ``|g| <= (1-alpha)/alpha``
  - skew_reverse_kl  ``log(q/m) + 1 - alpha q/m``, m = alpha q + (1-alpha) p;  ``g <= log(1/alpha)``
  - symmetric_kl (w) ``(1-w) g_FKL + w g_RKL``
  - akl (mu)         ``w_head g_FKL + w_tail g_RKL``, the weights held fixed (they carry no gradient)

- :func:`logit_gradient`: :math:`\partial L / \partial z_i` for ``q = softmax(z)``, which is what an optimiser
  sees: :math:`q_i\,(g_i - \sum_j q_j g_j)`. Only the part of g orthogonal to the all-ones vector survives the
  softmax, so g is defined up to an additive constant (RKL's "+1" never matters). Each g above is the partial
  derivative of the divergence's formula in kdiv, except TVD: the partial of ``sum |p - q| / 2`` is
  ``sign(q - p) / 2``; on the simplex TVD also equals ``sum max(p - q, 0)``, whose partial ``-1[q < p]`` differs by
  the constant 1/2 (where q != p) and makes explicit that a class the student already covers gets no push of its own
  (TaiLr's argument). Both give the same logit gradient.

At temperature T the logit gradient is divided by T (kdiv applies no T**2 factor).

References: Hinton et al. 2015 (FKL); Gu et al., MiniLLM, ICLR 2024 (RKL); Agarwal et al., GKD, ICLR 2024 (JSD);
Ji et al., TaiLr, ICLR 2023 (TVD); Ko et al., DistiLLM, ICML 2024 (skew KL); Wu et al., arXiv 2404.02657 (AKL).
"""

from __future__ import annotations

import torch

from ..core.registry import SPECS, spec

__all__ = ["PROB_GRADIENTS", "prob_gradient", "logit_gradient"]

# name -> g(q, p, **hyper) = dL/dq, elementwise in (q, p) except akl (whose weights read the whole row); read off the
# divergences' specs (kdiv.core.divergences, where the coefficients are written beside each divergence)
PROB_GRADIENTS = {name: s.prob_gradient for name, s in SPECS.items() if s.prob_gradient is not None}


def _check(q, p):
    for arg, x in (("q", q), ("p", p)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{arg} must be a floating torch.Tensor of probabilities")
        if torch.isnan(x).any() or (x <= 0).any() or (x > 1).any():
            raise ValueError(f"{arg} must hold probabilities in (0, 1] (the closed forms divide by them)")
    if q.shape != p.shape:
        raise ValueError(f"q and p must have the same shape, got {tuple(q.shape)} and {tuple(p.shape)}")


def prob_gradient(name: str, q: torch.Tensor, p: torch.Tensor, **hyper) -> torch.Tensor:
    r""":math:`\partial L / \partial q_i` of divergence `name` in closed form (see the module table).

    q is the student's probability, p the teacher's (student first, as everywhere in kdiv); both in (0, 1].
    Elementwise in (q, p) for every name except "akl", whose head / tail weights need whole rows [..., V].

    Shapes: q, p [...] (or [..., V] rows for "akl") -> [...] of the same shape.
    """
    if name not in PROB_GRADIENTS:
        raise ValueError(f"name must be one of {sorted(PROB_GRADIENTS)}, got {name!r}")
    _check(q, p)
    unknown = sorted(set(hyper) - set(spec(name).defaults))
    if unknown:
        raise ValueError(f"{name} takes no hyper-parameter {unknown[0]!r}")
    return PROB_GRADIENTS[name](q, p, **spec(name).check_hyper(hyper))


def logit_gradient(name: str, q: torch.Tensor, p: torch.Tensor, *, temperature: float = 1.0, **hyper) -> torch.Tensor:
    r""":math:`\partial L / \partial z` for ``q = softmax(z / T)``: :math:`q \odot (g - \langle q, g\rangle) / T`.

    This is the gradient kdiv's autograd returns for ``kdiv.get(name, **hyper)(z, teacher_logits,
    temperature=T, reduction="sum")`` on one token per row.

    Shapes: q, p [..., V] (rows summing to 1) -> [..., V].
    """
    _check(q, p)
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    g = prob_gradient(name, q, p, **hyper)
    return q * (g - (q * g).sum(-1, keepdim=True)) / temperature
