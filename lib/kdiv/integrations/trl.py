"""Any kdiv divergence in TRL's GKD trainer, in place of its ``generalized_jsd_loss``.

TRL's ``GKDTrainer`` (``trl.experimental.gkd`` in TRL 1.x; Agarwal et al., "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", ICLR 2024) mixes on-policy student samples (``lmbda``), teacher
samples (``seq_kd``) and the dataset, and scores each batch with its ``generalized_jsd_loss(student_logits,
teacher_logits, labels, beta, temperature, reduction, num_items_in_batch)`` on shifted logits. Two ways in:

- :class:`GKDTrainer`: TRL's trainer with ``loss=kdiv.DistillationLoss(...)``; its ``generalized_jsd_loss`` is the
  kdiv loss (any divergence, the CE mix, ``T²``, the vocabulary options), everything else (generation, the
  teacher under ``no_grad`` in eval mode, the causal shift) is TRL's.
- :func:`generalized_jsd_loss`: a function with TRL's signature, to put on a trainer class of one's own
  (``MyTrainer.generalized_jsd_loss = staticmethod(kdiv.integrations.trl.generalized_jsd_loss("akl"))``).

Conventions: kdiv's ``js`` *is* GKD's generalized JSD (same ``beta``: 0 = forward KL, 1 = reverse KL); the loss's
own hyper-parameters hold, so set ``beta`` on the loss (the default loss takes ``args.beta``). TRL's
``compute_loss`` passes no temperature (``args.temperature`` is the sampling temperature): the KD temperature is
the loss's own.
``num_items_in_batch`` is honoured as TRL does (sums over counted tokens divided by it). Without labels, kdiv
averages over tokens, where TRL's ``"batchmean"`` divides by the batch size.

TRL's ``GKDTrainer`` refuses a teacher whose vocabulary size differs from the student's before any loss runs. With
``lmbda > 0`` it takes ``num_items_in_batch`` from the dataset's labels, counted before on-policy samples replace
them, for kdiv's loss as for its own.

``trl`` is imported when :class:`GKDTrainer` is first looked up, never by ``import kdiv``; it is in the ``train``
extra (``pip install kdiv[train]``).
"""

from __future__ import annotations

import torch

from ..core.distillation_loss import DistillationLoss

__all__ = ["GKDTrainer", "generalized_jsd_loss"]  # noqa: F822  (GKDTrainer: see __getattr__)

_REDUCTIONS = ("batchmean", "sum")


def _unshifted(loss: DistillationLoss) -> DistillationLoss:
    """`loss` for logits and labels that TRL has already shifted."""
    return DistillationLoss(
        loss.divergence,
        kd_ratio=loss.kd_ratio,
        temperature=loss.temperature,
        t_squared=loss.t_squared,
        ignore_index=loss.ignore_index,
        shift=False,
        vocab=loss.vocab,
        **loss.hyper,
    )


def _with_trl_signature(loss: DistillationLoss):
    aligned = _unshifted(loss)

    def generalized_jsd_loss(
        student_logits,
        teacher_logits,
        labels=None,
        beta=0.5,
        temperature=1.0,
        reduction="batchmean",
        num_items_in_batch=None,
    ):
        """TRL's ``generalized_jsd_loss`` signature, computed by a :class:`kdiv.DistillationLoss` (whose own
        hyper-parameters and temperature hold: ``beta`` and ``temperature`` are ignored)."""
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        if labels is None:  # every token counts
            labels = torch.zeros(student_logits.shape[:-1], dtype=torch.long, device=student_logits.device)
        out = aligned(student_logits, teacher_logits, labels, num_items_in_batch=num_items_in_batch)
        if reduction == "sum":
            return out.loss * (out.n_tokens.clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return out.loss

    generalized_jsd_loss.distillation_loss = loss
    return generalized_jsd_loss


def generalized_jsd_loss(divergence: str = "js", **kwargs):
    """A function with TRL's ``generalized_jsd_loss`` signature that computes ``kdiv.DistillationLoss(divergence,
    **kwargs)`` on logits and labels TRL has shifted. ``kwargs``: ``kd_ratio``, ``temperature``, ``t_squared``,
    ``ignore_index``, ``vocab`` and the divergence's hyper-parameters (``beta`` for ``"js"``: TRL's ``beta``
    argument is ignored).

    ``reduction``: ``"batchmean"`` (the mean over counted tokens, or the sum divided by ``num_items_in_batch``)
    or ``"sum"``; TRL's ``"mean"`` (over tokens and vocabulary entries) and ``"none"`` (per vocabulary entry) have
    no per-token counterpart and raise a ValueError.
    """
    if "shift" in kwargs:
        raise ValueError("shift is not an argument here: TRL shifts the logits and labels itself")
    return _with_trl_signature(DistillationLoss(divergence, **kwargs))


def _trainer_class():
    from trl.experimental.gkd import GKDTrainer as _GKDTrainer

    class GKDTrainer(_GKDTrainer):
        """TRL's ``GKDTrainer`` with a kdiv loss in place of ``generalized_jsd_loss``.

        Args:
            loss: a :class:`kdiv.DistillationLoss`; its ``shift`` is ignored (TRL shifts the logits itself), its
                hyper-parameters and temperature are used, not ``args.beta``. Default: ``DistillationLoss("js",
                beta=args.beta)``, TRL's own loss computed by kdiv.
            everything else: as for ``trl.experimental.gkd.GKDTrainer`` (``model``, ``teacher_model``, ``args`` a
                ``GKDConfig``, datasets, ``processing_class``, ...).
        """

        def __init__(self, *args, loss: DistillationLoss | None = None, **kwargs):
            if loss is not None and not isinstance(loss, DistillationLoss):
                raise ValueError(f"loss must be a kdiv.DistillationLoss, got {type(loss).__name__}")
            super().__init__(*args, **kwargs)
            self.distillation_loss = DistillationLoss("js", beta=self.beta) if loss is None else loss
            # an instance attribute shadows TRL's staticmethod: its compute_loss calls self.generalized_jsd_loss
            self.generalized_jsd_loss = _with_trl_signature(self.distillation_loss)

    GKDTrainer.__module__ = __name__
    return GKDTrainer


def __getattr__(name):
    # the trainer subclass is built on first use, so that importing this module does not import TRL
    if name == "GKDTrainer":
        cls = globals()["GKDTrainer"] = _trainer_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
