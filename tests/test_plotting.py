"""kdiv.lab.plotting: one palette for every name, byte-stable files, the GIF writer, legends outside the data."""

from __future__ import annotations

import hashlib
import io

import imageio.v3 as iio
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

import kdiv  # noqa: E402
import kdiv.lab.plotting as kp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402

TRANSPORT = ["wasserstein_1d", "sorted_wasserstein", "sinkhorn", "sinkhorn_divergence", "sinkd"]


@pytest.fixture
def figures(tmp_path, monkeypatch):
    folder = tmp_path / "figs"
    monkeypatch.setenv("KDIV_FIGURES", str(folder))
    monkeypatch.setattr(kp, "_figures_folder", None)
    return folder


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Palette and labels
# ---------------------------------------------------------------------------------------------------------------


def test_every_divergence_has_a_colour_and_a_label():
    names = ["teacher", *kdiv.DIVERGENCES, *TRANSPORT]
    for name in names:
        assert name in kp.COLORS and name in kp.LABELS
    assert set(kp.COLORS) == set(kp.LABELS)
    # no two names share a colour
    assert len({to_rgb(c) for c in kp.COLORS.values()}) == len(kp.COLORS)
    assert kp.LABELS["forward_kl"] == "FKL" and kp.LABELS["reverse_kl"] == "RKL"
    assert kp.LABELS["symmetric_kl"] == "FKL+RKL" and kp.LABELS["js"] == "JSD" and kp.LABELS["akl"] == "AKL"


def test_aliases_specs_and_hyperparameters():
    assert kp.color("fkl") == kp.color("forward_kl") == kp.color(("forward_kl", {}))
    assert kp.label(("js", {"beta": 0.1})) == "JSD (β=0.1)"
    assert kp.label("skew_kl", alpha=0.2) == "SKL (α=0.2)"
    with pytest.raises(ValueError, match="name must be one of"):
        kp.color("kl_div")
    with pytest.raises(ValueError, match="name must be a string"):
        kp.label(3)


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------


def _figure():
    kp.use_style()
    fig, axes = kp.subplots(1, 2, width=6, height=2.5)
    x = np.arange(20.0)
    p = np.exp(-0.5 * ((x - 8) / 3) ** 2)
    p /= p.sum()
    for ax in axes[0]:
        kp.plot_distribution(ax, x, p, "teacher")
        kp.plot_distribution(ax, x, np.full(20, 0.05), "forward_kl")
        kp.plot_distribution(ax, x, p[::-1], "reverse_kl")
    kp.legend_outside(fig)
    return fig


def test_savefig_is_byte_stable_and_has_no_run_dependent_metadata(figures):
    fig = _figure()
    path = kp.savefig(fig, "stable")
    assert path == figures / "stable.png"
    first = _digest(path)
    plt.close(fig)
    fig = _figure()  # a new figure, drawn again from scratch
    assert kp.savefig(fig, "stable.png") == path
    assert _digest(path) == first
    plt.close(fig)
    data = path.read_bytes()
    for chunk in (b"tIME", b"Software", b"matplotlib version"):
        assert chunk not in data


def test_savefig_writes_at_the_collection_dpi(figures):
    fig = _figure()
    path = kp.savefig(fig, "dpi")
    plt.close(fig)
    height, width, _ = iio.imread(path).shape
    assert width == pytest.approx(6 * kp.DPI, abs=2)


@pytest.mark.parametrize("name", ["../escape", "a/b", "", ".hidden"])
def test_savefig_rejects_paths(figures, name):
    fig = _figure()
    with pytest.raises(ValueError, match="name must be a plain file name"):
        kp.savefig(fig, name)
    plt.close(fig)


def test_nothing_is_written_until_a_folder_is_named(tmp_path, monkeypatch):
    # a user's own project with a pyproject.toml: no figures/ appears in it
    monkeypatch.delenv("KDIV_FIGURES", raising=False)
    monkeypatch.setattr(kp, "_figures_folder", None)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    monkeypatch.chdir(tmp_path)
    fig, ax = kp.subplots()
    with pytest.raises(ValueError, match="no folder for figures"):
        kp.savefig(fig, "x")
    assert list(tmp_path.iterdir()) == [tmp_path / "pyproject.toml"]
    # named: by folder=, by set_figures_dir, by KDIV_FIGURES
    assert kp.savefig(fig, "a", folder=tmp_path / "out") == tmp_path / "out" / "a.png"
    kp.set_figures_dir(tmp_path / "chosen")
    assert kp.savefig(fig, "b") == tmp_path / "chosen" / "b.png"
    monkeypatch.setattr(kp, "_figures_folder", None)
    monkeypatch.setenv("KDIV_FIGURES", str(tmp_path / "env"))
    assert kp.figures_dir() == tmp_path / "env"
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Legends and insets
# ---------------------------------------------------------------------------------------------------------------


