r"""A continuous Gaussian-mixture teacher and a single-Gaussian student fitted to it under any divergence.

This is the set-up of the textbook mean-seeking / mode-seeking argument (Bishop, PRML §10.1.2; MiniLLM, Gu et al.,
ICLR 2024, Figure 2): a student family too narrow to hold the teacher. Fitting one Gaussian to a two-component
mixture under forward KL matches the mixture's mean and variance (moment matching), covering both modes; under
reverse KL it settles on one mode, and which one depends on where it starts. Wu et al. (arXiv 2404.02657) point out
that an LLM's softmax student is not such a family: with free logits both divergences reach the teacher
(:mod:`kdiv.lab.toy`).

Densities are discretised on a fine, wide grid x [V]: the teacher's logits are ``log p(x)`` and the student's
``log N(x; m, s^2)``. Any kdiv divergence is then applied to these logits (their softmax over the grid is the density
times the grid step, renormalised), so KL, JSD, TVD... are Riemann sums of their continuous versions. A grid step of
a few hundredths of the narrowest sigma and a range of several sigmas beyond the outer components keep the
discretisation error far below the digits printed in the notebooks.

The student's parameters are the mean and log standard deviation, both in units of the teacher's own standard
deviation around its mean (so one learning rate suits any scale): ``m = mean + std * u``, ``s = std * exp(v)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..core.checks import index_of
from .toy import Component, Teacher, make_optimizer, resolve_divergence, single_thread

__all__ = ["GaussianMixture", "GaussianFit", "fit_gaussian", "gaussian_log_density"]


def gaussian_log_density(x: torch.Tensor, mean, std) -> torch.Tensor:
    r"""``log N(x; mean, std^2)``, broadcasting: x [V], mean and std [...] -> [..., V]."""
    mean = torch.as_tensor(mean, dtype=x.dtype).unsqueeze(-1)
    std = torch.as_tensor(std, dtype=x.dtype).unsqueeze(-1)
    z = (x - mean) / std
    return -0.5 * z * z - std.log() - 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class GaussianMixture:
    r"""A continuous mixture :math:`p(x) = \sum_k w_k N(x; \mu_k, \sigma_k^2)` with weights renormalised to sum 1.

    ``components``: :class:`kdiv.lab.toy.Component` (weight, mean, sigma), each with its own sigma.
    """

    components: tuple[Component, ...]

    def __post_init__(self):
        comps = tuple(self.components)
        if not comps or not all(isinstance(c, Component) for c in comps):
            raise ValueError("components must be a non-empty sequence of kdiv.lab.toy.Component")
        object.__setattr__(self, "components", comps)

    @property
    def weights(self) -> tuple[float, ...]:
        total = sum(c.weight for c in self.components)
        return tuple(c.weight / total for c in self.components)

    @property
    def mean(self) -> float:
        """The mixture's mean, :math:`\\sum_k w_k \\mu_k` (the forward-KL single-Gaussian fit's mean)."""
        return sum(w * c.mean for w, c in zip(self.weights, self.components, strict=True))

    @property
    def std(self) -> float:
        """The mixture's standard deviation, :math:`\\sqrt{\\sum_k w_k (\\sigma_k^2 + \\mu_k^2) - \\text{mean}^2}`."""
        second = sum(w * (c.sigma**2 + c.mean**2) for w, c in zip(self.weights, self.components, strict=True))
        return math.sqrt(max(second - self.mean**2, 0.0))

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x), computed in log space (no underflow far from the modes). x [V] float64 -> [V]."""
        total = math.log(sum(c.weight for c in self.components))
        return torch.logsumexp(torch.stack([c.log_density(x) for c in self.components]), dim=0) - total

    def grid(self, n: int = 1501, *, width: float = 6.0) -> torch.Tensor:
        """An even grid [n] reaching ``width`` sigmas beyond every component and beyond the mixture's mean +- width
        times its std."""
        if not isinstance(n, int) or n < 2:
            raise ValueError(f"n must be an int >= 2, got {n!r}")
        if not width > 0:
            raise ValueError(f"width must be positive, got {width}")
        # wide enough for every component and for the moment-matched Gaussian, so no fit is cut by the grid's ends
        lo = min(min(c.mean - width * c.sigma for c in self.components), self.mean - width * self.std)
        hi = max(max(c.mean + width * c.sigma for c in self.components), self.mean + width * self.std)
        return torch.linspace(lo, hi, n, dtype=torch.float64)

    def discretise(self, x: torch.Tensor, name: str = "mixture") -> Teacher:
        """The mixture on the grid ``x`` as a discrete :class:`kdiv.lab.toy.Teacher` (probabilities renormalised)."""
        return Teacher(name, x, torch.softmax(self.log_density(x), dim=0))


@dataclass
class GaussianFit:
    """What :func:`fit_gaussian` returns. D divergences, S initialisations, T steps, V grid points.

    - ``keys`` (D), ``inits`` (S pairs (mean, std)), ``x`` [V] the grid, ``teacher`` the discretised mixture.
    - ``mean``, ``std``, ``loss``: [D, S, T + 1], after t = 0..T updates.
    """

    mixture: GaussianMixture
    teacher: Teacher
    x: torch.Tensor
    keys: tuple[str, ...]
    inits: tuple[tuple[float, float], ...]
    mean: torch.Tensor
    std: torch.Tensor
    loss: torch.Tensor

    def index(self, key: str) -> int:
        return index_of("key", key, self.keys)

    def tvd(self, step: int = -1) -> torch.Tensor:
        """Total variation between the discretised student and teacher on the grid, [D, S], after ``step`` updates."""
        logq = gaussian_log_density(self.x, self.mean[..., step], self.std[..., step])
        q = torch.softmax(logq, dim=-1)
        return 0.5 * (q - self.teacher.probs).abs().sum(-1)

    def density(self, key: str, init: int = 0, step: int = -1) -> torch.Tensor:
        """The fitted student's density N(x; mean, std^2) on the grid [V] (a density, not renormalised)."""
        d = self.index(key)
        return gaussian_log_density(self.x, self.mean[d, init, step], self.std[d, init, step]).exp()


