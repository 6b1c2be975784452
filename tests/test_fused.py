"""kdiv.fused_linear against the plain path: logits = hidden @ weight.T (+ bias) in float64, then the divergence
written plainly with autograd (kdiv.testing.plain), values and every student gradient (hidden, weight, bias).

Over every divergence and its example hyper-parameters, float32 / bf16 / float64 inputs, masks whose counted rows
are not consecutive, temperatures, chunk sizes that leave a partial last chunk, a teacher whose hidden size differs
from the student's, with and without biases; and the bad inputs, each a ValueError naming the argument.
"""

from __future__ import annotations

import math

import kdiv
import pytest
import torch
from cases import DEFAULT_CASES, HYPER_CASES, NAMES
from kdiv.testing import plain
from torch.utils._python_dispatch import TorchDispatchMode

HS, HT, V = 16, 24, 97  # student and teacher hidden sizes differ
# max |got - want| / max |want|, for values and for gradients, by input dtype. bf16: the logits are formed in
# float32 from the bf16 values, so the values are float32-accurate; the gradients are rounded to bf16 once, at the
# end (bf16's unit roundoff 2**-8), never through bf16 logits.
TOL = {torch.float64: (1e-11, 1e-10), torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 2**-8)}


def _model(batch, h, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*batch, h, generator=g, dtype=torch.float64)
    weight = torch.randn(V, h, generator=g, dtype=torch.float64) * (3.0 / math.sqrt(h))  # logits of std ~3
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    cast = lambda x: None if x is None else x.to(dtype)
    return cast(hidden), cast(weight), cast(b)


def _leaves(*xs):
    return [None if x is None else x.detach().clone().requires_grad_() for x in xs]


def _plain_path(name, hyper, s, t, weights, **kw):
    """float64 value [...] and gradients (hidden, weight, bias) of sum(weights * per-token loss), plain autograd."""
    sh, sw, sb = _leaves(*(None if x is None else x.double() for x in s))
    th, tw, tb = (None if x is None else x.double() for x in t)
    zs = sh @ sw.T + (0 if sb is None else sb)
    zt = th @ tw.T + (0 if tb is None else tb)
    out = plain.DIVERGENCES[name](zs, zt, reduction="none", **kw, **hyper)
    (out * weights).sum().backward()
    return out.detach(), [None if x is None else x.grad for x in (sh, sw, sb)]


def _fused(name, hyper, s, t, weights, **kw):
    sh, sw, sb = _leaves(*s)
    th, tw, tb = t
    out = kdiv.fused_linear(name, sh, sw, th, tw, student_bias=sb, teacher_bias=tb, reduction="none", **kw, **hyper)
    (out * weights.to(out.dtype)).sum().backward()
    return out.detach(), [None if x is None else x.grad for x in (sh, sw, sb)]


def _rel_err(got, want):
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _assert_close(got, want, tol, what):
    assert got.shape == want.shape, what
    assert torch.isfinite(got).all(), what
    err = _rel_err(got, want)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name, hyper", DEFAULT_CASES + HYPER_CASES)
def test_matches_plain_path(name, hyper, dtype):
    batch = (3, 7)  # 21 rows, chunks of 4: a partial last chunk; the mask leaves non-consecutive rows
    bias = dtype != torch.bfloat16  # a student bias and no teacher bias, or the other way round
    s, t = _model(batch, HS, dtype, 0, bias), _model(batch, HT, dtype, 1, not bias)
    mask = torch.arange(21).reshape(batch) % 4 != 1
    weights = torch.linspace(-1.0, 2.0, 21, dtype=torch.float64).reshape(batch)  # backward with per-token weights
    kw = dict(temperature=1.7, mask=mask)
    want, want_grads = _plain_path(name, hyper, s, t, weights, **kw)
    got, got_grads = _fused(name, hyper, s, t, weights, chunk_size=4, **kw)
    v_tol, g_tol = TOL[dtype]
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _assert_close(got, want, v_tol, "value")
    assert (got[~mask] == 0).all()
    for what, g, w, x in zip(("hidden", "weight", "bias"), got_grads, want_grads, s, strict=True):
        if x is None:
            continue
        assert g.dtype == x.dtype, what
        _assert_close(g, w, g_tol, what)
    assert (got_grads[0][~mask] == 0).all()


