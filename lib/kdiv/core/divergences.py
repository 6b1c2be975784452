r"""Token-level divergences used as knowledge-distillation losses, on logits.

Every function has one signature::

    fn(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", chunk_size=None, **hyper)

- ``student_logits``, ``teacher_logits``: ``[..., V]``, same shape, any floating dtype. The student comes first
  (as in TRL and Liger-Kernel); ``q = softmax(student_logits / T)`` is the student, ``p = softmax(teacher_logits /
  T)`` the teacher. bf16/fp16 inputs are computed in fp32 (chunk by chunk), float64 in float64.
- No ``T**2`` factor is applied (as in TRL and Liger-Kernel); multiply by ``temperature**2`` yourself to follow
  Hinton et al.
- ``mask``: optional bool ``[...]``, True = the token counts (see :func:`mask_from_labels`).
- ``reduction``: ``"mean"`` over counted tokens (0 when no token counts), ``"sum"``, or ``"none"`` (per-token
  ``[...]``, 0 where masked). The result is fp32 (float64 for float64 inputs).
- Gradients reach the student only; the teacher is treated as a constant.
- ``chunk_size``: rows per chunk (default: chosen from the vocabulary size); see :mod:`kdiv.core.engine.chunked`.
- ``vocab_group``: a ``torch.distributed`` process group over which the vocabulary is sharded (tensor parallelism):
  the logits are then this rank's shard ``[..., V_rank]`` and the result is the divergence of the full rows; see
  :mod:`kdiv.parallel`. Added to every signature by the decorator.

A ``-inf`` logit is a token outside that model's vocabulary. Its log-probability is taken as
``log(float32 tiny) = -87.34`` (``LOG_FLOOR`` of :mod:`kdiv.core.engine.chunked`) so that a token masked by one
model but not the other gives a finite loss and a NaN-free gradient (exact ``KL(q||p)`` would be ``+inf`` there).

Each function below is registered with :func:`kdiv.core.spec.divergence`, which holds its spec (hyper-parameters
and their ranges, label, colour, marker, closed-form gradient coefficient) and runs its row kernel
(:mod:`kdiv.core.kernels`); the bodies below are never run.
"""

from __future__ import annotations

import math
import numbers

import torch

from . import kernels as K
from .head_selection import akl_weights
from .headtail import threshold
from .spec import Hyper, divergence

__all__ = [
    "forward_kl",
    "reverse_kl",
    "symmetric_kl",
    "js",
    "tvd",
    "skew_kl",
    "skew_reverse_kl",
    "akl",
    "mask_from_labels",
]

# ---------------------------------------------------------------------------------------------------------------
# Closed-form coefficients g(q, p) = dL/dq per class, with q the student's and p the teacher's probability, q and
# p treated as free variables (see kdiv.lab.gradients for what they show and how they enter the logit gradient).
# ---------------------------------------------------------------------------------------------------------------


def _fkl_coefficient(q, p):
    return -p / q


def _rkl_coefficient(q, p):
    return torch.log(q / p) + 1


def _symmetric_kl_coefficient(q, p, *, w=0.5):
    return (1 - w) * _fkl_coefficient(q, p) + w * _rkl_coefficient(q, p)


def _js_coefficient(q, p, *, beta=0.5):
    if beta == 0.0:  # js is FKL at beta=0 and RKL at beta=1 (the GKD / TRL convention)
        return _fkl_coefficient(q, p)
    if beta == 1.0:
        return _rkl_coefficient(q, p)
    return (1 - beta) * torch.log(q / (beta * p + (1 - beta) * q))  # the terms through m cancel


def _tvd_coefficient(q, p):
    # -1[q < p], which on the simplex differs from the partial sign(q - p) / 2 by a constant (see kdiv.lab.gradients);
    # torch.where, not -(q < p): a negated 0 would print as -0.0
    return torch.where(q < p, -1.0, 0.0).to(q.dtype)


def _skew_kl_coefficient(q, p, *, alpha=0.1):
    return -(1 - alpha) * p / (alpha * p + (1 - alpha) * q)


def _skew_reverse_kl_coefficient(q, p, *, alpha=0.1):
    ratio = q / (alpha * q + (1 - alpha) * p)
    return torch.log(ratio) + 1 - alpha * ratio


