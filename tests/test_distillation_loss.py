"""kdiv.DistillationLoss against float64 numpy references: the shift, the label mask, the CE mix, T², the
num_items_in_batch normalisation (micro-batches add up to the full batch), the vocabulary options, bad input."""

from __future__ import annotations

import kdiv
import numpy as np
import pytest
import reference
import torch
from scipy.special import log_softmax, softmax

NAMES = sorted(kdiv.DIVERGENCES)
LOG_TINY = reference.LOG_ZERO_PROB  # log of float32 tiny: the probability a -inf logit stands for


def batch(b=3, length=9, v=23, *, seed=0, v_teacher=None, dtype=torch.float64):
    """(student [b, L, V], teacher [b, L, V_t], labels [b, L]) with prompt and padding positions at -100."""
    rng = np.random.default_rng(seed)
    s = torch.from_numpy(2 * rng.standard_normal((b, length, v))).to(dtype)
    t = torch.from_numpy(3 * rng.standard_normal((b, length, v_teacher or v))).to(dtype)
    labels = torch.from_numpy(rng.integers(0, v, (b, length)))
    for i in range(b):  # a prompt of i + 1 tokens and i tokens of padding: a different count per row
        labels[i, : i + 1] = -100
        if i:
            labels[i, -i:] = -100
    return s, t, labels


def reference_loss(s, t, labels, name, *, kd_ratio, temperature=1.0, t_squared=False, denominator=None, **hyper):
    """The loss written plainly in float64 numpy: shift, mask, per-token divergence, CE, mix, normalisation."""
    s, t, y = s.detach().double().numpy()[:, :-1], t.double().numpy()[:, :-1], labels.numpy()[:, 1:]
    counted = y != -100
    kd_tok = reference.DIVERGENCES[name](s, t, temperature=temperature, **hyper)
    logq = log_softmax(s, axis=-1)
    ce_tok = -np.take_along_axis(logq, np.where(counted, y, 0)[..., None], -1)[..., 0]
    den = max(counted.sum(), 1) if denominator is None else denominator
    kd, ce = kd_tok[counted].sum() / den, ce_tok[counted].sum() / den
    return (1 - kd_ratio) * ce + kd_ratio * (temperature**2 if t_squared else 1) * kd, kd, ce


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kd_ratio", [1.0, 0.3, 0.0])
def test_matches_float64_reference(name, kd_ratio):
    s, t, labels = batch(seed=3)
    temperature = 1.5
    out = kdiv.DistillationLoss(name, kd_ratio=kd_ratio, temperature=temperature)(s, t, labels)
    want, kd, ce = reference_loss(s, t, labels, name, kd_ratio=kd_ratio, temperature=temperature)
    np.testing.assert_allclose(out.loss.item(), want, rtol=1e-9)
    np.testing.assert_allclose([out.kd.item(), out.ce.item()], [kd, ce], rtol=1e-9)
    assert out.n_tokens.item() == (labels[:, 1:] != -100).sum().item()
    assert not out.kd.requires_grad and not out.ce.requires_grad


@pytest.mark.divergences("chosen", reason="the T² factor and the hyper-parameters pass through the same code")
@pytest.mark.parametrize("name, hyper", [("js", {"beta": 0.1}), ("akl", {"mu": 0.3}), ("skew_kl", {"alpha": 0.2})])
def test_t_squared_and_hyper(name, hyper):
    s, t, labels = batch(seed=4)
    out = kdiv.DistillationLoss(name, kd_ratio=0.6, temperature=2.0, t_squared=True, **hyper)(s, t, labels)
    want, _, _ = reference_loss(s, t, labels, name, kd_ratio=0.6, temperature=2.0, t_squared=True, **hyper)
    np.testing.assert_allclose(out.loss.item(), want, rtol=1e-9)


def test_without_shift_takes_any_leading_shape():
    s, t, labels = batch(seed=5)
    aligned = kdiv.DistillationLoss("forward_kl", kd_ratio=0.5, shift=False)
    flat = aligned(s[:, :-1].reshape(-1, s.shape[-1]), t[:, :-1].reshape(-1, t.shape[-1]), labels[:, 1:].reshape(-1))
    shifted = kdiv.DistillationLoss("forward_kl", kd_ratio=0.5)(s, t, labels)
    np.testing.assert_allclose(flat.loss.item(), shifted.loss.item(), rtol=1e-12)


