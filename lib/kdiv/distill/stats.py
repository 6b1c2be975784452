r"""Statistics over training seeds: means with t intervals, paired differences with bootstrap intervals.

With n seeds and values :math:`x_1..x_n`, :func:`mean_ci` gives :math:`\bar x \pm t_{0.975, n-1}\, s / \sqrt n`
(Student's t; s the sample standard deviation). :func:`paired_differences` pairs each divergence's value with the
baseline's *of the same seed* (same initialisation, same batches), :math:`d_s = x_s - b_s`, and reports the mean
difference with its t interval and a percentile bootstrap interval (resampling seeds, fixed generator seed).

With 3 seeds a bootstrap has only 10 distinct resamples; the t interval is the one to read then, and both are
reported. numpy only (scipy is a test dependency); the t quantile is computed from the closed form of the t
distribution's CDF for integer degrees of freedom (Abramowitz & Stegun 26.7.3-4) by bisection.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["t_cdf", "t_quantile", "mean_ci", "bootstrap_ci", "paired_differences", "summary", "values_by_seed"]


def _t_two_sided(t: float, df: int) -> float:
    """A(t | df) = P(|T| <= t), t >= 0, integer df >= 1 (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        if df == 1:
            return 2 * theta / math.pi
        term, total = math.cos(theta), math.cos(theta)
        for k in range(3, df - 1, 2):  # terms cos^3 .. cos^{df-2}
            term *= c2 * (k - 1) / k
            total += term
        return 2 / math.pi * (theta + math.sin(theta) * total)
    term, total = 1.0, 1.0
    for k in range(2, df - 1, 2):  # terms cos^2 .. cos^{df-2}
        term *= c2 * (k - 1) / k
        total += term
    return math.sin(theta) * total


def t_cdf(t: float, df: int) -> float:
    """The CDF of Student's t with integer ``df`` degrees of freedom."""
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    a = _t_two_sided(abs(t), df)
    return 0.5 + 0.5 * a if t >= 0 else 0.5 - 0.5 * a


def t_quantile(prob: float, df: int) -> float:
    """The ``prob`` quantile of Student's t (bisection on :func:`t_cdf` to 1e-12)."""
    if not 0.0 < prob < 1.0:
        raise ValueError(f"prob must be in (0, 1), got {prob!r}")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > prob:
        lo *= 2
    while t_cdf(hi, df) < prob:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < prob:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def mean_ci(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the t interval of the mean. One value: (x, nan, nan)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"values must be a non-empty 1-d sequence, got shape {x.shape}")
    m = float(x.mean())
    if x.size < 2:
        return m, math.nan, math.nan
    half = t_quantile(0.5 + level / 2, x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return m, m - half, m + half


def bootstrap_ci(values, *, level: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (numpy's default_rng(seed), resampling with replacement)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"values must be a non-empty 1-d sequence, got shape {x.shape}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def values_by_seed(records, *, regime: str, divergence: str, metric: str) -> dict[int, float]:
    return {
        int(r["seed"]): float(r["metrics"][metric])
        for r in records
        if r["regime"] == regime and r["divergence"] == divergence
    }


def summary(records, metric: str, *, level: float = 0.95) -> list[dict]:
    """One row per (regime, divergence): n seeds, mean, t-interval, in the records' order."""
    rows, seen = [], []
    for r in records:
        key = (r["regime"], r["divergence"])
        if key not in seen:
            seen.append(key)
    for regime, div in seen:
        vals = list(values_by_seed(records, regime=regime, divergence=div, metric=metric).values())
        m, lo, hi = mean_ci(vals, level)
        rows.append({"regime": regime, "divergence": div, "n": len(vals), "mean": m, "low": lo, "high": hi})
    return rows


def paired_differences(
    records, metric: str, *, regime: str = "kd", baseline: str = "forward_kl", n_boot: int = 10_000, seed: int = 0
) -> list[dict]:
    """Per divergence of ``regime``: mean of (value - baseline's value of the same seed) over the shared seeds, its
    t interval and its percentile bootstrap interval; ``real`` when the t interval excludes 0 (with few seeds
    the bootstrap interval is too narrow: it cannot see beyond the seeds it has)."""
    base = values_by_seed(records, regime=regime, divergence=baseline, metric=metric)
    if not base:
        raise ValueError(f"no {regime!r} records of baseline {baseline!r}")
    divs = list(dict.fromkeys(r["divergence"] for r in records if r["regime"] == regime))
    rows = []
    for div in divs:
        if div == baseline:
            continue
        vals = values_by_seed(records, regime=regime, divergence=div, metric=metric)
        seeds = sorted(set(vals) & set(base))
        if not seeds:
            continue
        d = [vals[s] - base[s] for s in seeds]
        m, lo, hi = mean_ci(d)
        blo, bhi = bootstrap_ci(d, n_boot=n_boot, seed=seed)
        rows.append(
            {
                "divergence": div,
                "n": len(d),
                "mean": m,
                "t_low": lo,
                "t_high": hi,
                "boot_low": blo,
                "boot_high": bhi,
                "real": bool(len(d) > 1 and (lo > 0 or hi < 0)),
            }
        )
    return rows