def _akl_coefficient(q, p, *, mu=0.5):
    # the weights are held fixed (they carry no gradient) and read whole rows [..., V]
    w_head, w_tail = akl_weights(q.log(), p.log(), mu)
    return w_head.unsqueeze(-1) * _fkl_coefficient(q, p) + w_tail.unsqueeze(-1) * _rkl_coefficient(q, p)


# ---------------------------------------------------------------------------------------------------------------
# Plain forms: the loss per row from whole-row log-probabilities logq, logp [..., V] -> [...], written the usual way
# (elementwise terms summed over the vocabulary, autograd for the backward). kdiv.testing.plain wraps them into
# the plain versions that the tests hold the chunked kernels against and that bench/ times.
# ---------------------------------------------------------------------------------------------------------------


def _kl_rows(loga, logb):
    """KL(a || b) per row."""
    return (loga.exp() * (loga - logb)).sum(-1)


def _log_mix(loga, logb, weight_a):
    """log(weight_a * a + (1 - weight_a) * b) from log a, log b."""
    if weight_a == 1.0:
        return loga + 0 * logb  # (keeps the student in the graph, with gradient 0)
    return torch.logaddexp(loga + math.log(weight_a), logb + math.log1p(-weight_a))


def _fkl_plain(logq, logp):
    return _kl_rows(logp, logq)


def _rkl_plain(logq, logp):
    return _kl_rows(logq, logp)


def _symmetric_kl_plain(logq, logp, *, w):
    return (1 - w) * _kl_rows(logp, logq) + w * _kl_rows(logq, logp)


def _js_plain(logq, logp, *, beta):
    if beta == 0.0:
        return _kl_rows(logp, logq)
    if beta == 1.0:
        return _kl_rows(logq, logp)
    logm = _log_mix(logp, logq, beta)
    return beta * _kl_rows(logp, logm) + (1 - beta) * _kl_rows(logq, logm)


def _tvd_plain(logq, logp):
    return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)


def _skew_kl_plain(logq, logp, *, alpha):
    return _kl_rows(logp, logq) if alpha == 0.0 else _kl_rows(logp, _log_mix(logp, logq, alpha))


def _skew_reverse_kl_plain(logq, logp, *, alpha):
    return _kl_rows(logq, logp) if alpha == 0.0 else _kl_rows(logq, _log_mix(logq, logp, alpha))


def _akl_plain(logq, logp, *, mu):
    q, p = logq.exp(), logp.exp()
    with torch.no_grad():  # the weights carry no gradient; the head by a full sort
        head = p >= threshold(p, mu).unsqueeze(-1)
        err = (p - q).abs()
        g_total = err.sum(-1)
        w_head = torch.where(g_total == 0, 0.5, (err * head).sum(-1) / g_total.clamp_min(torch.finfo(p.dtype).tiny))
    return w_head * _kl_rows(logp, logq) + (1 - w_head) * _kl_rows(logq, logp)


# ---------------------------------------------------------------------------------------------------------------
# The divergences. Colours: Okabe-Ito (colour-blind safe) for the first six, FKL blue and RKL vermillion
# everywhere; SRKL's violet keeps a CIELAB distance of at least 25 from every other colour of the collection, in
# normal vision and under simulated protan-, deutan- and tritanopia (Machado et al. 2009). Markers: open shapes that
# stay distinguishable where students coincide (the FKL circle is large enough to show an RKL square inside it).
# ---------------------------------------------------------------------------------------------------------------

_UNIT = dict(low=0.0, high=1.0)


@divergence(
    kernel=K.forward_kl_rows,
    label="FKL",
    color="#0072B2",
    marker=("o", 5.2),
    aliases=("fkl",),
    prob_gradient=_fkl_coefficient,
    plain=_fkl_plain,
    reference="Hinton et al. 2015",
)
def forward_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", chunk_size=None):
    r"""Forward KL, :math:`\mathrm{KL}(p\,\|\,q) = \sum_v p_v \log(p_v / q_v)`: the standard KD loss.

    This is the true KL divergence, 0 when the student equals the teacher. DistiLLM's and MiniLLM's
    ``forward_kl`` return the cross-entropy :math:`-\sum_v p_v \log q_v`, which differs by the teacher's entropy
    (same gradient, different value). Gradient with respect to the student logits: ``(q - p) / T``.

    Shapes: logits [..., V]; mask [...]; returns [] or [...] with reduction="none".
    Reference: Hinton et al., "Distilling the Knowledge in a Neural Network", 2015.
    """


