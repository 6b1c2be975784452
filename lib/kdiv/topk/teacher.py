r"""A teacher given by its top-k token ids and log-probabilities: :class:`TopK`, accepted by every token-level
divergence in place of the teacher's logits.

A serving engine or an offline pass over the data returns, per token, the ids of the teacher's k most probable
tokens and their log-probabilities at the full softmax, :math:`t_j = \log p_j` for :math:`j \in S` (the k ids).
The student stays dense (logits ``[..., V]``). With :math:`\ell = z / T` the student's scaled logits and
:math:`q = \mathrm{softmax}(\ell)`, every treatment of the missing mass forms a few categories per token and runs
the divergence's own row kernel on them (the chunked engine of :mod:`kdiv.core.engine.chunked`, on rows of k or
k + 1 "logits"), so that every divergence, mask, reduction and hyper-parameter behaves as with dense logits:

- ``"tail"`` (the default): the k ids, plus one category for everything else.
  Teacher :math:`(p_j)_{j\in S},\ p_\text{tail} = 1 - \sum_{j\in S} p_j`; student
  :math:`(q_j)_{j\in S},\ q_\text{tail} = \sum_{v\notin S} q_v`; the loss is :math:`D(p_{S+}\,\|\,q_{S+})` on these
  k + 1 categories. Exact for what the k ids carry; for every f-divergence (forward_kl, reverse_kl, symmetric_kl,
  js, tvd, skew_kl, skew_reverse_kl) a lower bound of the dense divergence, by the data-processing inequality
  (merging categories never increases an f-divergence). AKL is not an f-divergence and gets no such bound; its
  head is chosen among the k ids only (see below).
- ``"renorm"``: both restricted to the k ids and renormalised,
  :math:`\tilde p_j = p_j / \sum_S p,\ \tilde q_j = q_j / \sum_S q`; the loss is :math:`D(\tilde p\,\|\,\tilde q)`.
  Neither a lower nor an upper bound; the student's mass outside S gets no gradient.
- ``"fkl_topk"`` (forward_kl only): :math:`\sum_{j\in S} p_j \log(p_j / q_j)` with the student's full softmax q
  (the usual top-k distillation loss). It can be negative (the tail's terms are missing); its gradient
  :math:`(q_v \sum_S p - p_v [v\in S]) / T` drives the student towards :math:`p_j / \sum_S p` on S and 0 outside.
  Other divergences raise a ValueError: their formula has terms in q outside S (reverse KL's
  :math:`\sum q \log(q/p)`) that the top-k teacher cannot give.

Temperature. ``TopK(..., temperature=T0)`` states the temperature the log-probabilities were taken at (default 1):
:math:`t = \log\mathrm{softmax}(z_\text{teacher} / T_0)` at the ids. Called at temperature T, the student is
:math:`\mathrm{softmax}(z / T)` (exact, it is dense) and the teacher's k + 1 categories
:math:`(t_j, \log p_\text{tail})` are re-tempered as :math:`\mathrm{softmax}((t, \log p_\text{tail}) \cdot T_0/T)`:
exact where T = T0 and where k = V (any T); for k < V and T != T0 the tail is tempered as if it were one token,
which for T > T0 under-states its tempered mass (:math:`\sum_v p_v^{a} \ge (\sum_v p_v)^a` for a < 1). Sample the
teacher at the training temperature (T0 = T) to be exact. ``"renorm"`` renormalises :math:`t \cdot T_0/T` over S.

AKL. AKL's head is the teacher's top tokens with cumulative mass <= mu (the top-1 always in it). With ``"tail"``
the head is chosen among the k ids by their full-softmax mass, the tail category never belongs to it: that is the
dense head whenever the k ids hold more than mu of the mass (ties with the k-th id aside). When they hold at most
mu, the dense head would need more than k ids; the head is then all k ids, and the tail category is AKL's tail.
With ``"renorm"``, AKL is the AKL of the renormalised distributions (head by renormalised mass).

A teacher given as dense logits with ``-inf`` outside its top k is not a top-k teacher: the engine floors each
missing token at probability float32 tiny, which makes reverse-KL-like terms about 87 * q_tail. Use :class:`TopK`.

Shapes: indices [..., k] (int64 or int32, distinct per row, in [0, V)); logprobs [..., k] (floating, <= 0);
student logits [..., V] with the same leading shape.
"""

