"""The native backend (kdiv.set_backend("native"): the fused C++ row kernel) against float64 and the eager engine.

The native kernel is a second implementation of the engine's fast path, so it is held to what the eager engine is
held to: values and student gradients within 1e-5 relative of float64 on float32 inputs (tests/reference.py and the
plain autograd versions in float64), over offsets between the models, temperatures, masks, shifted views, bf16 and
rows with -inf logits (which it hands to the eager floored path). The whole of tests/test_accuracy.py and the
engine's other tests also run under KDIV_BACKEND=native in `make unit`. Divergences and dtypes it does not cover
(float16, float64) must run eagerly, unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import kdiv
import numpy as np
import pytest
import reference
import torch
from cases import DEFAULT_CASES, HYPER_CASES, NAMES
from kdiv.core import head_selection, kernels
from kdiv.core.engine import chunked, native
from kdiv.core.headtail import head_threshold
from kdiv.testing import plain
from test_chunked import _teachers

try:
    kdiv.native_build()
except RuntimeError as e:  # no C++ compiler here: the eager backend is all there is (make unit says so too)
    pytest.skip(f"the native backend cannot be built here: {e}", allow_module_level=True)

RTOL, ATOL, GRAD_ATOL = 1e-5, 1e-7, 2e-7
COVERED = {"forward_kl", "reverse_kl", "symmetric_kl", "js", "tvd", "skew_kl", "skew_reverse_kl", "akl"}


@pytest.fixture(autouse=True)
def native_backend():
    with kdiv.backend("native"):
        yield


@pytest.fixture
def calls(monkeypatch):
    """How many blocks the native kernel computed."""
    count = [0]
    run = native.NativeKernel.run

    def counted(self, *args):
        count[0] += 1
        return run(self, *args)

    monkeypatch.setattr(native.NativeKernel, "run", counted)
    return count


def _pair(shape, seed=0, offset=30.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    t = torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + 0.5 * s
    return (s - offset).float(), (t + offset).float()


def _value_and_grad(name, s, t, **kw):
    x = s.clone().requires_grad_()
    loss = kdiv.get(name)(x, t, reduction="none", **kw)
    loss.sum().backward()
    return loss.detach(), x.grad


def _eager(name, s, t, **kw):
    with kdiv.backend("eager"):
        return _value_and_grad(name, s, t, **kw)


def _close_to_float64(got, grad, want, want_grad):
    """float32 results within the engine's float32 tolerance of float64 ones (of the same float32 inputs)."""
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(grad.double().numpy(), want_grad.numpy(), rtol=RTOL, atol=GRAD_ATOL)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name, hyper", DEFAULT_CASES + HYPER_CASES)
def test_matches_float64_and_eager(name, hyper, temperature, calls):
    s, t = _pair((3, 5, 1271))
    kw = dict(hyper, temperature=temperature)
    got, grad = _value_and_grad(name, s, t, **kw)
    want = reference.DIVERGENCES[name](s.double().numpy(), t.double().numpy(), **kw)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=RTOL, atol=ATOL)
    xd = s.double().requires_grad_()
    plain.DIVERGENCES[name](xd, t.double(), reduction="sum", **kw).backward()
    np.testing.assert_allclose(grad.double().numpy(), xd.grad.numpy(), rtol=RTOL, atol=GRAD_ATOL)
    # the native kernel ran where it covers the divergence (skew divergences at alpha = 1 are 0: eager)
    covered = name in COVERED and hyper.get("alpha") != 1.0
    assert (calls[0] > 0) == covered


