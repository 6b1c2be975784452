r"""Token-level divergences from hidden states and LM-head weights, chunk of rows by chunk of rows.

:func:`fused_linear` computes ``D(softmax((h_s W_s^T + b_s) / T), softmax((h_t W_t^T + b_t) / T))`` for any
registered token-level divergence D without holding either model's [N, V] logits: for each chunk of n rows it
forms the two [n, V] logits blocks in float32 (float64 where an input is float64), runs the divergence on them
(the public function, through kdiv's chunked engine, which returns the closed-form gradient
:math:`g = \partial L / \partial z_s` of the block), and folds g into the student's gradients at once::

    grad_hidden[rows] = g @ W_s            # [n, H_s]
    grad_weight      += g^T @ h_s[rows]    # [V, H_s]
    grad_bias        += g.sum(0)           # [V]

so that only a few [n, V] blocks exist at a time and backward has nothing left to do but scale (as Liger-Kernel's
fused linear losses do). The gradients carry the reduction's weight (1/count for ``"mean"``); with
``reduction="none"`` the per-row weights are only known in backward, which then runs the chunks a second time.

Precision: bf16/fp16 hidden states and weights are cast to float32 *before* the matmul, so logits are never
rounded to bf16 (rounding them first gave Liger-Kernel 4-23 % gradient error, Liger-Kernel issue #1432); the weight
and bias gradients are accumulated over the chunks in float32 and cast to the weight's dtype at the end. For bf16
weights this holds a float32 copy of each head and a float32 weight-gradient accumulator ([V, H] each).
"""

from __future__ import annotations

import torch

from ..core.checks import check_mask, check_positive, check_positive_int, check_reduction, warn_if_swapped
from ..core.registry import spec as _spec

__all__ = ["fused_linear", "FUSED_CHUNK_ELEMENTS", "auto_fused_chunk_rows"]

# Target size of one chunk's logits block, in elements (rows x vocab): 3 * 2**21 (24 MiB in float32). Three such
# blocks are live at a time (student and teacher logits, their gradient); measured with bench/fused.py --chunks on
# a 2-core CPU, 2**22 kept the extra memory at 0.15x of one [N, V] logits tensor at N x V = 4096 x 32000 and
# 1024 x 128256 but took 1.4-2x the plain path's time (the [n, H] x [H, V] matmuls slow down below ~200 rows),
# 2**23 ran at 1.0-1.5x and took 0.26-0.30x; this lies between.
FUSED_CHUNK_ELEMENTS = 3 << 21


