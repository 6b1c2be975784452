"""The chunked engine on real call patterns: its CPU worker pool, grad mode off, shifted (row-strided) logits,
torch.compile and torch.func, and CUDA (values, gradients, memory, no host sync inside the chunk loop).

Values and gradients are held against the plain autograd versions (kdiv.testing.plain); memory against the size
of one logits tensor, with the Linux peak-RSS probe of tests/test_chunked.py.
"""

from __future__ import annotations

import threading
import time
import warnings

import kdiv
import pytest
import torch
from cases import NAMES
from kdiv.core.engine import chunked, workers
from kdiv.testing import plain
from test_chunked import rss_probe  # noqa: F401  (a fixture)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _logits(shape, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(shape, generator=g)).to(device), (3 * torch.randn(shape, generator=g)).to(device)


# ---------------------------------------------------------------------------------------------------------------
# The worker pool
# ---------------------------------------------------------------------------------------------------------------


def test_pool_starts_once_when_two_threads_ask_at_once(monkeypatch):
    monkeypatch.setattr(workers, "_executor", None)
    monkeypatch.setattr(workers, "_usable", None)
    built = []
    original = workers.ThreadPoolExecutor

    class Slow(original):
        def __init__(self, *args, **kwargs):
            built.append(self)
            time.sleep(0.05)  # widen the window in which a second caller could start another pool
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(workers, "ThreadPoolExecutor", Slow)
    barrier, got = threading.Barrier(2), []

    def ask():
        barrier.wait()
        got.append(workers.pool())

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(built) <= 1 and got[0] is got[1]
    finally:
        for pool in built:
            pool.shutdown(wait=False)


def test_pool_is_sized_from_the_cpus_this_process_may_use(monkeypatch):
    if not hasattr(workers.os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 64)
    assert workers.usable_cpus() == 1
    assert workers.n_workers() == 1  # whatever torch's thread count says
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: set(range(64)))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert workers.n_workers() == 3  # torch's thread count decides within the affinity
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------------
# Grad mode off: the loss only
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_no_gradient_is_computed_with_grad_mode_off(name, monkeypatch):
    s, t = _logits((6, 300))
    x = s.clone().requires_grad_()
    want = plain.DIVERGENCES[name](s, t)
    asked = []
    original = chunked._chunked_pass
    monkeypatch.setattr(chunked, "_chunked_pass", lambda *a: asked.append(a[-2]) or original(*a))
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            out = kdiv.DIVERGENCES[name](x, t)
        assert not out.requires_grad
        torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-6)
    assert asked == [False, False]  # want_grad
    assert x.grad is None


def test_no_gradient_memory_with_grad_mode_off(rss_probe):  # noqa: F811
    n, vocab = 768, 32000
    s, t = _logits((n, vocab), seed=1)
    x = s.requires_grad_()
    kdiv.js(x.detach(), t)  # first call: worker threads and their stacks
    with torch.no_grad():
        extra = rss_probe(lambda: kdiv.js(x, t))
    assert extra < 0.35 * n * vocab * 4, extra / 2**20


# ---------------------------------------------------------------------------------------------------------------
# Shifted logits: row-strided views read in place, the base given the gradient
# ---------------------------------------------------------------------------------------------------------------


def _shift_cases():
    """(label, make) with make(base) -> the student view of a [B, T, V] base."""
    return [
        ("shift", lambda b: b[:, :-1]),
        ("every other position", lambda b: b[:, ::2]),
        ("time-major", lambda b: b.transpose(0, 1)),
        ("a small part of the base", lambda b: b[:, :2]),
        ("one position", lambda b: b[:, 3]),
    ]


@pytest.mark.parametrize("name", NAMES)
def test_shifted_logits_match_plain(name):
    s, t = _logits((3, 7, 130), seed=2)
    mask = torch.arange(3 * 7).reshape(3, 7) % 5 != 2
    for label, view in _shift_cases():
        for m, chunk_size in ((None, None), (mask, 4)):
            # against float64: the plain float32 versions are themselves off by a few 1e-7
            base, want_base = s.clone().requires_grad_(), s.double().requires_grad_()
            mv = None if m is None else view(m)
            out = kdiv.DIVERGENCES[name](view(base), view(t), mask=mv, reduction="none", chunk_size=chunk_size)
            want = plain.DIVERGENCES[name](view(want_base), view(t).double(), mask=mv, reduction="none")
            (out * torch.linspace(0.5, 2.0, out.numel()).reshape(out.shape)).sum().backward()
            (want * torch.linspace(0.5, 2.0, want.numel()).reshape(want.shape)).sum().backward()
            where = f"{name} {label} mask={m is not None} chunk={chunk_size}"
            torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-7, msg=where)
            torch.testing.assert_close(base.grad.double(), want_base.grad, rtol=1e-5, atol=2e-7, msg=where)


def test_shifted_logits_are_read_in_place(monkeypatch):
    s, t = _logits((2, 9, 64), seed=3)
    base = s.clone().requires_grad_()
    copies = []
    original = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous", lambda self, *a, **k: copies.append(1) or original(self, *a, **k))
    kdiv.forward_kl(base[:, :-1], t[:, 1:], chunk_size=3).backward()
    assert not copies
    # the gradient of the base is the engine's own tensor (no copy through the slice), 0 at the dropped position
    assert (base.grad[:, -1] == 0).all()