from __future__ import annotations

import math
import threading

import torch

from ..core import kernels as K
from ..core.checks import check_logits, check_mask, check_positive, check_reduction, warn_on_misuse
from ..core.engine import workers
from ..core.engine.chunked import auto_chunk_rows, rowwise_divergence
from ..core.headtail import threshold as head_threshold  # unchecked: the k ids' mass is below 1

__all__ = ["TopK", "TREATMENTS", "topk_divergence", "topk_from_logits"]

TREATMENTS = ("tail", "renorm", "fkl_topk")

# A log-probability above 0 by more than this is refused (fp16 / bf16 log_softmax output rounds to at most ~1e-7
# above 0); up to it, log-probabilities are clamped at 0. The k probabilities may sum to 1 + _MASS_SLACK at most
# (fp16 storage of 512 log-probabilities moves their sum by well under 1e-2; raw logits sum far above 1).
_LOGPROB_SLACK = 1e-3
_MASS_SLACK = 1e-2


class TopK:
    r"""A teacher as its top-k token ids and log-probabilities at the full softmax.

    ``TopK(indices, logprobs, missing="tail", temperature=1.0)``: indices [..., k] int64 / int32, logprobs
    [..., k] floating (:math:`\log p_j`, at most 0, e.g. ``logits.log_softmax(-1).topk(k)``); ``missing``: the
    treatment of the mass outside the k ids, one of :data:`TREATMENTS` (see :mod:`kdiv.topk.teacher`);
    ``temperature``: the temperature T0 the log-probabilities were taken at. Pass it wherever teacher logits go:
    ``kdiv.reverse_kl(student_logits, kdiv.TopK(ids, logprobs), mask=mask)``.

    Shape checks happen here; the checks that need the student (k <= V, ids in range, batch shape) or the mask
    (distinct ids, log-probabilities <= 0 and summing to at most 1 on counted tokens) when a divergence is called.
    """

    __slots__ = ("indices", "logprobs", "missing", "temperature")

    def __init__(self, indices, logprobs, missing: str = "tail", temperature: float = 1.0):
        if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"indices must be an int64 or int32 torch.Tensor, got {_describe(indices)}")
        if not isinstance(logprobs, torch.Tensor) or not logprobs.is_floating_point():
            raise ValueError(f"logprobs must be a floating torch.Tensor, got {_describe(logprobs)}")
        if indices.dim() == 0 or indices.shape[-1] == 0:
            raise ValueError(f"indices must have shape [..., k] with k >= 1, got {tuple(indices.shape)}")
        if logprobs.shape[-1:] != indices.shape[-1:]:
            raise ValueError(
                f"indices and logprobs must have the same k (last axis), got indices {tuple(indices.shape)} and "
                f"logprobs {tuple(logprobs.shape)}"
            )
        if logprobs.shape != indices.shape:
            raise ValueError(
                f"logprobs must have the shape of indices, got {tuple(logprobs.shape)} and {tuple(indices.shape)}"
            )
        if logprobs.device != indices.device:
            raise ValueError(f"indices and logprobs must be on one device, got {indices.device} and {logprobs.device}")
        if missing not in TREATMENTS:
            raise ValueError(f"missing must be one of {TREATMENTS}, got {missing!r}")
        self.indices, self.logprobs, self.missing = indices, logprobs.detach(), missing
        self.temperature = check_positive("temperature", temperature)

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """The leading (token) shape [...]."""
        return self.indices.shape[:-1]

    def with_missing(self, missing: str) -> TopK:
        """The same teacher with another treatment of the missing mass."""
        return TopK(self.indices, self.logprobs, missing, self.temperature)

    def __repr__(self):
        return f"TopK(shape={tuple(self.shape)}, k={self.k}, missing={self.missing!r}, temperature={self.temperature})"

    # the divergences' wrapper calls this in place of kdiv.core.engine.chunked.rowwise_divergence (same signature)
    @staticmethod
    def rowwise_divergence(kernel, student_logits, teacher_logits, **kwargs):
        return topk_divergence(kernel, student_logits, teacher_logits, **kwargs)


