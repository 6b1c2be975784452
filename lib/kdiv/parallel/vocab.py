"""Vocab-parallel token-level divergences: :func:`vocab_parallel`, which ``kdiv.<divergence>(..., vocab_group=g)``
runs. The conventions are in :mod:`kdiv.parallel`.

Per call, before any row is computed, one ``all_gather`` of a few numbers per rank (:func:`_agree`) checks that
every rank was called alike (divergence, hyper-parameters, temperature, reduction, rows, mask, compute dtype) and
that no rank's arguments are bad; if one is, every rank raises the same ValueError, so no rank is left waiting in a
collective. Then, per chunk of counted rows, three ``all_reduce`` calls of per-row numbers:

1. MAX of the row maxima of both scaled logits ([2, n]); a NaN or +inf logit enters as +inf, so that every rank
   sees the bad row and raises the same error;
2. SUM of the row sums of ``exp(z - max)`` ([2, n]): the global log-normalisers;
3. SUM of the divergence's partial sums and of its gradient terms' sums ([k, n], k = 2, 6 for AKL).

AKL adds its head search between 2 and 3 (:mod:`kdiv.parallel.head`): two collectives per round. The gradient of the
local shard is written in closed form during the forward pass, as the single-process engine does.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..core.checks import (
    REDUCTIONS,
    SWAPPED_LOGITS,
    check_logits,
    check_mask,
    check_positive,
    check_positive_int,
    check_reduction,
    warn_if_swapped,
)
from ..core.engine.chunked import LOG_FLOOR
from ..core.spec import SPECS
from .head import head_threshold_sharded
from .terms import TERMS, Rows

__all__ = ["vocab_parallel", "head_mask", "Stats"]

_NAMES = list(TERMS)
# Logits of the largest shard per chunk: four times the single-process engine's chunk, since every chunk costs three
# collectives (tens of microseconds each on an idle machine, milliseconds on a busy one); the chunk's temporaries
# (about ten of its size) stay a small fraction of the shard's gradient at LLM sizes.
CHUNK_ELEMENTS = 1 << 20
_DTYPES = (torch.float32, torch.float64)


class Stats:
    """Counts of the collectives of the last :func:`vocab_parallel` call on this rank (for the benchmark):
    ``calls``, ``scalars`` (numbers sent per rank, each all_reduce counted once with its message size),
    ``bytes``, ``head_rounds`` (AKL: rounds of the head search, summed over chunks)."""

    calls = scalars = nbytes = head_rounds = 0

    @classmethod
    def reset(cls):
        cls.calls = cls.scalars = cls.nbytes = cls.head_rounds = 0


def _all_reduce(x, op, group):
    Stats.calls += 1
    Stats.scalars += x.numel()
    Stats.nbytes += x.numel() * x.element_size()
    dist.all_reduce(x, op=op, group=group)
    return x


def _check_group(group):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("vocab_group was given but torch.distributed is not initialised (init_process_group)")
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"vocab_group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError("vocab_group: this process is not a member of the group")


def _collective_device(group, *tensors):
    for x in tensors:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"


def _local_call(name, student, teacher, temperature, mask, reduction, chunk_size, values):
    """This rank's arguments checked, as (fields that must agree between ranks, the checked values)."""
    if name not in SPECS or name not in TERMS:
        raise ValueError(f"name must be one of {sorted(TERMS)}, got {name!r}")
    spec = SPECS[name]
    unknown = sorted(set(values) - {h.name for h in spec.hyper})
    if unknown:
        raise ValueError(f"{name}() got an unexpected keyword argument {unknown[0]!r}")
    hyper = spec.check_hyper(values)
    if hasattr(teacher, "rowwise_divergence"):  # a kdiv.TopK teacher
        raise ValueError(
            "teacher_logits is a kdiv.TopK teacher, which cannot be vocab-sharded (its ids span the whole "
            "vocabulary): pass dense teacher logits of this rank's shard, or call without vocab_group"
        )
    check_logits(student, teacher)
    temperature = check_positive("temperature", temperature)
    reduction = check_reduction(reduction)
    batch_shape = student.shape[:-1]
    mask = check_mask(mask, batch_shape, student.device)
    # swapped arguments only: a shard of a probability row does not sum to 1, so "probabilities as logits" is not seen
    warn_if_swapped([student], [teacher], SWAPPED_LOGITS)
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    n_rows = math.prod(batch_shape)
    counted = None if mask is None else mask.reshape(-1)
    if counted is None:
        n_counted, fingerprint = n_rows, 0.0
    else:
        rows = counted.nonzero().squeeze(1).double()
        n_counted = rows.numel()
        # which rows count, in two numbers: enough to tell masks apart that differ between ranks by mistake
        fingerprint = float((rows + 1).sum()) + float(((rows * 0.6180339887) % 1.0).sum())
    agree = [
        _NAMES.index(name),
        *(list(hyper.values()) + [0.0])[:1],
        temperature,
        REDUCTIONS.index(reduction),
        n_rows,
        len(batch_shape),
        n_counted,
        fingerprint,
        _DTYPES.index(dtype),
        -1 if chunk_size is None else chunk_size,
    ]
    return agree, (hyper, temperature, reduction, counted, dtype, batch_shape)


