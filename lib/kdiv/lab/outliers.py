r"""A teacher with a far-away outlier, and the best single-Gaussian student under any divergence.

The set-up of TaiLr's Figure 1 (Ji et al., "Tailoring Language Generation Models under Total Variation Distance",
ICLR 2023): the target is a main mode plus a low-mass component far away,

.. math:: p(x) \propto (1 - \varepsilon)\, N(x; 0, 1) + \varepsilon\, N(x; d, 1),

and the student is one Gaussian :math:`N(\mu, \sigma^2)`. Both are discretised on a wide, evenly spaced grid (so
the truncation of the student is negligible) and compared with the kdiv token-level divergences, the grid points
playing the role of the vocabulary. Forward KL's optimum matches the teacher's mean and variance (the discretised
Gaussians are an exponential family with statistics x and x^2 on the grid), so it is dragged towards the outlier;
the question is how far each other divergence is dragged.

The fit is a global search rather than gradient descent, since TVD is not smooth and some divergences have more
than one local minimum here: a coarse grid over (mu, log sigma), then repeated zooms around the best point
(:func:`best_gaussian`). Every candidate of one zoom level is evaluated in one batched kdiv call.

AKL is the exception: its head / tail weights carry no gradient, so training does not minimise AKL's value; it
converges to a point where ``w_head * grad FKL + w_tail * grad RKL = 0``, which is not the minimum of the value.
:func:`train_gaussian` finds that point the way training does, by Adam on (mu, log sigma).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.registry import get
from .gaussian import gaussian_log_density
from .toy import single_thread

__all__ = ["outlier_teacher", "moments", "GaussianSearch", "best_gaussian", "train_gaussian"]


def _check_grid(x) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.dim() != 1 or x.numel() < 2 or not torch.isfinite(x).all():
        raise ValueError(f"x must be a finite 1-D grid of at least 2 points, got shape {tuple(x.shape)}")
    return x


def outlier_teacher(x, eps, *, distance: float = 10.0, sigma: float = 1.0) -> torch.Tensor:
    r"""Log-probabilities [E, V] of :math:`(1-\varepsilon) N(0, \sigma^2) + \varepsilon N(d, \sigma^2)` on grid ``x``.

    ``eps``: the outlier's mass, a number or a sequence of E numbers in [0, 1); ``distance`` d: where the outlier
    sits. Each row is renormalised over the grid. eps = 0 gives the main mode alone.
    """
    x = _check_grid(x)
    eps = torch.as_tensor(eps, dtype=torch.float64).reshape(-1)
    if not ((eps >= 0) & (eps < 1)).all():
        raise ValueError(f"eps must lie in [0, 1), got {eps.tolist()}")
    if not (math.isfinite(distance) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"distance must be finite and sigma > 0, got {distance} and {sigma}")
    main = torch.log1p(-eps)[:, None] - 0.5 * (x / sigma) ** 2
    # log(0) = -inf for eps = 0: logaddexp then returns the main mode exactly
    far = torch.log(eps)[:, None] - 0.5 * ((x - distance) / sigma) ** 2
    return torch.log_softmax(torch.logaddexp(main, far), dim=-1)


def moments(x, logits) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of softmax(logits) on the grid ``x``. Shapes: [V], [..., V] -> ([...], [...])."""
    x = _check_grid(x)
    probs = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1)
    mean = (probs * x).sum(-1)
    return mean, ((probs * (x - mean.unsqueeze(-1)) ** 2).sum(-1)).sqrt()


@dataclass
class GaussianSearch:
    """What :func:`best_gaussian` returns, for E teachers: parameters ``mean``, ``sigma`` [E] of the best Gaussian,
    its divergence ``loss`` [E], and the coarse search's ``profile`` [E, M] (the loss minimised over sigma, at each
    of the M coarse means ``profile_means``), which shows every local minimum along the mean."""

    mean: torch.Tensor
    sigma: torch.Tensor
    loss: torch.Tensor
    profile_means: torch.Tensor
    profile: torch.Tensor


