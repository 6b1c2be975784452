r"""The token-level divergences written the usual way, for the benchmark and as the tests' plain versions.

Each builds its temporaries over the whole [N, V] logits (log_softmax, softmax, elementwise products, a sum over
the vocabulary) and lets autograd do the backward, as DistiLLM's, MiniLLM's and TRL's losses do. Same signature,
conventions and results as :mod:`kdiv.core.divergences` (``-inf`` logits get log-probability ``LOG_FLOOR``;
masked tokens count 0; ``"mean"`` over counted tokens), so that ``tests/test_chunked.py`` can hold the chunked
kernels against them. Each is its spec's plain form (``kdiv.spec(name).plain``, on log-probabilities) wrapped in
the common arguments: ``plain.DIVERGENCES[name]``, also ``plain.<name>``.

Shapes: logits [..., V]; mask [...]; returns [] or [...] with reduction="none".
"""

from __future__ import annotations

import torch

from ..core.engine.chunked import LOG_FLOOR
from ..core.registry import SPECS


def _log_probs(logits, temperature):
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return torch.log_softmax(z / temperature, dim=-1).nan_to_num(neginf=LOG_FLOOR)


def _reduce(rows, mask, reduction):
    if mask is not None:
        rows = rows * mask
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    n = rows.numel() if mask is None else mask.sum()
    return rows.sum() / (n.clamp_min(1) if isinstance(n, torch.Tensor) else max(n, 1))


def _plain(spec):
    """The plain version of one divergence: log-softmax of both logits, its spec's plain form, the reduction."""

    def fn(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", **hyper):
        unknown = sorted(set(hyper) - set(spec.defaults))
        if unknown:
            raise TypeError(f"{spec.name}() got an unexpected keyword argument {unknown[0]!r}")
        logq = _log_probs(student_logits, temperature)
        logp = _log_probs(teacher_logits.detach(), temperature)
        return _reduce(spec.plain(logq, logp, **{**spec.defaults, **hyper}), mask, reduction)

    fn.__name__ = fn.__qualname__ = spec.name
    fn.__doc__ = f"{spec.label}, the plain way (see the module docstring)."
    return fn


def soft_cross_entropy(student_logits, teacher_probs):
    """torch's cross-entropy with soft targets (probabilities), mean over tokens: the yardstick."""
    return torch.nn.functional.cross_entropy(student_logits, teacher_probs)


DIVERGENCES = {name: _plain(spec) for name, spec in SPECS.items()}
globals().update(DIVERGENCES)  # plain.forward_kl, plain.js, ...