def _buffer_bytes():
    return workers.n_workers() * (chunked._FIXED_BUFFERS + chunked.MAX_SCRATCH) * chunked.CHUNK_ELEMENTS * 4


@pytest.mark.divergences("chosen", reason="a memory probe per divergence costs seconds: the kernels share the engine")
@pytest.mark.parametrize("name", ["js"])
def test_shifted_logits_extra_memory(rss_probe, name):  # noqa: F811
    b, T, vocab = 4, 193, 32000  # 98 MB of fp32 logits
    s, t = _logits((b, T, vocab), seed=4)
    view_bytes = b * (T - 1) * vocab * 4
    base = s.clone().requires_grad_()

    def step():
        kdiv.DIVERGENCES[name](base[:, :-1], t[:, :-1]).backward()

    step()  # first call: worker threads and their stacks
    base.grad = None
    slack = 8 * 2**20
    # one gradient (of the base: T / (T - 1) of the view), chunk buffers; a copy of either input would add 1.0
    extra = rss_probe(step)
    assert extra < 1.1 * view_bytes + _buffer_bytes() + slack, (extra / view_bytes, _buffer_bytes() / view_bytes)
    base.grad = None
    extra = rss_probe(lambda: kdiv.DIVERGENCES[name](s[:, :-1], t[:, :-1]))
    assert extra < _buffer_bytes() + slack, extra / view_bytes


# ---------------------------------------------------------------------------------------------------------------
# torch.compile, torch.func
# ---------------------------------------------------------------------------------------------------------------


def test_a_compiled_training_step_runs_without_warnings():
    # kdiv is a graph break (torch.compiler.disable on the engine's entry): the model around it is compiled
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 50)
    x, teacher = torch.randn(2, 5, 16), torch.randn(2, 5, 50)

    def step(x):
        logits = model(x)
        loss = kdiv.js(logits[:, :-1], teacher[:, :-1])
        loss.backward()
        return loss.detach()

    eager = step(x)
    grad = model.weight.grad.clone()
    model.zero_grad()
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(step, backend="aot_eager")
        for _ in range(3):
            model.zero_grad()
            got = compiled(x)
    torch._dynamo.reset()
    assert not [str(w.message) for w in caught]
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(model.weight.grad, grad)


def test_torch_func_transforms_get_a_clear_error():
    s, t = _logits((3, 20))
    for transform in (torch.func.grad, torch.func.vmap):
        with pytest.raises(RuntimeError, match="torch.func"):
            transform(lambda x: kdiv.forward_kl(x, t))(s)


# ---------------------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------------------


@cuda
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_plain(name):
    s, t = _logits((4, 9, 5003), seed=5)
    s[0, 0, :4] = -float("inf")  # the floored path too
    for dtype in (torch.float32, torch.bfloat16):
        sc, tc = s.cuda().to(dtype), t.cuda().to(dtype)
        x, y = sc[:, :-1].detach().requires_grad_(), s[:, :-1].to(dtype).double().requires_grad_()
        out = kdiv.DIVERGENCES[name](x, tc[:, :-1], reduction="none")
        want = plain.DIVERGENCES[name](y, t[:, :-1].to(dtype).double(), reduction="none")
        out.sum().backward()
        want.sum().backward()
        g_tol = (2e-5, 1e-7) if dtype == torch.float32 else (2e-2, 1e-4)
        torch.testing.assert_close(out.cpu().double(), want, rtol=1e-5, atol=1e-7, msg=f"{name} {dtype}")
        torch.testing.assert_close(x.grad.cpu().double(), y.grad, rtol=g_tol[0], atol=g_tol[1], msg=name)


@cuda
@pytest.mark.parametrize("name", NAMES)
def test_cuda_chunk_loop_never_syncs(name, monkeypatch):
    # the per-chunk work (and AKL's head threshold) must queue on the stream without reading anything back to the
    # host; the few syncs of a call (mask, the non-finite check after the loop) are outside it
    s, t = _logits((256, 32000), seed=6, device="cuda")
    original = chunked._Engine.run

    def run_without_sync(self, blocks, loss, floored=False):
        blocks = list(blocks)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            original(self, blocks, loss, floored)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(chunked._Engine, "run", run_without_sync)
    for chunk_size in (None, 16):
        x = s.clone().requires_grad_()
        kdiv.DIVERGENCES[name](x, t, chunk_size=chunk_size).backward()
    assert torch.isfinite(x.grad).all()


@cuda
def test_cuda_shifted_memory_is_one_gradient():
    b, T, vocab = 4, 257, 32000
    s, t = _logits((b, T, vocab), seed=7, device="cuda")
    base = s.clone().requires_grad_()
    view_bytes = b * (T - 1) * vocab * 4
    rows = chunked.auto_chunk_rows(b * (T - 1), vocab, "cuda")
    buffers = (chunked._FIXED_BUFFERS + chunked.MAX_SCRATCH) * rows * vocab * 4
    for name in ("forward_kl", "akl"):
        base.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        kdiv.DIVERGENCES[name](base[:, :-1], t[:, :-1]).backward()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        # AKL's sort on CUDA takes about 3 more chunk-sized tensors (values, int64 indices)
        assert extra < 1.1 * view_bytes + 2 * buffers, (name, extra / view_bytes)
