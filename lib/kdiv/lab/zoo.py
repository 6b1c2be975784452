r"""The whole loss zoo on the toy problems: the divergence list, W1 as a toy loss, and what the notebooks measure.

The notebooks in ``notebooks/`` compare every divergence of kdiv on the toy teachers of :mod:`kdiv.lab.toy` (free
softmax students, Wu et al., arXiv 2404.02657) and on shifted bumps. This module holds the pieces more than one of
them needs:

- :data:`ZOO`: the divergence specs compared, with the hyper-parameters of their papers' defaults.
- :func:`wasserstein_on`: exact W1 on a teacher's ordered grid, as a loss :func:`kdiv.lab.toy.fit` accepts.
- :func:`location_sweep`: loss and gradient of a divergence as a bump-shaped student slides along the grid
  (the disjoint-support argument for optimal transport, Arjovsky et al., "Wasserstein GAN", ICML 2017, Example 1).
- :func:`first_step_below`, :func:`akl_weight_curves`, :func:`head_tail_log_error`: read off a
  :class:`kdiv.lab.toy.FitResult`.
"""

from __future__ import annotations

import torch

from ..core.head_selection import akl_weights
from ..core.headtail import head_mask
from ..core.registry import SPECS
from ..core.transport import wasserstein_1d
from .toy import FitResult, resolve_divergence, single_thread

__all__ = ["ZOO", "wasserstein_on", "location_sweep", "first_step_below", "akl_weight_curves", "head_tail_log_error"]

# Every token-level divergence, at its spec's default: the default of the paper that proposed it (GKD's JSD at
# beta 0.5, DistiLLM's skew 0.1, AKL's mu 0.5; symmetric_kl w=0.5 is the AKL paper's "FKL+RKL" up to a factor 2).
ZOO = tuple((name, dict(s.defaults)) for name, s in SPECS.items())


def wasserstein_on(x) -> object:
    r"""Exact W1 on the ordered grid ``x`` [V] as a loss with kdiv's signature, named "wasserstein_1d".

    ``fn(student_logits [..., V], teacher_logits [..., V], *, reduction="mean", temperature=1.0)``; pass it to
    :func:`kdiv.lab.toy.fit` beside the registry names. The cost of moving mass from x_i to x_j is |x_i - x_j|.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.dim() != 1 or x.numel() < 2 or not bool((x[1:] > x[:-1]).all()):
        raise ValueError("x must be a 1-D increasing grid of at least 2 points")

    def wasserstein_1d_loss(student_logits, teacher_logits, *, reduction="mean", temperature=1.0, mask=None):
        return wasserstein_1d(
            student_logits,
            teacher_logits,
            support=x.to(student_logits.dtype),
            reduction=reduction,
            temperature=temperature,
            mask=mask,
        )

    wasserstein_1d_loss.__name__ = "wasserstein_1d"
    return wasserstein_1d_loss


def location_sweep(x, teacher_logits, divergence, centers, *, sigma: float = 1.0):
    r"""Loss and d loss / d c of a bump student :math:`q_c \propto \exp(-(x - c)^2 / 2\sigma^2)` at each centre c.

    ``divergence``: a registry name, ``(name, {hyper})`` or a callable with kdiv's signature (e.g.
    :func:`wasserstein_on`). The gradient with respect to the location is by autograd through that loss.

    Shapes: x [V]; teacher_logits [V]; centers [N] -> (loss [N], grad [N]). float64.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    teacher_logits = torch.as_tensor(teacher_logits, dtype=torch.float64)
    if x.dim() != 1 or teacher_logits.shape != x.shape:
        raise ValueError(
            f"x and teacher_logits must be [V] of one shape, got {tuple(x.shape)} and {tuple(teacher_logits.shape)}"
        )
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    _, fn = resolve_divergence(divergence)
    c = torch.as_tensor(centers, dtype=torch.float64).reshape(-1).clone().requires_grad_(True)
    with single_thread():
        student = -0.5 * ((x - c.unsqueeze(-1)) / sigma) ** 2  # [N, V]
        loss = fn(student, teacher_logits.expand_as(student))
        (grad,) = torch.autograd.grad(loss.sum(), c)
    return loss.detach(), grad


def first_step_below(errors: torch.Tensor, steps: torch.Tensor, threshold: float) -> torch.Tensor:
    """The first recorded step at which ``errors`` is at or below ``threshold`` and stays there; -1 if never.

    Shapes: errors [..., R] over the recorded ``steps`` [R] -> [...] (int64).
    """
    errors = torch.as_tensor(errors)
    steps = torch.as_tensor(steps)
    if errors.shape[-1] != steps.numel():
        raise ValueError(f"errors must end with the {steps.numel()} recorded steps, got {tuple(errors.shape)}")
    above = errors > threshold
    # index after the last step above the threshold (reversed cumulative "any" finds it without a Python loop)
    ever_above_later = above.flip(-1).cummax(-1).values.flip(-1)
    first = (~ever_above_later).to(torch.int64).argmax(-1)
    reached = ~ever_above_later[..., -1]
    return torch.where(reached, steps[first], torch.full_like(first, -1))


def akl_weight_curves(result: FitResult, key: str, *, mu: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """AKL's (head weight, tail weight) for the students of divergence ``key`` at every recorded step.

    Reads the same weights :func:`kdiv.akl` uses (:func:`kdiv.core.divergences.akl_weights`), from the recorded student
    distributions. Shapes: ([L, S, R], [L, S, R]) for L learning rates, S seeds, R recorded steps.
    """
    d = result.index(key)
    q = result.probs[d]
    p = result.teacher.probs.expand_as(q)
    return akl_weights(q.log(), p.log(), mu)


def head_tail_log_error(student_probs: torch.Tensor, teacher_probs: torch.Tensor, mu: float = 0.5):
    r"""Mean relative error :math:`|\log q_j - \log p_j|` over the teacher's head and over its tail.

    The companion of :func:`kdiv.head_tail_error`, which sums absolute errors :math:`|p_j - q_j|` and so weighs
    each token by its mass: there the tail is dominated by its largest tokens. Here every tail token counts
    equally, which is what a log-scale plot of the far tail shows. Same head / tail split (AKL's, ``mu``).

    Shapes: student_probs [..., V], teacher_probs [V] -> (head [...], tail [...]).
    """
    teacher_probs = torch.as_tensor(teacher_probs)
    if teacher_probs.dim() != 1 or student_probs.shape[-1] != teacher_probs.shape[0]:
        raise ValueError(
            f"teacher_probs must be [V] with V = student_probs.shape[-1], got "
            f"{tuple(teacher_probs.shape)} and {tuple(student_probs.shape)}"
        )
    head = head_mask(teacher_probs, mu)
    err = (student_probs.log() - teacher_probs.log()).abs()
    return err[..., head].mean(-1), err[..., ~head].mean(-1)
