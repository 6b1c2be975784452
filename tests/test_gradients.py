"""The closed-form gradients of kdiv.lab.gradients against autograd through kdiv, and their stated bounds."""

import kdiv
import numpy as np
import pytest
import reference
import torch
from cases import DEFAULT_CASES, HYPER_CASES
from kdiv.lab.gradients import PROB_GRADIENTS, logit_gradient, prob_gradient

# every divergence with a closed-form coefficient, at its defaults and its spec's example values
CASES = [c for c in DEFAULT_CASES + HYPER_CASES if c.values[0] in PROB_GRADIENTS]


@pytest.mark.parametrize(("name", "hyper"), CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_logit_gradient_matches_autograd(name, hyper, temperature):
    gen = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(4, 3, 13, generator=gen, dtype=torch.float64)).requires_grad_()
    teacher = 3 * torch.randn(4, 3, 13, generator=gen, dtype=torch.float64)
    loss = kdiv.get(name, **hyper)(student, teacher, temperature=temperature, reduction="sum")
    (auto,) = torch.autograd.grad(loss, student)
    q = torch.softmax(student.detach() / temperature, -1)
    p = torch.softmax(teacher / temperature, -1)
    closed = logit_gradient(name, q, p, temperature=temperature, **hyper)
    np.testing.assert_allclose(closed.numpy(), auto.numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.divergences("prob_form")
@pytest.mark.parametrize(("name", "hyper"), [c for c in CASES if c.values[0] in reference.PROB_FORMS])
def test_prob_gradient_matches_finite_differences(name, hyper):
    # the reference's formula of L(q) with q free (off the simplex), differentiated by central differences
    def loss(q, p):
        return reference.PROB_FORMS[name](q, p, **hyper)

    rng = np.random.default_rng(1)
    q, p = rng.dirichlet(np.ones(9)), rng.dirichlet(np.ones(9))
    h = 1e-7
    fd = np.array([(loss(q + h * e, p) - loss(q - h * e, p)) / (2 * h) for e in np.eye(9)])
    got = prob_gradient(name, torch.tensor(q), torch.tensor(p), **hyper).numpy()
    np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-6)


def test_bounds_stated_in_the_docstring():
    q = torch.logspace(-8, 0, 200, dtype=torch.float64)
    for p_val in (1e-6, 1e-2, 0.5, 1.0):
        p = torch.full_like(q, p_val)
        assert prob_gradient("skew_kl", q, p, alpha=0.1).abs().max() <= 9.0 + 1e-9
        # g = log r + 1 - alpha r increases in r = q / m <= 1 / alpha, so g <= log(1 / alpha)
        assert prob_gradient("skew_reverse_kl", q, p, alpha=0.1).max() <= np.log(10) + 1e-9
        tvd = prob_gradient("tvd", q, p)
        assert tvd.abs().max() <= 1
        assert (tvd[q >= p] == 0).all()
    # forward KL grows like 1/q: at q = 1e-8 the coefficient is -p / q
    assert prob_gradient("forward_kl", q[:1], torch.full_like(q[:1], 0.5)).item() == pytest.approx(-0.5e8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "nope"}, "name"),
        ({"q": torch.tensor([0.0, 1.0])}, "q"),
        ({"p": torch.tensor([0.5])}, "same shape"),
        ({"p": torch.tensor([0.5, float("nan")])}, "p"),
        ({"beta": 2.0}, "beta"),
    ],
)
def test_bad_input(kwargs, match):
    args = {"name": "js", "q": torch.tensor([0.5, 0.5]), "p": torch.tensor([0.2, 0.8])} | kwargs
    name, q, p = args.pop("name"), args.pop("q"), args.pop("p")
    with pytest.raises(ValueError, match=match):
        prob_gradient(name, q, p, **args)


def test_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        logit_gradient("tvd", torch.tensor([0.5, 0.5]), torch.tensor([0.2, 0.8]), temperature=0)
