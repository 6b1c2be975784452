"""kdiv.lab.toy and kdiv.lab.gaussian: the toy teachers, the vectorised fitting loop, the single-Gaussian fits.

References are computed independently: mixture densities with scipy.stats.norm, separate one-row fits with
torch.optim.Adam, moments of a mixture by numerical integration.
"""

from __future__ import annotations

import math

import kdiv
import numpy as np
import pytest
import torch
from kdiv.lab import toy
from kdiv.lab.gaussian import GaussianMixture, fit_gaussian, gaussian_log_density
from scipy import integrate, stats

# ---------------------------------------------------------------------------------------------------------------
# Teachers
# ---------------------------------------------------------------------------------------------------------------


def _mixture_reference(x, components):
    density = sum(w * stats.norm.pdf(x, m, s) for w, m, s in components)
    return density / density.sum()


def test_bimodal_teacher_is_the_papers_case_a():
    t = toy.bimodal_teacher()
    x = np.arange(0.0, 100.0, 2.0)
    np.testing.assert_array_equal(t.x.numpy(), x)
    np.testing.assert_allclose(t.probs.numpy(), _mixture_reference(x, [(0.3, 25, 10), (0.5, 75, 10)]), rtol=1e-12)
    assert float(t.probs.sum()) == pytest.approx(1.0, abs=1e-12)
    # two modes, at 24/26 and 74/76, the right one 5/3 as high (same sigma)
    p = t.probs.numpy()
    peaks = [i for i in range(1, 49) if p[i] > p[i - 1] and p[i] >= p[i + 1]]
    assert [x[i] for i in peaks] in ([24.0, 74.0], [24.0, 76.0], [26.0, 74.0], [26.0, 76.0])
    assert p[peaks[1]] / p[peaks[0]] == pytest.approx(5 / 3, rel=1e-2)


def test_unimodal_teacher_is_the_papers_case_b():
    t = toy.unimodal_teacher()
    x = np.arange(0.0, 100.0, 2.0)
    np.testing.assert_allclose(t.probs.numpy(), _mixture_reference(x, [(1.0, 50, 15)]), rtol=1e-12)
    assert float(t.x[t.probs.argmax()]) == 50.0
    assert t.mean == pytest.approx(50.0, abs=0.05)
    assert t.std == pytest.approx(15.0, rel=0.01)


def test_each_component_uses_its_own_sigma():
    # the paper's reference code used the first sigma for both components; a wide second one must show
    x = np.linspace(-20.0, 100.0, 241)
    comps = [(0.5, 0.0, 2.0), (0.5, 40.0, 8.0)]
    t = toy.mixture_teacher(torch.from_numpy(x), [toy.Component(*c) for c in comps])
    np.testing.assert_allclose(t.probs.numpy(), _mixture_reference(x, comps), rtol=1e-12)
    # equal weights, each component with its own width: half the mass near 0, plus the wide one's left tail
    assert float(t.probs[t.x < 20].sum()) == pytest.approx(0.5 + 0.5 * stats.norm.cdf(20, 40, 8), abs=5e-4)


def test_long_tail_teacher_is_seeded_and_within_the_noise_of_a_half_normal():
    a, b, c = toy.long_tail_teacher(0), toy.long_tail_teacher(0), toy.long_tail_teacher(1)
    assert torch.equal(a.probs, b.probs)
    assert not torch.equal(a.probs, c.probs)
    x = np.arange(80) * 1.25
    np.testing.assert_array_equal(a.x.numpy(), x)
    assert float(a.probs.sum()) == pytest.approx(1.0, abs=1e-12)
    half_normal = np.exp(-0.5 * (x / 16.0) ** 2)
    ratio = a.probs.numpy() / half_normal
    ratio /= ratio.min()
    assert ratio.max() <= 1.01 + 1e-12  # (1 + 0.01 U) noise: ratios within 1 % of each other
    assert ratio.max() > 1.005  # and the noise is really there
    # the noise is the documented generator's U(0, 1) draw
    u = np.random.default_rng(0).uniform(0.0, 1.0, 80)
    want = half_normal * (1 + 0.01 * u)
    np.testing.assert_allclose(a.probs.numpy(), want / want.sum(), rtol=1e-12)


