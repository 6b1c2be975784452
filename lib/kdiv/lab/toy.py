r"""Toy teachers on a 1-D grid and the loop that fits a free softmax student to them under any divergence.

This is the set-up of the toy experiments of Wu et al., "Rethinking Kullback-Leibler Divergence in Knowledge
Distillation for Large Language Models" (COLING 2025, arXiv 2404.02657), Figures 2 and 3: the teacher is a
discretised Gaussian mixture over V grid points, the student a vector of V free logits trained by Adam, so that
student and teacher share one optimum (q = p) whatever the divergence.

Teachers (each component with its own weight, mean and sigma; densities evaluated at the grid points, renormalised):

- :func:`bimodal_teacher`, case (a): x = 0, 2, ..., 98 (50 points), 0.3 N(25, 10) + 0.5 N(75, 10).
- :func:`unimodal_teacher`, case (b): the same grid, N(50, 15).
- :func:`long_tail_teacher`, case (c): x = 0, 1.25, ..., 98.75 (80 points), a half-normal with sigma 16, times
  (1 + 0.01 U(0, 1)) noise from a seeded generator.

Two differences from the paper's reference notebooks, both deliberate: their mixture density used the first
component's sigma for the second component too (harmless for (a), where both are 10, wrong in general), and their
long-tail noise was drawn unseeded, so the figure changed on every run. Here every component uses its own sigma and
the noise comes from ``numpy.random.default_rng(seed)``.

:func:`fit` trains several divergences (and several learning rates and initialisations) in one call: the student is
one logits tensor per learning rate of shape [D, S, V] (divergence, initialisation, grid point), and one optimiser
steps them all. Adam and SGD update every element independently, so each row follows exactly the trajectory it would
follow alone (``tests/test_toy.py`` checks this against separate fits).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..core.checks import index_of
from ..core.headtail import head_tail_error
from ..core.registry import DIVERGENCES, get

__all__ = [
    "Component",
    "Teacher",
    "FitResult",
    "Adam",
    "mixture_teacher",
    "bimodal_teacher",
    "unimodal_teacher",
    "long_tail_teacher",
    "init_logits",
    "resolve_divergence",
    "make_optimizer",
    "fit",
    "single_thread",
]


# --------------------------------------------------------------------------------------------------------------
# Teachers
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """One Gaussian component: ``weight * N(mean, sigma**2)``; weights need not sum to 1 (the teacher is
    renormalised on its grid)."""

    weight: float
    mean: float
    sigma: float

    def __post_init__(self):
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"weight must be a positive finite number, got {self.weight}")
        if not math.isfinite(self.mean):
            raise ValueError(f"mean must be finite, got {self.mean}")
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be a positive finite number, got {self.sigma}")

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """log of ``weight * N(x; mean, sigma**2)`` (normalised density, so components of different sigma weigh
        right)."""
        z = (x - self.mean) / self.sigma
        return math.log(self.weight) - 0.5 * z * z - math.log(self.sigma) - 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class Teacher:
    """A discrete teacher distribution on an ordered 1-D grid.

    ``x`` [V] grid points, ``probs`` [V] probabilities (float64, sum 1). ``logits`` = log(probs), -inf where a
    probability is 0 (kdiv's divergences accept -inf logits).
    """

    name: str
    x: torch.Tensor
    probs: torch.Tensor

    def __post_init__(self):
        if self.x.dim() != 1 or self.x.shape != self.probs.shape:
            raise ValueError(
                f"x and probs must be 1-D of one shape, got {tuple(self.x.shape)} and {tuple(self.probs.shape)}"
            )
        if not torch.isfinite(self.probs).all() or (self.probs < 0).any():
            raise ValueError("probs must be finite and non-negative")
        if abs(float(self.probs.sum()) - 1.0) > 1e-9:
            raise ValueError(f"probs must sum to 1, got {float(self.probs.sum())}")

    @property
    def logits(self) -> torch.Tensor:
        return self.probs.log()

    @property
    def vocab(self) -> int:
        return self.x.shape[0]

    @property
    def mean(self) -> float:
        return float((self.x * self.probs).sum())

    @property
    def std(self) -> float:
        return float(((self.x - self.mean) ** 2 * self.probs).sum().sqrt())


def _grid(start: float, step: float, n: int) -> torch.Tensor:
    return start + step * torch.arange(n, dtype=torch.float64)


def mixture_teacher(x, components: Sequence[Component], *, name: str = "mixture") -> Teacher:
    r"""The Gaussian mixture :math:`\sum_k w_k N(x; \mu_k, \sigma_k^2)` evaluated at the grid points ``x`` [V] and
    renormalised to sum to 1 over the grid. Computed in log space, so far-away grid points do not underflow to 0."""
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.dim() != 1 or x.numel() < 2:
        raise ValueError(f"x must be a 1-D grid of at least 2 points, got shape {tuple(x.shape)}")
    if not components:
        raise ValueError("components must contain at least one Component")
    log_d = torch.logsumexp(torch.stack([c.log_density(x) for c in components]), dim=0)
    return Teacher(name, x, torch.softmax(log_d, dim=0))


def bimodal_teacher() -> Teacher:
    """Case (a): 0.3 N(25, 10) + 0.5 N(75, 10) on x = 0, 2, ..., 98 (50 points), renormalised."""
    return mixture_teacher(
        _grid(0.0, 2.0, 50), [Component(0.3, 25.0, 10.0), Component(0.5, 75.0, 10.0)], name="bimodal"
    )


def unimodal_teacher() -> Teacher:
    """Case (b): N(50, 15) on x = 0, 2, ..., 98 (50 points), renormalised."""
    return mixture_teacher(_grid(0.0, 2.0, 50), [Component(1.0, 50.0, 15.0)], name="unimodal")


def long_tail_teacher(seed: int = 0, *, sigma: float = 16.0, noise: float = 0.01) -> Teacher:
    """Case (c): half-normal with ``sigma`` on x = 0, 1.25, ..., 98.75 (80 points), times (1 + noise U(0, 1)).

    The noise breaks ties between tail probabilities, as in the paper; it is drawn from
    ``numpy.random.default_rng(seed)``, so one seed gives one teacher on every machine.
    """
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be positive, got {sigma}")
    if not (0 <= noise < 1):
        raise ValueError(f"noise must be in [0, 1), got {noise}")
    x = _grid(0.0, 1.25, 80)
    density = torch.exp(-0.5 * (x / sigma) ** 2)  # half-normal: the x >= 0 half of N(0, sigma^2)
    u = torch.from_numpy(np.random.default_rng(seed).uniform(0.0, 1.0, x.numel()))
    density = density * (1.0 + noise * u)
    return Teacher("long_tail", x, density / density.sum())


# --------------------------------------------------------------------------------------------------------------
# Fitting
# --------------------------------------------------------------------------------------------------------------


def init_logits(vocab: int, seed: int = 0, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Seeded initial student logits [vocab], U(0, 1) as in the paper's reference notebooks (a near-uniform
    student)."""
    if not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"vocab must be a positive int, got {vocab!r}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.rand(vocab, generator=g, dtype=dtype)


def resolve_divergence(spec, *, temperature: float = 1.0) -> tuple[str, Callable]:
    """A divergence spec -> (key, fn). ``fn(student_logits [N, V], teacher_logits [N, V]) -> [N]`` per row.

    A spec is a registry name ("forward_kl"), a ``(name, {hyper: value})`` pair (``("js", {"beta": 0.1})``), or a
    callable with kdiv's signature ``fn(student_logits, teacher_logits, *, temperature, reduction)`` that returns one
    loss per row for ``reduction="none"`` (e.g. a transport loss wrapped to that signature). The key names it in
    results: "forward_kl", "js(beta=0.1)", or the callable's ``__name__``.
    """
    if callable(spec):
        name = getattr(spec, "__name__", None) or type(spec).__name__
        return name, lambda s, t: spec(s, t, reduction="none", temperature=temperature)
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict):
        name, hyper = spec
    elif isinstance(spec, str):
        name, hyper = spec, {}
    else:
        raise ValueError(f"divergences must hold names, (name, hyper) pairs or callables, got {spec!r}")
    if name not in DIVERGENCES:
        raise ValueError(f"divergence name must be one of {sorted(DIVERGENCES)} (or pass a callable), got {name!r}")
    fn = get(name, **hyper)
    key = name + ("(" + ", ".join(f"{k}={v:g}" for k, v in sorted(hyper.items())) + ")" if hyper else "")
    return key, lambda s, t: fn(s, t, reduction="none", temperature=temperature)


