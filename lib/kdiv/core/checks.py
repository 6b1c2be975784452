"""Argument checks shared by every kdiv function: bad input raises a ValueError that names the argument."""

from __future__ import annotations

import math

import torch

REDUCTIONS = ("mean", "sum", "none")


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