def test_teacher_logits_are_log_probs_and_zero_probs_are_minus_inf():
    t = toy.Teacher("z", torch.arange(3.0, dtype=torch.float64), torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    assert torch.isneginf(t.logits[2])
    r = toy.fit(t, ["forward_kl", "reverse_kl"], steps=50, lr=0.1)
    assert torch.isfinite(r.loss).all() and torch.isfinite(r.probs).all()
    assert float(r.probs[:, 0, 0, -1, 2].max()) < 0.05


@pytest.mark.parametrize(
    "bad",
    [
        dict(weight=0.0, mean=0.0, sigma=1.0),
        dict(weight=1.0, mean=math.nan, sigma=1.0),
        dict(weight=1.0, mean=0.0, sigma=-1.0),
    ],
)
def test_component_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(k for k, v in bad.items() if not (v > 0 or k == "mean") or v != v)):
        toy.Component(**bad)


def test_teacher_rejects_unnormalised_probs():
    with pytest.raises(ValueError, match="sum to 1"):
        toy.Teacher("t", torch.arange(2.0, dtype=torch.float64), torch.tensor([0.5, 0.6], dtype=torch.float64))
    with pytest.raises(ValueError, match="noise"):
        toy.long_tail_teacher(0, noise=1.5)


# ---------------------------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------------------------

ZOO = ["forward_kl", "reverse_kl", ("js", {"beta": 0.1}), "tvd", ("skew_reverse_kl", {"alpha": 0.2}), "akl"]


def test_vectorised_fit_equals_separate_fits():
    teacher = toy.long_tail_teacher(0)
    lrs, seeds, steps = [0.05, 0.2], [0, 3], 25
    together = toy.fit(teacher, ZOO, steps=steps, lr=lrs, seeds=seeds)
    assert together.probs.shape == (len(ZOO), 2, 2, steps + 1, teacher.vocab)
    assert together.loss.shape == (len(ZOO), 2, 2, steps + 1)
    for d, spec in enumerate(ZOO):
        for li, lr in enumerate(lrs):
            for si, seed in enumerate(seeds):
                # one row alone, with torch's own Adam: an independent reference for both the loop and the optimiser
                alone = toy.fit(teacher, spec, steps=steps, lr=lr, seeds=seed, optimizer=lambda g: torch.optim.Adam(g))
                np.testing.assert_allclose(
                    together.probs[d, li, si].numpy(), alone.probs[0, 0, 0].numpy(), rtol=1e-12, atol=1e-15
                )
                np.testing.assert_allclose(
                    together.loss[d, li, si].numpy(), alone.loss[0, 0, 0].numpy(), rtol=1e-12, atol=1e-15
                )


def test_written_out_adam_matches_torch_adam():
    torch.manual_seed(0)
    start = torch.randn(3, 7, dtype=torch.float64)
    ours, theirs = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    opt_ours = toy.Adam([{"params": [ours], "lr": 0.3}])
    opt_theirs = torch.optim.Adam([theirs], lr=0.3)
    target = torch.randn(3, 7, dtype=torch.float64)
    for _ in range(40):
        for p, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            ((p - target) ** 4).sum().backward()
            opt.step()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_all_divergences_share_the_initial_student():
    r = toy.fit(toy.bimodal_teacher(), ZOO, steps=3, lr=0.1, seeds=[5, 6])
    init = torch.stack([torch.softmax(toy.init_logits(50, s), -1) for s in (5, 6)])
    for d in range(len(ZOO)):
        torch.testing.assert_close(r.probs[d, 0, :, 0], init, rtol=1e-14, atol=0)


def test_loss_curve_is_the_divergence_of_the_recorded_student():
    teacher = toy.unimodal_teacher()
    r = toy.fit(teacher, ["forward_kl", "reverse_kl"], steps=30, lr=0.1)
    for d, name in enumerate(r.keys):
        q = r.probs[d, 0, 0]  # [T + 1, V]
        want = kdiv.get(name)(q.log(), teacher.logits.expand_as(q), reduction="none")
        torch.testing.assert_close(r.loss[d, 0, 0], want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "make_teacher, lr", [(toy.bimodal_teacher, 0.1), (toy.unimodal_teacher, 0.1), (toy.long_tail_teacher, 0.2)]
)
def test_fkl_and_rkl_both_reach_the_teacher(make_teacher, lr):
    # the paper's point: with a softmax student both divergences share the optimum q = p
    r = toy.fit(make_teacher(), ["forward_kl", "reverse_kl"], steps=300, lr=lr, record=[0, 300])
    tvd = r.tvd()[:, 0, 0]
    assert (tvd[:, 0] > 0.3).all()
    assert (tvd[:, -1] < 2e-3).all(), tvd