@pytest.mark.parametrize("name, hyper", DEFAULT_CASES + HYPER_CASES)
def test_identical_models_give_exactly_zero(name, hyper):
    """D(x, x) = 0 and its gradient 0 exactly, as on the eager engine: q - p is formed so that it is 0 where the rows
    are equal (not the rounding of p), and the mixtures' log u is log(1 + 0)."""
    x = torch.randn(6, 3001, generator=torch.Generator().manual_seed(4)) * 4
    loss, grad = _value_and_grad(name, x, x, **hyper)
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("vocab", [1, 2, 7, 1023, 1024, 1025, 3001])
@pytest.mark.divergences("chosen", reason="vocabulary sizes around the kernel's block of 1024 and its SIMD width")
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "js", "tvd", "skew_reverse_kl"])
def test_vocabulary_sizes(name, vocab):
    s, t = _pair((4, vocab), seed=vocab)
    _close_to_float64(*_value_and_grad(name, s, t), *_eager(name, s.double(), t.double()))


@pytest.mark.parametrize("name", NAMES)
def test_layouts_masks_and_chunks(name):
    """The causal shift of a 3-D tensor (row-strided, read in place), a mask whose rows are not consecutive (gathered
    blocks), chunks of one and of three rows (straddling the shifted view's segments), a broadcast teacher."""
    base_s, base_t = _pair((3, 9, 300), seed=1)
    mask = torch.rand(3, 8, generator=torch.Generator().manual_seed(2)) > 0.4
    for chunk_size in (None, 1, 3):
        for m in (None, mask):
            outs = []
            for b, dtype in (("native", torch.float32), ("eager", torch.float64)):
                with kdiv.backend(b):
                    x = base_s.to(dtype).clone().requires_grad_()
                    loss = kdiv.get(name)(x[:, :-1], base_t.to(dtype)[:, :-1], mask=m, chunk_size=chunk_size)
                    loss.backward()
                    outs.append((loss.detach(), x.grad))
            _close_to_float64(*outs[0], *outs[1])
    teacher = base_t[0, :1].expand(5, 300)  # row stride 0
    s = base_s[0, :5]
    _close_to_float64(*_value_and_grad(name, s, teacher), *_eager(name, s.double(), teacher.double()))