_FIELDS = (
    "divergence",
    "hyper-parameter",
    "temperature",
    "reduction",
    "number of rows",
    "number of batch axes",
    "number of counted rows",
    "mask",
    "compute dtype",
    "chunk_size",
)


def _agree(group, device, agree, vocab, error):
    """One all_gather of every rank's call: raises on every rank the same ValueError when one rank's arguments are
    bad, or when the ranks were called differently. Returns the shard sizes of all ranks."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    mine = torch.tensor([float(error is not None), vocab, *agree], dtype=torch.float64, device=device)
    if error is not None:
        mine[2:] = 0
    everyone = [torch.empty_like(mine) for _ in range(world)]
    Stats.calls += 1
    dist.all_gather(everyone, mine, group=group)
    table = torch.stack(everyone).cpu()
    failed = table[:, 0].nonzero().squeeze(1).tolist()
    if failed:
        messages = [None] * world
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=group)
        text = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
        raise ValueError(f"vocab-parallel divergence: bad arguments on {len(failed)} of {world} ranks: {text}") from (
            error
        )
    for i, field in enumerate(_FIELDS):
        column = table[:, 2 + i]
        if not bool((column == column[0]).all()):
            values = ", ".join(f"rank {r}: {v:g}" for r, v in enumerate(column.tolist()))
            raise ValueError(f"vocab-parallel divergence: the ranks of vocab_group disagree on the {field} ({values})")
    del rank
    return [int(v) for v in table[:, 1].tolist()]


def _rows_error(m):
    """The ValueError for rows whose global maximum is +inf (NaN or +inf somewhere) or -inf (all -inf)."""
    for label, row_max in (("student_logits", m[0]), ("teacher_logits", m[1])):
        if bool((row_max == math.inf).any()):
            return ValueError(f"{label} contains NaN or +inf (on some rank of vocab_group)")
    for label, row_max in (("student_logits", m[0]), ("teacher_logits", m[1])):
        if bool((row_max == -math.inf).any()):
            return ValueError(f"{label} has a counted token whose logits are all -inf (on every rank of vocab_group)")
    return None


def _log_probs(z, lse):
    # a -inf logit gets log-probability LOG_FLOOR, as on the engine's floored path (no NaN or +inf is left here)
    return torch.nan_to_num_(z - lse.unsqueeze(-1), neginf=LOG_FLOOR)


def _pass(name, student, teacher, counted, hyper, temperature, dtype, chunk_rows, want_grad, scale, group, vocab):
    """Per-row loss [N] (0 where not counted) and, if want_grad, the local gradient [N, V_rank] times scale."""
    n_rows = student.shape[0]
    rows = None if counted is None or bool(counted.all()) else counted.nonzero().squeeze(1)
    loss = torch.zeros(n_rows, dtype=dtype, device=student.device)
    grad = None
    if want_grad:
        grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)
        if rows is not None:
            grad.index_fill_(0, (~counted).nonzero().squeeze(1), 0)
    n_work = n_rows if rows is None else rows.numel()
    term = TERMS[name]
    for start in range(0, n_work, chunk_rows):
        block = slice(start, min(start + chunk_rows, n_work)) if rows is None else rows[start : start + chunk_rows]
        zs, zt = student[block].to(dtype), teacher[block].to(dtype)
        if temperature != 1.0:
            zs, zt = zs / temperature, zt / temperature
        m = torch.stack([zs.amax(-1), zt.amax(-1)])
        m = torch.where(torch.isnan(m), math.inf, m)
        _all_reduce(m, dist.ReduceOp.MAX, group)
        error = _rows_error(m)
        if error is not None:
            raise error
        es, et = torch.sub(zs, m[0].unsqueeze(-1)).exp_(), torch.sub(zt, m[1].unsqueeze(-1)).exp_()
        sums = _all_reduce(torch.stack([es.sum(-1), et.sum(-1)]), dist.ReduceOp.SUM, group)
        lse = m + sums.log()
        # the probabilities from the exponentials already taken (a -inf logit gets 0 here, not float32 tiny: every
        # term below weighs by them, where the difference is below 1e-36)
        q, p = es.mul_(sums[0].reciprocal().unsqueeze(-1)), et.mul_(sums[1].reciprocal().unsqueeze(-1))
        ls, lt = _log_probs(zs, lse[0]), _log_probs(zt, lse[1])
        # the teacher's largest log-probability, computed as its rank computes that token's
        top = _log_probs(m[1].unsqueeze(-1), lse[1]).squeeze(-1)

        def head(mu, lt=lt, p=p, top=top):
            tau, rounds = head_threshold_sharded(lt, p, mu, vocab, top, group, _all_reduce)
            Stats.head_rounds += rounds
            return tau

        terms = term(Rows(ls, lt, q, p, head), **hyper)
        floored = torch.isneginf(zs)
        finite = None if not bool(floored.any()) else floored.logical_not_()
        h_sums = [(h.sum(-1) if finite is None else (h * finite).sum(-1)) for h in terms.h]
        totals = _all_reduce(torch.stack([*terms.partials, *h_sums]), dist.ReduceOp.SUM, group)
        k = len(terms.partials)
        row_loss, weights = terms.combine(totals[:k])
        loss[block] = row_loss
        if want_grad:
            h = terms.h[0] if weights == [1.0] else sum(w * x for w, x in zip(weights, terms.h, strict=True))
            h_sum = sum(
                (w.squeeze(-1) if isinstance(w, torch.Tensor) else w) * s
                for w, s in zip(weights, totals[k:], strict=True)
            )
            g = torch.addcmul(h, q, h_sum.unsqueeze(-1), value=-1.0).mul_(scale)
            if finite is not None:
                g.mul_(finite)
            grad[block] = g.to(grad.dtype)
    return loss, grad


class _VocabParallelLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, counted, name, hyper, temperature, dtype, chunk_rows, reduction, group, vocab):
        want_grad = ctx.needs_input_grad[0]
        n_counted = student.shape[0] if counted is None else int(counted.sum())
        weight = 1.0 / max(n_counted, 1) if reduction == "mean" else 1.0
        scale = weight / temperature
        args = (name, student, teacher, counted, hyper, temperature, dtype, chunk_rows)
        loss, grad = _pass(*args, want_grad, scale, group, vocab)
        ctx.grad = grad
        ctx.save_for_backward(student, teacher, counted)
        ctx.args = (name, hyper, temperature, dtype, chunk_rows, scale, reduction, group, vocab)
        if reduction == "none":
            return loss
        total = loss.sum()
        return total * weight if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "kdiv's token-level divergences cannot be differentiated twice (create_graph=True): "
                "their gradient is computed in closed form"
            )
        grad, ctx.grad = ctx.grad, None
        name, hyper, temperature, dtype, chunk_rows, scale, reduction, group, vocab = ctx.args
        if grad is None:  # a second backward (retain_graph=True): every rank computes it again, collectives too
            student, teacher, counted = ctx.saved_tensors
            args = (name, student, teacher, counted, hyper, temperature, dtype, chunk_rows)
            _, grad = _pass(*args, True, scale, group, vocab)
        if reduction == "none":
            grad.mul_(grad_out.to(grad.dtype).unsqueeze(-1))
        elif grad_out.device.type != "cpu" or float(grad_out) != 1.0:
            grad.mul_(grad_out.to(grad.dtype))
        return grad, *([None] * 10)


def vocab_parallel(
    name,
    student_logits,
    teacher_logits,
    *,
    group,
    temperature=1.0,
    mask=None,
    reduction="mean",
    chunk_size=None,
    **hyper,
):
    """The divergence ``name`` of the full rows, from this rank's vocabulary shard of both logits.

    ``kdiv.<name>(student_shard, teacher_shard, vocab_group=group, ...)`` calls this. Shapes: logits
    [..., V_rank] (this rank's contiguous slice of the vocabulary; V_rank may differ between ranks, and may be 0);
    mask [...] (the same on every rank); returns [] or [...] with reduction="none", the same value on every rank,
    whose backward gives this rank's shard of the gradient. Every rank of ``group`` must make the call. See
    :mod:`kdiv.parallel` for the conventions.
    """
    _check_group(group)
    device = _collective_device(group, student_logits, teacher_logits)
    error, agree, checked = None, [0.0] * len(_FIELDS), None
    try:
        agree, checked = _local_call(
            name, student_logits, teacher_logits, temperature, mask, reduction, chunk_size, hyper
        )
    except (ValueError, TypeError) as e:
        error = e
    vocab_local = student_logits.shape[-1] if error is None else 0
    Stats.reset()
    shards = _agree(group, device, agree, vocab_local, error)
    hyper, temperature, reduction, counted, dtype, batch_shape = checked
    vocab = sum(shards)
    if vocab == 0:
        raise ValueError("student_logits: the vocabulary is empty on every rank of vocab_group")
    n_counted = int(agree[6])
    # the same number of rows per chunk on every rank (the collectives must match), from the largest shard
    chunk_rows = chunk_size or max(1, min(max(n_counted, 1), CHUNK_ELEMENTS // max(max(shards), 1)))
    student = student_logits.reshape(-1, vocab_local)
    teacher = teacher_logits.detach().reshape(-1, vocab_local)
    out = _VocabParallelLoss.apply(
        student, teacher, counted, name, hyper, temperature, dtype, chunk_rows, reduction, group, vocab
    )
    return out.reshape(batch_shape) if reduction == "none" else out


def head_mask(teacher_logits, mu=0.5, *, group, temperature=1.0):
    """AKL's head (:func:`kdiv.head_mask` of the full rows' teacher probabilities) on this rank's shard.

    Shapes: teacher_logits [..., V_rank] (this rank's shard) -> bool [..., V_rank]. Every rank of ``group`` must
    make the call; rows of all -inf, NaN or +inf raise ValueError on every rank.
    """
    _check_group(group)
    device = _collective_device(group, teacher_logits)
    error = None
    try:
        check_logits(teacher_logits, teacher_logits)
        mu = SPECS["akl"].check_hyper({"mu": mu})["mu"]
        temperature = check_positive("temperature", temperature)
        dtype = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
        n_rows = math.prod(teacher_logits.shape[:-1])
        agree = [_NAMES.index("akl"), mu, temperature, 0, n_rows, teacher_logits.dim() - 1, n_rows, 0.0]
        agree += [_DTYPES.index(dtype), -1]
    except ValueError as e:
        error, agree = e, [0.0] * len(_FIELDS)
    Stats.reset()
    shards = _agree(group, device, agree, teacher_logits.shape[-1] if error is None else 0, error)
    z = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]).to(dtype) / temperature
    m = z.amax(-1)
    m = torch.where(torch.isnan(m), math.inf, m)
    _all_reduce(m, dist.ReduceOp.MAX, group)
    error = _rows_error(torch.stack([torch.zeros_like(m), m]))
    if error is not None:
        raise error
    lse = m + _all_reduce((z - m.unsqueeze(-1)).exp_().sum(-1), dist.ReduceOp.SUM, group).log_()
    lt = _log_probs(z, lse)
    top = _log_probs(m.unsqueeze(-1), lse).squeeze(-1)
    tau, rounds = head_threshold_sharded(lt, lt.exp(), mu, sum(shards), top, group, _all_reduce)
    Stats.head_rounds += rounds
    return (lt >= tau.unsqueeze(-1)).reshape(teacher_logits.shape)