def test_head_tail_error_uses_the_library_split():
    r = toy.fit(toy.long_tail_teacher(), ["forward_kl", "reverse_kl"], steps=5, lr=0.2)
    g_head, g_tail = r.head_tail_error(mu=0.5)
    want_head, want_tail = kdiv.head_tail_error(r.probs[1, 0, 0, 5], r.teacher.probs, 0.5)
    assert float(g_head[1, 0, 0, 5]) == float(want_head) and float(g_tail[1, 0, 0, 5]) == float(want_tail)
    torch.testing.assert_close(g_head + g_tail, 2 * r.tvd())
    table = r.head_tail_table([0, 5])
    assert table.splitlines()[0].split() == [
        "step",
        "forward_kl",
        "head",
        "forward_kl",
        "tail",
        "reverse_kl",
        "head",
        "reverse_kl",
        "tail",
    ]
    assert table.splitlines()[2].split()[0] == "5"


def test_record_keeps_only_the_asked_steps_and_student_looks_them_up():
    r = toy.fit(toy.unimodal_teacher(), "forward_kl", steps=20, lr=0.1, record=[20, 0, 10])
    assert r.steps.tolist() == [0, 10, 20]
    assert r.loss.shape[-1] == 21
    full = toy.fit(toy.unimodal_teacher(), "forward_kl", steps=20, lr=0.1)
    torch.testing.assert_close(r.student("forward_kl", 10), full.student("forward_kl", 10), rtol=0, atol=0)
    with pytest.raises(ValueError, match="step 5 was not recorded"):
        r.student("forward_kl", 5)


def test_keys_name_hyperparameters_and_callables_work():
    def my_fkl(s, t, *, reduction, temperature):
        return kdiv.forward_kl(s, t, reduction=reduction, temperature=temperature)

    r = toy.fit(toy.unimodal_teacher(), [("js", {"beta": 0.1}), "js", my_fkl], steps=5, lr=0.1)
    assert r.keys == ("js(beta=0.1)", "js", "my_fkl")
    same = toy.fit(toy.unimodal_teacher(), "forward_kl", steps=5, lr=0.1)
    torch.testing.assert_close(r.probs[2], same.probs[0], rtol=0, atol=0)


def test_given_init_and_temperature():
    teacher = toy.bimodal_teacher()
    init = torch.zeros(50, dtype=torch.float64)
    r = toy.fit(teacher, "forward_kl", steps=0, lr=0.1, init=init, temperature=2.0)
    torch.testing.assert_close(r.probs[0, 0, 0, 0], torch.full((50,), 1 / 50, dtype=torch.float64))
    want = kdiv.forward_kl(init, teacher.logits, temperature=2.0)
    assert float(r.loss[0, 0, 0, 0]) == pytest.approx(float(want), rel=1e-12)
    assert r.seeds == (None,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(divergences="nope"), "divergence name"),
        (dict(divergences=["forward_kl", "forward_kl"]), "distinct"),
        (dict(divergences=[]), "must not be empty"),
        (dict(lr=0.0), "lr must be positive"),
        (dict(lr=[0.1, -1.0]), "lr must be positive"),
        (dict(steps=-1), "steps"),
        (dict(init=torch.zeros(3)), "init must be"),
        (dict(record=[0, 99]), "record"),
        (dict(optimizer="lbfgs"), "optimizer"),
    ],
)
def test_fit_rejects_bad_arguments(kwargs, match):
    args = dict(divergences="forward_kl", steps=5, lr=0.1) | kwargs
    with pytest.raises(ValueError, match=match):
        toy.fit(toy.unimodal_teacher(), **args)


def test_fit_rejects_a_non_teacher():
    with pytest.raises(ValueError, match="teacher"):
        toy.fit(torch.ones(3), "forward_kl")


