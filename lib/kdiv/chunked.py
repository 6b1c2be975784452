"""Chunked forward + backward for token-level divergences on [tokens, vocab] logits.

Every token-level divergence in :mod:`kdiv.divergences` is a *row kernel*: given one chunk of student and teacher
log-probabilities (compute dtype, already divided by the temperature) it returns the per-row loss and, when asked,
the gradient with respect to the chunk's scaled student logits, in closed form. :class:`_ChunkedRowLoss` runs the
kernel over chunks of rows and writes the gradient chunk by chunk into one preallocated tensor of the student's
shape and dtype, so nothing of size [N, V] is allocated beyond that gradient: the fp32 temporaries (and the fp32
upcast of bf16/fp16 inputs) live only for one chunk.

The gradient is computed during the forward pass (as Liger-Kernel does) and scaled by the incoming per-row
gradient in backward. Teacher logits never receive a gradient.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_logits, check_mask, check_positive, check_positive_int, check_reduction

# A log-probability of -inf (a -inf logit: a token outside the vocabulary) is replaced by log of the smallest
# normal float32, as if the token had probability 1.2e-38. This keeps every divergence finite, and every gradient
# free of NaN, when one model masks a token the other does not (where exact KL(q||p) would be +inf).
LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)  # -87.34

# Target size of one chunk, in elements: a few fp32 temporaries of this size stay in cache-sized memory.
CHUNK_ELEMENTS = 1 << 16


def auto_chunk_rows(n_rows: int, vocab: int) -> int:
    """Rows per chunk: about CHUNK_ELEMENTS elements per chunk, at least one row."""
    return max(1, min(n_rows, CHUNK_ELEMENTS // max(vocab, 1)))


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def log_probs(logits: torch.Tensor, temperature: float, dtype: torch.dtype):
    """log softmax(logits / temperature) in `dtype`, with -inf replaced by LOG_FLOOR; also the row logsumexp."""
    z = logits.to(dtype)
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    logp = (z - lse).nan_to_num_(nan=0.0, posinf=0.0, neginf=LOG_FLOOR)
    return logp, lse.squeeze(-1)


def _chunked_pass(student, teacher, counted, kernel, hyper, temperature, chunk_rows, want_grad, status):
    """Per-row loss [N] and, if `want_grad`, the gradient [N, V] (student's dtype), one chunk of rows at a time.

    `status` [4] bool collects, without a host sync per chunk: student NaN/+inf, teacher NaN/+inf, student row all
    -inf, teacher row all -inf (counted rows only).
    """
    n_rows = student.shape[0]
    dtype = _compute_dtype(student, teacher)
    loss = torch.zeros(n_rows, dtype=dtype, device=student.device)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if want_grad else None
    for start in range(0, n_rows, chunk_rows):
        stop = min(start + chunk_rows, n_rows)
        logq, lse_s = log_probs(student[start:stop], temperature, dtype)
        logp, lse_t = log_probs(teacher[start:stop], temperature, dtype)
        rows_loss, dz = kernel(logq, logp, want_grad, **hyper)
        keep = None if counted is None else counted[start:stop]
        for k, lse in ((0, lse_s), (1, lse_t)):
            bad_value = torch.isnan(lse) | (lse == math.inf)
            bad_empty = lse == -math.inf
            if keep is not None:
                bad_value, bad_empty = bad_value & keep, bad_empty & keep
            status[k] |= bad_value.any()
            status[k + 2] |= bad_empty.any()
        loss[start:stop] = rows_loss if keep is None else torch.where(keep, rows_loss, 0)
        if want_grad:
            if keep is not None:
                dz = torch.where(keep.unsqueeze(-1), dz, 0)
            if temperature != 1.0:
                dz = dz / temperature
            grad[start:stop] = dz
    return loss, grad


class _ChunkedRowLoss(torch.autograd.Function):
    """Per-row loss [N] of a row kernel over logits [N, V]; gradient with respect to the student only."""

    @staticmethod
    def forward(ctx, student, teacher, counted, kernel, hyper, temperature, chunk_rows, status):
        want_grad = ctx.needs_input_grad[0]
        loss, grad = _chunked_pass(student, teacher, counted, kernel, hyper, temperature, chunk_rows, want_grad,
                                   status)
        # The gradient is kept as an attribute, not through save_for_backward, so that backward can scale it in
        # place: no second [N, V] tensor. A further backward (retain_graph=True, gradcheck) recomputes it.
        ctx.grad = grad
        ctx.save_for_backward(student, teacher, counted)
        ctx.args = (kernel, hyper, temperature, chunk_rows)
        return loss

    @staticmethod
    def backward(ctx, grad_rows):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            student, teacher, counted = ctx.saved_tensors
            kernel, hyper, temperature, chunk_rows = ctx.args
            status = torch.zeros(4, dtype=torch.bool, device=student.device)
            _, grad = _chunked_pass(student, teacher, counted, kernel, hyper, temperature, chunk_rows, True, status)
        return grad.mul_(grad_rows.to(grad.dtype).unsqueeze(-1)), None, None, None, None, None, None, None


def rowwise_divergence(kernel, student_logits, teacher_logits, *, temperature, mask, reduction, chunk_size, hyper):
    """Validate the arguments, run `kernel` chunk by chunk, reduce. The body of every token-level divergence."""
    check_logits(student_logits, teacher_logits)
    temperature = check_positive("temperature", temperature)
    reduction = check_reduction(reduction)
    batch_shape = student_logits.shape[:-1]
    mask = check_mask(mask, batch_shape, student_logits.device)
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    counted = None if mask is None else mask.reshape(-1)
    n_rows = student.shape[0]
    chunk_rows = auto_chunk_rows(n_rows, vocab) if chunk_size is None else check_positive_int("chunk_size", chunk_size)

    status = torch.zeros(4, dtype=torch.bool, device=student.device)
    rows = _ChunkedRowLoss.apply(student, teacher, counted, kernel, hyper, temperature, chunk_rows, status)
    flags = status.tolist()
    if flags[0]:
        raise ValueError("student_logits contains NaN or +inf")
    if flags[1]:
        raise ValueError("teacher_logits contains NaN or +inf")
    if flags[2]:
        raise ValueError("student_logits has a counted token whose logits are all -inf")
    if flags[3]:
        raise ValueError("teacher_logits has a counted token whose logits are all -inf")

    if reduction == "none":
        return rows.reshape(batch_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    # mean over counted tokens; a batch that counts no token gives 0 (and a zero gradient), not NaN
    n_counted = n_rows if counted is None else counted.sum()
    return total / (n_counted.clamp_min(1) if isinstance(n_counted, torch.Tensor) else max(n_counted, 1))
