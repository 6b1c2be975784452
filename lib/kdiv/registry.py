"""The registry of divergences by name: ``kdiv.DIVERGENCES`` and ``kdiv.get``."""

from __future__ import annotations

import functools
import inspect

from . import divergences as _d

# name -> function; every entry takes (student_logits, teacher_logits, *, temperature, mask, reduction, **hyper)
DIVERGENCES = {
    "forward_kl": _d.forward_kl,
    "reverse_kl": _d.reverse_kl,
    "symmetric_kl": _d.symmetric_kl,
    "js": _d.js,
    "tvd": _d.tvd,
    "skew_kl": _d.skew_kl,
    "skew_reverse_kl": _d.skew_reverse_kl,
    "akl": _d.akl,
}

# The token-level divergences computed chunk by chunk on [tokens, vocab] logits.
TOKEN_LEVEL = tuple(DIVERGENCES)


def hyperparameters(name: str) -> dict:
    """The hyper-parameters of a registered divergence and their defaults, e.g. ``{"beta": 0.5}`` for "js"."""
    fn = _lookup(name)
    common = {"temperature", "mask", "reduction", "chunk_size"}
    return {
        k: p.default
        for k, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in common
    }


def _lookup(name: str):
    if name not in DIVERGENCES:
        raise ValueError(f"name must be one of {sorted(DIVERGENCES)}, got {name!r}")
    return DIVERGENCES[name]


def get(name: str, **hyper):
    """The divergence called `name`, with keyword arguments bound, e.g. ``kdiv.get("js", beta=0.1)``.

    Raises ValueError for an unknown name or a keyword the function does not take.
    """
    fn = _lookup(name)
    accepted = {k for k, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    unknown = sorted(set(hyper) - accepted)
    if unknown:
        raise ValueError(f"{name} takes no argument {unknown[0]!r}; it takes {sorted(accepted)}")
    if not hyper:
        return fn
    bound = functools.partial(fn, **hyper)
    functools.update_wrapper(bound, fn)
    return bound