def test_fit_leaves_the_thread_setting_alone():
    before = torch.get_num_threads()
    toy.fit(toy.unimodal_teacher(), "forward_kl", steps=2, lr=0.1)
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------------------------------------------------------
# kdiv.lab.gaussian
# ---------------------------------------------------------------------------------------------------------------

MIX = GaussianMixture((toy.Component(0.3, 25.0, 8.0), toy.Component(0.5, 75.0, 8.0)))


def test_mixture_moments_match_numerical_integration():
    x = np.linspace(-100, 200, 300001)
    density = 0.375 * stats.norm.pdf(x, 25, 8) + 0.625 * stats.norm.pdf(x, 75, 8)
    mean = integrate.trapezoid(x * density, x)
    std = math.sqrt(integrate.trapezoid((x - mean) ** 2 * density, x))
    assert MIX.mean == pytest.approx(mean, rel=1e-9)
    assert MIX.std == pytest.approx(std, rel=1e-9)
    xs = torch.linspace(-10, 110, 7, dtype=torch.float64)
    np.testing.assert_allclose(
        MIX.log_density(xs).exp().numpy(),
        0.375 * stats.norm.pdf(xs.numpy(), 25, 8) + 0.625 * stats.norm.pdf(xs.numpy(), 75, 8),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        gaussian_log_density(xs, 3.0, 2.0).exp().numpy(), stats.norm.pdf(xs.numpy(), 3, 2), rtol=1e-12
    )


def test_forward_kl_single_gaussian_is_moment_matching_and_reverse_kl_picks_the_mode_it_starts_near():
    fitted = fit_gaussian(MIX, ["forward_kl", "reverse_kl"], inits=[(20.0, 10.0), (80.0, 10.0)], steps=400, lr=0.05)
    for i in range(2):  # FKL: the same answer from both starts, the mixture's mean and std
        assert float(fitted.mean[0, i, -1]) == pytest.approx(MIX.mean, abs=1e-3)
        assert float(fitted.std[0, i, -1]) == pytest.approx(MIX.std, abs=1e-3)
    # RKL: the left start ends on the left mode, the right start on the right one, each about one mode wide
    assert float(fitted.mean[1, 0, -1]) == pytest.approx(25.0, abs=0.5)
    assert float(fitted.mean[1, 1, -1]) == pytest.approx(75.0, abs=0.5)
    assert (fitted.std[1, :, -1] - 8.0).abs().max() < 0.5
    # the heavier mode is the better RKL optimum: KL(q || p) ~ -log w
    assert float(fitted.loss[1, 0, -1]) == pytest.approx(-math.log(0.375), abs=0.01)
    assert float(fitted.loss[1, 1, -1]) == pytest.approx(-math.log(0.625), abs=0.01)
    tvd = fitted.tvd()
    assert tvd.shape == (2, 2) and float(tvd.min()) > 0.3


def test_tvd_fit_ignores_a_light_outlier_that_drags_forward_kl():
    # the reuse issue 4 needs: any divergence on discretised densities
    mix = GaussianMixture((toy.Component(0.95, 0.0, 1.0), toy.Component(0.05, 10.0, 1.0)))
    fitted = fit_gaussian(mix, ["forward_kl", "tvd"], inits=[(0.5, 1.5)], steps=400, lr=0.05)
    assert float(fitted.mean[0, 0, -1]) == pytest.approx(mix.mean, abs=1e-3)  # 0.5: dragged
    assert abs(float(fitted.mean[1, 0, -1])) < 0.1  # stays on the main mode


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(inits=[(0.0, 0.0)]), "inits"),
        (dict(inits=[]), "inits"),
        (dict(lr=-1.0), "lr"),
        (dict(steps=1.5), "steps"),
        (dict(grid=torch.zeros(1)), "grid"),
        (dict(divergences="nope"), "divergence name"),
    ],
)
def test_fit_gaussian_rejects_bad_arguments(kwargs, match):
    args = dict(divergences="forward_kl", inits=[(0.0, 1.0)], steps=2) | kwargs
    divergences = args.pop("divergences")
    with pytest.raises(ValueError, match=match):
        fit_gaussian(MIX, divergences, **args)