@pytest.mark.divergences("chosen", reason="the gradient of the mix; every divergence's own is tested elsewhere")
@pytest.mark.parametrize("name", ["forward_kl", "skew_reverse_kl"])
def test_gradcheck(name):
    s, t, labels = batch(b=2, length=4, v=5, seed=6)
    loss_fn = kdiv.DistillationLoss(name, kd_ratio=0.4, temperature=1.3, t_squared=True)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, t, labels, num_items_in_batch=7).loss, (s,))
    assert s.grad is None


def test_gradient_reaches_the_student_only_and_not_the_last_position():
    s, t, labels = batch(seed=7)
    s.requires_grad_(True)
    t.requires_grad_(True)
    kdiv.DistillationLoss("akl", kd_ratio=0.5)(s, t, labels).loss.backward()
    assert t.grad is None
    assert torch.all(s.grad[:, -1] == 0)  # the last position predicts nothing
    assert torch.all(s.grad[2, :2] == 0)  # they predict labels[2, 1:3] = -100 (the prompt)
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_micro_batches_with_num_items_add_up_to_the_full_batch(name):
    s, t, labels = batch(b=5, seed=8)
    loss_fn = kdiv.DistillationLoss(name, kd_ratio=0.5)
    full_s = s.clone().requires_grad_(True)
    full = loss_fn(full_s, t, labels)
    full.loss.backward()

    n_items = (labels[:, 1:] != -100).sum()  # the whole batch's counted tokens, as transformers counts them
    micro_s = s.clone().requires_grad_(True)
    parts = [
        loss_fn(micro_s[i : i + 2], t[i : i + 2], labels[i : i + 2], num_items_in_batch=n_items) for i in (0, 2, 4)
    ]
    total = sum(p.loss for p in parts)
    total.backward()
    np.testing.assert_allclose(total.item(), full.loss.item(), rtol=1e-12)
    np.testing.assert_allclose(sum(p.kd for p in parts).item(), full.kd.item(), rtol=1e-12)
    np.testing.assert_allclose(micro_s.grad.numpy(), full_s.grad.numpy(), rtol=1e-9, atol=1e-15)
    assert sum(p.n_tokens for p in parts) == full.n_tokens

    # the naive way, the mean of the micro-batch means, is another number: the rows count different numbers of tokens
    naive = sum(loss_fn(s[i : i + 2], t[i : i + 2], labels[i : i + 2]).loss for i in (0, 2, 4)) / 3
    assert abs(naive.item() - full.loss.item()) > 1e-3 * full.loss.item()


def test_num_items_as_int_float_or_tensor():
    s, t, labels = batch(seed=9)
    loss_fn = kdiv.DistillationLoss("tvd", kd_ratio=0.2)
    want, _, _ = reference_loss(s, t, labels, "tvd", kd_ratio=0.2, denominator=40)
    for n in (40, 40.0, torch.tensor(40), torch.tensor([40.0])):
        np.testing.assert_allclose(loss_fn(s, t, labels, num_items_in_batch=n).loss.item(), want, rtol=1e-9)


def test_no_counted_token_gives_zero_and_a_working_backward():
    s, t, labels = batch(seed=10)
    labels[:] = -100
    s.requires_grad_(True)
    out = kdiv.DistillationLoss("akl", kd_ratio=0.5)(s, t, labels)
    out.loss.backward()
    assert out.loss.item() == 0 and out.n_tokens.item() == 0
    assert torch.all(s.grad == 0)


def test_aliases_and_low_precision():
    s, t, labels = batch(seed=11, dtype=torch.bfloat16)
    by_alias = kdiv.DistillationLoss("fkl", kd_ratio=0.5)
    assert by_alias.divergence == "forward_kl"
    out = by_alias(s, t, labels)
    want, _, _ = reference_loss(s.double(), t.double(), labels, "forward_kl", kd_ratio=0.5)
    assert out.loss.dtype == torch.float32
    np.testing.assert_allclose(out.loss.item(), want, rtol=1e-5)


