"""Chunked forward + backward for token-level divergences on [tokens, vocab] logits.

Every token-level divergence in :mod:`kdiv.core.divergences` is a *row kernel*: given one chunk of rows (a
:class:`Chunk`: both scaled logits, both softmaxes, their log-normalisers, scratch space) it returns the per-row
loss and, when the student needs a gradient, writes the gradient with respect to the chunk's student logits, in
closed form. :class:`_ChunkedRowLoss` runs the kernel over chunks of rows and writes the gradient chunk by chunk
into one tensor of the student's shape and dtype, so nothing of size [N, V] is allocated beyond that gradient: the
fp32 temporaries (and the fp32 upcast of bf16/fp16 inputs) live in a few chunk-sized buffers that every chunk
reuses.

The gradient is computed during the forward pass (as Liger-Kernel does), already multiplied by the reduction's
weight (1/T, and 1/count for ``"mean"``), so that backward has nothing left to do for the usual ``loss.backward()``.
Teacher logits never receive a gradient.

Two paths per row. The *fast path* works on the logits shifted by their row maximum, z - max(z) (exact in floating
point; log q = z - max(z) - logsumexp(z - max(z)) is never materialised: sums like sum_v q_v log q_v are taken as
dot products with the shifted logits plus a per-row constant of size at most log V). Shifting first is what keeps
float32 accurate when the two models' logits sit far apart: a raw difference z_t - z_s of two logits near +-c
rounds at ~eps * c, and a row constant lse_s - lse_t of size ~c multiplies the error of sum p = 1. A ``-inf``
logit makes such a row's loss NaN or inf; those rows, and only those, are computed again on the *floored path*,
which first replaces the logits by their log-probabilities with ``-inf`` raised to :data:`LOG_FLOOR`. A row whose
logits are finite but span more than float32 can hold (~1e38) raises a ValueError there. Counted rows only are
computed: rows the mask drops are skipped, with loss 0 and gradient 0. Every loss is clamped at 0 (a divergence is
never negative; rounding can take a row with q ~ p a few ulps below).

Inputs are read in place: any layout whose rows have unit stride along V, including the causal-LM shift
``logits[:, :-1]`` (rows of a 3-D view, read segment by segment). When the student is such a view of a contiguous
tensor that requires grad and covers >= ~90 % of it, the gradient is written straight into a tensor of the base's
shape (the rows the view leaves out are zeroed): autograd would otherwise allocate the base's gradient and copy
this one into it, 2x one logits tensor at the peak instead of 1x. With grad mode off (``torch.no_grad``,
``torch.inference_mode``) no gradient is computed.

Performance notes (measured on a 2-core CPU; see the README's Performance section and ``bench/``): the
probabilities come from torch's fused softmax (one exp per element; renormalised by an accurate sum for V > 64k,
see :data:`_RENORMALISE_ABOVE`); log-normalisers from the row maximum of the softmax, ``lse = -log(max(softmax(z)))``
for shifted z, instead of a second exp pass; elementwise work runs in place on the chunk buffers, with no
chunk-sized temporary (a fresh tensor costs its page faults on every call); on CPU the chunks are shared out to
single-core worker threads (:mod:`.workers`) rather than split op by op over torch's intra-op threads; a chunk of
about :data:`CHUNK_ELEMENTS` elements keeps a worker's buffers in the CPU cache while the Python overhead per torch
op (a few microseconds) stays small against the op. On CUDA chunks are :data:`CUDA_CHUNK_ELEMENTS` elements and the
chunk loop never reads a value back to the host (AKL's head threshold takes its sort-based route there).
"""

from __future__ import annotations

import math
import threading

import torch

from ..checks import check_logits, check_mask, check_positive, check_positive_int, check_reduction, warn, warn_on_misuse
from . import native, workers

# A log-probability of -inf (a -inf logit: a token outside the vocabulary) is replaced by log of the smallest
# normal float32, as if the token had probability 1.2e-38. This keeps every divergence finite, and every gradient
# free of NaN, when one model masks a token the other does not (where exact KL(q||p) would be +inf).
LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)  # -87.34