class Adam:
    """Adam with torch's defaults (betas (0.9, 0.999), eps 1e-8, no weight decay), the same arithmetic as
    ``torch.optim.Adam`` on CPU, written out.

    Why not ``torch.optim.Adam`` itself: constructing any torch.optim optimizer imports ``torch._dynamo``, about 2 s
    on a 2-core machine, more than a whole toy fit. ``tests/test_toy.py`` checks that both give the same iterates.
    Every element is updated independently of every other, which is what makes :func:`fit`'s rows independent.
    """

    def __init__(self, param_groups: list[dict], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.param_groups = [{"params": list(g["params"]), "lr": float(g["lr"])} for g in param_groups]
        self.betas, self.eps = betas, eps
        self.state: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if id(p) not in self.state:
                    self.state[id(p)] = (torch.zeros_like(p), torch.zeros_like(p), 0)
                exp_avg, exp_avg_sq, t = self.state[id(p)]
                t += 1
                self.state[id(p)] = (exp_avg, exp_avg_sq, t)
                exp_avg.lerp_(p.grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                step_size = group["lr"] / (1 - beta1**t)
                denom = (exp_avg_sq.sqrt() / (1 - beta2**t) ** 0.5).add_(self.eps)
                p.addcdiv_(exp_avg, denom, value=-step_size)


def make_optimizer(optimizer, param_groups: list[dict]):
    """``"adam"`` (:class:`Adam`, torch's defaults), ``"sgd"`` (``torch.optim.SGD``), or a callable
    ``param_groups -> optimizer`` (e.g. ``lambda g: torch.optim.RMSprop(g)``). Each group holds its own ``lr``."""
    if callable(optimizer):
        return optimizer(param_groups)
    if optimizer == "adam":
        return Adam(param_groups)
    if optimizer == "sgd":
        return torch.optim.SGD(param_groups)
    raise ValueError(f"optimizer must be 'adam', 'sgd' or a callable, got {optimizer!r}")


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread inside the block, then restore the previous setting.

    The toy problems are a few thousand numbers per operation: too small to gain from threads, while on a busy
    machine each parallel region can wait a whole scheduler slice (~10 ms) for its helper thread, so a 300-step fit
    took seconds instead of a fraction of one.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _as_tuple(value, name: str) -> tuple:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not values:
        raise ValueError(f"{name} must not be empty")
    return values


def _keys_unique(keys: list[str]) -> None:
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"divergences must be distinct, got {dupes[0]!r} twice")


@dataclass
class FitResult:
    """What :func:`fit` returns. D divergences, L learning rates, S initialisations, R recorded steps, V grid points.

    - ``keys`` (D): divergence keys ("forward_kl", "js(beta=0.1)"); ``lrs`` (L); ``seeds`` (S, None for given inits).
    - ``steps`` [R]: the recorded step numbers; step t is the student after t optimiser updates (0 = initial).
    - ``probs`` [D, L, S, R, V]: the student distribution softmax(logits) at each recorded step.
    - ``loss`` [D, L, S, T + 1]: each row's own divergence after t updates, t = 0..T.
    """

    teacher: Teacher
    keys: tuple[str, ...]
    lrs: tuple[float, ...]
    seeds: tuple
    steps: torch.Tensor
    probs: torch.Tensor
    loss: torch.Tensor

    def index(self, key: str) -> int:
        return index_of("key", key, self.keys)

    def _step_index(self, step: int) -> int:
        hits = (self.steps == step).nonzero()
        if hits.numel() == 0:
            raise ValueError(f"step {step} was not recorded; recorded steps run {self.steps.tolist()[:5]}...")
        return int(hits[0, 0])

    def student(self, key: str, step: int, *, lr: int = 0, seed: int = 0) -> torch.Tensor:
        """The student distribution [V] of divergence ``key`` after ``step`` updates (``lr``, ``seed``: indices)."""
        return self.probs[self.index(key), lr, seed, self._step_index(step)]

    def head_tail_error(self, mu: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """(g_head, g_tail), each [D, L, S, R]: the AKL head / tail split of the teacher (:mod:`kdiv.core.headtail`)."""
        return head_tail_error(self.probs, self.teacher.probs.expand_as(self.probs), mu)

    def tvd(self) -> torch.Tensor:
        """Total variation distance to the teacher, [D, L, S, R]."""
        return 0.5 * (self.probs - self.teacher.probs).abs().sum(-1)

    def head_tail_table(
        self, steps: Sequence[int], *, mu: float = 0.5, lr: int = 0, seed: int = 0, digits: int = 4
    ) -> str:
        """A fixed-digit text table: one row per step, head and tail error per divergence (for notebook output)."""
        g_head, g_tail = self.head_tail_error(mu)
        width = max(digits + 3, *(len(k) + 6 for k in self.keys))
        header = f"{'step':>5}" + "".join(f"{k + ' head':>{width}}{k + ' tail':>{width}}" for k in self.keys)
        lines = [header]
        for step in steps:
            r = self._step_index(step)
            cells = "".join(
                f"{float(g_head[d, lr, seed, r]):>{width}.{digits}f}{float(g_tail[d, lr, seed, r]):>{width}.{digits}f}"
                for d in range(len(self.keys))
            )
            lines.append(f"{step:>5}{cells}")
        return "\n".join(lines)


def fit(
    teacher: Teacher,
    divergences,
    steps: int = 200,
    lr=0.1,
    *,
    seeds=0,
    init=None,
    optimizer="adam",
    record=None,
    temperature: float = 1.0,
) -> FitResult:
    r"""Fit a free softmax student to ``teacher`` under each divergence, from shared initial logits, in one loop.

    The student of divergence d is logits z [V], q = softmax(z / temperature); each step minimises
    ``divergence(z, teacher.logits)`` with its own optimiser state (rows never mix: the loss is a sum of per-row
    losses and Adam / SGD act elementwise).

    Arguments:
        teacher: a :class:`Teacher`.
        divergences: one spec or a list of specs (see :func:`resolve_divergence`), D of them.
        steps: number of optimiser updates T.
        lr: a learning rate or a sequence of L learning rates (one parameter group each).
        seeds: an int or a sequence of S seeds for :func:`init_logits`; every divergence and learning rate starts
            from the same logits for a given seed.
        init: optional initial logits [V] or [S, V] instead of seeds.
        optimizer: "adam" (default, :class:`Adam`), "sgd", or a callable ``param_groups -> optimizer``.
        record: the steps at which to store the student (default: every step 0..T).
        temperature: passed to the divergences.

    Returns a :class:`FitResult` (student distributions at the recorded steps, loss curves). float64 throughout.
    """
    if not isinstance(teacher, Teacher):
        raise ValueError(f"teacher must be a kdiv.lab.toy.Teacher, got {type(teacher).__name__}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    specs = list(divergences) if isinstance(divergences, list) else [divergences]
    if not specs:
        raise ValueError("divergences must not be empty")
    resolved = [resolve_divergence(s, temperature=temperature) for s in specs]
    keys = [k for k, _ in resolved]
    _keys_unique(keys)
    lrs = _as_tuple(lr, "lr")
    for value in lrs:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"lr must be positive, got {value!r}")
    vocab = teacher.vocab

    if init is not None:
        start = torch.as_tensor(init, dtype=torch.float64)
        start = start.unsqueeze(0) if start.dim() == 1 else start
        if start.dim() != 2 or start.shape[1] != vocab:
            raise ValueError(f"init must be [V] or [S, V] with V = {vocab}, got {tuple(start.shape)}")
        seed_list: tuple = (None,) * start.shape[0]
    else:
        seed_list = _as_tuple(seeds, "seeds")
        start = torch.stack([init_logits(vocab, int(s)) for s in seed_list])
    n_div, n_init = len(resolved), start.shape[0]

    record_steps = torch.arange(steps + 1) if record is None else torch.as_tensor(sorted(set(record)))
    if record_steps.numel() == 0 or record_steps.min() < 0 or record_steps.max() > steps:
        raise ValueError(f"record must hold steps in [0, {steps}], got {record}")
    slot = {int(s): i for i, s in enumerate(record_steps)}

    # One [D, S, V] leaf per learning rate; every divergence row starts from the same logits.
    params = [start.unsqueeze(0).repeat(n_div, 1, 1).requires_grad_(True) for _ in lrs]
    opt = make_optimizer(optimizer, [{"params": [p], "lr": float(v)} for p, v in zip(params, lrs, strict=True)])
    target = teacher.logits.expand(len(lrs) * n_init, vocab)

    probs = torch.empty(n_div, len(lrs), n_init, record_steps.numel(), vocab, dtype=torch.float64)
    losses = torch.empty(n_div, len(lrs), n_init, steps + 1, dtype=torch.float64)

    def evaluate(t: int, need_grad: bool):
        z = torch.stack(params, dim=1)  # [D, L, S, V]
        rows = torch.stack([fn(z[d].reshape(-1, vocab), target) for d, (_, fn) in enumerate(resolved)])
        losses[..., t] = rows.detach().reshape(n_div, len(lrs), n_init)
        if t in slot:
            with torch.no_grad():
                # exp(z - logsumexp) rather than torch.softmax: on small float64 inputs torch.softmax wakes its
                # thread pool and costs milliseconds per call on a busy machine, the whole budget of a step.
                zt = z.detach() / temperature
                probs[:, :, :, slot[t]] = (zt - zt.logsumexp(-1, keepdim=True)).exp()
        return rows.sum() if need_grad else None

    with single_thread():
        for t in range(steps):
            opt.zero_grad(set_to_none=True)
            evaluate(t, True).backward()
            opt.step()
        with torch.no_grad():
            evaluate(steps, False)

    return FitResult(teacher, tuple(keys), tuple(float(v) for v in lrs), seed_list, record_steps, probs, losses)