@divergence(
    kernel=K.reverse_kl_rows,
    label="RKL",
    color="#D55E00",
    marker=("s", 3.4),
    aliases=("rkl",),
    prob_gradient=_rkl_coefficient,
    plain=_rkl_plain,
    reference="Gu et al., MiniLLM, ICLR 2024",
)
def reverse_kl(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", chunk_size=None):
    r"""Reverse KL, :math:`\mathrm{KL}(q\,\|\,p) = \sum_v q_v \log(q_v / p_v)`.

    Shapes: logits [..., V]; mask [...]; returns [] or [...] with reduction="none".
    Reference: Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024.
    """


@divergence(
    kernel=K.symmetric_kl_rows,
    label="FKL+RKL",
    color="#CC79A7",
    marker=("D", 3.4),
    hyper=[Hyper("w", 0.5, **_UNIT, symbol="w", examples=(0.0, 0.3, 1.0))],
    aliases=("fkl+rkl",),
    prob_gradient=_symmetric_kl_coefficient,
    plain=_symmetric_kl_plain,
    reference="Wu et al., COLING 2025, Table 2",
)
def symmetric_kl(
    student_logits, teacher_logits, *, w=0.5, temperature=1.0, mask=None, reduction="mean", chunk_size=None
):
    r"""Weighted sum of both KL directions: :math:`(1-w)\,\mathrm{KL}(p\|q) + w\,\mathrm{KL}(q\|p)`.

    ``w=0.5`` is (half of) the "FKL+RKL" baseline of the AKL paper; w=0 gives forward KL, w=1 reverse KL.

    Shapes: logits [..., V]; mask [...]; returns [] or [...] with reduction="none".
    Reference: Wu et al., arXiv 2404.02657 (COLING 2025), Table 2 "FKL+RKL".
    """


@divergence(
    kernel=K.js_rows,
    label="JSD",
    color="#009E73",
    marker=("^", 4.0),
    hyper=[Hyper("beta", 0.5, **_UNIT, symbol="β", examples=(0.0, 0.1, 0.9, 1.0))],
    aliases=("jsd",),
    prob_gradient=_js_coefficient,
    plain=_js_plain,
    reference="Agarwal et al., GKD, ICLR 2024",
)
def js(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, mask=None, reduction="mean", chunk_size=None):
    r"""Generalized Jensen-Shannon divergence in the GKD / TRL convention.

    .. math:: \mathrm{JSD}_\beta = \beta\,\mathrm{KL}(p\,\|\,m) + (1-\beta)\,\mathrm{KL}(q\,\|\,m),
              \qquad m = \beta p + (1-\beta) q,

    with beta=0 defined as forward KL(p||q) and beta=1 as reverse KL(q||p), as TRL's ``generalized_jsd_loss``
    does. beta=0.5 is the symmetric JSD, bounded by log 2.

    Near the endpoints the formula does *not* approach the KLs: as beta -> 0, m -> q and the value shrinks like
    beta * KL(p||q) towards 0, then jumps to KL(p||q) at exactly beta=0 (symmetrically at beta=1).

    Shapes: logits [..., V]; mask [...]; returns [] or [...] with reduction="none".
    Reference: Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated
    Mistakes" (GKD), ICLR 2024.
    """


@divergence(
    kernel=K.tvd_rows,
    label="TVD",
    color="#E69F00",
    marker=("v", 4.0),
    aliases=("tv",),
    prob_gradient=_tvd_coefficient,
    plain=_tvd_plain,
    reference="Ji et al., TaiLr, ICLR 2023",
)
def tvd(student_logits, teacher_logits, *, temperature=1.0, mask=None, reduction="mean", chunk_size=None):
    r"""Total variation distance, :math:`\tfrac12 \sum_v |p_v - q_v|`, in [0, 1].

    Its gradient with respect to q is bounded (``sign(q - p) / 2``), the robustness TaiLr argues for.

    Shapes: logits [..., V]; mask [...]; returns [] or [...] with reduction="none".
    Reference: Ji et al., "Tailoring Language Generation Models under Total Variation Distance" (TaiLr),
    ICLR 2023; Wen et al., "f-Divergence Minimization for Sequence-Level Knowledge Distillation", ACL 2023.
    """


@divergence(
    kernel=K.skew_kl_rows,
    label="SKL",
    color="#56B4E9",
    marker=("<", 4.0),
    hyper=[Hyper("alpha", 0.1, **_UNIT, symbol="α", examples=(0.0, 0.5, 1.0))],
    aliases=("skl",),
    prob_gradient=_skew_kl_coefficient,
    plain=_skew_kl_plain,
    reference="Ko et al., DistiLLM, ICML 2024",
)
def skew_kl(
    student_logits, teacher_logits, *, alpha=0.1, temperature=1.0, mask=None, reduction="mean", chunk_size=None
):
    r"""Skew forward KL (DistiLLM): :math:`\mathrm{KL}(p\,\|\,\alpha p + (1-\alpha) q)`.

    alpha=0 gives forward KL, alpha=1 gives 0. For alpha > 0 the gradient on classes the student under-weights
    is bounded by (1 - alpha) / alpha. DistiLLM's code computes the cross-entropy form
    :math:`-\sum p \log m` (differs by the teacher's entropy).

    Shapes: logits [..., V]; mask [...]; returns [] or [...] with reduction="none".
    Reference: Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models", ICML 2024.
    """


@divergence(
    kernel=K.skew_reverse_kl_rows,
    label="SRKL",
    color="#AA00EE",
    marker=(">", 4.0),
    hyper=[Hyper("alpha", 0.1, **_UNIT, symbol="α", examples=(0.0, 0.5, 1.0))],
    aliases=("srkl",),
    prob_gradient=_skew_reverse_kl_coefficient,
    plain=_skew_reverse_kl_plain,
    reference="Ko et al., DistiLLM, ICML 2024",
)
def skew_reverse_kl(
    student_logits, teacher_logits, *, alpha=0.1, temperature=1.0, mask=None, reduction="mean", chunk_size=None
):
    r"""Skew reverse KL (DistiLLM): :math:`\mathrm{KL}(q\,\|\,\alpha q + (1-\alpha) p)`.

    alpha=0 gives reverse KL, alpha=1 gives 0.

    Shapes: logits [..., V]; mask [...]; returns [] or [...] with reduction="none".
    Reference: Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models", ICML 2024.
    """


@divergence(
    kernel=K.akl_rows,
    label="AKL",
    color="#6A3D9A",
    marker=("*", 4.8),
    hyper=[Hyper("mu", 0.5, **_UNIT, low_open=True, high_open=True, symbol="μ", examples=(0.1, 0.9))],
    prob_gradient=_akl_coefficient,
    plain=_akl_plain,
    reference="Wu et al., COLING 2025 (arXiv 2404.02657)",
)
def akl(student_logits, teacher_logits, *, mu=0.5, temperature=1.0, mask=None, reduction="mean", chunk_size=None):
    r"""Adaptive KL (AKL): forward and reverse KL weighted per token by the student's error on head and tail.

    .. math:: \mathrm{AKL} = \frac{g_\text{head}}{g_\text{head} + g_\text{tail}}\,\mathrm{KL}(p\|q)
                           + \frac{g_\text{tail}}{g_\text{head} + g_\text{tail}}\,\mathrm{KL}(q\|p)

    where the head is the teacher's top tokens with cumulative mass <= mu (the top-1 token always included) and
    g_head, g_tail are the summed |p - q| over head and tail (:func:`kdiv.core.headtail.head_tail_error`). The
    weights carry no gradient. Where the student equals the teacher both errors are 0: the reference code divides 0
    by 0; kdiv uses weights (1/2, 1/2), which give loss 0 and gradient 0, as any weights would.

    Shapes: logits [..., V]; mask [...]; returns [] or [...] with reduction="none".
    Reference: Wu et al., "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large Language
    Models", COLING 2025 (arXiv 2404.02657).
    """


def mask_from_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The bool mask of counted tokens from language-model labels: True where ``labels != ignore_index``.

    Shapes: labels [...] (integer) -> [...] (bool), to pass as ``mask=`` with logits [..., V].
    """
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError("labels must be an integer torch.Tensor")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"ignore_index must be an int (the label of tokens that do not count), got {ignore_index!r}")
    return labels != ignore_index
