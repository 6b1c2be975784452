"""Distillation with ``transformers.Trainer``: :class:`DistillationTrainer` and :func:`distillation_loss_on_batch`.

``DistillationTrainer(model=student, teacher_model=teacher, loss=kdiv.DistillationLoss(...), args=..., ...)`` is a
``transformers.Trainer`` whose ``compute_loss`` runs the teacher without gradient, in eval mode, on the student's
inputs and returns :class:`kdiv.DistillationLoss` of the two models' logits and the labels. Everything else is the
Trainer's: optimizer, schedule, gradient accumulation, mixed precision, data parallelism, logging, checkpoints.

Gradient accumulation is exact: the Trainer counts the tokens of every micro-batch of an optimizer step
(``num_items_in_batch``, over ``labels[..., 1:]`` for a shifting loss, over all ranks with
``average_tokens_across_devices``) and the loss divides its sums by that count, so the micro-batches' losses add up
to the mean over the step's counted tokens. The Trainer only counts for models that take loss keyword arguments;
this one always asks it to. ``kd`` and ``ce`` (the two terms, per optimizer step) are logged beside ``loss``.

:func:`distillation_loss_on_batch` is the same computation as a function, for a ``compute_loss`` of one's own.

``transformers`` is imported when :class:`DistillationTrainer` is first looked up, never by ``import kdiv``; it is
in the ``train`` extra (``pip install kdiv[train]``).
"""

from __future__ import annotations

import torch

from ..core.distillation_loss import DistillationLoss, DistillationLossOutput

__all__ = ["DistillationTrainer", "distillation_loss_on_batch"]  # noqa: F822  (DistillationTrainer: see __getattr__)


def distillation_loss_on_batch(
    model, teacher_model, inputs: dict, loss: DistillationLoss, *, num_items_in_batch=None
) -> tuple[DistillationLossOutput, object]:
    """Run the student (with gradient) and the teacher (eval mode, no gradient) on ``inputs`` and distil.

    ``inputs``: the model's keyword arguments (``input_ids``, ``attention_mask``, ...) and ``labels`` ``[B, L]``
    (``loss.ignore_index`` where a token does not count); the labels are not passed to the models, so that neither
    computes a loss of its own. Both models must return ``.logits`` ``[B, L, V]``. The teacher is left in eval mode.

    Returns ``(loss(student_logits, teacher_logits, labels, num_items_in_batch=...), student_outputs)``.
    """
    if not isinstance(loss, DistillationLoss):
        raise ValueError(f"loss must be a kdiv.DistillationLoss, got {type(loss).__name__}")
    if not isinstance(inputs, dict) or "labels" not in inputs:
        raise ValueError("inputs must be a dict holding 'labels' besides the model's inputs")
    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    outputs = model(**model_inputs)
    teacher_model.eval()  # no dropout in the targets
    with torch.no_grad():
        teacher_logits = teacher_model(**model_inputs).logits
    return loss(outputs.logits, teacher_logits, labels, num_items_in_batch=num_items_in_batch), outputs


def _trainer_class():
    import transformers

    class DistillationTrainer(transformers.Trainer):
        """A ``transformers.Trainer`` that distils ``teacher_model`` into ``model`` with a kdiv loss.

        Args:
            model: the student (a causal LM returning ``.logits``), as for ``transformers.Trainer``.
            teacher_model: the teacher, same tokenizer; moved to the training device, frozen, run in eval mode
                under ``torch.no_grad()``. Its vocabulary size may differ from the student's if ``loss`` says how
                (``vocab="slice"`` or ``"pad"``).
            loss: a :class:`kdiv.DistillationLoss` (default: ``DistillationLoss("akl")``, pure distillation).
            args, **kwargs: as for ``transformers.Trainer`` (datasets of ``input_ids``, ``attention_mask``,
                ``labels``; data collator; callbacks; ...).
        """

        def __init__(self, model=None, args=None, *, teacher_model, loss: DistillationLoss | None = None, **kwargs):
            if teacher_model is None or not isinstance(teacher_model, torch.nn.Module):
                raise ValueError(f"teacher_model must be a torch.nn.Module, got {type(teacher_model).__name__}")
            loss = DistillationLoss() if loss is None else loss
            if not isinstance(loss, DistillationLoss):
                raise ValueError(f"loss must be a kdiv.DistillationLoss, got {type(loss).__name__}")
            if loss.ignore_index != -100:
                # the Trainer counts num_items_in_batch as labels != -100, whatever the loss ignores
                raise ValueError(f"loss.ignore_index must be -100 with the Trainer, got {loss.ignore_index}")
            super().__init__(model=model, args=args, **kwargs)
            self.distillation_loss = loss
            teacher_model.requires_grad_(False)
            self.teacher_model = self.accelerator.prepare_model(teacher_model.eval(), evaluation_mode=True)
            # The Trainer counts num_items_in_batch only for models that take loss keyword arguments, and over
            # labels[..., 1:] only for a loss it knows to shift: here the count must match what the loss counts.
            self.model_accepts_loss_kwargs = True
            self._loss_shifts_labels = loss.shift
            self._parts = {"kd": 0.0, "ce": 0.0}
            self._parts_logged_at = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out, outputs = distillation_loss_on_batch(
                model, self.teacher_model, inputs, self.distillation_loss, num_items_in_batch=num_items_in_batch
            )
            loss = out.loss
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                # num_items_in_batch counts the tokens of every rank and the ranks' gradients are averaged: each
                # rank's share of the global mean is scaled back up, as the Trainer does for its own losses
                tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
                scale = self.accelerator.num_processes // tp_size if self.args.n_gpu <= 1 else self.args.n_gpu
                loss = loss * scale
            if model.training:
                # per optimizer step, like the logged loss: summed as they are, or averaged over the
                # accumulation steps when they are micro-batch means
                steps = 1 if num_items_in_batch is not None else self.current_gradient_accumulation_steps
                for name in self._parts:
                    self._parts[name] = self._parts[name] + getattr(out, name) / steps
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict, *args, **kwargs) -> None:
            steps = self.state.global_step - self._parts_logged_at
            if "loss" in logs and steps > 0:
                for name, value in self._parts.items():
                    logs[name] = float(value) / steps
                    self._parts[name] = 0.0
                self._parts_logged_at = self.state.global_step
            super().log(logs, *args, **kwargs)

    DistillationTrainer.__module__ = __name__
    return DistillationTrainer


def __getattr__(name):
    # the Trainer subclass is built on first use, so that importing this module does not import transformers
    if name == "DistillationTrainer":
        cls = globals()["DistillationTrainer"] = _trainer_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