@pytest.mark.parametrize("dtypes", [("bf16", "f32"), ("f32", "bf16"), ("bf16", "bf16")])
@pytest.mark.divergences("chosen", reason="bf16 loads and the bf16 gradient are the same for every kind")
@pytest.mark.parametrize("name", ["forward_kl", "symmetric_kl", "js", "skew_kl"])
def test_bfloat16(name, dtypes, calls):
    s, t = _pair((6, 2000), seed=3)
    cast = {"bf16": torch.bfloat16, "f32": torch.float32}
    s, t = s.to(cast[dtypes[0]]), t.to(cast[dtypes[1]])
    got, grad = _value_and_grad(name, s, t)
    assert calls[0] > 0 and grad.dtype == s.dtype
    e_loss, e_grad = _eager(name, s, t)
    torch.testing.assert_close(got, e_loss, rtol=RTOL, atol=ATOL)
    # the same float32 gradient, rounded to bf16 once: at most one bf16 ulp apart
    torch.testing.assert_close(grad.float(), e_grad.float(), rtol=2**-7, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_dtypes_run_eagerly(dtype, calls):
    s, t = _pair((4, 500), seed=4)
    got, grad = _value_and_grad("reverse_kl", s.to(dtype), t.to(dtype))
    assert calls[0] == 0
    e_loss, e_grad = _eager("reverse_kl", s.to(dtype), t.to(dtype))
    assert torch.equal(got, e_loss) and torch.equal(grad, e_grad)


@pytest.mark.parametrize("name", NAMES)
def test_rows_with_inf_logits_go_to_the_floored_path(name):
    """-inf logits (a masked token, a top-k teacher) and logits of magnitude 1e30: the kernel hands those rows back
    as NaN and the eager floored path computes them; the result is the eager engine's."""
    s, t = _pair((6, 400), seed=5)
    s[1, :7] = -torch.inf
    t[2, 30:] = -torch.inf  # a top-k teacher padded with -inf (93 %): a warning for the reverse-KL terms
    t[3, 5] = -torch.inf
    s[4] *= 1e28
    t[5] += 1e30  # (in float32 the row collapses to a few distinct values: ulp(1e30) = 7e22)
    warnings_ok = pytest.warns(kdiv.KdivWarning) if name in ("reverse_kl", "symmetric_kl", "akl") else _nothing()
    with warnings_ok:
        got, grad = _value_and_grad(name, s, t)
    with warnings_ok:
        e_loss, e_grad = _eager(name, s, t)
    assert torch.isfinite(got).all() and (got >= 0).all() and torch.isfinite(grad).all()
    # the floored rows are the eager engine's own computation; the others within float32 of it
    torch.testing.assert_close(got, e_loss, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad, e_grad, rtol=1e-4, atol=1e-6)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.divergences("chosen", reason="one kind with a mixture pass, and AKL, whose head is found first")
@pytest.mark.parametrize("name", ["js", "akl"])
def test_nan_logits_raise(name):
    s, t = _pair((3, 100))
    s[1, 3] = torch.nan
    with pytest.raises(ValueError, match="student_logits contains NaN"):
        kdiv.get(name)(s, t)
    s, t = _pair((3, 100))
    t[2, 3] = torch.nan
    with pytest.raises(ValueError, match="teacher_logits contains NaN"):
        kdiv.get(name)(s, t)


def test_no_grad_computes_the_loss_only(calls):
    s, t = _pair((8, 3000), seed=6)
    x = s.clone().requires_grad_()
    with torch.no_grad():
        loss = kdiv.skew_kl(x, t)
    assert calls[0] > 0 and loss.grad_fn is None and x.grad is None
    torch.testing.assert_close(loss, kdiv.skew_kl(s, t), rtol=RTOL, atol=ATOL)


def test_concurrent_callers():
    """Threads calling at once (each call then shares its blocks out to the worker threads): the same results."""
    s, t = _pair((64, 2000), seed=7)
    want = _value_and_grad("js", s, t)
    results = [None] * 4

    def work(i):
        with kdiv.backend("native"):
            results[i] = _value_and_grad("js", s, t)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for r in results:
        assert torch.equal(r[0], want[0]) and torch.equal(r[1], want[1])


# ---------------------------------------------------------------------------------------------------------------
# Choosing the backend
# ---------------------------------------------------------------------------------------------------------------


def test_backend_blocks_nest_and_are_per_thread():
    assert kdiv.get_backend() == "native"
    with kdiv.backend("eager"):
        assert kdiv.get_backend() == "eager"
        seen = []
        th = threading.Thread(target=lambda: seen.append(kdiv.get_backend()))
        th.start()
        th.join()
        assert seen == [native._default or os.environ.get("KDIV_BACKEND") or "eager"]
    assert kdiv.get_backend() == "native"


def test_bad_backend_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        kdiv.set_backend("cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        with kdiv.backend("fast"):
            pass


def _python(code, **env):
    full = {k: v for k, v in os.environ.items() if k != "KDIV_BACKEND"}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def test_without_a_compiler(tmp_path):
    """set_backend("native") raises, saying what is missing; KDIV_BACKEND=native warns and runs eagerly."""
    code = "import kdiv\ntry:\n    kdiv.set_backend('native')\nexcept RuntimeError as e:\n    print('raised:', e)"
    done = _python(code, CXX="no-such-compiler", KDIV_CACHE_DIR=str(tmp_path))
    assert "raised: kdiv's native backend needs a C++ compiler" in done.stdout, done.stderr
    code = (
        "import warnings, torch, kdiv\nwarnings.simplefilter('always')\n"
        "print(float(kdiv.forward_kl(torch.zeros(2, 5), torch.ones(2, 5))), kdiv.get_backend())"
    )
    done = _python(code, CXX="no-such-compiler", KDIV_BACKEND="native", KDIV_CACHE_DIR=str(tmp_path))
    assert done.stdout.split() == ["0.0", "eager"], done.stderr
    assert "KDIV_BACKEND=native, but the native kernel cannot be built" in done.stderr


def test_environment_variable_and_cache(tmp_path):
    """KDIV_BACKEND=native builds into KDIV_CACHE_DIR once; a second process loads the cached library."""
    code = (
        "import torch, kdiv\nfrom kdiv.core.engine import native\n"
        "x = torch.randn(3, 50)\nkdiv.js(x, x.flip(0))\n"
        "print(kdiv.get_backend(), native.native_build().parent, native.native_build.seconds is not None)"
    )
    first = _python(code, KDIV_BACKEND="native", KDIV_CACHE_DIR=str(tmp_path))
    assert first.stdout.split() == ["native", str(tmp_path), "True"], first.stderr
    second = _python(code, KDIV_BACKEND="native", KDIV_CACHE_DIR=str(tmp_path))
    assert second.stdout.split() == ["native", str(tmp_path), "False"], second.stderr
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]  # no temporary file left behind
    bad = _python(code, KDIV_BACKEND="fastest")
    assert "KDIV_BACKEND must be one of" in bad.stderr


def test_kernel_benchmark_builds_and_runs():
    """bench/native_kernel.py (the kernel alone, against a git revision of itself) at a toy size: it builds its
    driver with the backend's flags and times every kind."""
    script = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "native_kernel.py")
    done = subprocess.run(
        [sys.executable, script, "--shapes", "2x1031", "--rounds", "1"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    kinds = ["forward_kl", "reverse_kl", "symmetric_kl", "js", "tvd", "skew_kl", "skew_reverse_kl"]
    rows = [words for words in map(str.split, done.stdout.splitlines()) if words and words[0] in kinds]
    assert [r[0] for r in rows] == kinds
    assert all(float(r[1]) > 0 for r in rows)


@pytest.mark.parametrize("vocab", [129, 1000, 5000, 32000])
def test_native_head_threshold_is_head_threshold(vocab):
    """AKL's head threshold with the native kernel's bisection, selection, sort and prefix sums: exactly
    kdiv.core.headtail.head_threshold (same ties, same float arithmetic) on teachers of every kind."""
    kernel = native.native_kernel(kernels.akl_rows, {"mu": 0.5}, (torch.float32,) * 2, torch.device("cpu"), 1.0, None)
    p = _teachers(vocab, torch.float32, np.random.default_rng(vocab))
    large = 0
    for mu in (0.05, 0.3, 0.5, 0.75, 0.9, 0.99):
        got = head_selection.head_threshold_rows(p, mu, chunked.Scratch.like(p), kernel)
        assert torch.equal(got, head_threshold(p, mu)), (vocab, mu)
        large += int(((head_threshold(p, mu).unsqueeze(-1) <= p).sum(-1) > head_selection._TOP_K).sum())
    assert large > 0  # the large-head path (the native part) was taken


@pytest.mark.parametrize("vocab", [32000, 128256])
def test_native_head_threshold_on_flat_teachers(vocab):
    """Heads of thousands to tens of thousands of tokens (std-1 and std-0.5 Gaussian logits, and the same with
    probabilities rounded to few values: long tie groups), which the kernel sorts by radix: still exactly
    head_threshold."""
    kernel = native.native_kernel(kernels.akl_rows, {"mu": 0.5}, (torch.float32,) * 2, torch.device("cpu"), 1.0, None)
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(4, vocab, generator=g) * torch.tensor([[1.0], [1.0], [0.5], [0.5]])
    p = torch.softmax(logits, dim=-1)
    tied = (p * 2**20).round() / 2**20  # a few hundred distinct values per row
    for rows in (p, tied / tied.sum(-1, keepdim=True)):
        for mu in (0.3, 0.5, 0.9):
            want = head_threshold(rows, mu)
            assert ((rows >= want.unsqueeze(-1)).sum(-1) > 1000).all()  # heads large enough for the radix sort
            got = head_selection.head_threshold_rows(rows, mu, chunked.Scratch.like(rows), kernel)
            assert torch.equal(got, want), (vocab, mu)