# ---- different vocabulary sizes --------------------------------------------------------------------------------
def test_strict_vocab_says_what_to_do():
    s, t, labels = batch(v=23, v_teacher=20)
    with pytest.raises(ValueError, match=r"23.*20.*vocab='slice'.*vocab='pad'"):
        kdiv.DistillationLoss("forward_kl")(s, t, labels)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("v_teacher", [17, 29])
def test_slice_compares_the_shared_ids(name, v_teacher):
    s, t, labels = batch(v=23, v_teacher=v_teacher, seed=12)
    v = min(23, v_teacher)
    out = kdiv.DistillationLoss(name, kd_ratio=0.5, vocab="slice")(s, t, labels)
    kd_tok = reference.DIVERGENCES[name](s.numpy()[:, :-1, :v], t.numpy()[:, :-1, :v])
    counted = labels.numpy()[:, 1:] != -100
    np.testing.assert_allclose(out.kd.item(), kd_tok[counted].mean(), rtol=1e-9)
    # the CE term stays on the student's full vocabulary
    y = labels.numpy()[:, 1:][counted]
    logq = log_softmax(s.numpy()[:, :-1][counted], -1)
    np.testing.assert_allclose(out.ce.item(), -logq[np.arange(len(y)), y].mean(), rtol=1e-9)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("v_teacher", [17, 29])
def test_pad_matches_the_reference_on_minus_inf_padded_logits(name, v_teacher):
    s, t, labels = batch(v=23, v_teacher=v_teacher, seed=13)
    v = max(23, v_teacher)
    pad = lambda x: np.concatenate([x, np.full((*x.shape[:-1], v - x.shape[-1]), -np.inf)], -1)
    out = kdiv.DistillationLoss(name, vocab="pad")(s, t, labels)
    kd_tok = reference.DIVERGENCES[name](pad(s.numpy()[:, :-1]), pad(t.numpy()[:, :-1]))
    counted = labels.numpy()[:, 1:] != -100
    np.testing.assert_allclose(out.loss.item(), kd_tok[counted].mean(), rtol=1e-9)


def test_pad_by_hand_teacher_smaller():
    # A student with 29 ids, a teacher with 23: p_v = tiny on the student's 6 extra ids. Forward KL is then KL over
    # the shared ids against the student's own (not renormalised) distribution; reverse KL adds q_v (log q_v - log
    # tiny) for each extra id: steep but finite.
    s, t, labels = batch(v=29, v_teacher=23, seed=14)
    counted = labels.numpy()[:, 1:] != -100
    z_s, z_t = s.numpy()[:, :-1][counted], t.numpy()[:, :-1][counted]  # [n, 29], [n, 23]
    q, logq = softmax(z_s, -1), log_softmax(z_s, -1)
    p, logp = softmax(z_t, -1), log_softmax(z_t, -1)
    fkl = (p * (logp - logq[:, :23])).sum(-1) + (np.exp(LOG_TINY) * (LOG_TINY - logq[:, 23:])).sum(-1)
    rkl = (q[:, :23] * (logq[:, :23] - logp)).sum(-1) + (q[:, 23:] * (logq[:, 23:] - LOG_TINY)).sum(-1)
    for name, want in (("forward_kl", fkl), ("reverse_kl", rkl)):
        got = kdiv.DistillationLoss(name, vocab="pad")(s, t, labels)
        np.testing.assert_allclose(got.loss.item(), want.mean(), rtol=1e-9)

    # forward KL's gradient on an extra id is (q_v - tiny) / n: the student is pushed to put no mass there
    s.requires_grad_(True)
    kdiv.DistillationLoss("forward_kl", vocab="pad")(s, t, labels).loss.backward()
    grad = s.grad.numpy()[:, :-1][counted]
    np.testing.assert_allclose(grad[:, 23:], q[:, 23:] / counted.sum(), rtol=1e-6)


