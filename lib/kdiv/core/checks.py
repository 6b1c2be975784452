"""Argument checks shared by every kdiv function: bad input raises a ValueError that names the argument; likely
misuse that is still computable (swapped arguments, probabilities passed as logits) gets a :class:`KdivWarning`."""

from __future__ import annotations

import math
import os
import sys
import warnings

import torch

REDUCTIONS = ("mean", "sum", "none")


class KdivWarning(UserWarning):
    """A call that kdiv computes but that is probably not what was meant (``kdiv.KdivWarning``).

    Silence one kind with ``warnings.filterwarnings("ignore", "...", kdiv.KdivWarning)``, or all of them with
    ``warnings.simplefilter("ignore", kdiv.KdivWarning)``."""


# Frames in these packages are passed over when a warning names the line that caused it: kdiv's own, and torch's
# (nn.Module.__call__, the torch.compiler.disable wrapper, autograd) between the user's call and kdiv.
_INTERNAL = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (sys.modules[__name__.split(".")[0]], torch)
)


def warn(message: str) -> None:
    """A KdivWarning attributed to the first caller outside kdiv and torch (the user's line)."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2: warn's caller
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, KdivWarning, stacklevel=level)


def check_logits(student_logits, teacher_logits) -> None:
    """Both logits are floating tensors of one shape [..., V] with V >= 1."""
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must have a floating dtype (logits), got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] == 0:
            raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {tuple(x.shape)}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits and teacher_logits must have the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
            + (" (different vocabulary sizes)" if student_logits.shape[:-1] == teacher_logits.shape[:-1] else "")
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits and teacher_logits must be on one device, got {student_logits.device} "
            f"and {teacher_logits.device}"
        )


# A row counts as "probabilities" when it is non-negative and sums to 1 within this (float64 sum).
_PROBABILITY_SUM_TOL = 1e-3


def _first_row(x: torch.Tensor) -> torch.Tensor | None:
    """The first row [V] of x [..., V], a view (None for an empty batch)."""
    return x[(0,) * (x.dim() - 1)] if x.numel() else None


def looks_like_probabilities(x: torch.Tensor) -> bool:
    """True when the first row of x [..., V] (V >= 2) is non-negative and sums to 1: softmax output, not logits.
    One row is read (O(V), whatever the batch), so the check costs nothing beside the divergence."""
    row = _first_row(x)
    if row is None or row.numel() < 2:
        return False
    low, total = torch.stack([row.min().double(), row.sum(dtype=torch.float64)]).tolist()
    return low >= 0 and abs(total - 1) <= _PROBABILITY_SUM_TOL


def warn_if_swapped(student_tensors, teacher_tensors, what: str) -> None:
    """A KdivWarning when grad mode is on, some teacher tensor requires grad and no student tensor does: kdiv
    detaches the teacher, so such a loss gives no gradient to anything (the arguments were probably swapped)."""
    if not torch.is_grad_enabled():
        return
    if any(t is not None and t.requires_grad for t in teacher_tensors) and not any(
        s is not None and s.requires_grad for s in student_tensors
    ):
        warn(
            f"{what}: kdiv treats the teacher as a constant, so "
            "this loss gives no gradient to anything. The student comes first: were the arguments swapped? "
            "(Compute the teacher under torch.no_grad() or .detach() it to silence this.)"
        )


SWAPPED_LOGITS = "teacher_logits requires grad but student_logits does not"


def warn_on_misuse(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None) -> None:
    """KdivWarnings for calls that compute but are probably wrong: the teacher requires grad and the student does
    not (swapped arguments: the loss would give no gradient), and probabilities passed where logits are expected
    (the loss then compares softmax(probabilities), nearly uniform, and comes out near 0). ``teacher_logits`` None:
    the student alone (a top-k teacher brings its own checks)."""
    if teacher_logits is not None:
        warn_if_swapped([student_logits], [teacher_logits], SWAPPED_LOGITS)
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if x is not None and looks_like_probabilities(x):
            warn(
                f"{name} looks like probabilities (its first row is non-negative and sums to 1), but kdiv takes "
                "logits: it would compare softmax(probabilities), nearly uniform, and the loss comes out near 0. "
                "Pass logits, or log-probabilities (probs.log(); log-softmax output is a valid logit)."
            )


def check_mask(mask, batch_shape: torch.Size, device) -> torch.Tensor | None:
    """The mask is None or a bool tensor of the logits' shape without the vocabulary axis."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must have dtype torch.bool (True = the token counts), got {mask.dtype}")
    if mask.shape != batch_shape:
        raise ValueError(
            f"mask must have shape {tuple(batch_shape)} (the logits without the vocab axis), got {tuple(mask.shape)}"
        )
    return mask.to(device)


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _as_float(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN")
    return value


def check_positive(name: str, value) -> float:
    """A finite number > 0 (temperature, epsilon, support spacing)."""
    value = _as_float(name, value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_closed_unit(name: str, value) -> float:
    """A number in [0, 1] (alpha, beta, w)."""
    value = _as_float(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def check_open_unit(name: str, value) -> float:
    """A number in (0, 1) (AKL's mu)."""
    value = _as_float(name, value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {value}")
    return value


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def index_of(name: str, value, options) -> int:
    """The position of `value` in `options`, or a ValueError naming the argument and the choices."""
    options = list(options)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return options.index(value)