def _describe(x):
    return f"{x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__


def topk_from_logits(teacher_logits: torch.Tensor, k: int, *, missing="tail", temperature=1.0) -> TopK:
    """The top-k teacher of dense teacher logits [..., V] at temperature T0: ids and log softmax(logits / T0)."""
    x = teacher_logits.detach()
    logprobs = torch.log_softmax((x if x.dtype == torch.float64 else x.float()) / temperature, dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    return TopK(ids, values, missing=missing, temperature=temperature)


# ---------------------------------------------------------------------------------------------------------------
# Student side: gather the scaled logits at the ids, plus one logsumexp per row (over the ids' complement, or the
# whole row), with a closed-form backward, chunk by chunk: nothing of size [N, V] is allocated but the gradient.
# ---------------------------------------------------------------------------------------------------------------


def _run_blocks(n_rows, vocab, device, work):
    """work(rows, buffers) for every block of rows (a slice); on CPU shared out to the engine's single-core worker
    threads (see :mod:`kdiv.core.engine.chunked`: torch's own intra-op threads fork and join on every op of every
    chunk, which costs many times the work when other processes share the cores). ``buffers``: a per-worker dict
    that `work` keeps its chunk buffers in."""
    step = auto_chunk_rows(n_rows, vocab, device)
    blocks = [slice(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]
    n_threads = min(workers.n_workers(), len(blocks))
    pool = workers.pool() if n_threads > 1 and device.type == "cpu" else None
    if pool is None:
        buffers = {}
        for rows in blocks:
            work(rows, buffers)
        return
    queue, lock = iter(blocks), threading.Lock()

    def worker():
        with torch.no_grad():
            buffers = {}
            while True:
                with lock:
                    rows = next(queue, None)
                if rows is None:
                    return
                work(rows, buffers)

    for future in [pool.submit(worker) for _ in range(n_threads)]:
        future.result()


def _buffer(buffers, key, n, vocab, dtype, device):
    """A [n, vocab] view of a per-worker buffer, allocated once per worker and call (a fresh chunk-sized tensor
    per block would pay its page faults every time)."""
    if key not in buffers:
        buffers[key] = torch.empty(auto_chunk_rows(1 << 30, vocab), vocab, dtype=dtype, device=device)
    return buffers[key][:n]


def _scaled(student, rows, temperature, dtype, out):
    """student[rows] / T in the compute dtype: a view where nothing needs converting, else written into `out`."""
    z = student[rows]
    if z.dtype == dtype and temperature == 1.0:
        return z
    if temperature == 1.0:
        return out.copy_(z)
    return torch.div(z, temperature, out=out) if z.dtype == dtype else out.copy_(z).div_(temperature)


class _StudentCategories(torch.autograd.Function):
    r"""[N, V] student logits -> [N, k (+1)]: :math:`\ell_{S} = z_S / T` and, for ``last="rest"``,
    :math:`\log\sum_{v\notin S} e^{z_v/T}` or, for ``last="full"``, :math:`\log\sum_v e^{z_v/T}`.

    Backward: :math:`\partial L/\partial z_v = (g_v [v\in S] + g_\text{last}\,\sigma_v) / T` with
    :math:`\sigma` the softmax of z / T over the complement of S ("rest") or the whole row ("full"). Rows not
    counted are never read into the result (they may hold anything) and get gradient 0. Chunk by chunk: nothing
    of size [N, V] is allocated but the gradient."""

    @staticmethod
    def forward(ctx, student, ids, counted, temperature, last, dtype):
        n, vocab = student.shape
        k = ids.shape[1]
        device = student.device
        out = torch.zeros(n, k + (last is not None), dtype=dtype, device=device)
        lse = torch.full((n,), -math.inf, dtype=dtype, device=device)
        top = torch.zeros(n, dtype=dtype, device=device)

        def work(rows, buffers):
            buf = _buffer(buffers, "z", rows.stop - rows.start, vocab, dtype, device)
            z = _scaled(student, rows, temperature, dtype, buf)
            z_ids = z.gather(1, ids[rows])
            out[rows, :k] = z_ids
            if last is None:
                top[rows] = z.amax(1)
                return
            if last == "rest":
                if z is not buf:
                    buf.copy_(z)
                z = buf.scatter_(1, ids[rows], -math.inf)
            # logsumexp as the engine takes it: max(z) - log(max(softmax(z))), torch's fused softmax being one
            # pass where z - max and its exp are two
            m = z.amax(1)
            e = torch.ops.aten._softmax.out(z, -1, False, out=_buffer(buffers, "e", z.shape[0], vocab, dtype, device))
            lse[rows] = torch.where(m == -math.inf, -math.inf, m - e.amax(1).log_())
            top[rows] = m if last == "full" else torch.maximum(m, z_ids.amax(1))

        _run_blocks(n, vocab, device, work)
        # the row maxima tell NaN / +inf, or all -inf, in counted rows (a NaN row's maximum is NaN)
        seen = top if counted is None else top[counted]
        if bool((torch.isnan(seen) | (seen == math.inf)).any()):
            raise ValueError("student_logits contains NaN or +inf")
        if bool((seen == -math.inf).any()):
            raise ValueError("student_logits has a counted token whose logits are all -inf")
        if last is not None:
            out[:, -1] = lse
        if counted is not None:
            out[~counted] = 0.0  # nothing of an uncounted row travels on, NaN included
        ctx.save_for_backward(student, ids, counted, lse)
        ctx.args = (temperature, last, dtype)
        return out

    @staticmethod
    def backward(ctx, g):
        student, ids, counted, lse = ctx.saved_tensors
        temperature, last, dtype = ctx.args
        n, vocab = student.shape
        k = ids.shape[1]
        device = student.device
        grad = torch.empty_like(student)
        g = g.to(dtype) / temperature
        # a row whose complement is empty or all -inf has lse = -inf and g_last = 0 (the engine's floored path)
        empty = torch.isneginf(lse)

        def work(rows, buffers):
            n_rows = rows.stop - rows.start
            direct = grad.dtype == dtype
            block = grad[rows] if direct else _buffer(buffers, "g", n_rows, vocab, dtype, device)
            if last is None:
                block.zero_()
            else:
                # g_last * the softmax over the complement (the ids at -inf) or over the whole row
                buf = _buffer(buffers, "z", n_rows, vocab, dtype, device)
                z = _scaled(student, rows, temperature, dtype, buf)
                if last == "rest":
                    if z is not buf:
                        buf.copy_(z)
                    z = buf.scatter_(1, ids[rows], -math.inf)
                torch.ops.aten._softmax.out(z, -1, False, out=block).mul_(g[rows, k:])
                if bool(empty[rows].any()):
                    block.masked_fill_(empty[rows].unsqueeze(1), 0.0)  # softmax of an all -inf row is NaN
            block.scatter_add_(1, ids[rows], g[rows, :k])
            if counted is not None:
                skip = ~counted[rows]
                if bool(skip.any()):
                    block.masked_fill_(skip.unsqueeze(1), 0.0)
            if not direct:
                grad[rows] = block

        _run_blocks(n, vocab, device, work)
        return grad, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# Teacher side: checks and the k + 1 categories at the call's temperature.
# ---------------------------------------------------------------------------------------------------------------


def _check_teacher(teacher: TopK, student: torch.Tensor, counted):
    vocab = student.shape[-1]
    if teacher.shape != student.shape[:-1]:
        raise ValueError(
            f"teacher_logits (a TopK of token shape {tuple(teacher.shape)}) and student_logits "
            f"{tuple(student.shape)} must have the same leading shape"
        )
    if teacher.k > vocab:
        raise ValueError(f"teacher_logits has k = {teacher.k} ids, more than the student's vocabulary size {vocab}")
    if teacher.indices.device != student.device:
        raise ValueError(
            f"teacher_logits and student_logits must be on one device, got {teacher.indices.device} and "
            f"{student.device}"
        )
    ids = teacher.indices.reshape(-1, teacher.k)
    logprobs = teacher.logprobs.reshape(-1, teacher.k)
    if counted is not None:
        ids, logprobs = ids[counted], logprobs[counted]
    if ids.numel() == 0:
        return
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(f"indices of teacher_logits must lie in [0, {vocab}) (the student's vocabulary)")
    if teacher.k > 1:
        ordered = ids.sort(1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise ValueError("indices of teacher_logits must be distinct within each token (a duplicated id)")
    if bool(torch.isnan(logprobs).any() or (logprobs == math.inf).any()):
        raise ValueError("logprobs of teacher_logits contains NaN or +inf")
    if bool((logprobs > _LOGPROB_SLACK).any()):
        raise ValueError(
            f"logprobs of teacher_logits must be log-probabilities (<= 0), got a maximum of {float(logprobs.max()):g}"
            " (raw logits?)"
        )
    mass = logprobs.float().clamp_max(0).logsumexp(1).exp().max()
    if float(mass) > 1 + _MASS_SLACK:
        raise ValueError(
            f"logprobs of teacher_logits must be log-probabilities at the full softmax, but the k probabilities of a "
            f"token sum to {float(mass):.4g} > 1"
        )


def _teacher_categories(teacher: TopK, temperature: float, dtype, vocab: int) -> torch.Tensor:
    """[N, k + 1]: the k log-probabilities and log p_tail, re-tempered to `temperature` (unnormalised logits).
    p_tail = 1 - sum p carries the rounding of the log-probabilities, which re-tempering raises to the power
    T0 / T (1e-7 becomes 3e-4 at T0 / T = 1/2): where k = V nothing is missing and the tail is exactly 0."""
    t = teacher.logprobs.reshape(-1, teacher.k).to(dtype).clamp_max(0)
    top = t.logsumexp(1, keepdim=True)
    # log(1 - exp(top)): -inf where rounding makes the k ids hold everything
    tail = torch.where(top < -math.log(2), torch.log1p(-top.exp()), torch.log(-torch.expm1(top)))
    tail = torch.where(top >= 0, -math.inf, tail) if teacher.k < vocab else torch.full_like(top, -math.inf)
    cats = torch.cat([t, tail], dim=1)
    if temperature != teacher.temperature:
        cats = cats * (teacher.temperature / temperature)
    return cats


def _akl_tail_rows(c, *, mu):
    """AKL on k + 1 categories whose last one is the tail: the head is chosen among the first k (see the module
    docstring), the tail category is never in it. The rest is kdiv.core.kernels.akl_rows."""
    p_ids = c.p[:, :-1]
    tau = head_threshold(p_ids, mu)
    err = torch.sub(c.p, c.q, out=c.scratch(0)).abs_()
    g_total = err.sum(-1)
    g_head = (err[:, :-1] * (p_ids >= tau.unsqueeze(-1))).sum(-1)
    exact = g_total == 0
    w_head = torch.where(exact, 0.5, g_head / torch.where(exact, 1, g_total)).unsqueeze(-1)
    w_tail = 1 - w_head
    d = torch.sub(c.zs, c.zt, out=c.scratch(0))
    k = c.lse_t - c.lse_s
    fkl = -c.dot(c.p, d) - k.squeeze(-1)
    rkl = c.dot(c.q, d) + k.squeeze(-1)
    if c.grad is not None:
        K._mix_kl_grad(c, d, k, rkl, w_head, w_tail)
    return w_head.squeeze(-1) * fkl + w_tail.squeeze(-1) * rkl


def _name_of(kernel):
    from ..core.spec import SPECS

    return next((s.name for s in SPECS.values() if s.kernel is kernel), getattr(kernel, "__name__", "?"))


def topk_divergence(kernel, student_logits, teacher_logits, *, temperature, mask, reduction, chunk_size, hyper):
    """A token-level divergence (its row kernel) between dense student logits [..., V] and a :class:`TopK`
    teacher [..., k]: the body of every ``kdiv.<divergence>(student_logits, kdiv.TopK(...))``; same arguments and
    semantics as :func:`kdiv.core.engine.chunked.rowwise_divergence`."""
    teacher = teacher_logits
    check_logits(student_logits, student_logits)
    temperature = check_positive("temperature", temperature)
    reduction = check_reduction(reduction)
    batch_shape = student_logits.shape[:-1]
    mask = check_mask(mask, batch_shape, student_logits.device)
    warn_on_misuse(student_logits, None)
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    counted = None if mask is None else mask.reshape(-1)
    _check_teacher(teacher, student_logits, counted)
    if teacher.missing == "fkl_topk" and kernel is not K.forward_kl_rows:
        raise ValueError(
            f"missing='fkl_topk' is forward KL's top-k form and is defined for forward_kl only, not {_name_of(kernel)}"
            " (its terms in the student's mass outside the k ids have no teacher counterpart): use 'tail' or 'renorm'"
        )
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.logprobs.dtype) else torch.float32
    ids = teacher.indices.reshape(-1, teacher.k).long()
    if counted is not None:
        ids = torch.where(counted.unsqueeze(1), ids, torch.arange(teacher.k, device=ids.device))
    cats = _teacher_categories(teacher, temperature, dtype, vocab)
    missing = teacher.missing
    if missing == "tail" and teacher.k == vocab:
        missing = "renorm"  # nothing is missing: the k + 1-th category would only hold the teacher's rounding
    small_batch = (*batch_shape, -1)

    if missing == "fkl_topk":
        q_cats = _StudentCategories.apply(student, ids, counted, temperature, "full", dtype)
        log_p = cats.log_softmax(1)[:, :-1]
        p = log_p.exp()
        log_q = q_cats[:, :-1] - q_cats[:, -1:]
        per_token = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(1)
        return _reduce(per_token, counted, reduction, batch_shape)

    if missing == "tail":
        s_cats = _StudentCategories.apply(student, ids, counted, temperature, "rest", dtype)
        t_cats = cats
        if kernel is K.akl_rows:
            kernel = _akl_tail_rows
    else:  # renorm
        s_cats = _StudentCategories.apply(student, ids, counted, temperature, None, dtype)
        t_cats = cats[:, :-1]
    return rowwise_divergence(
        kernel,
        s_cats.reshape(small_batch),
        t_cats.reshape(small_batch),
        temperature=1.0,
        mask=mask,
        reduction=reduction,
        chunk_size=chunk_size,
        hyper=hyper,
    )


def _reduce(per_token, counted, reduction, batch_shape):
    """The engine's reductions on a per-token loss [N]: 0 where not counted; mean over counted tokens (0 if none)."""
    if counted is not None:
        per_token = torch.where(counted, per_token, 0.0)
    if reduction == "none":
        return per_token.reshape(batch_shape)
    total = per_token.sum()
    if reduction == "sum":
        return total
    n = per_token.numel() if counted is None else int(counted.sum())
    return total / max(n, 1)