def test_pad_by_hand_student_smaller():
    # A student with 23 ids, a teacher with 29: the teacher's mass on the 6 ids the student lacks adds
    # p_v (log p_v - log tiny) to forward KL, a constant without gradient; the student's gradient keeps its shape.
    s, t, labels = batch(v=23, v_teacher=29, seed=15)
    counted = labels.numpy()[:, 1:] != -100
    z_s, z_t = s.numpy()[:, :-1][counted], t.numpy()[:, :-1][counted]
    logq = log_softmax(z_s, -1)
    p, logp = softmax(z_t, -1), log_softmax(z_t, -1)
    want = (p[:, :23] * (logp[:, :23] - logq)).sum(-1) + (p[:, 23:] * (logp[:, 23:] - LOG_TINY)).sum(-1)
    s.requires_grad_(True)
    got = kdiv.DistillationLoss("forward_kl", vocab="pad")(s, t, labels)
    np.testing.assert_allclose(got.loss.item(), want.mean(), rtol=1e-9)
    got.loss.backward()
    q = softmax(z_s, -1)
    # a missing id's log q is the constant log tiny, so d/dz_v = q_v * p(shared ids) - p_v: the student is pulled
    # towards the teacher renormalised over the ids it has
    want_grad = (q * p[:, :23].sum(-1, keepdims=True) - p[:, :23]) / len(p)
    np.testing.assert_allclose(s.grad.numpy()[:, :-1][counted], want_grad, rtol=1e-6, atol=1e-12)


def test_padding_with_zero_logits_would_put_real_mass_on_missing_ids():
    # What -inf padding avoids: with 0 logits a teacher's missing ids get probability exp(0) / Z each.
    _, t, _ = batch(v=23, v_teacher=20, seed=16)
    zero_padded = torch.cat([t, t.new_zeros(*t.shape[:-1], 3)], -1).softmax(-1)[..., 20:].sum(-1)
    inf_padded = torch.cat([t, t.new_full((*t.shape[:-1], 3), float("-inf"))], -1).softmax(-1)[..., 20:].sum(-1)
    assert zero_padded.min() > 1e-4 and inf_padded.max() == 0


# ---- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"divergence": "kl"}, "divergence must be one of"),
        ({"divergence": None}, "divergence must be one of"),
        ({"kd_ratio": 1.5}, "kd_ratio"),
        ({"kd_ratio": "half"}, "kd_ratio"),
        ({"temperature": 0.0}, "temperature"),
        ({"t_squared": 1}, "t_squared"),
        ({"ignore_index": -100.0}, "ignore_index"),
        ({"shift": "yes"}, "shift"),
        ({"vocab": "crop"}, "vocab must be one of"),
        ({"divergence": "akl", "mu": 1.0}, "mu"),
        ({"divergence": "akl", "beta": 0.5}, "takes no hyper-parameter 'beta'"),
        ({"divergence": "js", "mask": None}, "set by DistillationLoss"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kdiv.DistillationLoss(**kwargs)


def test_bad_inputs():
    s, t, labels = batch()
    loss_fn = kdiv.DistillationLoss("js")
    cases = [
        ((s.long(), t, labels), {}, "student_logits must be a floating"),
        ((s, t.numpy(), labels), {}, "teacher_logits must be a floating"),
        ((s, t, labels.double()), {}, "labels must be an integer"),
        ((s[0], t[0], labels[0]), {}, r"\[B, L, V\]"),
        ((s, t[:, :-1], labels), {}, "agree on every axis"),
        ((s, t, labels[:, :-1]), {}, "labels must have shape"),
        ((s, t, labels + 100), {}, "labels must be ids in"),
        ((s, t, labels), {"num_items_in_batch": 0}, "num_items_in_batch must be a finite number > 0"),
        ((s, t, labels), {"num_items_in_batch": "all"}, "num_items_in_batch must be a number"),
        ((s, t, labels), {"num_items_in_batch": torch.ones(2)}, "one-element tensor"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            loss_fn(*args, **kwargs)


def test_repr_names_the_settings():
    text = repr(kdiv.DistillationLoss("akl", kd_ratio=0.5, mu=0.3, vocab="pad"))
    assert "'akl'" in text and "mu=0.3" in text and "kd_ratio=0.5" in text and "vocab='pad'" in text
