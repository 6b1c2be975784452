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

Two paths per row. The *fast path* works on the logits themselves (log q = z_s - logsumexp(z_s) is never
materialised; sums like sum_v q_v log q_v are taken as dot products with the logits plus a per-row constant). A
``-inf`` logit makes such a row's loss NaN or inf; those rows, and only those, are computed again on the *floored
path*, which first replaces the logits by their log-probabilities with ``-inf`` raised to :data:`LOG_FLOOR`.
Counted rows only are computed: rows the mask drops are skipped, with loss 0 and gradient 0.

Performance notes (measured on a 2-core CPU; see the README's Performance section and ``bench/``): the
probabilities come from torch's fused softmax (one exp per element); log-normalisers from two row maxima,
``lse = max(z) - log(max(softmax(z)))``, instead of a second exp pass; elementwise work runs in place on the chunk
buffers, with no chunk-sized temporary (a fresh tensor costs its page faults on every call); on CPU the chunks are
shared out to single-core worker threads rather than split op by op over torch's intra-op threads; a chunk of
about :data:`CHUNK_ELEMENTS` elements keeps a worker's buffers in the CPU cache while the Python overhead per torch
op (a few microseconds) stays small against the op.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from ..checks import check_logits, check_mask, check_positive, check_positive_int, check_reduction

# A log-probability of -inf (a -inf logit: a token outside the vocabulary) is replaced by log of the smallest
# normal float32, as if the token had probability 1.2e-38. This keeps every divergence finite, and every gradient
# free of NaN, when one model masks a token the other does not (where exact KL(q||p) would be +inf).
LOG_FLOOR = math.log(torch.finfo(torch.float32).tiny)  # -87.34

# Target size of one chunk, in elements (rows x vocab), tuned with bench/chunk_size.py on a 2-core CPU: 2**17 to
# 2**19 are within noise of each other; 2**16 pays the Python overhead per op, 2**20 falls out of the cache.
CHUNK_ELEMENTS = 1 << 18

# Scratch buffers a kernel may ask for with Chunk.scratch(i), i < MAX_SCRATCH; the engine's own per worker: q, p,
# both scaled logits, a gradient block, the dot product's.
MAX_SCRATCH = 4
_FIXED_BUFFERS = 6


def auto_chunk_rows(n_rows: int, vocab: int) -> int:
    """Rows per chunk: about CHUNK_ELEMENTS elements per chunk, at least one row."""
    return max(1, min(n_rows, CHUNK_ELEMENTS // max(vocab, 1)))


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

    ``zs``, ``zt`` [n, V]: student and teacher logits divided by the temperature; ``q``, ``p`` [n, V]: their
    softmaxes; ``lse_s``, ``lse_t`` [n, 1]: their logsumexp (computed on first use), so that
    ``log q = zs - lse_s``; ``grad`` [n, V] or None: where the kernel writes ``scale * d loss / d zs`` (None when
    the student needs no gradient); ``scratch(i)`` [n, V], i < MAX_SCRATCH: buffers the kernel may overwrite;
    ``dot(a, b)``: row dot products; ``floored``: True on the floored path, where a kernel must not divide by a
    probability (a finite logit can still underflow) and the logits are log-probabilities.
    """

    __slots__ = ("zs", "zt", "q", "p", "grad", "scale", "floored", "_lse_s", "_lse_t")

    def __init__(self, zs, zt, q, p, grad, scale, buffers, dot_buffer, floored=False):
        super().__init__(buffers, dot_buffer)
        self.zs, self.zt, self.q, self.p = zs, zt, q, p
        self.grad, self.scale, self.floored = grad, scale, floored
        self._lse_s = self._lse_t = None

    @property
    def lse_s(self) -> torch.Tensor:
        if self._lse_s is None:
            # max(softmax) = exp(max(z) - lse): a reduction instead of a second exp pass over the row
            self._lse_s = (self.zs.amax(-1) - self.q.amax(-1).log_()).unsqueeze(-1)
        return self._lse_s

    @property
    def lse_t(self) -> torch.Tensor:
        if self._lse_t is None:
            self._lse_t = (self.zt.amax(-1) - self.p.amax(-1).log_()).unsqueeze(-1)
        return self._lse_t


def _row_blocks(n_rows: int, rows: torch.Tensor | None, chunk_rows: int):
    """Blocks of rows to compute: a slice where the rows are consecutive, else an index tensor."""
    if rows is None:
        for start in range(0, n_rows, chunk_rows):
            yield slice(start, min(start + chunk_rows, n_rows))
        return
    listed = rows.tolist()
    for start in range(0, len(listed), chunk_rows):
        block = listed[start : start + chunk_rows]
        if block[-1] - block[0] == len(block) - 1:
            yield slice(block[0], block[-1] + 1)
        else:
            yield rows[start : start + chunk_rows]


# ---------------------------------------------------------------------------------------------------------------
# Threads. On CPU the blocks are shared out to torch.get_num_threads() Python threads, each running its torch ops
# on one core (the ops release the GIL), each taking the next block when it is done with one. Torch's own intra-op
# threading would split every op of every chunk over the cores and join them again: thousands of fork/joins per
# call, each of which waits for the slowest core, which costs little on an idle machine but can multiply the time
# when other processes share the cores. One block per worker needs no join until the end.
# ---------------------------------------------------------------------------------------------------------------

_local = threading.local()
_executor: ThreadPoolExecutor | None = None
_threads_usable: bool | None = None


def _omp_set_num_threads():
    """omp_set_num_threads of the OpenMP runtime loaded in this process (torch's), or None."""
    if not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if ".so" in line and "/" in line}
    except OSError:
        return None
    torch_dir = os.path.dirname(torch.__file__)
    # torch's own copy first, where another package has loaded a second OpenMP runtime
    for path in sorted(paths, key=lambda p: (not p.startswith(torch_dir), p)):
        if os.path.basename(path).startswith(("libgomp", "libiomp5", "libomp")):
            try:
                return ctypes.CDLL(path).omp_set_num_threads
            except (OSError, AttributeError):
                continue
    return None


def _init_worker(set_threads):
    # torch sets a thread's OpenMP team size when the thread first asks for it: ask first, then set it to 1
    torch.get_num_threads()
    set_threads(1)
    _local.single = torch.get_num_threads() == 1


def _forget_workers():
    # a forked child has none of the parent's threads: it starts its own pool when it needs one
    global _executor, _threads_usable
    _executor = _threads_usable = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


def _workers() -> ThreadPoolExecutor | None:
    """The shared pool of single-core worker threads, or None where torch's threads cannot be set per thread."""
    global _executor, _threads_usable
    if _threads_usable is None:
        set_threads = _omp_set_num_threads()
        if set_threads is not None:
            _executor = ThreadPoolExecutor(
                max_workers=max(os.cpu_count() or 1, 2),
                thread_name_prefix="kdiv",
                initializer=_init_worker,
                initargs=(set_threads,),
            )
            _threads_usable = _executor.submit(lambda: _local.single).result()
        else:
            _threads_usable = False
    return _executor if _threads_usable else None


class _Engine:
    """Runs one kernel over blocks of rows; every worker reuses one set of chunk buffers for all its blocks."""

    def __init__(self, student, teacher, kernel, hyper, temperature, chunk_rows, n_buffer_rows, want_grad, scale):
        self.student, self.teacher, self.kernel, self.hyper = student, teacher, kernel, hyper
        self.temperature, self.want_grad, self.scale = temperature, want_grad, scale
        self.dtype = _compute_dtype(student, teacher)
        self.buffer_rows = max(1, min(chunk_rows, n_buffer_rows))
        self.grad = None
        if want_grad:
            # (advising this tensor's pages as transparent huge pages, as THP_MEM_ALLOC_ENABLE=1 does, made the
            # first touch 3x cheaper in isolation but the whole call 1.5x slower right after another large tensor
            # was freed, as in the benchmark: not done)
            self.grad = torch.empty(student.shape, dtype=student.dtype, device=student.device)

    def _buffers(self):
        """A worker's chunk buffers: q, p, the two scaled logits (when they cannot be views of the inputs), the
        gradient block (when it cannot be written in place), the dot product's, the kernel's scratch; one
        allocation, cut into views once per block size."""
        pool = torch.empty(
            _FIXED_BUFFERS + MAX_SCRATCH,
            self.buffer_rows,
            self.student.shape[1],
            dtype=self.dtype,
            device=self.student.device,
        )
        cache = {}

        def views(n):
            if n not in cache:
                cut = pool[:, :n]
                cache[n] = (*cut[:_FIXED_BUFFERS].unbind(0), cut[_FIXED_BUFFERS:])
            return cache[n]

        return views

    def run(self, blocks, loss, floored=False):
        """Every block of rows: loss into loss[block], gradient into self.grad; on worker threads where the inputs
        are on the CPU and there are blocks enough."""
        blocks = list(blocks)
        n_threads = min(torch.get_num_threads(), len(blocks))
        pool = _workers() if n_threads > 1 and self.student.device.type == "cpu" else None
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

    def _logits(self, x, block, buf, floored):
        """x[block] as compute-dtype logits / T: a view of x when nothing needs converting, else in `buf`."""
        if isinstance(block, slice):
            src = x[block]
            if src.dtype == self.dtype and self.temperature == 1.0 and not floored:
                return src
            buf.copy_(src)
        elif x.dtype == self.dtype:
            torch.index_select(x, 0, block, out=buf)
        else:
            buf.copy_(x.index_select(0, block))
        if self.temperature != 1.0:
            buf.div_(self.temperature)
        if floored:
            # log-probabilities with -inf raised to LOG_FLOOR, used as logits: softmax gives the probabilities
            # back (a floored token gets probability float32 tiny) and every log term stays finite
            buf.copy_(torch.log_softmax(buf, -1).nan_to_num_(nan=0.0, posinf=0.0, neginf=LOG_FLOOR))
        return buf

    def run_block(self, block, buffers, loss, floored=False):
        """Loss of the rows `block` (a slice or an index tensor) into loss[block], gradient into self.grad."""
        n = (block.stop - block.start) if isinstance(block, slice) else block.numel()
        q, p, zs_buf, zt_buf, grad_buf, dot_buf, scratch = buffers(n)
        zs = self._logits(self.student, block, zs_buf, floored)
        zt = self._logits(self.teacher, block, zt_buf, floored)
        torch.ops.aten._softmax.out(zs, -1, False, out=q)
        torch.ops.aten._softmax.out(zt, -1, False, out=p)
        grad, direct = None, False
        if self.want_grad:
            # fp32 gradient rows that are consecutive are written in place; others go through a buffer
            direct = isinstance(block, slice) and self.grad.dtype == self.dtype
            grad = self.grad[block] if direct else grad_buf
        chunk = Chunk(zs, zt, q, p, grad, self.scale, scratch, dot_buf, floored)
        loss[block] = self.kernel(chunk, **self.hyper)
        if floored and grad is not None:
            # The kernel differentiated with respect to the floored log-probabilities as if they were free logits.
            # A floored entry is a constant, and the others are z - logsumexp(z) with the floored tokens out of
            # the sum: chain rule, grad_w = g_w - q_w * sum_{u not floored} g_u = g_w + q_w * sum_{v floored} g_v
            # (g sums to 0 over the row), and 0 at the floored tokens.
            floor = torch.isneginf(self.student[block]).to(self.dtype)
            torch.addcmul(grad, q, chunk.dot(grad, floor).unsqueeze(-1), out=grad)
            grad.mul_(floor.sub_(1).neg_())
        if grad is not None and not direct:
            if isinstance(block, slice):
                self.grad[block] = grad
            else:
                self.grad.index_copy_(0, block, grad.to(self.grad.dtype))


def _check_rows(student, teacher, rows):
    """ValueError for NaN / +inf, or all -inf, among the given rows of either logits."""
    for name, x in (("student_logits", student), ("teacher_logits", teacher)):
        m = x.index_select(0, rows).amax(-1)
        if bool((torch.isnan(m) | (m == math.inf)).any()):
            raise ValueError(f"{name} contains NaN or +inf")
        if bool((m == -math.inf).any()):
            raise ValueError(f"{name} has a counted token whose logits are all -inf")


def _chunked_pass(student, teacher, counted, kernel, hyper, temperature, chunk_rows, want_grad, scale):
    """Per-row loss [N] (compute dtype, 0 where not counted) and, if `want_grad`, the gradient [N, V] (student's
    dtype) times `scale`, one block of rows at a time. Raises ValueError on NaN/+inf or all -inf counted rows."""
    n_rows = student.shape[0]
    rows = None
    if counted is not None and not bool(counted.all()):
        rows = counted.nonzero().squeeze(1)
    n_work = n_rows if rows is None else rows.numel()
    engine = _Engine(student, teacher, kernel, hyper, temperature, chunk_rows, n_work, want_grad, scale)
    dtype = engine.dtype
    loss = torch.zeros(n_rows, dtype=dtype, device=student.device)
    if engine.grad is not None and rows is not None:
        engine.grad.index_fill_(0, (~counted).nonzero().squeeze(1), 0)
    engine.run(_row_blocks(n_rows, rows, chunk_rows), loss)

    # rows whose fast-path loss is not finite hold a -inf logit, or a probability that underflows where a kernel
    # divides by it: compute them again on the floored path, where kernels do neither
    # (NaN, +inf or all -inf in a row make its softmax NaN, and so its loss: those rows are checked here, once)
    bad = ~torch.isfinite(loss)
    if bool(bad.any()):
        bad_rows = bad.nonzero().squeeze(1)
        _check_rows(student, teacher, bad_rows)
        engine.run(_row_blocks(n_rows, bad_rows, chunk_rows), loss, floored=True)
    return loss, engine.grad


class _ChunkedRowLoss(torch.autograd.Function):
    """The reduced loss ([] for "mean"/"sum", [N] for "none") of a row kernel over logits [N, V]; gradient with
    respect to the student only."""

    @staticmethod
    def forward(ctx, student, teacher, counted, kernel, hyper, temperature, chunk_rows, reduction):
        want_grad = ctx.needs_input_grad[0]
        n_counted = student.shape[0] if counted is None else int(counted.sum())
        # the gradient of the reduced loss, already weighted, so that a plain loss.backward() only hands it on
        weight = 1.0 / max(n_counted, 1) if reduction == "mean" else 1.0
        scale = weight / temperature
        loss, grad = _chunked_pass(student, teacher, counted, kernel, hyper, temperature, chunk_rows, want_grad, scale)
        # The gradient is kept as an attribute, not through save_for_backward, so that backward can hand it on (or
        # scale it in place): no second [N, V] tensor. A further backward (retain_graph=True) recomputes it.
        ctx.grad = grad
        ctx.save_for_backward(student, teacher, counted)
        ctx.args = (kernel, hyper, temperature, chunk_rows, scale, reduction)
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
        kernel, hyper, temperature, chunk_rows, scale, reduction = ctx.args
        if grad is None:
            student, teacher, counted = ctx.saved_tensors
            _, grad = _chunked_pass(student, teacher, counted, kernel, hyper, temperature, chunk_rows, True, scale)
        if reduction == "none":
            grad.mul_(grad_out.to(grad.dtype).unsqueeze(-1))
        elif grad_out.device.type != "cpu" or float(grad_out) != 1.0:
            # on CUDA, multiply rather than read grad_out back to the host
            grad.mul_(grad_out.to(grad.dtype))
        return grad, None, None, None, None, None, None, None


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
    out = _ChunkedRowLoss.apply(student, teacher, counted, kernel, hyper, temperature, chunk_rows, reduction)
    return out.reshape(batch_shape) if reduction == "none" else out
