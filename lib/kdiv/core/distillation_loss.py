r"""The distillation loss of a causal language model as one module: shift, label mask, CE mix, normalisation.

:class:`DistillationLoss` takes the student's and the teacher's logits and the labels of one (micro-)batch and
returns

.. math::

    \mathcal{L} = (1 - r)\,\mathrm{CE}(y, q) + r\, c\, D(p, q), \qquad c = T^2 \text{ if t\_squared else } 1,

with :math:`r` = ``kd_ratio``, :math:`D` any registered kdiv divergence at temperature :math:`T`, and CE the
student's cross-entropy on the labels at temperature 1 (as MiniLLM and DistiLLM mix it in). Both terms are summed
over the counted tokens (``label != ignore_index``) and divided by ``num_items_in_batch`` when given, else by this
call's number of counted tokens.

Gradient accumulation and data parallelism: pass ``num_items_in_batch`` = the number of counted tokens of the whole
batch (over every micro-batch and every rank); the micro-batch losses then add up to the full batch's mean, and so do
their gradients. Averaging each micro-batch's own mean (the default without ``num_items_in_batch``) weighs a token
of a short micro-batch more than one of a long one and is not the full batch's mean.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .checks import check_closed_unit, check_positive
from .spec import COMMON_ARGUMENTS, SPECS

__all__ = ["DistillationLoss", "DistillationLossOutput", "VOCAB_OPTIONS"]

# How a difference in vocabulary size between student and teacher is handled (see DistillationLoss).
VOCAB_OPTIONS = ("strict", "slice", "pad")


class DistillationLossOutput(NamedTuple):
    """What :class:`DistillationLoss` returns.

    ``loss``: the scalar to backpropagate; ``kd``, ``ce``: its two terms before mixing (detached, for logging; ``kd``
    without the ``T²`` factor), normalised like ``loss``; ``n_tokens``: the number of tokens this call counted
    (a 0-d int64 tensor, so that reading it needs no device synchronisation until it is logged).
    """

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor
    n_tokens: torch.Tensor


def _resolve(divergence: str) -> str:
    """The registered name of `divergence` (a name or one of its aliases)."""
    if isinstance(divergence, str):
        if divergence in SPECS:
            return divergence
        for name, s in SPECS.items():
            if divergence in s.aliases:
                return name
    names = sorted(SPECS)
    aliases = sorted(a for s in SPECS.values() for a in s.aliases)
    raise ValueError(f"divergence must be one of {names} (or an alias: {aliases}), got {divergence!r}")


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _pad_vocab(logits: torch.Tensor, size: int) -> torch.Tensor:
    """`logits` [..., V] extended to [..., size] with -inf logits (a copy: torch cannot view past the end)."""
    pad = logits.new_full((*logits.shape[:-1], size - logits.shape[-1]), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


class DistillationLoss(nn.Module):
    r"""Knowledge-distillation loss of a causal LM: ``(1 - kd_ratio)·CE + kd_ratio·KD`` over the counted tokens.

    Args:
        divergence: a registered kdiv divergence by name or alias (``sorted(kdiv.DIVERGENCES)``), e.g. ``"akl"``.
        kd_ratio: :math:`r \in [0, 1]`, the weight of the KD term; ``1`` is pure distillation, ``0`` plain CE.
        temperature: :math:`T > 0` of the KD term (both models' logits are divided by it); CE uses ``T = 1``.
        t_squared: multiply the KD term by :math:`T^2` (Hinton et al., 2015) so that its gradient keeps its scale
            as ``T`` grows. Off by default, as in TRL and Liger-Kernel.
        ignore_index: the label of tokens that do not count (prompt, padding).
        shift: the causal shift: position ``i`` of the logits predicts ``labels[i + 1]``. The shift takes views
            (``logits[:, :-1]``, ``labels[:, 1:]``), never copies. ``False`` when the labels are already aligned.
        vocab: what to do when the student's and the teacher's vocabulary sizes ``V_s`` and ``V_t`` differ (e.g. a
            teacher with 50257 rows against a student whose embedding is padded to 50304):

            - ``"strict"`` (default): raise a ValueError.
            - ``"slice"``: compare the distributions over the shared first ``min(V_s, V_t)`` ids only, both
              renormalised there (views, no copy). Right when the extra ids are padding that no model ever predicts;
              a model's mass on its extra ids is ignored.
            - ``"pad"``: give the smaller model ``-inf`` logits for the ids it lacks (a copy of its logits at the
              larger size). The smaller model then puts no probability on those ids, and the larger one is compared
              over its whole vocabulary: a student with extra ids is pushed to put no mass there. Padding with ``0``
              logits instead (as Liger-Kernel does) would give each padded id the probability ``exp(0) / Z``: real
              mass on tokens the model does not have, which skews the teacher's distribution (or the student's) by
              ``(V_t - V_s) / Z``.

            Under kdiv's ``-inf`` convention a padded id has probability float32 ``tiny`` (log ``-87.34``), not 0, so
            the loss stays finite: where the *teacher* is padded, a student id outside the teacher's vocabulary costs
            reverse-KL-type terms ``q_v (log q_v + 87.34)`` (a steep, finite push towards ``q_v = 0``; exact reverse
            KL would be ``+inf``) and forward-KL-type terms nothing; where the *student* is padded, the teacher's
            mass on the missing ids adds ``p_v (log p_v + 87.34)`` to forward-KL-type terms: a constant the student
            cannot reduce (the loss no longer reaches 0) and without gradient, since a padded id's log-probability
            is the constant -87.34; the student is pulled towards the teacher renormalised over the ids it has.
        **hyper: the divergence's hyper-parameters (``kdiv.hyperparameters(divergence)``), e.g. ``mu=0.5`` for AKL,
            ``beta=0.1`` for JS; validated against their ranges.

    ``forward(student_logits, teacher_logits, labels, *, num_items_in_batch=None)``:

    - ``student_logits`` ``[B, L, V_s]``, ``teacher_logits`` ``[B, L, V_t]`` (any floating dtypes; the teacher gets
      no gradient), ``labels`` ``[B, L]`` integer student-vocabulary ids. With ``shift=False`` any leading shape
      ``[..., V]`` / ``[...]`` is accepted.
    - ``num_items_in_batch``: when given (an int, a float or a one-element tensor, as ``transformers`` and TRL pass
      it), both terms are sums over the counted tokens divided by it, so that the losses of the micro-batches of
      one optimizer step (and of the ranks of a data-parallel step) add up to the mean over all counted tokens of the
      whole batch. Without it: the mean over this call's counted tokens (0 when none counts).
    - Returns :class:`DistillationLossOutput` ``(loss, kd, ce, n_tokens)``.

    The CE term is computed on the student's own full vocabulary, ``logsumexp(z) - z[y]`` (in fp32), whatever
    ``vocab`` says; it needs finite logits on every row, counted or not, when ``kd_ratio < 1`` (its gradient runs
    through every row's softmax, as in ``torch.nn.functional.cross_entropy``). With ``kd_ratio = 1`` it is only
    logged, computed without a graph; with ``kd_ratio = 0`` the KD term is.

    Example::

        loss_fn = kdiv.DistillationLoss("akl", kd_ratio=0.5, mu=0.5)
        out = loss_fn(student(input_ids).logits, teacher_logits, labels)
        out.loss.backward()

    References: MiniLLM (Gu et al., ICLR 2024) and DistiLLM (Ko et al., ICML 2024) for the CE mix; Hinton et al.,
    "Distilling the Knowledge in a Neural Network", 2015, for ``T²``; ``num_items_in_batch`` as in ``transformers``'
    Trainer (the gradient-accumulation loss fix) and TRL.
    """

    def __init__(
        self,
        divergence: str = "akl",
        *,
        kd_ratio: float = 1.0,
        temperature: float = 1.0,
        t_squared: bool = False,
        ignore_index: int = -100,
        shift: bool = True,
        vocab: str = "strict",
        **hyper,
    ):
        super().__init__()
        self.divergence = _resolve(divergence)
        s = SPECS[self.divergence]
        unknown = sorted(set(hyper) - set(s.defaults))
        if unknown:
            common = f" ({unknown[0]} is set by DistillationLoss itself)" if unknown[0] in COMMON_ARGUMENTS else ""
            raise ValueError(
                f"{self.divergence} takes no hyper-parameter {unknown[0]!r}{common}; it takes {sorted(s.defaults)}"
            )
        self.hyper = s.check_hyper(hyper)
        self.kd_ratio = check_closed_unit("kd_ratio", kd_ratio)
        self.temperature = check_positive("temperature", temperature)
        self.t_squared = _check_flag("t_squared", t_squared)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
        self.ignore_index = ignore_index
        self.shift = _check_flag("shift", shift)
        if vocab not in VOCAB_OPTIONS:
            raise ValueError(f"vocab must be one of {VOCAB_OPTIONS}, got {vocab!r}")
        self.vocab = vocab
        self._fn = s.fn

    def extra_repr(self) -> str:
        hyper = "".join(f", {k}={v:g}" for k, v in self.hyper.items())
        return (
            f"{self.divergence!r}{hyper}, kd_ratio={self.kd_ratio:g}, temperature={self.temperature:g}, "
            f"t_squared={self.t_squared}, ignore_index={self.ignore_index}, shift={self.shift}, vocab={self.vocab!r}"
        )

    # -- argument checks -------------------------------------------------------------------------------------------
    def _check(self, student_logits, teacher_logits, labels):
        for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise ValueError(f"{name} must be a floating torch.Tensor (logits), got {_describe(x)}")
            if x.dim() < (3 if self.shift else 1) or x.shape[-1] == 0:
                want = "[B, L, V] (shift=True)" if self.shift else "[..., V] with V >= 1"
                raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer torch.Tensor, got {_describe(labels)}")
        if self.shift and student_logits.dim() != 3:
            raise ValueError(
                f"student_logits must have shape [B, L, V] with shift=True, got {tuple(student_logits.shape)}"
            )
        if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
            raise ValueError(
                f"student_logits and teacher_logits must agree on every axis but the vocabulary, got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
            )
        if labels.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"labels must have shape {tuple(student_logits.shape[:-1])} (the logits without the vocabulary "
                f"axis), got {tuple(labels.shape)}"
            )
        if student_logits.device != teacher_logits.device or labels.device != student_logits.device:
            raise ValueError(
                f"student_logits, teacher_logits and labels must be on one device, got {student_logits.device}, "
                f"{teacher_logits.device} and {labels.device}"
            )
        v_s, v_t = student_logits.shape[-1], teacher_logits.shape[-1]
        if v_s != v_t and self.vocab == "strict":
            raise ValueError(
                f"student_logits has a vocabulary of {v_s} and teacher_logits one of {v_t}: pass vocab='slice' to "
                f"compare the shared first {min(v_s, v_t)} ids only, or vocab='pad' to give the smaller model -inf "
                f"logits for the ids it lacks (see DistillationLoss)"
            )

    @staticmethod
    def _check_num_items(num_items_in_batch, device):
        if num_items_in_batch is None:
            return None
        if isinstance(num_items_in_batch, torch.Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(
                    f"num_items_in_batch must be a number or a one-element tensor, got a tensor of shape "
                    f"{tuple(num_items_in_batch.shape)}"
                )
            # not checked for > 0 here: that would synchronise with the device on every call
            return num_items_in_batch.reshape(()).to(device=device, dtype=torch.float32)
        if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
            raise ValueError(f"num_items_in_batch must be a number, got {_describe(num_items_in_batch)}")
        if not num_items_in_batch > 0 or num_items_in_batch == float("inf"):
            raise ValueError(f"num_items_in_batch must be a finite number > 0, got {num_items_in_batch}")
        return float(num_items_in_batch)

    def counted(self, labels: torch.Tensor) -> torch.Tensor:
        """The mask of the tokens this loss counts (after its own shift): labels[:, 1:] (or labels) != ignore_index."""
        return (labels[:, 1:] if self.shift else labels) != self.ignore_index

    # -- the loss --------------------------------------------------------------------------------------------------
    def forward(self, student_logits, teacher_logits, labels, *, num_items_in_batch=None) -> DistillationLossOutput:
        self._check(student_logits, teacher_logits, labels)
        denominator = self._check_num_items(num_items_in_batch, student_logits.device)
        mask = self.counted(labels)  # [B, L-1] or [...]: True = the token counts
        if self.shift:
            # views: the engine reads these row-strided logits in place
            student_logits = student_logits[:, :-1]
            teacher_logits = teacher_logits[:, :-1]
            labels = labels[:, 1:]
        n_tokens = mask.sum()
        if denominator is None:
            denominator = n_tokens.clamp(min=1).to(torch.float32)

        kd_student, kd_teacher = self._shared_vocabulary(student_logits, teacher_logits)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.kd_ratio > 0):
            kd_sum = self._fn(
                kd_student, kd_teacher, temperature=self.temperature, mask=mask, reduction="sum", **self.hyper
            )
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.kd_ratio < 1):
            ce_sum = self._cross_entropy_sum(student_logits, labels, mask)
        kd, ce = kd_sum / denominator, ce_sum / denominator

        kd_weight = self.kd_ratio * (self.temperature**2 if self.t_squared else 1.0)
        if self.kd_ratio == 1.0:
            loss = kd_weight * kd
        elif self.kd_ratio == 0.0:
            loss = ce
        else:
            loss = (1.0 - self.kd_ratio) * ce + kd_weight * kd
        return DistillationLossOutput(loss, kd.detach(), ce.detach(), n_tokens)

    def _shared_vocabulary(self, student_logits, teacher_logits):
        """Both logits over one vocabulary, as `vocab` says (checked already)."""
        v_s, v_t = student_logits.shape[-1], teacher_logits.shape[-1]
        if v_s == v_t:
            return student_logits, teacher_logits
        if self.vocab == "slice":
            v = min(v_s, v_t)
            return student_logits[..., :v], teacher_logits[..., :v]
        if v_s < v_t:  # the gradient reaches the student's own ids through the concatenation
            return _pad_vocab(student_logits, v_t), teacher_logits
        return student_logits, _pad_vocab(teacher_logits.detach(), v_s)

    def _cross_entropy_sum(self, logits, labels, mask):
        """Σ over counted tokens of -log softmax(logits)[label], in fp32, on the student's full vocabulary."""
        # Checked on the CPU only: on an accelerator the check would synchronise with the device on every call
        # (there an id out of range fails in gather instead).
        if logits.device.type == "cpu" and (mask & ((labels < 0) | (labels >= logits.shape[-1]))).any():
            raise ValueError(
                f"labels must be ids in [0, {logits.shape[-1]}) (the student's vocabulary) or ignore_index="
                f"{self.ignore_index}"
            )
        # no copy for fp32 (or float64) logits; bf16 / fp16 are upcast as transformers' causal LM loss does
        z = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
        target = torch.where(mask, labels, 0).unsqueeze(-1)
        nll = torch.logsumexp(z, dim=-1) - z.gather(-1, target).squeeze(-1)
        return torch.where(mask, nll, 0.0).sum()


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of dtype {x.dtype}"
    return type(x).__name__