def test_legend_outside_overlaps_no_axes():
    fig = _figure()
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_tightbbox(fig.canvas.get_renderer()))
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["Teacher", "FKL", "RKL"]  # once each, though both panels have them
    plt.close(fig)


def test_add_inset_sets_limits_and_scale():
    fig, axes = kp.subplots(1, 1)
    inset = kp.add_inset(axes[0, 0], xlim=(50, 100), ylim=(1e-8, 1e-1), yscale="log")
    assert inset.get_xlim() == (50, 100) and inset.get_yscale() == "log"
    assert inset in axes[0, 0].child_axes
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# GIF
# ---------------------------------------------------------------------------------------------------------------


def _animation(n_frames, blit=True):
    """A figure with an inset and three moving artists; returns (fig, update)."""
    kp.use_style()
    fig, axes = kp.subplots(1, 1, width=5, height=3)
    ax = axes[0, 0]
    x = np.arange(60.0)
    inset = kp.add_inset(ax, xlim=(30, 60), ylim=(1e-6, 1.0), yscale="log")
    kp.plot_distribution(ax, x, np.full(60, 1 / 60), "teacher")
    main = kp.plot_distribution(ax, x, np.full(60, 1 / 60), "forward_kl")
    zoom = kp.plot_distribution(inset, x, np.full(60, 1 / 60), "forward_kl", label=None)
    _ = ax.set_ylim(0, 0.2)
    title = ax.set_title(" ")

    def update(i):
        p = np.exp(-0.5 * ((x - 10 - 40 * i / max(n_frames - 1, 1)) / 4) ** 2)
        p /= p.sum()
        main.set_ydata(p)
        zoom.set_ydata(p)
        title.set_text(f"frame {i}")
        return [main, zoom, title] if blit else None

    return fig, update


def test_gif_is_byte_stable_small_and_has_every_frame(figures):
    digests = []
    for _ in range(2):
        fig, update = _animation(40)
        path = kp.save_gif(fig, update, 40, "anim", fps=20)
        plt.close(fig)
        digests.append(_digest(path))
    assert digests[0] == digests[1]
    frames = iio.imread(path, index=None, mode="RGB")
    assert frames.shape[0] == 40
    assert path.stat().st_size < 2_000_000 * 40 / 200  # the 200-frame budget of 2 MB, pro rata
    assert not np.array_equal(frames[0], frames[-1])


def test_blitted_frames_match_full_redraws(figures):
    # blitting with a cached background (and a repainted inset) must give what a full draw gives
    fig, update = _animation(12, blit=True)
    blitted = iio.imread(kp.save_gif(fig, update, 12, "blit"), index=None, mode="RGB")
    plt.close(fig)
    fig, update = _animation(12, blit=False)
    full = iio.imread(kp.save_gif(fig, update, 12, "full"), index=None, mode="RGB")
    plt.close(fig)
    assert blitted.shape == full.shape
    differ = np.abs(blitted.astype(int) - full.astype(int)).max(-1) > 48
    assert differ.mean() < 0.002, differ.mean()


def test_gif_restores_the_figure_and_rejects_bad_arguments(figures):
    fig, update = _animation(3)
    dpi = fig.dpi
    kp.save_gif(fig, update, 3, "restore", dpi=50)
    assert fig.dpi == dpi
    assert not any(a.get_animated() for ax in fig.axes for a in ax.get_children())
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")  # the figure still draws normally
    with pytest.raises(ValueError, match="frames"):
        kp.save_gif(fig, update, 0, "empty")
    with pytest.raises(ValueError, match="colors"):
        kp.save_gif(fig, update, 3, "c", colors=1)
    plt.close(fig)


def test_savefig_draws_the_same_file_for_data_that_differ_in_their_last_bits(tmp_path):
    """Float64 results differ in their last bits between CPUs; savefig rounds the drawn data to float32, so the
    file does not."""
    x = np.linspace(0.0, 1.0, 200)
    y = np.sin(7 * x) * np.exp(-x)
    digests = []
    for eps in (0.0, 1e-15):
        fig, ax = plt.subplots(figsize=(3, 2))
        _ = ax.plot(x, y * (1 + eps))
        _ = ax.scatter(x[::20], y[::20] * (1 + eps))
        _ = ax.fill_between(x, y * (1 + eps), 0.0, alpha=0.3)
        path = kp.savefig(fig, "stable", folder=tmp_path)
        plt.close(fig)
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
        assert ax.lines[0].get_ydata().dtype == np.float64
        assert np.array_equal(ax.lines[0].get_ydata(), (y * (1 + eps)).astype(np.float32).astype(np.float64))
    assert digests[0] == digests[1]
