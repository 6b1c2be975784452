"""The chunked engine (kdiv.core.engine.chunked) and its row kernels against the plain versions, chunk by chunk.

The plain versions are kdiv.testing.plain: every divergence written the usual way, with [N, V] temporaries and autograd.
The chunked kernels must give the same values and gradients over shapes, dtypes, masks, -inf logits, temperatures
and chunk sizes; keep nothing of size [N, V] beyond the gradient; and AKL's fast head threshold must be exactly
kdiv.core.headtail.head_threshold.
"""

from __future__ import annotations

import math

import kdiv
import numpy as np
import pytest
import torch
from cases import DEFAULT_CASES, HYPER_CASES, NAMES
from kdiv.core import head_selection as D
from kdiv.core.engine import chunked
from kdiv.core.headtail import head_threshold
from kdiv.testing import plain

# default hyper-parameters, and the spec's example values, which take the other code paths (a mixture weight near
# 1, the endpoints)
HYPER = DEFAULT_CASES + HYPER_CASES
TOL = {  # (rtol, atol) for values and for gradients, by input dtype
    torch.float64: ((1e-10, 1e-12), (1e-9, 1e-12)),
    torch.float32: ((2e-5, 2e-6), (2e-4, 2e-7)),
    torch.bfloat16: ((2e-5, 2e-6), (2e-2, 1e-4)),  # gradient rounded to bf16
}


def _inputs(shape, dtype, *, seed=0, scale=3.0, neg_inf=False):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    t = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    if neg_inf:  # tokens outside one model's vocabulary, or both
        s2, t2 = s.view(-1, shape[-1]), t.view(-1, shape[-1])
        s2[0, :3] = -math.inf
        t2[1, 1:4] = -math.inf
        s2[2, 5], t2[2, 5] = -math.inf, -math.inf
    return s, t


def _value_and_grad(fn, s, t, weights, **kwargs):
    x = s.clone().requires_grad_()
    out = fn(x, t, reduction="none", **kwargs)
    (out * weights.to(out.dtype)).sum().backward()
    return out.detach().double(), x.grad.double()


@pytest.mark.parametrize("name, hyper", HYPER)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_matches_plain(name, hyper, dtype):
    shape = (3, 5, 397)
    weights = torch.linspace(-1.0, 2.0, 15, dtype=torch.float64).reshape(3, 5)
    mask = torch.arange(15).reshape(3, 5) % 4 != 1
    (v_rtol, v_atol), (g_rtol, g_atol) = TOL[dtype]
    for neg_inf in (False, True):
        s, t = _inputs(shape, dtype, neg_inf=neg_inf)
        for temperature, m in ((1.0, None), (2.0, mask)):
            want_v, want_g = _value_and_grad(
                plain.DIVERGENCES[name], s, t, weights, temperature=temperature, mask=m, **hyper
            )
            for chunk_size in (1, 3, None):
                got_v, got_g = _value_and_grad(
                    kdiv.DIVERGENCES[name],
                    s,
                    t,
                    weights,
                    temperature=temperature,
                    mask=m,
                    chunk_size=chunk_size,
                    **hyper,
                )
                where = f"{name} {hyper} {dtype} -inf={neg_inf} T={temperature} chunk={chunk_size}"
                torch.testing.assert_close(got_v, want_v, rtol=v_rtol, atol=v_atol, msg=where)
                torch.testing.assert_close(got_g, want_g, rtol=g_rtol, atol=g_atol, msg=where)
                assert torch.isfinite(got_g).all(), where