def best_gaussian(
    x, teacher_logits, divergence, *, means=(-3.0, 13.0, 33), sigmas=(0.3, 10.0, 13), levels=10, zoom=7
) -> GaussianSearch:
    r"""The single Gaussian closest to each teacher under ``divergence``, by a coarse grid and repeated zooms.

    ``divergence``: a registry name or ``(name, {hyper: value})``; the loss is ``divergence(student_logits,
    teacher_logits)`` with the student first, as everywhere in kdiv. ``means``: (low, high, count) of the coarse
    grid over mu; ``sigmas``: (low, high, count) of the coarse grid over sigma, log-spaced. Each of ``levels``
    zooms lays ``zoom`` x ``zoom`` points around the best point so far, spanning +-1.25 of the previous spacing, so
    the spacing shrinks by 2.5 / (zoom - 1) per level (the default: 0.5 * (5/12)**10 = 8e-5 in mu).

    The search returns the global minimum on the coarse grid's basin, not a local minimum from some
    initialisation; ``profile`` shows where other local minima lie.

    Shapes: x [V]; teacher_logits [E, V] (or [V]) -> fields [E] and profile [E, M].
    """
    x = _check_grid(x)
    teacher_logits = torch.as_tensor(teacher_logits, dtype=torch.float64)
    teacher_logits = teacher_logits.unsqueeze(0) if teacher_logits.dim() == 1 else teacher_logits
    if teacher_logits.dim() != 2 or teacher_logits.shape[1] != x.numel():
        raise ValueError(f"teacher_logits must be [E, V] with V = {x.numel()}, got {tuple(teacher_logits.shape)}")
    name, hyper = divergence if isinstance(divergence, tuple) else (divergence, {})
    fn = get(name, **hyper)
    for arg, (low, high, count) in (("means", means), ("sigmas", sigmas)):
        if not (low < high and int(count) >= 3) or (arg == "sigmas" and low <= 0):
            raise ValueError(f"{arg} must be (low, high, count) with low < high, count >= 3, got {(low, high, count)}")
    if not (isinstance(levels, int) and levels >= 0 and isinstance(zoom, int) and zoom >= 3):
        raise ValueError(f"levels must be an int >= 0 and zoom an int >= 3, got {levels!r} and {zoom!r}")
    n_teachers, vocab = teacher_logits.shape

    def losses(mu, log_sigma):  # mu, log_sigma [E, K] -> [E, K]
        z = gaussian_log_density(x, mu, log_sigma.exp())
        t = teacher_logits.unsqueeze(1).expand_as(z)
        return fn(z.reshape(-1, vocab), t.reshape(-1, vocab), reduction="none").reshape(mu.shape)

    with single_thread():  # many small batched calls: threads only add waiting on a busy machine
        grid_mu = torch.linspace(means[0], means[1], int(means[2]), dtype=torch.float64)
        grid_ls = torch.linspace(math.log(sigmas[0]), math.log(sigmas[1]), int(sigmas[2]), dtype=torch.float64)
        mu, ls = torch.meshgrid(grid_mu, grid_ls, indexing="ij")  # [M, S]
        coarse = losses(mu.reshape(1, -1).expand(n_teachers, -1), ls.reshape(1, -1).expand(n_teachers, -1))
        profile = coarse.reshape(n_teachers, *mu.shape).min(-1).values
        best = coarse.argmin(-1)
        best_mu, best_ls = mu.reshape(-1)[best], ls.reshape(-1)[best]
        step_mu, step_ls = float(grid_mu[1] - grid_mu[0]), float(grid_ls[1] - grid_ls[0])
        offsets = torch.linspace(-1.25, 1.25, zoom, dtype=torch.float64)
        shrink = 2.5 / (zoom - 1)
        d_mu, d_ls = torch.meshgrid(offsets, offsets, indexing="ij")
        best_loss = coarse.gather(-1, best.unsqueeze(-1)).squeeze(-1)
        for _ in range(levels):
            cand_mu = best_mu.unsqueeze(-1) + step_mu * d_mu.reshape(1, -1)
            cand_ls = best_ls.unsqueeze(-1) + step_ls * d_ls.reshape(1, -1)
            values = losses(cand_mu, cand_ls)
            i = values.argmin(-1, keepdim=True)
            best_mu, best_ls = cand_mu.gather(-1, i).squeeze(-1), cand_ls.gather(-1, i).squeeze(-1)
            best_loss = values.gather(-1, i).squeeze(-1)
            step_mu, step_ls = step_mu * shrink, step_ls * shrink
    return GaussianSearch(best_mu, best_ls.exp(), best_loss, grid_mu, profile)


def train_gaussian(
    x, teacher_logits, divergence, *, mean=0.0, sigma=1.0, steps=300, lr=0.05
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Train a single Gaussian on each teacher by Adam on (mu, log sigma), the learning rate cosine-annealed to 0.

    Where :func:`best_gaussian` finds the minimum of the divergence's value, this finds where training stops, which
    differs for a loss whose gradient is not the gradient of its value (AKL, whose weights are detached). Start:
    ``mean``, ``sigma`` (numbers or [E]); returns (mean [E], sigma [E]) after ``steps`` updates.

    Shapes: x [V]; teacher_logits [E, V] (or [V]).
    """
    x = _check_grid(x)
    teacher_logits = torch.as_tensor(teacher_logits, dtype=torch.float64)
    teacher_logits = teacher_logits.unsqueeze(0) if teacher_logits.dim() == 1 else teacher_logits
    if teacher_logits.dim() != 2 or teacher_logits.shape[1] != x.numel():
        raise ValueError(f"teacher_logits must be [E, V] with V = {x.numel()}, got {tuple(teacher_logits.shape)}")
    if not (isinstance(steps, int) and steps >= 1 and lr > 0):
        raise ValueError(f"steps must be an int >= 1 and lr > 0, got {steps!r} and {lr!r}")
    name, hyper = divergence if isinstance(divergence, tuple) else (divergence, {})
    fn = get(name, **hyper)
    shape = teacher_logits.shape[:1]
    mu = torch.as_tensor(mean, dtype=torch.float64).expand(shape).clone().requires_grad_(True)
    sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(shape)
    if (sigma <= 0).any():
        raise ValueError("sigma must be > 0")
    log_sigma = sigma.log().clone().requires_grad_(True)
    opt = torch.optim.Adam([mu, log_sigma], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with single_thread():  # a few thousand numbers per step: threads only add waiting on a busy machine
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            fn(gaussian_log_density(x, mu, log_sigma.exp()), teacher_logits, reduction="sum").backward()
            opt.step()
            schedule.step()
    return mu.detach(), log_sigma.detach().exp()
