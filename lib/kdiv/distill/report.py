"""Tables and figures of the KD lab's results, for the notebook (it reads committed results; nothing retrains).

Tables are lists of dicts (:func:`table`, :func:`differences`) with a fixed-digit text rendering
(:func:`format_rows`); figures draw on axes given by the caller, in the collection's palette
(:mod:`kdiv.lab.plotting`). Needs the ``notebooks`` extra (matplotlib) for the figures only.
"""

from __future__ import annotations

import math

import numpy as np

from . import stats

__all__ = [
    "name_of",
    "table",
    "differences",
    "format_rows",
    "curves",
    "plot_metric",
    "plot_precision_recall",
    "plot_curves",
    "claims_check",
]

_OTHER = {"teacher": ("Teacher", "#262626"), "truth": ("p* (truth)", "#000000"), "sft": ("SFT", "#9a9a9a")}


def name_of(regime: str, divergence: str) -> str:
    if regime in _OTHER:
        return _OTHER[regime][0]
    from kdiv.lab import plotting as kp

    return kp.label(divergence)


def _color(regime, divergence):
    if regime in _OTHER:
        return _OTHER[regime][1]
    from kdiv.lab import plotting as kp

    return kp.color(divergence)


def table(results, metric: str, *, regime: str = "kd") -> list[dict]:
    """Rows of the paper's table in miniature: truth (synthetic arm), teacher, SFT, then every divergence of
    ``regime``; each with n seeds, mean and the 95 % t interval over seeds."""
    recs = results["records"]
    rows = []
    for row in stats.summary(recs, metric):
        if row["regime"] in ("truth", "teacher", "sft") or row["regime"] == regime:
            rows.append({"name": name_of(row["regime"], row["divergence"]), **row})
    order = {"truth": 0, "teacher": 1, "sft": 2}
    return sorted(rows, key=lambda r: order.get(r["regime"], 3))


def differences(results, metric: str, *, regime: str = "kd", baseline: str = "forward_kl", n_boot=10_000):
    """Paired differences of each divergence to ``baseline`` (same seed), with t and bootstrap intervals."""
    rows = stats.paired_differences(results["records"], metric, regime=regime, baseline=baseline, n_boot=n_boot)
    return [{"name": name_of(regime, r["divergence"]), **r} for r in rows]


def format_rows(rows, columns, digits: int = 2) -> str:
    """A fixed-width text table of ``rows`` (dicts) for ``columns`` (keys); floats with ``digits`` decimals."""

    def cell(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.{digits}f}"
        return str(v)

    cells = [[cell(r[c]) for c in columns] for r in rows]
    width = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, width, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, width, strict=True)) for row in cells]
    return "\n".join(lines)


def curves(results, key: str, *, regime: str = "kd") -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """divergence -> (steps, mean over seeds, half-width of the 95 % t interval) of curve ``key``."""
    out = {}
    by_div: dict[str, list] = {}
    for r in results["records"]:
        if r["regime"] == regime and r["curves"]:
            by_div.setdefault(r["divergence"], []).append(r["curves"])
    for div, cs in by_div.items():
        steps = np.array(cs[0]["step"])
        vals = np.array([c[key] for c in cs])
        mean = vals.mean(0)
        if len(cs) > 1:
            half = stats.t_quantile(0.975, len(cs) - 1) * vals.std(0, ddof=1) / math.sqrt(len(cs))
        else:
            half = np.zeros_like(mean)
        out[div] = (steps, mean, half)
    return out


def plot_metric(ax, results, metric: str, *, regime: str = "kd", ylabel: str | None = None):
    """Mean and 95 % interval per row of :func:`table`, one colour per divergence."""
    rows = table(results, metric, regime=regime)
    for i, r in enumerate(rows):
        err = None if math.isnan(r["low"]) else [[r["mean"] - r["low"]], [r["high"] - r["mean"]]]
        ax.errorbar([i], [r["mean"]], yerr=err, fmt="o", color=_color(r["regime"], r["divergence"]), capsize=3)
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=45, ha="right")
    ax.set_ylabel(ylabel or metric)
    return rows


def plot_precision_recall(ax, results, *, regime: str = "kd", references: bool = True, fmt: str = "o", suffix=""):
    """Coverage (-E_{x~p*} log q per token, x axis) against precision (-E_{x~q} log p* per token, y axis) per
    divergence, mean and 95 % interval over seeds; lower is better on both; the truth, teacher and SFT rows drawn
    too when ``references``."""
    cov = {(r["regime"], r["divergence"]): r for r in table(results, "nll_own_of_data", regime=regime)}
    pre = {(r["regime"], r["divergence"]): r for r in table(results, "nll_truth_of_own", regime=regime)}
    rows = []
    for key, c in cov.items():
        if not references and key[0] in _OTHER:
            continue
        p = pre[key]
        xerr = None if math.isnan(c["low"]) else [[c["mean"] - c["low"]], [c["high"] - c["mean"]]]
        yerr = None if math.isnan(p["low"]) else [[p["mean"] - p["low"]], [p["high"] - p["mean"]]]
        ax.errorbar(
            [c["mean"]],
            [p["mean"]],
            xerr=xerr,
            yerr=yerr,
            fmt=fmt,
            color=_color(*key),
            label=c["name"] + suffix,
            capsize=2,
            markerfacecolor="white" if fmt != "o" else None,
        )
        rows.append({"name": c["name"] + suffix, "coverage": c["mean"], "precision": p["mean"], "n": c["n"]})
    ax.set_xlabel("coverage: −E_{x~p*} log q(x) per token (nats)")
    ax.set_ylabel("precision: −E_{x~q} log p*(x) per token")
    return rows


def plot_curves(ax, results, key: str, *, regime: str = "kd", divergences=None, linestyle="-", label_suffix=""):
    """Curve ``key`` over training steps, mean over seeds with a 95 % band, per divergence."""
    rows = []
    for div, (steps, mean, half) in curves(results, key, regime=regime).items():
        if divergences is not None and div not in divergences:
            continue
        color = _color(regime, div)
        name = name_of(regime, div)
        _ = ax.plot(steps, mean, color=color, linestyle=linestyle, label=name + label_suffix)
        _ = ax.fill_between(steps, mean - half, mean + half, color=color, alpha=0.15, linewidth=0)
        rows.append({"name": name, "first": float(mean[0]), "last": float(mean[-1])})
    ax.set_xlabel("training step")
    return rows


def claims_check(results, metric: str, *, regime: str = "kd", baseline: str = "forward_kl") -> dict[str, str]:
    """For each divergence, whether it beats the baseline on ``metric`` (higher is better): "better" / "worse"
    when the paired 95 % t interval excludes 0, else "no difference"."""
    out = {}
    if not any(r["regime"] == regime for r in results["records"]):
        return out
    for r in differences(results, metric, regime=regime, baseline=baseline):
        if not r["real"]:
            out[r["divergence"]] = "no difference"
        else:
            out[r["divergence"]] = "better" if r["mean"] > 0 else "worse"
    return out