def fit_gaussian(
    mixture: GaussianMixture,
    divergences,
    *,
    inits: Sequence[tuple[float, float]],
    steps: int = 400,
    lr: float = 0.05,
    optimizer="adam",
    grid: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> GaussianFit:
    r"""Fit one Gaussian N(m, s^2) to ``mixture`` under each divergence, from each initial (mean, std), in one loop.

    The loss of divergence d is ``divergence(student_logits, teacher_logits)`` with both logits the log densities on
    ``grid`` (default :meth:`GaussianMixture.grid`). Divergences are specs as in :func:`kdiv.lab.toy.fit`: registry
    names,
    ``(name, {hyper})`` pairs, or callables with kdiv's signature. Parameters ``u, v`` per divergence and
    initialisation ([D, S] each) with ``m = mixture.mean + mixture.std * u`` and ``s = mixture.std * exp(v)``; one
    optimiser ("adam" by default, at ``lr`` in those units) steps them all, each row independently.

    Returns a :class:`GaussianFit` with the mean, std and loss after every step. float64 throughout.
    """
    if not isinstance(mixture, GaussianMixture):
        raise ValueError(f"mixture must be a kdiv.lab.gaussian.GaussianMixture, got {type(mixture).__name__}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    specs = list(divergences) if isinstance(divergences, list) else [divergences]
    if not specs:
        raise ValueError("divergences must not be empty")
    resolved = [resolve_divergence(s, temperature=temperature) for s in specs]
    keys = tuple(k for k, _ in resolved)
    if len(set(keys)) != len(keys):
        raise ValueError(f"divergences must be distinct, got {list(keys)}")
    inits = tuple((float(m), float(s)) for m, s in inits)
    if not inits or any(not (math.isfinite(m) and math.isfinite(s) and s > 0) for m, s in inits):
        raise ValueError(f"inits must be a non-empty sequence of (mean, std) with std > 0, got {inits}")

    x = mixture.grid() if grid is None else torch.as_tensor(grid, dtype=torch.float64)
    if x.dim() != 1 or x.numel() < 2:
        raise ValueError(f"grid must be 1-D with at least 2 points, got shape {tuple(x.shape)}")
    teacher = mixture.discretise(x)
    n_div, n_init, vocab = len(resolved), len(inits), x.numel()
    center, scale = mixture.mean, mixture.std

    init = torch.tensor(inits, dtype=torch.float64)  # [S, 2]
    u = ((init[:, 0] - center) / scale).repeat(n_div, 1).requires_grad_(True)  # [D, S]
    v = (init[:, 1] / scale).log().repeat(n_div, 1).requires_grad_(True)  # [D, S]
    opt = make_optimizer(optimizer, [{"params": [u, v], "lr": float(lr)}])
    target = mixture.log_density(x).expand(n_init, vocab)

    means = torch.empty(n_div, n_init, steps + 1, dtype=torch.float64)
    stds = torch.empty_like(means)
    losses = torch.empty_like(means)

    def evaluate(t: int):
        m, s = center + scale * u, scale * v.exp()
        logits = gaussian_log_density(x, m, s)  # [D, S, V]
        rows = torch.stack([fn(logits[d], target) for d, (_, fn) in enumerate(resolved)])  # [D, S]
        means[..., t], stds[..., t], losses[..., t] = m.detach(), s.detach(), rows.detach()
        return rows.sum()

    with single_thread():
        for t in range(steps):
            opt.zero_grad(set_to_none=True)
            evaluate(t).backward()
            opt.step()
        with torch.no_grad():
            evaluate(steps)

    return GaussianFit(mixture, teacher, x, keys, inits, means, stds, losses)