# Target size of one chunk, in elements (rows x vocab), tuned with bench/chunk_size.py on a 2-core CPU: 2**17 to
# 2**19 are within noise of each other; 2**16 pays the Python overhead per op, 2**20 falls out of the cache.
CHUNK_ELEMENTS = 1 << 18
# On CUDA there is no cache to stay in (a chunk streams through HBM whatever its size) and the cost to amortise is
# the host's: each of the ~25 torch ops per chunk takes the Python side 5-10 us to issue. A chunk of 2**23 elements
# makes every elementwise op move >= 64 MB (fp32 in and out), >= 13 us at an H100/H200's ~4.8 TB/s and ~30 us at an
# A100's 2 TB/s, so the GPU's queue stays ahead of the host (no host sync in the chunk loop keeps it that way) while
# the engine's ~10 fp32 chunk buffers take 10 * 32 MB = 320 MB, small against one [4096, 128256] gradient (2.1 GB).
CUDA_CHUNK_ELEMENTS = 1 << 23

# Scratch buffers a kernel may ask for with Chunk.scratch(i), i < MAX_SCRATCH; the engine's own per worker: q, p,
# both scaled logits, a gradient block, the dot product's.
MAX_SCRATCH = 4
_FIXED_BUFFERS = 6


def chunk_elements(device) -> int:
    """Target elements per chunk on this device: CUDA_CHUNK_ELEMENTS on CUDA, CHUNK_ELEMENTS elsewhere."""
    return CUDA_CHUNK_ELEMENTS if torch.device(device).type == "cuda" else CHUNK_ELEMENTS


