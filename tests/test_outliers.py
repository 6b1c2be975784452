"""kdiv.lab.outliers: the outlier teacher, the discretised Gaussian student and the global single-Gaussian fit."""

import math

import kdiv
import numpy as np
import pytest
import torch
from kdiv.lab.gaussian import gaussian_log_density
from kdiv.lab.outliers import best_gaussian, moments, outlier_teacher, train_gaussian

X = -15 + 0.2 * torch.arange(201, dtype=torch.float64)


def test_teacher_rows_are_distributions_with_the_mixture_moments():
    eps = [0.0, 0.05, 0.3]
    logp = outlier_teacher(X, eps, distance=10.0)
    np.testing.assert_allclose(logp.exp().sum(-1).numpy(), 1.0, atol=1e-12)
    mean, std = moments(X, logp)
    want_mean = [10 * e for e in eps]
    want_std = [math.sqrt(1 + e * (1 - e) * 100) for e in eps]
    np.testing.assert_allclose(mean.numpy(), want_mean, atol=1e-9)
    np.testing.assert_allclose(std.numpy(), want_std, atol=1e-9)
    # eps = 0 is the main Gaussian alone
    np.testing.assert_allclose(logp[0].numpy(), torch.log_softmax(gaussian_log_density(X, 0.0, 1.0), -1).numpy())


def test_forward_kl_fit_matches_the_teachers_moments():
    # the discretised Gaussians are an exponential family in (x, x^2): forward KL's optimum matches both moments
    logp = outlier_teacher(X, [0.02, 0.2])
    fit = best_gaussian(X, logp, "forward_kl")
    got_mean, got_std = moments(X, gaussian_log_density(X, fit.mean, fit.sigma))
    want_mean, want_std = moments(X, logp)
    np.testing.assert_allclose(got_mean.numpy(), want_mean.numpy(), atol=1e-3)
    np.testing.assert_allclose(got_std.numpy(), want_std.numpy(), atol=1e-3)


@pytest.mark.parametrize("name", sorted(kdiv.DIVERGENCES))
def test_every_divergence_recovers_a_gaussian_teacher(name):
    logp = torch.log_softmax(gaussian_log_density(X, 1.5, 2.0), -1)
    fit = best_gaussian(X, logp, name)
    assert fit.mean.item() == pytest.approx(1.5, abs=1e-3)
    assert fit.sigma.item() == pytest.approx(2.0, abs=1e-3)
    # TVD grows linearly with the parameter error, so at the search's resolution (8e-5) it is ~1e-5, not ~1e-10
    assert fit.loss.item() == pytest.approx(0.0, abs=1e-4)


def test_search_beats_a_dense_grid_on_the_non_smooth_tvd():
    logp = outlier_teacher(X, [0.1])
    fit = best_gaussian(X, logp, "tvd")
    mu, sigma = torch.meshgrid(
        torch.linspace(-0.5, 0.5, 101, dtype=torch.float64),
        torch.linspace(0.8, 1.6, 81, dtype=torch.float64),
        indexing="ij",
    )
    dense = kdiv.tvd(
        gaussian_log_density(X, mu.reshape(-1), sigma.reshape(-1)), logp.expand(mu.numel(), -1), reduction="none"
    )
    assert fit.loss.item() <= dense.min().item() + 1e-12
    # and the returned loss is the loss of the returned parameters
    again = kdiv.tvd(gaussian_log_density(X, fit.mean, fit.sigma), logp, reduction="none")
    np.testing.assert_allclose(again.numpy(), fit.loss.numpy(), rtol=1e-12)


def test_profile_shows_reverse_kl_second_minimum_at_the_outlier():
    fit = best_gaussian(X, outlier_teacher(X, [0.1]), "reverse_kl")
    profile, means = fit.profile[0], fit.profile_means
    local = [
        float(means[i]) for i in range(1, len(means) - 1) if profile[i] < profile[i - 1] and profile[i] < profile[i + 1]
    ]
    assert local == [0.0, 10.0]


def test_descent_reaches_the_global_fit_for_a_true_gradient():
    logp = outlier_teacher(X, [0.05, 0.2])
    mean, sigma = train_gaussian(X, logp, "forward_kl", mean=2.0, sigma=2.0, steps=300, lr=0.05)
    fit = best_gaussian(X, logp, "forward_kl")
    np.testing.assert_allclose(mean.numpy(), fit.mean.numpy(), atol=2e-3)
    np.testing.assert_allclose(sigma.numpy(), fit.sigma.numpy(), atol=2e-3)


def test_akl_training_stops_where_its_detached_gradient_vanishes():
    logp = outlier_teacher(X, [0.1])
    mean, sigma = train_gaussian(X, logp, "akl", steps=300, lr=0.05)
    mu = mean.clone().requires_grad_(True)
    log_sigma = sigma.log().requires_grad_(True)
    kdiv.akl(gaussian_log_density(X, mu, log_sigma.exp()), logp, reduction="sum").backward()
    assert mu.grad.abs().item() < 1e-5 and log_sigma.grad.abs().item() < 1e-5
    assert mean.item() > 0.05  # AKL's fixed point is pulled off the main mode


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: outlier_teacher(X, [1.0]), "eps"),
        (lambda: outlier_teacher(X[:1], 0.1), "x"),
        (lambda: outlier_teacher(X, 0.1, sigma=0.0), "sigma"),
        (lambda: best_gaussian(X, torch.zeros(3, 7), "tvd"), "teacher_logits"),
        (lambda: best_gaussian(X, outlier_teacher(X, 0.1), "nope"), "name"),
        (lambda: best_gaussian(X, outlier_teacher(X, 0.1), "tvd", sigmas=(0.0, 1.0, 5)), "sigmas"),
        (lambda: best_gaussian(X, outlier_teacher(X, 0.1), "tvd", zoom=2), "zoom"),
        (lambda: train_gaussian(X, outlier_teacher(X, 0.1), "tvd", steps=0), "steps"),
        (lambda: train_gaussian(X, outlier_teacher(X, 0.1), "tvd", sigma=0.0), "sigma"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