@pytest.mark.parametrize("name", NAMES)
def test_extreme_logits_match_plain(name):
    # probabilities that underflow in float32: the mixture kernels divide by q on their fast path, and must hand
    # such rows to the floored path
    s, t = _inputs((6, 211), torch.float32, seed=3, scale=60.0)
    s[0, 7], t[1, 9] = 1e4, -1e4
    weights = torch.ones(6, dtype=torch.float64)
    want_v, want_g = _value_and_grad(plain.DIVERGENCES[name], s.double(), t.double(), weights)
    got_v, got_g = _value_and_grad(kdiv.DIVERGENCES[name], s, t, weights)
    # float32 against float64, with log-ratios of size ~100: errors of ~eps * 100
    torch.testing.assert_close(got_v, want_v, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got_g, want_g, rtol=1e-3, atol=5e-5)
    assert torch.isfinite(got_g).all()


def test_chunking_and_threads_do_not_change_results(monkeypatch):
    import threading

    from kdiv.core.engine import workers

    s, t = _inputs((37, 1000), torch.float32, seed=5)
    ran_on = []  # the thread that computed each block
    original = chunked._Engine.run_block

    def recording(self, *args, **kwargs):
        ran_on.append(threading.current_thread().name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(chunked._Engine, "run_block", recording)
    if workers.usable_cpus() < 2:
        pytest.skip("one usable CPU: the engine runs every block in the calling thread")
    before = torch.get_num_threads()
    try:
        for name in NAMES:
            runs = []
            for threads, chunk_size in ((1, None), (2, None), (2, 1), (2, 7)):
                torch.set_num_threads(threads)
                ran_on.clear()
                x = s.clone().requires_grad_()
                loss = kdiv.DIVERGENCES[name](x, t, chunk_size=chunk_size, reduction="sum")
                loss.backward()
                runs.append((loss.detach(), x.grad))
                pooled = sum(thread.startswith("kdiv") for thread in ran_on)
                if threads == 1:
                    assert pooled == 0, name  # one thread: no pool
                elif workers.pool() is not None and len(ran_on) > 1:
                    assert pooled == len(ran_on), (name, chunk_size, ran_on)  # every block on a pool worker
            for loss, grad in runs[1:]:
                torch.testing.assert_close(loss, runs[0][0], rtol=1e-6, atol=0, msg=name)
                torch.testing.assert_close(grad, runs[0][1], rtol=1e-6, atol=1e-9, msg=name)
    finally:
        torch.set_num_threads(before)
    assert workers.pool() is not None  # torch's OpenMP runtime was found: the pool is what ran the blocks above


def test_auto_chunk_rows():
    assert chunked.auto_chunk_rows(10_000, 32000) == max(1, chunked.CHUNK_ELEMENTS // 32000)
    assert chunked.auto_chunk_rows(3, 32000) <= 3
    assert chunked.auto_chunk_rows(10, 10**9) == 1
    # a GPU streams chunks through memory: much larger chunks, the host's per-op cost amortised
    assert chunked.auto_chunk_rows(10_000, 32000, "cuda") == chunked.CUDA_CHUNK_ELEMENTS // 32000
    assert chunked.CUDA_CHUNK_ELEMENTS >= 16 * chunked.CHUNK_ELEMENTS
    with pytest.raises(ValueError, match="chunk_size"):
        kdiv.forward_kl(torch.zeros(2, 3), torch.zeros(2, 3), chunk_size=0)


def test_gradient_is_handed_on_not_copied():
    s, t = _inputs((9, 300), torch.float32)
    for name in NAMES:
        x = s.clone().requires_grad_()
        seen = []
        x.register_hook(lambda g, seen=seen: seen.append(g.data_ptr()))
        kdiv.DIVERGENCES[name](x, t).backward()
        assert seen == [x.grad.data_ptr()], name  # the engine's gradient tensor became x.grad itself


def test_grad_output_scales_and_second_backward_accumulates():
    s, t = _inputs((4, 50), torch.float64)
    x = s.clone().requires_grad_()
    loss = kdiv.js(x, t)
    (3.0 * loss).backward(retain_graph=True)
    once = x.grad.clone()
    loss.backward()  # recomputes the gradient, which was handed on by the first backward
    torch.testing.assert_close(x.grad, once * (4.0 / 3.0))
    y = s.clone().requires_grad_()
    plain.js(y, t).backward()
    torch.testing.assert_close(once, 3.0 * y.grad)


def test_no_gradient_when_the_student_needs_none():
    s, t = _inputs((5, 80), torch.float32)
    for name in NAMES:
        out = kdiv.DIVERGENCES[name](s, t, reduction="none")
        assert not out.requires_grad
        torch.testing.assert_close(out, plain.DIVERGENCES[name](s, t, reduction="none"), rtol=2e-5, atol=2e-6)


def test_masked_rows_are_skipped():
    # rows the mask drops are never read: NaN there is no error, their loss and gradient are 0
    s, t = _inputs((8, 120), torch.float32)
    s[2], t[5, 3] = math.nan, math.nan
    mask = torch.tensor([True, False, False, True, True, False, True, True])
    for name in NAMES:
        x = s.clone().requires_grad_()
        out = kdiv.DIVERGENCES[name](x, t, mask=mask, reduction="none")
        out.sum().backward()
        assert (out[~mask] == 0).all() and (x.grad[~mask] == 0).all(), name
        want = plain.DIVERGENCES[name](s[mask], t[mask], reduction="none")
        torch.testing.assert_close(out[mask], want, rtol=2e-5, atol=2e-6)
    with pytest.raises(ValueError, match="student_logits contains NaN"):
        kdiv.forward_kl(s, t, mask=torch.ones(8, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------------------
# Memory: nothing of size [N, V] beyond the gradient
# ---------------------------------------------------------------------------------------------------------------


def _extra_peak_rss(fn):
    """Peak resident memory of fn() beyond the resident memory before it (Linux)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        base = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 - base


@pytest.fixture
def rss_probe():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    return _extra_peak_rss


@pytest.mark.divergences("chosen", reason="a memory probe per divergence costs seconds: the kernels share the engine")
@pytest.mark.parametrize("name, dtype", [("js", torch.float32), ("akl", torch.float32), ("forward_kl", torch.bfloat16)])
def test_extra_memory_is_one_gradient(rss_probe, name, dtype):
    n, vocab = 768, 32000  # 98 MB of fp32 logits: large against the chunk buffers (~10 MB per worker)
    g = torch.Generator().manual_seed(1)
    s, t = (torch.randn(n, vocab, generator=g).mul_(4.0).to(dtype) for _ in range(2))
    grad_bytes = n * vocab * s.element_size()
    fp32_bytes = n * vocab * 4
    x = s.clone().requires_grad_()

    def step():
        kdiv.DIVERGENCES[name](x, t).backward()

    step()  # first call: worker threads and their stacks
    x.grad = None
    extra = rss_probe(step)
    # one gradient, plus chunk buffers; a second [N, V] tensor (or an fp32 copy of bf16 logits) would add >= 0.5
    assert extra < grad_bytes + 0.35 * fp32_bytes, (extra / 2**20, grad_bytes / 2**20)
    x.grad = None
    # without a gradient, nothing of size [N, V] at all
    assert rss_probe(lambda: kdiv.DIVERGENCES[name](s, t)) < 0.35 * fp32_bytes


# ---------------------------------------------------------------------------------------------------------------
# AKL's head threshold without a full sort
# ---------------------------------------------------------------------------------------------------------------


def _teachers(vocab, dtype, rng):
    """Teacher probabilities [rows, V] of many kinds: random, tied, flat, peaked, Zipf, exact dyadic masses,
    a tie group straddling mu, underflow, -inf tokens."""
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    out = []
    for scale in (0.1, 1.0, 2.0, 4.0, 10.0):  # head of ~V/2 tokens down to one
        out.append(torch.softmax(scale * torch.randn(4, vocab, generator=g, dtype=dtype), -1))
    out.append(torch.softmax(torch.randint(0, 4, (4, vocab), generator=g).to(dtype), -1))  # few values, big ties
    out.append(torch.softmax(0.25 * torch.randint(0, 40, (4, vocab), generator=g).to(dtype), -1))
    out.append(torch.full((2, vocab), 1.0 / vocab, dtype=dtype))  # flat: one tie group
    z = torch.randn(4, vocab, generator=g, dtype=dtype)
    z[:, :3] += torch.tensor([12.0, 11.0, 10.0], dtype=dtype)
    out.append(torch.softmax(z, -1))  # peaked
    zipf = -1.1 * torch.log(torch.arange(1, vocab + 1, dtype=dtype))
    out.append(torch.softmax(zipf + 0.05 * torch.randn(4, vocab, generator=g, dtype=dtype), -1))
    dyadic = torch.zeros(2, vocab, dtype=dtype)
    dyadic[:, :10] = torch.tensor([2.0 ** -(i + 1) for i in range(10)], dtype=dtype)
    dyadic[:, 10:] = (1 - dyadic[:, :10].sum(-1, keepdim=True)) / (vocab - 10)
    out.append(dyadic)  # cumulative masses exactly 1/2, 3/4, ...: ties with mu itself
    half = torch.zeros(2, vocab, dtype=dtype)
    half[:, : vocab // 2] = 1.0 / (vocab // 2)
    out.append(half)
    z = 3 * torch.randn(4, vocab, generator=g, dtype=dtype)
    z[:, ::3] = -1e4  # probabilities 0
    out.append(torch.softmax(z, -1))
    z[:, 1::3] = -math.inf
    out.append(torch.softmax(z, -1))
    return torch.cat(out)


@pytest.mark.parametrize("vocab", [50, 129, 1000, 5000, 32000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_head_threshold_is_head_threshold(vocab, dtype):
    rng = np.random.default_rng(vocab)
    p = _teachers(vocab, dtype, rng)
    for mu in (0.05, 0.3, 0.5, 0.75, 0.9, 0.99):
        got = D.head_threshold_rows(p, mu, chunked.Scratch.like(p))
        assert torch.equal(got, head_threshold(p, mu)), (vocab, dtype, mu)


def test_large_head_path_is_taken_and_exact():
    # heads of hundreds to thousands of tokens go through the bisection and prefix sort, not a full sort
    g = torch.Generator().manual_seed(11)
    p = torch.softmax(2.0 * torch.randn(6, 20000, generator=g), -1)
    assert (head_threshold(p, 0.5).unsqueeze(-1) <= p).sum(-1).min() > D._TOP_K
    called = []
    original = D.head_threshold
    D.head_threshold = lambda *a: called.append(1) or original(*a)
    try:
        got = D.head_threshold_rows(p, 0.5, chunked.Scratch.like(p))
    finally:
        D.head_threshold = original
    assert not called  # no full sort
    assert torch.equal(got, head_threshold(p, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_candidate_selection_numpy_and_torch_agree(dtype):
    # the CPU route (numpy) and the other devices' route (torch) give the same sorted candidates, or both refuse
    g = torch.Generator().manual_seed(12)
    p = torch.softmax(2.0 * torch.randn(5, 3000, generator=g, dtype=dtype), -1)
    p[1, :7] = p[1, 7]  # ties
    for q in (0.5, 0.9, 0.999):
        cutoff = p.quantile(q, dim=-1)
        for max_width in (3000, 100):
            a = D._sorted_candidates_numpy(p, cutoff, max_width)
            b = D._sorted_candidates(p, cutoff, max_width)
            assert (a is None) == (b is None)
            if a is not None:
                assert a.dtype == dtype and torch.equal(a, b)


def test_akl_weights_match_headtail():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, 7, 500, generator=g), 3 * torch.randn(3, 7, 500, generator=g)
    logq, logp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    w_head, w_tail = D.akl_weights(logq, logp, 0.5)
    g_head, g_tail = kdiv.core.headtail.head_tail_error(logq.exp(), logp.exp(), 0.5)
    torch.testing.assert_close(w_head, g_head / (g_head + g_tail))
    torch.testing.assert_close(w_head + w_tail, torch.ones_like(w_head))
