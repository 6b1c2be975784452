"""STAND-IN for ``kdiv.DistillationLoss`` (the training-integration loss module), to be replaced by it.

The harness uses only the interface below, so the switch is one import in :mod:`kdiv.distill.train`:
``DistillationLoss(divergence, *, kd_ratio, temperature, t_squared, ignore_index, shift, vocab, **hyper)`` and
``forward(student_logits, teacher_logits, labels, *, num_items_in_batch=None)`` returning ``.loss``, ``.kd``,
``.ce`` (detached), ``.n_tokens``;
loss = (1 - kd_ratio) * CE + kd_ratio * KD over the counted (label != ignore_index) tokens after the causal shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kdiv

__all__ = ["DistillationLoss", "DistillationOutput"]


@dataclass
class DistillationOutput:
    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    n_tokens: int


class DistillationLoss(torch.nn.Module):
    """Stand-in: (1 - kd_ratio) * CE(labels) + kd_ratio * divergence(student, teacher) on counted tokens."""

    def __init__(
        self,
        divergence="akl",
        *,
        kd_ratio=1.0,
        temperature=1.0,
        t_squared=False,
        ignore_index=-100,
        shift=True,
        vocab="strict",
        **hyper,
    ):
        super().__init__()
        self.fn = kdiv.get(divergence)  # a ValueError naming the registered divergences for a bad name
        if not 0.0 <= kd_ratio <= 1.0:
            raise ValueError(f"kd_ratio must be in [0, 1], got {kd_ratio!r}")
        if vocab != "strict":
            raise ValueError(f"vocab must be 'strict' in this stand-in, got {vocab!r}")
        self.divergence, self.kd_ratio, self.temperature, self.t_squared = divergence, kd_ratio, temperature, t_squared
        self.ignore_index, self.shift, self.hyper = ignore_index, shift, hyper

    def forward(self, student_logits, teacher_logits, labels, *, num_items_in_batch=None):
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"student_logits and teacher_logits must have the same shape (vocab='strict'), got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
            )
        if self.shift:
            student_logits, teacher_logits, labels = student_logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:]
        mask = labels != self.ignore_index
        n = int(mask.sum())
        denom = float(num_items_in_batch) if num_items_in_batch is not None else max(n, 1)
        s, t = student_logits[mask], teacher_logits[mask].detach()
        zero = student_logits.sum() * 0.0
        if self.kd_ratio > 0 and n:
            kd = self.fn(s, t, temperature=self.temperature, reduction="sum", **self.hyper) / denom
            if self.t_squared:
                kd = kd * self.temperature**2
        else:
            kd = zero
        if self.kd_ratio < 1 and n:
            ce = F.cross_entropy(s.float(), labels[mask], reduction="sum") / denom
        else:
            ce = zero
        loss = (1 - self.kd_ratio) * ce + self.kd_ratio * kd
        return DistillationOutput(loss=loss, kd=kd.detach(), ce=ce.detach(), n_tokens=n)