def test_bf16_logits_are_not_rounded():
    # The usual bf16 path rounds the logits to bf16 before the divergence casts them up (Liger-Kernel issue #1432);
    # its gradients are off by more than bf16's own rounding, the fused path's by no more.
    s, t = _model((3, 7), HS, torch.bfloat16, 0), _model((3, 7), HT, torch.bfloat16, 1)
    weights = torch.ones(3, 7, dtype=torch.float64)
    _, want = _plain_path("js", {}, s, t, weights)
    _, fused = _fused("js", {}, s, t, weights)
    sh, sw, sb = _leaves(*s)
    kdiv.js(sh @ sw.T + sb, t[0] @ t[1].T + t[2], reduction="sum").backward()  # bf16 logits
    assert max(_rel_err(g, w) for g, w in zip(fused, want, strict=True)) <= 2**-8
    assert max(_rel_err(g.grad, w) for g, w in zip((sh, sw, sb), want, strict=True)) > 2**-8


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", NAMES)
def test_reductions(name, reduction):
    s, t = _model((2, 9), HS, torch.float64, 2), _model((2, 9), HT, torch.float64, 3)
    mask = torch.tensor([[True, False, True, True, False, True, True, True, False]] * 2)
    count = int(mask.sum()) if reduction == "mean" else 1
    weights = mask.double() / count  # "mean" = sum over counted tokens / their number
    want, want_grads = _plain_path(name, {}, s, t, weights, mask=mask)
    sh, sw, sb = _leaves(*s)
    out = kdiv.fused_linear(
        name, sh, sw, t[0], t[1], student_bias=sb, teacher_bias=t[2], mask=mask, reduction=reduction, chunk_size=5
    )
    assert out.shape == ()
    (2.5 * out).backward()  # a grad_out other than 1 scales the gradients computed in the forward pass
    torch.testing.assert_close(out, (want * weights).sum(), rtol=1e-12, atol=1e-14)
    for g, w in zip((sh.grad, sw.grad, sb.grad), want_grads, strict=True):
        torch.testing.assert_close(g, 2.5 * w, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", NAMES)
def test_odd_shapes(name):
    # one token; a single-class vocabulary; hidden size 1; [N, H] without batch axes; no mask, default chunks
    for batch, hs, ht in (((1,), 1, 3), ((5,), 3, 1), ((2, 1, 3), 2, 2)):
        g = torch.Generator().manual_seed(4)
        sh = torch.randn(*batch, hs, generator=g, dtype=torch.float64, requires_grad=True)
        th = torch.randn(*batch, ht, generator=g, dtype=torch.float64)
        for vocab in (1, 6):
            sw = torch.randn(vocab, hs, generator=g, dtype=torch.float64, requires_grad=True)
            tw = torch.randn(vocab, ht, generator=g, dtype=torch.float64)
            got = kdiv.fused_linear(name, sh, sw, th, tw)
            (g_h, g_w) = torch.autograd.grad(got, (sh, sw))
            want = plain.DIVERGENCES[name](sh @ sw.T, th @ tw.T)
            w_h, w_w = torch.autograd.grad(want, (sh, sw))
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(g_h, w_h, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(g_w, w_w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_padded_vocabulary(name):
    # -inf bias entries: tokens outside one model's vocabulary (a padded head), as kdiv treats -inf logits
    s, t = _model((6,), HS, torch.float64, 5), _model((6,), HT, torch.float64, 6)
    s[2][:3] = -math.inf
    t[2][1:5] = -math.inf
    weights = torch.ones(6, dtype=torch.float64)
    want, want_grads = _plain_path(name, {}, s, t, weights)
    got, got_grads = _fused(name, {}, s, t, weights, chunk_size=4)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


def test_all_tokens_masked_gives_zero():
    s, t = _model((4,), HS, torch.float32, 7), _model((4,), HT, torch.float32, 8)
    sh, sw, sb = _leaves(*s)
    mask = torch.zeros(4, dtype=torch.bool)
    out = kdiv.fused_linear("js", sh, sw, t[0], t[1], student_bias=sb, teacher_bias=t[2], mask=mask)
    out.backward()
    assert float(out.detach()) == 0.0
    assert all(bool((x.grad == 0).all()) for x in (sh, sw, sb))
    none = kdiv.fused_linear("akl", sh, sw, t[0], t[1], mask=mask, reduction="none")
    assert none.shape == (4,) and bool((none == 0).all())


def test_gradients_reach_only_what_requires_them():
    s, t = _model((5,), HS, torch.float64, 9), _model((5,), HT, torch.float64, 10)
    th, tw, tb = _leaves(*t)  # a teacher that requires grad still gets none
    sh = s[0].clone().requires_grad_()
    # a frozen head (LoRA-style): only the hidden states get a gradient
    out = kdiv.fused_linear("forward_kl", sh, s[1], th, tw, student_bias=s[2], teacher_bias=tb)
    out.backward()
    assert th.grad is None and tw.grad is None and tb.grad is None
    want, (w_h, _, _) = _plain_path("forward_kl", {}, s, t, torch.full((5,), 0.2, dtype=torch.float64))
    torch.testing.assert_close(sh.grad, w_h, rtol=1e-10, atol=1e-13)
    with torch.no_grad():  # evaluation: values only
        torch.testing.assert_close(
            kdiv.fused_linear("forward_kl", *s[:2], *t[:2], student_bias=s[2], teacher_bias=t[2]), want.mean()
        )


def test_second_backward_recomputes_and_double_backward_is_refused():
    s, t = _model((6,), HS, torch.float64, 11), _model((6,), HT, torch.float64, 12)
    sh, sw, sb = _leaves(*s)
    out = kdiv.fused_linear("js", sh, sw, t[0], t[1], student_bias=sb, beta=0.3, chunk_size=4)
    first = torch.autograd.grad(out, (sh, sw, sb), retain_graph=True)
    second = torch.autograd.grad(out, (sh, sw, sb))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0.0)
    out = kdiv.fused_linear("js", sh, sw, t[0], t[1])
    with pytest.raises(RuntimeError, match="differentiated twice"):
        torch.autograd.grad(out, sh, create_graph=True)


class _LargestOutput(TorchDispatchMode):
    """The largest number of elements any op returns while active."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def test_no_tensor_of_the_logits_size_is_made():
    n = 192
    s, t = _model((n,), HS, torch.float32, 13), _model((n,), HT, torch.float32, 14)
    sh, sw, sb = _leaves(*s)
    with _LargestOutput() as seen:
        out = kdiv.fused_linear("js", sh, sw, t[0], t[1], student_bias=sb, teacher_bias=t[2], chunk_size=4)
        out.backward()
    # chunk-sized blocks and the engine's per-worker buffers only: far below one [N, V] logits tensor
    assert 0 < seen.largest <= n * V // 4
    assert sw.grad.shape == (V, HS)


def test_default_chunk_rows():
    from kdiv.fused.linear import FUSED_CHUNK_ELEMENTS, auto_fused_chunk_rows

    assert auto_fused_chunk_rows(4096, 32000) == FUSED_CHUNK_ELEMENTS // 32000
    assert auto_fused_chunk_rows(3, 32000) == 3
    assert auto_fused_chunk_rows(10, 10**8) == 1


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a ValueError naming the argument
# ---------------------------------------------------------------------------------------------------------------


def _good():
    g = torch.Generator().manual_seed(15)
    return dict(
        student_hidden=torch.randn(2, 3, 4, generator=g),
        student_weight=torch.randn(11, 4, generator=g),
        teacher_hidden=torch.randn(2, 3, 5, generator=g),
        teacher_weight=torch.randn(11, 5, generator=g),
    )


def _call(name="js", **changes):
    args = {**_good(), **changes}
    pos = [args.pop(k) for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    return kdiv.fused_linear(name, *pos, **args)


BAD = {
    "student hidden size": (dict(student_hidden=torch.randn(2, 3, 5)), "student_weight"),
    "teacher hidden size": (dict(teacher_weight=torch.randn(11, 4)), "teacher_weight"),
    "vocabulary sizes differ": (dict(teacher_weight=torch.randn(12, 5)), "vocabulary"),
    "weight not 2-d": (dict(student_weight=torch.randn(11, 4, 1)), "student_weight"),
    "teacher tokens differ": (dict(teacher_hidden=torch.randn(3, 2, 5)), "teacher_hidden"),
    "hidden not a tensor": (dict(student_hidden=[[0.0] * 4]), "student_hidden"),
    "integer hidden": (dict(teacher_hidden=torch.ones(2, 3, 5, dtype=torch.long)), "teacher_hidden"),
    "zero hidden size": (dict(student_hidden=torch.randn(2, 3, 0), student_weight=torch.randn(11, 0)), "student"),
    "bias shape": (dict(student_bias=torch.randn(10)), "student_bias"),
    "teacher bias shape": (dict(teacher_bias=torch.randn(11, 1)), "teacher_bias"),
    "mask shape": (dict(mask=torch.ones(2, 4, dtype=torch.bool)), "mask"),
    "mask dtype": (dict(mask=torch.ones(2, 3)), "mask"),
    "temperature": (dict(temperature=0.0), "temperature"),
    "reduction": (dict(reduction="avg"), "reduction"),
    "chunk_size": (dict(chunk_size=0), "chunk_size"),
    "hyper-parameter range": (dict(beta=1.5), "beta"),
    "hyper-parameter of another divergence": (dict(alpha=0.1), "alpha"),
    "NaN hidden state": (dict(student_hidden=torch.full((2, 3, 4), math.nan)), "NaN"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    changes, match = BAD[case]
    with pytest.raises(ValueError, match=match):
        _call(**changes)


def test_unknown_name():
    with pytest.raises(ValueError, match="name must be one of"):
        _call("kl")
    _call("akl", mu=0.3)  # its own hyper-parameter is accepted
