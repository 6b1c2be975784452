"""The registry of divergences by name: ``kdiv.DIVERGENCES``, ``kdiv.get``, ``kdiv.hyperparameters``, ``kdiv.spec``.

Everything here is read off the specs (:mod:`kdiv.core.spec`) that :mod:`kdiv.core.divergences` registers.
"""

from __future__ import annotations

import functools

from . import divergences as _divergences  # noqa: F401  (registers every divergence)
from .spec import COMMON_ARGUMENTS, SPECS, DivergenceSpec

__all__ = ["DIVERGENCES", "TOKEN_LEVEL", "get", "hyperparameters", "spec", "SPECS"]

# name -> function; every entry takes (student_logits, teacher_logits, *, temperature, mask, reduction, chunk_size,
# **hyper)
DIVERGENCES = {name: s.fn for name, s in SPECS.items()}

# The token-level divergences computed chunk by chunk on [tokens, vocab] logits.
TOKEN_LEVEL = tuple(DIVERGENCES)


def spec(name: str) -> DivergenceSpec:
    """The spec of a registered divergence (its hyper-parameters and ranges, label, colour, marker, ...)."""
    if name not in SPECS:
        raise ValueError(f"name must be one of {sorted(SPECS)}, got {name!r}")
    return SPECS[name]


def hyperparameters(name: str) -> dict:
    """The hyper-parameters of a registered divergence and their defaults, e.g. ``{"beta": 0.5}`` for "js"."""
    return dict(spec(name).defaults)


def get(name: str, **hyper):
    """The divergence called `name`, with keyword arguments bound, e.g. ``kdiv.get("js", beta=0.1)``.

    Raises ValueError for an unknown name, a keyword the function does not take, or a value outside its range.
    """
    s = spec(name)
    accepted = set(s.defaults) | set(COMMON_ARGUMENTS)
    unknown = sorted(set(hyper) - accepted)
    if unknown:
        raise ValueError(f"{name} takes no argument {unknown[0]!r}; it takes {sorted(accepted)}")
    s.check_hyper({k: v for k, v in hyper.items() if k in s.defaults})
    if not hyper:
        return s.fn
    bound = functools.partial(s.fn, **hyper)
    functools.update_wrapper(bound, s.fn)
    return bound
