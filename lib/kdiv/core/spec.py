"""One record per divergence: :class:`DivergenceSpec`, and the :func:`divergence` decorator that makes one.

Everything that needs a per-divergence table reads it from these records: the registry (``kdiv.DIVERGENCES``,
``kdiv.get``, ``kdiv.hyperparameters``), the figure style (colour, label, marker), the closed-form gradient
coefficients of :mod:`kdiv.lab.gradients`, the loss zoo of :mod:`kdiv.lab.zoo`, the plain autograd versions of
:mod:`kdiv.testing.plain`, and the test parametrisations.
A divergence is its row kernel (see :mod:`kdiv.core.engine.chunked`), its public function decorated with
:func:`divergence`, and a float64 reference in ``tests/reference.py``; nothing else names it.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from .checks import _as_float
from .engine.chunked import rowwise_divergence

__all__ = ["Hyper", "DivergenceSpec", "divergence", "SPECS", "COMMON_ARGUMENTS", "ADDED_ARGUMENTS"]

# Keyword arguments every token-level divergence takes besides its hyper-parameters.
COMMON_ARGUMENTS = {"temperature": 1.0, "mask": None, "reduction": "mean", "chunk_size": None, "vocab_group": None}
# Those of them that the decorator adds to the public signature when a template does not spell them out:
# ``vocab_group`` (a torch.distributed process group) runs the divergence on vocabulary shards (kdiv.parallel).
ADDED_ARGUMENTS = {"vocab_group": None}


@dataclass(frozen=True)
class Hyper:
    """A hyper-parameter: its name, default, valid range ``low .. high`` (open or closed at each end), the symbol a
    figure labels it with, and ``examples``: values beside the default that tests sweep (the ends of a closed range
    among them, since the kernels special-case them)."""

    name: str
    default: float
    low: float = 0.0
    high: float = 1.0
    low_open: bool = False
    high_open: bool = False
    symbol: str = ""
    examples: tuple[float, ...] = ()

    def __post_init__(self):
        for value in (self.default, *self.examples):
            if not self.contains(value):
                raise ValueError(f"{self.name}: {value} is outside its own range {self.range_text()}")

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def range_text(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def check(self, value) -> float:
        """The value as a float, or a ValueError naming the argument and its range."""
        value = _as_float(self.name, value)
        if not (math.isfinite(value) and self.contains(value)):
            raise ValueError(f"{self.name} must lie in {self.range_text()}, got {value}")
        return value


@dataclass(frozen=True)
class DivergenceSpec:
    """Everything kdiv knows about one token-level divergence.

    ``fn``: the public function (``kdiv.<name>``); ``kernel``: its row kernel; ``hyper``: its hyper-parameters;
    ``label``, ``color``, ``marker`` (matplotlib marker, size in points): how figures draw it; ``aliases``: short
    names a reader may type ("fkl"); ``prob_gradient``: the closed-form coefficient ``g(q, p, **hyper) = dL/dq``
    (None where there is none); ``reference``: the paper it comes from; ``plain``: the loss per row written the
    usual way, ``plain(logq, logp, **hyper) -> [...]`` from whole-row log-probabilities [..., V], which
    :mod:`kdiv.testing.plain` turns into the autograd version that tests and benchmarks compare the kernel with.
    """

    name: str
    fn: Callable
    kernel: Callable
    hyper: tuple[Hyper, ...]
    label: str
    color: str
    marker: tuple[str, float]
    aliases: tuple[str, ...] = ()
    prob_gradient: Callable | None = None
    reference: str = ""
    defaults: dict = field(default_factory=dict)
    plain: Callable | None = None

    def check_hyper(self, values: dict) -> dict:
        """Validated hyper-parameters, defaults filled in."""
        return {h.name: h.check(values[h.name]) if h.name in values else h.default for h in self.hyper}

    def examples(self) -> list[dict]:
        """Hyper-parameter settings worth testing beside the defaults: one per example value of each."""
        return [{h.name: v} for h in self.hyper for v in h.examples]


# name -> spec, in the order the divergences are defined
SPECS: dict[str, DivergenceSpec] = {}


def divergence(*, kernel, plain, label, color, marker, hyper=(), aliases=(), prob_gradient=None, reference=""):
    """Register a token-level divergence: decorates a function whose signature and docstring are the public ones
    and whose body is never run. The decorated function validates its arguments (hyper-parameters against their
    ranges) and runs ``kernel`` chunk by chunk through :func:`kdiv.core.engine.chunked.rowwise_divergence`; with
    ``vocab_group=`` (a process group) it runs :func:`kdiv.parallel.vocab_parallel` on this rank's vocabulary shard.
    """

    def wrap(template):
        name = template.__name__
        if name in SPECS:
            raise ValueError(f"divergence {name!r} is registered twice")
        signature = inspect.signature(template)
        keywords = {k: p.default for k, p in signature.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        added = {k: v for k, v in ADDED_ARGUMENTS.items() if k not in keywords}
        declared = {h.name: h.default for h in hyper}
        if {**keywords, **added} != {**declared, **COMMON_ARGUMENTS}:
            raise ValueError(
                f"{name}'s keyword arguments {keywords} do not match its hyper-parameters {declared} "
                f"and the common arguments {COMMON_ARGUMENTS}"
            )
        by_name = {h.name: h for h in hyper}

        @functools.wraps(template)
        def fn(
            student_logits,
            teacher_logits,
            *,
            temperature=1.0,
            mask=None,
            reduction="mean",
            chunk_size=None,
            vocab_group=None,
            **values,
        ):
            if vocab_group is not None:
                # every argument is checked there, on every rank at once: a bad one on one rank raises on all
                from ..parallel.vocab import vocab_parallel

                return vocab_parallel(
                    name,
                    student_logits,
                    teacher_logits,
                    group=vocab_group,
                    temperature=temperature,
                    mask=mask,
                    reduction=reduction,
                    chunk_size=chunk_size,
                    **values,
                )
            unknown = sorted(set(values) - set(by_name))
            if unknown:
                raise TypeError(f"{name}() got an unexpected keyword argument {unknown[0]!r}")
            checked = {k: h.check(values[k]) if k in values else h.default for k, h in by_name.items()}
            run = getattr(teacher_logits, "rowwise_divergence", rowwise_divergence)  # kdiv.TopK brings its own
            return run(
                kernel,
                student_logits,
                teacher_logits,
                temperature=temperature,
                mask=mask,
                reduction=reduction,
                chunk_size=chunk_size,
                hyper=checked,
            )

        if added:
            extra = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in added.items()]
            fn.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *extra])
        fn.spec = SPECS[name] = DivergenceSpec(
            name=name,
            fn=fn,
            kernel=kernel,
            hyper=tuple(hyper),
            label=label,
            color=color,
            marker=tuple(marker),
            aliases=tuple(aliases),
            prob_gradient=prob_gradient,
            reference=reference,
            defaults=declared,
            plain=plain,
        )
        return fn

    return wrap