def auto_chunk_rows(n_rows: int, vocab: int, device="cpu") -> int:
    """Rows per chunk: about chunk_elements(device) elements per chunk, at least one row."""
    return max(1, min(n_rows, chunk_elements(device) // max(vocab, 1)))


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class Scratch:
    """[n, V] buffers a row kernel may overwrite, and a row dot product that allocates nothing of that size (a
    fresh chunk-sized tensor costs its page faults on every call, which is what the buffers are there to avoid)."""

    __slots__ = ("_buffers", "_dot_buffer")

    def __init__(self, buffers, dot_buffer):
        self._buffers, self._dot_buffer = buffers, dot_buffer

    @classmethod
    def like(cls, x: torch.Tensor) -> Scratch:
        """Fresh buffers shaped like x [n, V], for a kernel called outside the engine."""
        return cls(torch.empty((MAX_SCRATCH, *x.shape), dtype=x.dtype, device=x.device), torch.empty_like(x))

    def scratch(self, i: int) -> torch.Tensor:
        return self._buffers[i]

    def first_rows(self, n: int) -> Scratch:
        """The same buffers, cut to their first n rows (for a kernel working on a subset of the rows)."""
        return Scratch(self._buffers[:, :n], self._dot_buffer[:n])

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """sum_v a[i, v] * b[i, v]: [n]."""
        return torch.mul(a, b, out=self._dot_buffer).sum(-1)


class Chunk(Scratch):
    """One chunk of n rows as a row kernel sees it (compute dtype throughout).

    ``zs``, ``zt`` [n, V]: student and teacher logits divided by the temperature, *shifted by their row maximum*
    (max 0; on the floored path, log-probabilities), so that every log-ratio a kernel forms from them is a
    difference of numbers of the size of the log-probabilities, whatever the logits' own offset; ``q``, ``p`` [n, V]:
    their softmaxes; ``lse_s``, ``lse_t`` [n, 1]: their logsumexp (computed on first use; at most log V), so that
    ``log q = zs - lse_s``; ``grad`` [n, V] or None: where the kernel writes ``scale * d loss / d zs`` (None when
    the student needs no gradient); ``scratch(i)`` [n, V], i < MAX_SCRATCH: buffers the kernel may overwrite;
    ``dot(a, b)``: row dot products; ``floored``: True on the floored path, where a kernel must not divide by a
    probability (a finite logit can still underflow) and the logits are log-probabilities.
    """

    __slots__ = ("zs", "zt", "q", "p", "grad", "scale", "floored", "lse_s", "lse_t")

    def __init__(self, zs, zt, q, p, grad, scale, buffers, dot_buffer, floored=False, lse_s=None, lse_t=None):
        super().__init__(buffers, dot_buffer)
        self.zs, self.zt, self.q, self.p = zs, zt, q, p
        self.grad, self.scale, self.floored = grad, scale, floored
        self.lse_s = _lse(zs, q) if lse_s is None else lse_s
        self.lse_t = _lse(zt, p) if lse_t is None else lse_t


def _lse(z, probs):
    """logsumexp of z [n, V] -> [n, 1] from its softmax: max(softmax) = exp(max(z) - lse), a reduction instead of
    a second exp pass (for kernels called outside the engine, which hands its chunks the exact sums)."""
    return (z.amax(-1) - probs.amax(-1).log_()).unsqueeze(-1)


# torch's fused CPU softmax accumulates a row's sum of exponentials in long sequential runs (one per SIMD lane):
# its probabilities sum to 1 within 7e-7 up to V = 64k, but only within 4e-6 at 128k and 2e-5 at 256k in float32.
# Longer rows are divided once more by their (cascaded, accurate) sum, which brings them to ~1e-6 per element.
_RENORMALISE_ABOVE = 1 << 16


def _softmax(z, out, floored):
    """softmax(z) into `out` and logsumexp(z) [n, 1] for rows z [n, V]: shifted logits (max exactly 0) or, floored,
    log-probabilities. The log-normaliser comes from max(softmax) = exp(max(z) - lse), a reduction instead of a
    second exp pass; for shifted logits it is a number of size <= log V, known to ~1e-7."""
    torch.ops.aten._softmax.out(z, -1, False, out=out)
    lse = out.amax(-1, keepdim=True).log_().neg_()
    if floored:
        lse.add_(z.amax(-1, keepdim=True))
    if z.shape[-1] > _RENORMALISE_ABOVE:
        total = out.sum(-1, keepdim=True)
        out.div_(total)
        lse.add_(total.log_())
    return lse


# ---------------------------------------------------------------------------------------------------------------
# Rows read (and gradient rows written) in place
# ---------------------------------------------------------------------------------------------------------------


def _try_view(x: torch.Tensor, shape):
    try:
        return x.view(shape)
    except RuntimeError:
        return None


class _Rows:
    """The N = numel / V rows of a tensor [..., V], addressed in place: a 2-D view [N, V] (of any row stride) when
    the leading axes merge into one; else segments [B, T, V] of T rows each (the causal-LM shift ``x[:, :-1]`` is
    one such layout); else (no unit stride along V, or a stranger layout) a contiguous copy."""

    __slots__ = ("flat", "seg", "seg_len", "n")

    def __init__(self, x: torch.Tensor):
        vocab = x.shape[-1]
        self.n = x.numel() // vocab if vocab else 0
        self.seg = self.seg_len = None
        if x.dim() >= 2 and x.stride(-1) == 1:
            self.flat = _try_view(x, (-1, vocab))
            if self.flat is None and x.dim() >= 3:
                self.seg = _try_view(x, (-1, x.shape[-2], vocab))
                self.seg_len = x.shape[-2]
            if self.flat is not None or self.seg is not None:
                return
        self.flat = x.reshape(-1, vocab) if x.stride(-1) == 1 else x.contiguous().view(-1, vocab)

    def view(self, block: slice):
        """Rows block as a view [n, V], or None where they straddle two segments."""
        if self.seg is None:
            return self.flat[block]
        b0, t0 = divmod(block.start, self.seg_len)
        if block.stop - block.start > self.seg_len - t0:
            return None
        return self.seg[b0, t0 : t0 + block.stop - block.start]

    def _index(self, block):
        if isinstance(block, slice):
            device = self.flat.device if self.seg is None else self.seg.device
            return torch.arange(block.start, block.stop, device=device)
        return block

    def read(self, block):
        """Rows block (a slice or an index tensor) [n, V]: a view where possible, else a gathered copy."""
        if isinstance(block, slice):
            v = self.view(block)
            if v is not None:
                return v
        idx = self._index(block)
        if self.seg is None:
            return self.flat.index_select(0, idx)
        return self.seg[idx // self.seg_len, idx % self.seg_len]

    def write(self, block, values: torch.Tensor):
        """Rows block = values (cast to this tensor's dtype)."""
        if isinstance(block, slice):
            v = self.view(block)
            if v is not None:
                v.copy_(values)
                return
        idx = self._index(block)
        if self.seg is None:
            self.flat.index_copy_(0, idx, values.to(self.flat.dtype))
        else:
            self.seg[idx // self.seg_len, idx % self.seg_len] = values.to(self.seg.dtype)

    def fill(self, idx: torch.Tensor, value: float):
        if self.seg is None:
            self.flat.index_fill_(0, idx, value)
        else:
            self.seg[idx // self.seg_len, idx % self.seg_len] = value


def _row_blocks(n_rows: int, rows: torch.Tensor | None, chunk_rows: int, seg_len: int | None = None):
    """Blocks of rows to compute: a slice where the rows are consecutive, else an index tensor. With segments of
    seg_len rows at least a chunk long, slices do not straddle two segments (so that they are read in place)."""
    if rows is None:
        step = seg_len if seg_len is not None and seg_len >= chunk_rows else n_rows
        for seg_start in range(0, n_rows, max(step, 1)):
            seg_stop = min(seg_start + step, n_rows)
            for start in range(seg_start, seg_stop, chunk_rows):
                yield slice(start, min(start + chunk_rows, seg_stop))
        return
    listed = rows.tolist()
    for start in range(0, len(listed), chunk_rows):
        block = listed[start : start + chunk_rows]
        if block[-1] - block[0] == len(block) - 1:
            yield slice(block[0], block[-1] + 1)
        else:
            yield rows[start : start + chunk_rows]


# ---------------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------------


class _Engine:
    """Runs one kernel over blocks of rows; every worker reuses one set of chunk buffers for all its blocks.

    student, teacher: _Rows of the logits; grad_rows: _Rows of the gradient (the rows of `grad`, which may be
    larger: the base tensor a shifted student is a view of), or None."""

    def __init__(self, student, teacher, kernel, hyper, temperature, chunk_rows, n_buffer_rows, grad_rows, scale):
        self.student, self.teacher, self.kernel, self.hyper = student, teacher, kernel, hyper
        self.temperature, self.grad_rows, self.scale = temperature, grad_rows, scale
        self.want_grad = grad_rows is not None
        self.vocab = student.flat.shape[-1] if student.seg is None else student.seg.shape[-1]
        self.device = student.flat.device if student.seg is None else student.seg.device
        s_dtype = (student.flat if student.seg is None else student.seg).dtype
        t_dtype = (teacher.flat if teacher.seg is None else teacher.seg).dtype
        self.dtypes = (s_dtype, t_dtype)
        self.dtype = torch.float64 if torch.float64 in self.dtypes else torch.float32
        self.grad_dtype = (
            None if grad_rows is None else (grad_rows.flat if grad_rows.seg is None else grad_rows.seg).dtype
        )
        self.buffer_rows = max(1, min(chunk_rows, n_buffer_rows))
        self.overflow = torch.zeros((), dtype=torch.bool, device=self.device)
        # the fused C++ kernel for the fast path, where the backend is "native" and it covers this call
        self.native = None
        if self.dtype == torch.float32:
            self.native = native.native_kernel(kernel, hyper, self.dtypes, self.device, temperature, self.grad_dtype)

    def _buffers(self):
        """A worker's chunk buffers: q, p, the two shifted logits, the gradient block (when it cannot be written in
        place), the dot product's, the kernel's scratch; one allocation, cut into views once per block size."""
        pool = torch.empty(
            _FIXED_BUFFERS + MAX_SCRATCH, self.buffer_rows, self.vocab, dtype=self.dtype, device=self.device
        )
        cache = {}

        def views(n):
            if n not in cache:
                cut = pool[:, :n]
                cache[n] = (*cut[:_FIXED_BUFFERS].unbind(0), cut[_FIXED_BUFFERS:])
            return cache[n]

        return views

    def run(self, blocks, loss, floored=False):
        """Every block of rows: loss into loss[block], gradient into the gradient rows; on worker threads where the
        inputs are on the CPU and there are blocks enough."""
        blocks = list(blocks)
        n_threads = min(workers.n_workers(), len(blocks))
        pool = workers.pool() if n_threads > 1 and self.device.type == "cpu" else None
        if pool is None:
            buffers = self._buffers()
            for block in blocks:
                self.run_block(block, buffers, loss, floored)
            return
        queue, lock = iter(blocks), threading.Lock()

        def work():
            with torch.no_grad():
                buffers = self._buffers()
                while True:
                    with lock:
                        block = next(queue, None)
                    if block is None:
                        return
                    self.run_block(block, buffers, loss, floored)

        for future in [pool.submit(work) for _ in range(n_threads)]:
            future.result()

    def _logits(self, rows, block, buf, floored):
        """Rows `block` of the logits as compute-dtype (x - max x) / T in `buf`; on the floored path, the
        log-probabilities with -inf raised to LOG_FLOOR."""
        src = rows.read(block)
        if floored:
            buf.copy_(src)
            if self.temperature != 1.0:
                buf.div_(self.temperature)
            logp = torch.log_softmax(buf, -1)
            # a finite logit whose distance to its row's maximum overflows has no float32 log-probability: noted
            # on the device (no host sync per chunk), raised after the loop
            self.overflow |= (torch.isneginf(logp) & torch.isfinite(buf)).any()
            # used as logits: softmax gives the probabilities back (a floored token gets probability float32
            # tiny) and every log term stays finite
            return buf.copy_(logp.nan_to_num_(nan=0.0, posinf=0.0, neginf=LOG_FLOOR))
        # Shifting by the row maximum is exact (x and max x are floats of one row) and makes every log-ratio the
        # kernels form a difference of log-probability-sized numbers: an offset c between the two models' logits
        # would otherwise cost ~eps * c in every term (1e-3 relative at c = 1e4 in float32).
        top = src.amax(-1, keepdim=True)
        if src.dtype == self.dtype:
            torch.sub(src, top, out=buf)
        else:  # convert first: the subtraction in bf16 would round
            buf.copy_(src).sub_(top.to(self.dtype))
        if self.temperature != 1.0:
            buf.div_(self.temperature)
        return buf

    def _gradient_target(self, block, grad_buf, in_place):
        """(grad, direct) for a block: with `in_place` (a dtype the kernel writes), gradient rows that can be viewed
        are written in place (direct is that view); others go through grad_buf (direct None, written back after);
        (None, None) without a gradient."""
        if not self.want_grad:
            return None, None
        direct = self.grad_rows.view(block) if in_place and isinstance(block, slice) else None
        return (grad_buf if direct is None else direct), direct

    def run_block(self, block, buffers, loss, floored=False):
        """Loss of the rows `block` (a slice or an index tensor) into loss[block], gradient into the gradient rows."""
        n = (block.stop - block.start) if isinstance(block, slice) else block.numel()
        if self.native is not None and not floored:
            self._run_native(block, n, buffers, loss)
            return
        q, p, zs_buf, zt_buf, grad_buf, dot_buf, scratch = buffers(n)
        zs = self._logits(self.student, block, zs_buf, floored)
        zt = self._logits(self.teacher, block, zt_buf, floored)
        lse_s, lse_t = _softmax(zs, q, floored), _softmax(zt, p, floored)
        grad, direct = self._gradient_target(block, grad_buf, in_place=self.grad_dtype == self.dtype)
        chunk = Chunk(zs, zt, q, p, grad, self.scale, scratch, dot_buf, floored, lse_s, lse_t)
        # every divergence is >= 0: a rounding error below 0 (q ~ p) is clamped, not returned
        loss[block] = self.kernel(chunk, **self.hyper).clamp_min_(0.0)
        if floored and grad is not None:
            # The kernel differentiated with respect to the floored log-probabilities as if they were free logits.
            # A floored entry is a constant, and the others are z - logsumexp(z) with the floored tokens out of
            # the sum: chain rule, grad_w = g_w - q_w * sum_{u not floored} g_u = g_w + q_w * sum_{v floored} g_v
            # (g sums to 0 over the row), and 0 at the floored tokens.
            floor = torch.isneginf(self.student.read(block)).to(self.dtype)
            torch.addcmul(grad, q, chunk.dot(grad, floor).unsqueeze(-1), out=grad)
            grad.mul_(floor.sub_(1).neg_())
        if grad is not None and direct is None:
            self.grad_rows.write(block, grad)

    def _run_native(self, block, n, buffers, loss):
        """run_block's fast path in the native kernel: rows read in place (or gathered), the gradient written in
        place where its rows can be viewed (else through the gradient buffer); rows it hands back as NaN are the
        floored path's, as on the eager fast path."""
        q, p, zs_buf, zt_buf, grad_buf, dot_buf, scratch = buffers(n)
        out = loss[block] if isinstance(block, slice) else torch.empty(n, dtype=loss.dtype, device=loss.device)
        grad, direct = self._gradient_target(block, grad_buf, in_place=True)  # the kernel writes fp32 and bf16 rows
        s, t = self.student.read(block), self.teacher.read(block)
        head_p = tau = None
        if self.native.mu is not None:
            # AKL: its head {p >= tau} on the teacher's softmax (the kernel's own, exactly normalised), found as
            # akl_rows finds it
            from ..head_selection import head_threshold_rows  # (which imports this module)

            head_p = p
            self.native.softmax(t, head_p)
            tau = head_threshold_rows(head_p, self.native.mu, Scratch(scratch, dot_buf), self.native)
            tau = tau.to(torch.float32).contiguous()
        # scratch rows for the kernel's exponentials: the first rows of two buffers this path does not otherwise use
        self.native.run(s, t, grad, q, zs_buf, out, self.scale, head_p, tau)
        if not isinstance(block, slice):
            loss[block] = out
        if grad is not None and direct is None:
            self.grad_rows.write(block, grad)


def _check_rows(student, teacher, rows):
    """ValueError for NaN / +inf, or all -inf, among the given rows of either logits (_Rows)."""
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        m = x.read(rows).amax(-1)
        if bool((torch.isnan(m) | (m == math.inf)).any()):
            raise ValueError(f"{name} contains NaN or +inf")
        if bool((m == -math.inf).any()):
            raise ValueError(f"{name} has a counted token whose logits are all -inf")


# A teacher row that is -inf on at least this share of the vocabulary looks like a top-k teacher padded with -inf.
_PADDED_SHARE = 0.9


def _warn_if_padded_topk(kernel, hyper, teacher, bad_rows):
    """A KdivWarning when a divergence with a reverse-KL term (kernels.REVERSE_TERM) is run against a teacher that is
    -inf on most of some row's vocabulary: the value is then mostly the floor (87.34 per unit of the student's mass
    outside the teacher's support), not a divergence. A few of the floored rows are read."""
    from ..kernels import REVERSE_TERM  # the kernels import this module

    reverse = REVERSE_TERM.get(kernel)
    if reverse is None or not reverse(hyper):
        return
    share = torch.isneginf(teacher.read(bad_rows[:8])).float().mean(-1).max().item()
    if share >= _PADDED_SHARE:
        name = getattr(kernel, "__name__", "this divergence").removesuffix("_rows")
        warn(
            f"teacher_logits is -inf on {share:.0%} of a row's vocabulary (a top-k teacher padded with -inf?): "
            f"{name} has a reverse-KL term, +inf against such a teacher wherever the student has mass; kdiv floors "
            f"the teacher's log-probabilities at {LOG_FLOOR:.2f} (float32 tiny), so the value is dominated by about "
            f"{-LOG_FLOOR:.0f} x the student's mass outside the teacher's ids. Pass the top-k teacher itself: "
            "kdiv.topk_from_logits(teacher_logits, k) or kdiv.TopK(indices, logprobs), treatment 'tail' (default) "
            "or 'renorm'."
        )


class _Gradient:
    """The gradient tensor a call returns and the _Rows its rows are written through.

    For a student that is a full-row view of a larger contiguous tensor (the causal shift ``logits[:, :-1]``,
    ``geometry`` given), the gradient is of the base's shape: the view's rows are written in place and the other
    rows zeroed, so that autograd gets the base's gradient without a second tensor of that size (through the view
    it would allocate the base's gradient and copy this one into it)."""

    def __init__(self, target, student, geometry, dtype):
        self.full = torch.empty(target.shape, dtype=dtype, device=target.device)
        if geometry is None:
            self.view = self.full
        else:
            size, stride, offset, uncovered = geometry
            self.view = self.full.as_strided(size, stride, self.full.storage_offset() + offset)
            if uncovered is not None:
                self.full.view(-1, target.shape[-1]).index_fill_(0, uncovered, 0)
        self.rows = _Rows(self.view)


def _chunked_pass(target, geometry, teacher, counted, kernel, hyper, temperature, chunk_rows, want_grad, scale):
    """Per-row loss [N] (compute dtype, 0 where not counted) and, if `want_grad`, the gradient (a _Gradient,
    student's dtype) times `scale`, one block of rows at a time. Raises ValueError on NaN/+inf or all -inf counted
    rows."""
    student = target if geometry is None else target.as_strided(*geometry[:2], target.storage_offset() + geometry[2])
    s_rows, t_rows = _Rows(student), _Rows(teacher)
    n_rows = s_rows.n
    rows = None
    if counted is not None and not bool(counted.all()):
        rows = counted.nonzero().squeeze(1)
    n_work = n_rows if rows is None else rows.numel()
    gradient = _Gradient(target, student, geometry, student.dtype) if want_grad else None
    engine = _Engine(s_rows, t_rows, kernel, hyper, temperature, chunk_rows, n_work, gradient and gradient.rows, scale)
    loss = torch.zeros(n_rows, dtype=engine.dtype, device=engine.device)
    if gradient is not None and rows is not None:
        gradient.rows.fill((~counted).nonzero().squeeze(1), 0)
    seg_len = s_rows.seg_len if t_rows.seg_len in (None, s_rows.seg_len) else None
    engine.run(_row_blocks(n_rows, rows, chunk_rows, seg_len), loss)

    # rows whose fast-path loss is not finite hold a -inf logit, or a probability that underflows where a kernel
    # divides by it: compute them again on the floored path, where kernels do neither
    # (NaN, +inf or all -inf in a row make its softmax NaN, and so its loss: those rows are checked here, once)
    bad = ~torch.isfinite(loss)
    if bool(bad.any()):
        bad_rows = bad.nonzero().squeeze(1)
        _check_rows(s_rows, t_rows, bad_rows)
        engine.run(_row_blocks(n_rows, bad_rows, chunk_rows), loss, floored=True)
        _warn_if_padded_topk(kernel, hyper, t_rows, bad_rows)
        if bool(engine.overflow):
            raise ValueError(
                "logits whose spread within a row exceeds the float32 range (~3e38) cannot be computed in float32; "
                "pass float64 logits"
            )
        if not bool(torch.isfinite(loss).all()):
            raise ValueError(
                "the divergence of finite logits overflows float32 (logits of magnitude ~1e38 within a row); "
                "pass float64 logits"
            )
    return loss, gradient


class _ChunkedRowLoss(torch.autograd.Function):
    """The reduced loss ([] for "mean"/"sum", [N] for "none") of a row kernel over logits [..., V]; gradient with
    respect to the student only (or to the base tensor the student is a row view of: see _Gradient)."""

    @staticmethod
    def forward(ctx, target, teacher, counted, geometry, kernel, hyper, temperature, chunk_rows, reduction):
        want_grad = ctx.needs_input_grad[0]
        n_rows = (target.numel() if geometry is None else math.prod(geometry[0])) // max(teacher.shape[-1], 1)
        n_counted = n_rows if counted is None else int(counted.sum())
        # the gradient of the reduced loss, already weighted, so that a plain loss.backward() only hands it on
        weight = 1.0 / max(n_counted, 1) if reduction == "mean" else 1.0
        scale = weight / temperature
        args = (kernel, hyper, temperature, chunk_rows)
        loss, grad = _chunked_pass(target, geometry, teacher, counted, *args, want_grad, scale)
        # The gradient is kept as an attribute, not through save_for_backward, so that backward can hand it on (or
        # scale it in place): no second [N, V] tensor. A further backward (retain_graph=True) recomputes it.
        ctx.grad = grad
        ctx.save_for_backward(target, teacher, counted)
        ctx.args = (geometry, *args, scale, reduction)
        if reduction == "none":
            return loss
        total = loss.sum()
        return total * weight if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            # create_graph=True: the gradient is closed-form, without a graph back to the logits, so a second
            # derivative through it would silently miss this loss's term. Refuse rather than be wrong.
            raise RuntimeError(
                "kdiv's token-level divergences cannot be differentiated twice (create_graph=True): "
                "their gradient is computed in closed form"
            )
        grad, ctx.grad = ctx.grad, None
        geometry, kernel, hyper, temperature, chunk_rows, scale, reduction = ctx.args
        if grad is None:
            target, teacher, counted = ctx.saved_tensors
            args = (kernel, hyper, temperature, chunk_rows, True, scale)
            _, grad = _chunked_pass(target, geometry, teacher, counted, *args)
        if reduction == "none":
            grad.view.mul_(grad_out.to(grad.full.dtype).reshape(grad.view.shape[:-1]).unsqueeze(-1))
        elif grad_out.device.type != "cpu" or float(grad_out) != 1.0:
            # on CUDA, multiply rather than read grad_out back to the host
            grad.full.mul_(grad_out.to(grad.full.dtype))
        return grad.full, None, None, None, None, None, None, None, None


def _base_geometry(x: torch.Tensor):
    """(size, stride, offset, uncovered rows) of x as full rows of the contiguous tensor it is a view of, where
    giving that base the gradient costs at most ~1.1x x's own (the causal shift x = logits[:, :-1]); else None."""
    base = x._base
    if base is None or x.grad_fn is None or not base.requires_grad or not base.is_contiguous() or x.dim() < 2:
        return None
    vocab = x.shape[-1]
    if base.dim() < 1 or base.shape[-1] != vocab or x.stride(-1) != 1 or base.numel() * 10 > x.numel() * 11:
        return None
    offset = x.storage_offset() - base.storage_offset()
    if offset % vocab or any(s % vocab for s in x.stride()[:-1]):
        return None
    # the base row of each of x's rows: must be distinct (an overlapping as_strided view is not a row view)
    row = torch.full((), offset // vocab, dtype=torch.long)
    for size, stride in zip(x.shape[:-1], x.stride()[:-1], strict=True):
        row = row.unsqueeze(-1) + torch.arange(size) * (stride // vocab)
    row = row.reshape(-1)
    covered = torch.zeros(base.numel() // vocab, dtype=torch.bool)
    covered[row] = True
    if int(covered.sum()) != row.numel():
        return None
    uncovered = (~covered).nonzero().squeeze(1)
    uncovered = uncovered.to(x.device) if uncovered.numel() else None
    return tuple(x.shape), tuple(x.stride()), offset, uncovered


@torch.compiler.disable
def rowwise_divergence(kernel, student_logits, teacher_logits, *, temperature, mask, reduction, chunk_size, hyper):
    """Validate the arguments, run `kernel` chunk by chunk, reduce. The body of every token-level divergence.

    Under torch.compile this is a graph break (it runs eagerly, its own threads and closed-form gradient intact);
    torch.func transforms are refused with a RuntimeError (the gradient is not an autograd graph they can see)."""
    if torch._C._are_functorch_transforms_active():
        raise RuntimeError(
            "kdiv's token-level divergences do not support torch.func transforms (grad, vmap, jacrev, ...): their "
            "gradient is computed in closed form inside the call; use loss.backward() / torch.autograd.grad, or the "
            "plain autograd versions in kdiv.testing.plain"
        )
    check_logits(student_logits, teacher_logits)
    temperature = check_positive("temperature", temperature)
    reduction = check_reduction(reduction)
    batch_shape = student_logits.shape[:-1]
    mask = check_mask(mask, batch_shape, student_logits.device)
    warn_on_misuse(student_logits, teacher_logits)
    vocab = student_logits.shape[-1]
    teacher = teacher_logits.detach()
    counted = None if mask is None else mask.reshape(-1)
    n_rows = student_logits.numel() // vocab
    if chunk_size is None:
        chunk_rows = auto_chunk_rows(n_rows, vocab, student_logits.device)
    else:
        chunk_rows = check_positive_int("chunk_size", chunk_size)
    # with grad mode off (torch.no_grad, inference_mode: a loss only logged) no gradient is computed or allocated
    needs_grad = torch.is_grad_enabled() and student_logits.requires_grad
    target, geometry = student_logits if needs_grad else student_logits.detach(), None
    if needs_grad:
        geometry = _base_geometry(student_logits)
        if geometry is not None:
            target = student_logits._base
    args = (kernel, hyper, temperature, chunk_rows, reduction)
    out = _ChunkedRowLoss.apply(target, teacher, counted, geometry, *args)
    return out.reshape(batch_shape) if reduction == "none" else out
