"""kdiv.lab.zoo: W1 as a toy loss, the location sweep, steps-to-threshold and AKL's weight curves."""

import kdiv
import numpy as np
import pytest
import torch
from kdiv.lab import toy
from kdiv.lab.zoo import ZOO, akl_weight_curves, first_step_below, head_tail_log_error, location_sweep, wasserstein_on
from scipy.stats import wasserstein_distance

X = torch.arange(30, dtype=torch.float64) * 0.5


def test_zoo_names_are_registered():
    for name, hyper in ZOO:
        kdiv.get(name, **hyper)
    assert {name for name, _ in ZOO} == set(kdiv.DIVERGENCES)


def test_wasserstein_on_matches_scipy_and_works_in_fit():
    gen = torch.Generator().manual_seed(0)
    s, t = (
        torch.randn(4, 30, generator=gen, dtype=torch.float64),
        torch.randn(4, 30, generator=gen, dtype=torch.float64),
    )
    w1 = wasserstein_on(X)
    got = w1(s, t, reduction="none")
    q, p = torch.softmax(s, -1).numpy(), torch.softmax(t, -1).numpy()
    want = [wasserstein_distance(X.numpy(), X.numpy(), q[i], p[i]) for i in range(4)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)
    teacher = toy.mixture_teacher(X, [toy.Component(1.0, 7.0, 2.0)])
    result = toy.fit(teacher, ["forward_kl", w1], steps=3, lr=0.1)
    assert result.keys == ("forward_kl", "wasserstein_1d")
    assert torch.isfinite(result.loss).all()


def test_location_sweep_gradients():
    x = torch.arange(60, dtype=torch.float64)
    teacher = -0.5 * ((x - 40) / 1.5) ** 2
    centers = torch.tensor([10.0, 25.0, 38.0, 45.0], dtype=torch.float64)
    loss, grad = location_sweep(x, teacher, wasserstein_on(x), centers, sigma=1.5)
    np.testing.assert_allclose(loss.numpy(), [30.0, 15.0, 2.0, 5.0], atol=1e-9)
    np.testing.assert_allclose(grad.numpy(), [-1.0, -1.0, -1.0, 1.0], atol=1e-9)
    loss, grad = location_sweep(x, teacher, ("js", {"beta": 0.5}), centers, sigma=1.5)
    assert loss[0].item() == pytest.approx(np.log(2), abs=1e-12)
    assert abs(grad[0].item()) < 1e-15
    # against a finite difference of the loss itself
    h = 1e-5
    lp, _ = location_sweep(x, teacher, "forward_kl", centers + h, sigma=1.5)
    lm, _ = location_sweep(x, teacher, "forward_kl", centers - h, sigma=1.5)
    _, g = location_sweep(x, teacher, "forward_kl", centers, sigma=1.5)
    np.testing.assert_allclose(g.numpy(), ((lp - lm) / (2 * h)).numpy(), rtol=1e-6)


def test_first_step_below():
    steps = torch.tensor([0, 1, 2, 5, 10, 20, 50])
    errors = torch.tensor(
        [
            [3.0, 2.0, 1.0, 0.5, 0.2, 0.3, 0.1],  # dips below 0.25 at 10, back above at 20
            [1.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        ]
    )
    assert first_step_below(errors, steps, 0.25).tolist() == [50, 1, -1]
    with pytest.raises(ValueError, match="errors"):
        first_step_below(errors[:, :3], steps, 0.25)


def test_akl_weight_curves_match_the_loss():
    teacher = toy.bimodal_teacher()
    result = toy.fit(teacher, ["akl", "forward_kl"], steps=4, lr=0.1, seeds=[0, 1])
    w_head, w_tail = akl_weight_curves(result, "akl")
    assert w_head.shape == (1, 2, 5)
    np.testing.assert_allclose((w_head + w_tail).numpy(), 1.0)
    # the AKL loss recorded by fit is w_head * FKL + w_tail * RKL of the recorded students
    q = result.probs[0, 0, 0, 2]
    z = q.log()
    fkl = kdiv.forward_kl(z, teacher.logits)
    rkl = kdiv.reverse_kl(z, teacher.logits)
    want = w_head[0, 0, 2] * fkl + w_tail[0, 0, 2] * rkl
    assert result.loss[0, 0, 0, 2].item() == pytest.approx(want.item(), rel=1e-10)


def test_head_tail_log_error():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)  # head at mu=0.5: the first token
    q = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.3, 0.15, 0.30]], dtype=torch.float64)
    head, tail = head_tail_log_error(q, p, 0.5)
    np.testing.assert_allclose(head.numpy(), [0.0, np.log(2)])
    np.testing.assert_allclose(tail.numpy(), [0.0, np.log(6) / 3])
    with pytest.raises(ValueError, match="teacher_probs"):
        head_tail_log_error(q, p[:3])


def test_bad_input():
    with pytest.raises(ValueError, match="x"):
        wasserstein_on(torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="sigma"):
        location_sweep(X, X * 0, "tvd", [1.0], sigma=0.0)
    with pytest.raises(ValueError, match="teacher_logits"):
        location_sweep(X, X[:3], "tvd", [1.0])