def auto_fused_chunk_rows(n_rows: int, vocab: int) -> int:
    """Rows per chunk of :func:`fused_linear`: about FUSED_CHUNK_ELEMENTS logits per chunk, at least one row."""
    return max(1, min(n_rows, FUSED_CHUNK_ELEMENTS // max(vocab, 1)))


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_tensor(name, x, dims=None):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimension(s), got shape {tuple(x.shape)}")


def _check_model(side, hidden, weight, bias):
    """hidden [..., H], weight [V, H], bias None or [V] of one model."""
    _check_tensor(f"{side}_hidden", hidden)
    if hidden.dim() == 0 or hidden.shape[-1] == 0:
        raise ValueError(f"{side}_hidden must have shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    _check_tensor(f"{side}_weight", weight, 2)
    if weight.shape[0] == 0:
        raise ValueError(f"{side}_weight must have shape [V, H] with V >= 1, got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{side}_weight must have shape [V, H] with H = {side}_hidden's hidden size {hidden.shape[-1]} "
            f"(as nn.Linear's weight), got {tuple(weight.shape)}"
        )
    if bias is not None:
        _check_tensor(f"{side}_bias", bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{side}_bias must have shape [V] = [{weight.shape[0]}] ({side}_weight's vocabulary), "
                f"got {tuple(bias.shape)}"
            )
    for name, x in ((f"{side}_weight", weight), (f"{side}_bias", bias)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name} must be on {side}_hidden's device {hidden.device}, got {x.device}")


def _blocks(n_rows, counted, chunk_rows):
    """Blocks of counted rows: slices where the rows are consecutive, else index tensors."""
    if counted is None or bool(counted.all()):
        return [slice(i, min(i + chunk_rows, n_rows)) for i in range(0, n_rows, chunk_rows)]
    rows = counted.nonzero().squeeze(1)
    out = []
    for i in range(0, rows.numel(), chunk_rows):
        block = rows[i : i + chunk_rows]
        first, last = int(block[0]), int(block[-1])
        out.append(slice(first, last + 1) if last - first == block.numel() - 1 else block)
    return out


def _rows(x, block):
    return x[block] if isinstance(block, slice) else x.index_select(0, block)


class _Heads:
    """Both heads in their compute dtypes (views where no cast is needed) and the chunk loop over them."""

    def __init__(self, sh, sw, sb, th, tw, tb, counted, fn, temperature, chunk_rows):
        self.sh, self.th, self.counted = sh, th, counted
        self.fn, self.temperature, self.chunk_rows = fn, temperature, chunk_rows
        self.s_dtype, self.t_dtype = _compute_dtype(sh, sw, sb), _compute_dtype(th, tw, tb)
        self.sw, self.sb = sw.to(self.s_dtype), None if sb is None else sb.to(self.s_dtype)
        self.tw, self.tb = tw.to(self.t_dtype), None if tb is None else tb.to(self.t_dtype)
        self.vocab = sw.shape[0]

    @staticmethod
    def _logits(h, w, b, dtype, out):
        h = h.to(dtype)  # cast before the matmul: the logits are never rounded to bf16
        if b is None:
            return torch.mm(h, w.T, out=out)
        return torch.addmm(b, h, w.T, out=out)

    def run(self, reduction, want, row_weights=None):
        """One pass over the chunks. `want`: which of (hidden, weight, bias) gradients to compute. Returns
        (loss: [] for mean/sum inner "sum", or [N] per row; grads in compute dtype, unweighted for "mean"/"sum",
        times the per-row `row_weights` [N] for "none")."""
        n_rows = self.sh.shape[0]
        blocks = _blocks(n_rows, self.counted, self.chunk_rows)
        buffer_rows = max(((b.stop - b.start) if isinstance(b, slice) else b.numel() for b in blocks), default=0)
        zs_buf = torch.empty(buffer_rows, self.vocab, dtype=self.s_dtype, device=self.sh.device)
        zt_buf = torch.empty(buffer_rows, self.vocab, dtype=self.t_dtype, device=self.sh.device)
        want_h, want_w, want_b = want
        grad = any(want)
        gh = torch.zeros(self.sh.shape, dtype=self.s_dtype, device=self.sh.device) if want_h else None
        gw = torch.zeros(self.sw.shape, dtype=self.s_dtype, device=self.sh.device) if want_w else None
        gb = torch.zeros(self.vocab, dtype=self.s_dtype, device=self.sh.device) if want_b else None
        per_row = reduction == "none"
        loss = torch.zeros(n_rows if per_row else (), dtype=torch.float64, device=self.sh.device)
        for block in blocks:
            hs = _rows(self.sh, block)
            n = hs.shape[0]
            zs = self._logits(hs, self.sw, self.sb, self.s_dtype, zs_buf[:n])
            zt = self._logits(_rows(self.th, block), self.tw, self.tb, self.t_dtype, zt_buf[:n])
            try:
                if not grad:
                    out = self.fn(zs, zt, temperature=self.temperature, reduction=reduction)
                else:
                    with torch.enable_grad():
                        leaf = zs.detach().requires_grad_()
                        out = self.fn(leaf, zt, temperature=self.temperature, reduction=reduction)
                        weights = None if row_weights is None else _rows(row_weights, block).to(out.dtype)
                        (g,) = torch.autograd.grad(out, leaf, weights)
                    out = out.detach()
            except ValueError as e:
                raise ValueError(f"the logits of these hidden states and heads are not usable: {e}") from None
            if per_row:
                if isinstance(block, slice):
                    loss[block] = out
                else:
                    loss.index_copy_(0, block, out.to(loss.dtype))
            else:
                loss += out
            if not grad:
                continue
            g = g.to(self.s_dtype)
            if want_h:
                if isinstance(block, slice):
                    torch.mm(g, self.sw, out=gh[block])
                else:
                    gh.index_copy_(0, block, g @ self.sw)
            if want_w:
                gw.addmm_(g.T, hs.to(self.s_dtype))
            if want_b:
                gb += g.sum(0)
            del g
        return loss, (gh, gw, gb)


def _finish(grads, inputs, weight=1.0):
    """The gradients times `weight`, each in its input's dtype (the float32 accumulators of bf16 inputs cast once)."""
    out = []
    for g, x in zip(grads, inputs, strict=True):
        if g is not None and weight != 1.0:
            g.mul_(weight)
        out.append(None if g is None else g.to(x.dtype))
    return tuple(out)


class _FusedLinearDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sh, sw, sb, th, tw, tb, counted, fn, temperature, chunk_rows, reduction):
        heads = _Heads(sh, sw, sb, th, tw, tb, counted, fn, temperature, chunk_rows)
        want = tuple(ctx.needs_input_grad[:3])
        n_counted = sh.shape[0] if counted is None else int(counted.sum())
        weight = 1.0 / max(n_counted, 1) if reduction == "mean" else 1.0
        ctx.grads = None
        if reduction == "none":
            # the per-row weights come in backward: compute the values only, the gradients there
            loss, _ = heads.run("none", (False, False, False))
        else:
            loss, grads = heads.run("sum", want)
            loss = loss * weight
            if any(want):
                ctx.grads = _finish(grads, (sh, sw, sb), weight)
        ctx.heads, ctx.weight, ctx.reduction, ctx.want = heads, weight, reduction, want
        ctx.inputs = (sh, sw, sb)
        dtype = torch.float64 if torch.float64 in (heads.s_dtype, heads.t_dtype) else torch.float32
        return loss.to(dtype)

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            # the gradients are closed-form, without a graph back to the inputs: a second derivative through them
            # would silently miss this loss's term
            raise RuntimeError(
                "kdiv.fused_linear cannot be differentiated twice (create_graph=True): its gradient is computed "
                "in closed form"
            )
        grads, ctx.grads = ctx.grads, None
        if ctx.reduction == "none":
            _, grads = ctx.heads.run("none", ctx.want, row_weights=grad_out)
            grads = _finish(grads, ctx.inputs)
        else:
            if grads is None:  # a second backward (retain_graph=True): compute them again
                _, grads = ctx.heads.run("sum", ctx.want)
                grads = _finish(grads, ctx.inputs, ctx.weight)
            if grad_out.device.type != "cpu" or float(grad_out) != 1.0:
                grads = tuple(None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads)
        return (*grads, None, None, None, None, None, None, None, None)


def fused_linear(
    name,
    student_hidden,
    student_weight,
    teacher_hidden,
    teacher_weight,
    *,
    student_bias=None,
    teacher_bias=None,
    temperature=1.0,
    mask=None,
    reduction="mean",
    chunk_size=None,
    **hyper,
):
    r"""The divergence `name` between the student's and the teacher's next-token distributions, computed from their
    last hidden states and LM heads without materialising either [N, V] logits tensor.

    .. math:: L = \mathrm{reduce}_i\; D\big(\mathrm{softmax}(z^s_i / T),\, \mathrm{softmax}(z^t_i / T)\big),
              \qquad z^s = h^s W_s^\top + b_s,\quad z^t = h^t W_t^\top + b_t,

    with exactly the conventions of ``kdiv.get(name)`` on those logits (student first, no ``T**2`` factor, mask
    True = the token counts, ``"mean"`` over counted tokens, ``-inf`` logits floored at ``LOG_FLOOR``): the result
    equals ``kdiv.get(name, **hyper)(h_s @ W_s.T + b_s, h_t @ W_t.T + b_t, ...)`` to float32 rounding, with
    logits formed in float32 even for bf16 inputs. Gradients reach ``student_hidden``, ``student_weight`` and
    ``student_bias``; the teacher gets none. Masked rows are skipped (loss 0, gradient 0).

    Shapes: ``student_hidden`` [..., H_s], ``student_weight`` [V, H_s] (as ``nn.Linear.weight``), ``student_bias``
    [V]; ``teacher_hidden`` [..., H_t] (same leading shape; H_t may differ from H_s), ``teacher_weight`` [V, H_t],
    ``teacher_bias`` [V]; ``mask`` [...]; returns [] or [...] with ``reduction="none"``. ``chunk_size``: rows per
    chunk (default :func:`auto_fused_chunk_rows`, about 6.3 million logits per chunk). ``**hyper``: the divergence's
    hyper-parameters, checked as ``kdiv.get`` checks them.

    Example::

        loss = kdiv.fused_linear("js", h_student, lm_head.weight, h_teacher, teacher_head.weight, beta=0.1,
                                 mask=labels != -100)
        loss.backward()   # h_student.grad, lm_head.weight.grad

    Reference: the fused linear + loss idea of Liger-Kernel (Hsu et al., "Liger Kernel: Efficient Triton Kernels
    for LLM Training", 2024), here for every divergence kdiv registers.
    """
    s = _spec(name)
    accepted = set(s.defaults)
    unknown = sorted(set(hyper) - accepted)
    if unknown:
        raise ValueError(f"{name} takes no argument {unknown[0]!r}; its hyper-parameters are {sorted(accepted)}")
    checked = s.check_hyper(hyper)
    _check_model("student", student_hidden, student_weight, student_bias)
    _check_model("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"teacher_weight's vocabulary size {teacher_weight.shape[0]} differs from student_weight's "
            f"{student_weight.shape[0]}: both heads must map onto one vocabulary"
        )
    batch_shape = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != batch_shape:
        raise ValueError(
            f"teacher_hidden must have the leading shape {tuple(batch_shape)} of student_hidden (one row per token), "
            f"got {tuple(teacher_hidden.shape)}"
        )
    if teacher_hidden.device != student_hidden.device:
        raise ValueError(
            f"teacher_hidden must be on student_hidden's device {student_hidden.device}, got {teacher_hidden.device}"
        )
    temperature = check_positive("temperature", temperature)
    reduction = check_reduction(reduction)
    mask = check_mask(mask, batch_shape, student_hidden.device)
    warn_if_swapped(
        (student_hidden, student_weight, student_bias),
        (teacher_hidden, teacher_weight, teacher_bias),
        "the teacher's hidden states or head require grad but none of the student's inputs does",
    )
    sh = student_hidden.reshape(-1, student_hidden.shape[-1])
    th = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    n_rows, vocab = sh.shape[0], student_weight.shape[0]
    if chunk_size is None:
        chunk_rows = auto_fused_chunk_rows(n_rows, vocab)
    else:
        chunk_rows = check_positive_int("chunk_size", chunk_size)
    counted = None if mask is None else mask.reshape(-1)
    fn = s.fn if not checked else _bind(s.fn, checked)
    out = _FusedLinearDivergence.apply(
        sh,
        student_weight,
        student_bias,
        th,
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        counted,
        fn,
        temperature,
        chunk_rows,
        reduction,
    )
    return out.reshape(batch_shape) if reduction == "none" else out


def _bind(fn, hyper):
    def bound(student_logits, teacher_logits, **common):
        return fn(student_logits, teacher_logits, **common, **hyper)

    return bound
