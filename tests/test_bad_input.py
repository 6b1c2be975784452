"""Bad input raises a ValueError that names the offending argument; nothing turns into a silent NaN."""

from __future__ import annotations

import math

import kdiv
import pytest
import torch
from cases import NAMES, WITH_HYPER, out_of_range

# (name, hyper-parameter, a value it must refuse), from the specs' ranges
OUT_OF_RANGE = [
    pytest.param(name, h.name, v, id=f"{name}-{h.name}={v:g}")
    for name, hypers in WITH_HYPER.items()
    for h in hypers
    for v in [*out_of_range(h), math.nan, math.inf, -math.inf]
]
NOT_A_NUMBER = {"str": "0.5", "None": None, "list": [0.5], "vec": torch.tensor([0.2, 0.3])}


def pair(shape=(2, 3, 5), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("name", NAMES)
def test_different_shapes(name):
    fn = kdiv.get(name)
    s, t = pair()
    with pytest.raises(ValueError, match="same shape"):
        fn(s, t[:1])
    with pytest.raises(ValueError, match="teacher_logits"):
        fn(s, t.reshape(3, 2, 5))
    # a different vocabulary size is called out as such
    with pytest.raises(ValueError, match="vocabulary"):
        fn(s, t[..., :4])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_dtype(name, dtype):
    fn = kdiv.get(name)
    s, t = pair()
    with pytest.raises(ValueError, match="student_logits"):
        fn(s.to(dtype), t)
    with pytest.raises(ValueError, match="teacher_logits"):
        fn(s, t.to(dtype))


@pytest.mark.parametrize("name", NAMES)
def test_not_a_tensor_or_no_vocab_axis(name):
    fn = kdiv.get(name)
    s, t = pair()
    with pytest.raises(ValueError, match="student_logits"):
        fn(s.tolist(), t)
    with pytest.raises(ValueError, match="teacher_logits"):
        fn(s, t.numpy())
    with pytest.raises(ValueError, match="student_logits"):
        fn(torch.tensor(1.0), torch.tensor(2.0))
    with pytest.raises(ValueError, match="student_logits"):
        fn(torch.zeros(3, 0), torch.zeros(3, 0))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "+inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_nan_and_plus_inf_logits(name, bad, dtype):
    fn = kdiv.get(name)
    s, t = pair(dtype=dtype)
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[1, 2, 3] = bad
    t_bad[0, 0, 0] = bad
    with pytest.raises(ValueError, match="student_logits"):
        fn(s_bad, t)
    with pytest.raises(ValueError, match="teacher_logits"):
        fn(s, t_bad)
    # also with a gradient requested, and with a small chunk size (the check must see every chunk)
    with pytest.raises(ValueError, match="student_logits"):
        fn(s_bad.requires_grad_(), t, chunk_size=1)


@pytest.mark.parametrize("name", NAMES)
def test_bad_token_outside_the_mask_is_ignored(name):
    # a NaN in a token the mask leaves out does not enter the loss: no error and a finite result
    s, t = pair()
    s[1, 2, 3] = math.nan
    t[1, 2, 0] = math.inf
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    x = s.clone().requires_grad_()
    loss = kdiv.get(name)(x, t, mask=mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_row_of_only_minus_inf(name):
    fn = kdiv.get(name)
    s, t = pair()
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[0, 1] = -math.inf
    t_bad[1, 0] = -math.inf
    with pytest.raises(ValueError, match="student_logits"):
        fn(s_bad, t)
    with pytest.raises(ValueError, match="teacher_logits"):
        fn(s, t_bad)


@pytest.mark.divergences("with_hyper")
@pytest.mark.parametrize("name, key, value", OUT_OF_RANGE)
def test_hyperparameter_out_of_range(name, key, value):
    s, t = pair()
    with pytest.raises(ValueError, match=key):
        kdiv.get(name)(s, t, **{key: value})
    with pytest.raises(ValueError, match=key):
        kdiv.get(name, **{key: value})(s, t)


@pytest.mark.divergences("with_hyper")
@pytest.mark.parametrize("name", sorted(WITH_HYPER))
@pytest.mark.parametrize("value", NOT_A_NUMBER.values(), ids=NOT_A_NUMBER.keys())
def test_hyperparameter_not_a_number(name, value):
    for h in WITH_HYPER[name]:
        s, t = pair()
        with pytest.raises(ValueError, match=h.name):
            kdiv.get(name)(s, t, **{h.name: value})


@pytest.mark.parametrize("value", [0.0, 1.0, -0.5, 1.5, math.nan, math.inf])
def test_akl_mu_outside_open_unit_interval(value):
    s, t = pair()
    with pytest.raises(ValueError, match="mu"):
        kdiv.akl(s, t, mu=value)
    p = torch.softmax(t, -1)
    for fn in (kdiv.head_threshold, kdiv.head_mask):
        with pytest.raises(ValueError, match="mu"):
            fn(p, value)
    with pytest.raises(ValueError, match="mu"):
        kdiv.head_tail_error(torch.softmax(s, -1), p, value)


def test_head_split_bad_probabilities():
    p = torch.softmax(torch.randn(3, 5), -1)
    with pytest.raises(ValueError, match="teacher_probs"):
        kdiv.head_mask(p.to(torch.int64), 0.5)
    with pytest.raises(ValueError, match="student_probs"):
        kdiv.head_tail_error(p.tolist(), p, 0.5)
    with pytest.raises(ValueError, match="same shape"):
        kdiv.head_tail_error(p[:2], p, 0.5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf, -math.inf, "1.0", None])
def test_temperature(name, value):
    s, t = pair()
    with pytest.raises(ValueError, match="temperature"):
        kdiv.get(name)(s, t, temperature=value)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("value", ["avg", "MEAN", None, "batchmean"])
def test_unknown_reduction(name, value):
    s, t = pair()
    with pytest.raises(ValueError, match="reduction"):
        kdiv.get(name)(s, t, reduction=value)


@pytest.mark.parametrize("name", NAMES)
def test_bad_mask(name):
    fn = kdiv.get(name)
    s, t = pair()
    with pytest.raises(ValueError, match="mask"):
        fn(s, t, mask=torch.ones(2, 3, 5, dtype=torch.bool))  # the vocabulary axis included
    with pytest.raises(ValueError, match="mask"):
        fn(s, t, mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        fn(s, t, mask=torch.ones(2, 3))  # float, not bool
    with pytest.raises(ValueError, match="mask"):
        fn(s, t, mask=torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="mask"):
        fn(s, t, mask=[[True] * 3] * 2)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("value", [0, -1, 1.5, "4", True])
def test_bad_chunk_size(name, value):
    s, t = pair()
    with pytest.raises(ValueError, match="chunk_size"):
        kdiv.get(name)(s, t, chunk_size=value)


def test_get_unknown_name_or_keyword():
    with pytest.raises(ValueError, match="name"):
        kdiv.get("kl")
    with pytest.raises(ValueError, match="name"):
        kdiv.hyperparameters("jsd")
    with pytest.raises(ValueError, match="gamma"):
        kdiv.get("js", gamma=0.5)
    with pytest.raises(ValueError, match="beta"):
        kdiv.get("skew_kl", beta=0.5)  # skew_kl's hyper-parameter is alpha
    with pytest.raises(ValueError, match="alpha"):
        kdiv.get("forward_kl", alpha=0.1)


def test_mask_from_labels_bad_input():
    with pytest.raises(ValueError, match="labels"):
        kdiv.mask_from_labels(torch.tensor([1.0, -100.0]))
    with pytest.raises(ValueError, match="labels"):
        kdiv.mask_from_labels(torch.tensor([True, False]))
    with pytest.raises(ValueError, match="labels"):
        kdiv.mask_from_labels([1, -100])
