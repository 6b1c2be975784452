"""The one figure style of the collection: palette, labels, rc settings, ``savefig`` and the GIF writer.

Every notebook draws with these so that the teacher, FKL, RKL and every other divergence keep one colour and one
short label in every figure::

    import kdiv.lab.plotting as kp
    kp.use_style()                                   # once, in the setup cell
    fig, ax = kp.subplots(1, 2)
    kp.plot_distribution(ax[0], x, teacher_probs, "teacher")
    kp.plot_distribution(ax[0], x, student_probs, "forward_kl")
    kp.legend_outside(fig)                           # legends go beside the panels, never over data
    kp.set_figures_dir("../figures")                 # once: where figures go
    kp.savefig(fig, "fr_kl")                         # -> ../figures/fr_kl.png

Files are byte-stable: a fixed dpi, no timestamps or version strings in the PNG metadata, and a GIF whose palette
is computed deterministically from its own frames.

Figures go to a folder that is named, never guessed: ``folder=``, :func:`set_figures_dir` (the collection's
notebooks call ``kp.set_figures_dir("../figures")``), or the environment variable ``KDIV_FIGURES``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import matplotlib as mpl
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg

from ..core.registry import SPECS

__all__ = [
    "COLORS",
    "LABELS",
    "MARKERS",
    "STYLE",
    "DPI",
    "color",
    "label",
    "use_style",
    "style",
    "subplots",
    "plot_distribution",
    "add_inset",
    "legend_outside",
    "figures_dir",
    "set_figures_dir",
    "savefig",
    "stabilise",
    "save_gif",
]

# The divergences' colours, labels and markers come from their specs (kdiv.core.divergences); the entries here are
# for what is not a registered divergence. Paul Tol's colours for the transport losses; the teacher is near-black
# so students drawn over it stay visible.
COLORS: dict[str, str] = {
    "teacher": "#262626",
    "student": "#9a9a9a",  # an untrained / initial student
    **{name: s.color for name, s in SPECS.items()},
    "wasserstein_1d": "#999933",
    "sorted_wasserstein": "#661100",
    "sinkhorn": "#44AA99",
    "sinkhorn_divergence": "#332288",
    "sinkd": "#882255",
}

LABELS: dict[str, str] = {
    "teacher": "Teacher",
    "student": "Student (init.)",
    **{name: s.label for name, s in SPECS.items()},
    "wasserstein_1d": "W1",
    "sorted_wasserstein": "sorted W1",
    "sinkhorn": "Sinkhorn",
    "sinkhorn_divergence": "Sinkhorn div.",
    "sinkd": "SinKD",
}

# name -> (marker, size in points): open markers of different shapes, so students that coincide stay visible
MARKERS: dict[str, tuple[str, float]] = {name: s.marker for name, s in SPECS.items()}

# Short aliases a reader may type; they map to the names above.
_ALIASES = {
    **{alias: name for name, s in SPECS.items() for alias in s.aliases},
    "w1": "wasserstein_1d",
    "wasserstein": "wasserstein_1d",
}

_GREEK = {
    **{h.name: h.symbol for s in SPECS.values() for h in s.hyper if h.symbol},
    "epsilon": "ε",
    "temperature": "T",
}

# PNG resolution: a 7-inch wide figure is ~1000 px, sharp on a README page without being heavy.
DPI = 144

STYLE: dict[str, object] = {
    "figure.figsize": (7.0, 3.2),
    "figure.dpi": 100,
    "figure.constrained_layout.use": True,
    "font.family": "DejaVu Sans",  # ships with matplotlib: identical glyphs on every machine
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e6e6e6",
    "grid.linewidth": 0.6,
    "legend.fontsize": 8.5,
    "legend.frameon": False,
    "lines.linewidth": 1.6,
    "lines.markersize": 4,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "savefig.dpi": DPI,
    "savefig.facecolor": "white",
    "image.interpolation": "nearest",
    "svg.hashsalt": "kdiv",
    "path.simplify": True,
}


def _canonical(name: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"name must be a string, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name)
    if key not in COLORS:
        raise ValueError(f"name must be one of {sorted(COLORS)} (or {sorted(_ALIASES)}), got {name!r}")
    return key


def _split_spec(spec) -> tuple[str, dict]:
    """A divergence spec is a name or a (name, {hyper: value}) pair, as :func:`kdiv.lab.toy.fit` takes it."""
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], dict):
        return spec[0], dict(spec[1])
    return spec, {}


def color(spec) -> str:
    """The colour of a divergence (registry name, alias such as "fkl", or ``(name, hyper)``), or "teacher"."""
    name, _ = _split_spec(spec)
    return COLORS[_canonical(name)]


def label(spec, **hyper) -> str:
    """The short label, with hyper-parameters appended: ``label(("js", {"beta": 0.1}))`` -> ``"JSD (β=0.1)"``."""
    name, spec_hyper = _split_spec(spec)
    spec_hyper.update(hyper)
    text = LABELS[_canonical(name)]
    if spec_hyper:
        text += " (" + ", ".join(f"{_GREEK.get(k, k)}={v:g}" for k, v in sorted(spec_hyper.items())) + ")"
    return text


def use_style() -> None:
    """Apply the collection's rc settings for the rest of the session (call once in a notebook's setup cell)."""
    mpl.rcParams.update(STYLE)


def style():
    """The collection's rc settings as a context manager: ``with kdiv.lab.plotting.style(): ...``."""
    return mpl.rc_context(STYLE)


def subplots(nrows: int = 1, ncols: int = 1, *, width: float = 7.0, height: float | None = None, **kwargs):
    """``plt.subplots`` with the collection's style and a README-friendly size (inches; height 2.8 per row)."""
    import matplotlib.pyplot as plt

    with style():
        return plt.subplots(nrows, ncols, figsize=(width, height or 2.8 * nrows), squeeze=False, **kwargs)


def plot_distribution(ax, x, probs, spec, *, kind: str | None = None, **kwargs):
    """Draw a distribution over a 1-D support in the colour and label of ``spec``.

    The teacher is a line with small dots (kind="line"); students are open markers (kind="scatter"), one shape per
    divergence (:data:`MARKERS`), so all stay visible where they coincide. ``x``, ``probs``: [V] arrays or tensors.
    Returns the artist (a Line2D for "line" and "scatter": update it with ``set_ydata`` in a GIF).
    """
    x = np.asarray(_numpy(x), dtype=float)
    probs = np.asarray(_numpy(probs), dtype=float)
    if x.shape != probs.shape or x.ndim != 1:
        raise ValueError(f"x and probs must be 1-D of one shape, got {x.shape} and {probs.shape}")
    name, _ = _split_spec(spec)
    is_teacher = _canonical(name) == "teacher"
    kind = kind or ("line" if is_teacher else "scatter")
    kwargs.setdefault("label", label(spec))
    c = color(spec)
    if kind == "line":
        kwargs.setdefault("zorder", 2)
        (artist,) = ax.plot(
            x,
            probs,
            "-",
            color=c,
            marker="." if is_teacher else None,
            markersize=3,
            linewidth=1.2 if is_teacher else 1.6,
            **kwargs,
        )
    elif kind == "scatter":
        # markers of a Line2D without its line: same look as ax.scatter, several times faster to draw (GIF frames)
        marker, size = MARKERS.get(_canonical(name), ("o", 4.0))
        kwargs.setdefault("zorder", 3)
        kwargs.setdefault("marker", marker)
        kwargs.setdefault("markersize", size)
        (artist,) = ax.plot(
            x,
            probs,
            linestyle="none",
            markerfacecolor="none",
            markeredgecolor=c,
            markeredgewidth=1.1,
            color=c,
            **kwargs,
        )
    elif kind == "bar":
        artist = ax.bar(
            x, probs, width=0.8 * float(np.min(np.diff(x))) if x.size > 1 else 0.8, color=c, alpha=0.35, **kwargs
        )
    else:
        raise ValueError(f"kind must be 'line', 'scatter' or 'bar', got {kind!r}")
    return artist


def add_inset(ax, *, xlim, ylim, yscale: str = "linear", bounds=(0.52, 0.42, 0.45, 0.52), title: str | None = None):
    """A zoom inset inside ``ax`` (``bounds``: x, y, width, height in axes fractions; default upper right).

    Put it where the parent's data leave room (e.g. over a flat tail); ``yscale="log"`` shows a long tail's small
    probabilities. Returns the inset axes, to draw on with :func:`plot_distribution` (pass ``label=None``).
    """
    inset = ax.inset_axes(list(bounds))
    inset.set_xlim(*xlim)
    inset.set_yscale(yscale)
    inset.set_ylim(*ylim)
    inset.tick_params(labelsize=7)
    inset.grid(True, which="major")
    if title:
        inset.set_title(title, fontsize=7.5, pad=2)
    return inset


def legend_outside(fig, *, handles=None, labels=None, loc: str = "outside upper center", ncols: int | None = None):
    """One legend for the whole figure, outside every panel (needs constrained layout, which the style sets).

    Duplicate labels across panels are shown once. ``loc`` is any matplotlib "outside ..." location.
    """
    if handles is None:
        seen: dict[str, object] = {}
        for ax in fig.axes:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                seen.setdefault(lab, h)
        labels, handles = list(seen), list(seen.values())
    if not handles:
        raise ValueError("fig has no labelled artists to put in a legend")
    return fig.legend(handles, labels, loc=loc, ncols=ncols or min(len(handles), 6))


def _numpy(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return x


# --------------------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------------------


_figures_folder: Path | None = None


def set_figures_dir(folder) -> None:
    """Name the folder :func:`savefig` and :func:`save_gif` write to for the rest of the session.

    The collection's notebooks call ``kp.set_figures_dir("../figures")`` in their setup cell (a notebook runs in
    its own folder). Nothing is written anywhere until a folder is named, here, with ``folder=`` or with the
    environment variable ``KDIV_FIGURES``.
    """
    global _figures_folder
    if not isinstance(folder, (str, os.PathLike)) or not str(folder):
        raise ValueError(f"folder must be a path, got {folder!r}")
    _figures_folder = Path(folder)


def figures_dir(folder=None) -> Path:
    """The folder figures go to (created if missing): ``folder`` if given, else the one named with
    :func:`set_figures_dir`, else ``KDIV_FIGURES``; a ValueError if none is named."""
    if folder is not None:
        chosen = Path(folder)
    elif _figures_folder is not None:
        chosen = _figures_folder
    elif os.environ.get("KDIV_FIGURES"):
        chosen = Path(os.environ["KDIV_FIGURES"])
    else:
        raise ValueError(
            "no folder for figures was named: pass folder=, call kdiv.lab.plotting.set_figures_dir(...) "
            "or set KDIV_FIGURES"
        )
    chosen.mkdir(parents=True, exist_ok=True)
    return chosen


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _target(name: str, suffix: str, folder=None) -> Path:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"name must be a plain file name such as 'fr_kl' (letters, digits, _ . -), got {name!r}")
    stem = name[: -len(suffix)] if name.endswith(suffix) else name
    return figures_dir(folder) / f"{stem}{suffix}"


def _float32(values):
    """values rounded to float32 (as float64), or unchanged where they are not a float array."""
    a = np.ma.asarray(values)  # (a masked array keeps its mask through astype)
    return a.astype(np.float32).astype(np.float64) if a.dtype.kind == "f" else values


def stabilise(fig) -> None:
    """Round the data of the figure's lines, scatter offsets and filled areas to float32, in place.

    The same float64 computation differs in its last bits between CPUs (the vector width changes the order of
    torch's and numpy's sums), which can move an antialiased edge by one grey level; rounded to float32 (7 digits,
    far below a pixel), the drawn data, and so the file, are the same on every machine."""
    for ax in fig.axes:
        for line in ax.get_lines():
            line.set_data(_float32(line.get_xdata(orig=True)), _float32(line.get_ydata(orig=True)))
        for coll in ax.collections:
            offsets = coll.get_offsets()
            if len(offsets):
                coll.set_offsets(_float32(offsets))
            for path in coll.get_paths():
                if path.vertices.flags.writeable:
                    path.vertices[...] = _float32(path.vertices)


def savefig(fig, name: str, *, folder=None, dpi: int = DPI) -> Path:
    """Write ``<folder>/<name>.png`` (see :func:`figures_dir`) at a fixed dpi with no run-dependent bytes;
    returns the path.

    The figure stays open (close it with ``plt.close(fig)``). Metadata is cleared so the file does not change with
    the matplotlib version either, and the data are rounded to float32 first (:func:`stabilise`) so that it does not
    change with the CPU.
    """
    stabilise(fig)
    path = _target(name, ".png", folder)
    with style():  # the file must not depend on rc changes made after the figure was built
        fig.savefig(path, dpi=dpi, facecolor="white", metadata={"Software": None})
    return path


def _draw_changed(fig, canvas, changed, inset_backgrounds: dict) -> None:
    """Draw the changed artists over the restored background, each axes' artists below the insets that cover them.

    Where a parent axes changed, its insets' clean background (saved with their tick labels) is pasted back before
    the insets' own changed artists are drawn, so data of the parent that moved under an inset stays hidden, as in a
    full draw, without redrawing the inset's ticks every frame.
    """
    by_axes: dict = {}
    for a in changed:
        by_axes.setdefault(a.axes, []).append(a)
    for ax in fig.axes:
        for a in by_axes.get(ax, ()):
            fig.draw_artist(a)
        for inset in ax.child_axes:
            if inset in by_axes or ax in by_axes:
                canvas.restore_region(inset_backgrounds[inset])
                for a in by_axes.get(inset, ()):
                    fig.draw_artist(a)
    for a in by_axes.get(None, ()):
        fig.draw_artist(a)


def save_gif(
    fig,
    update: Callable[[object], Iterable | None],
    frames,
    name: str,
    *,
    fps: float = 20,
    dpi: int = 72,
    colors: int = 48,
    loop: int = 0,
    folder=None,
) -> Path:
    """Write ``<folder>/<name>.gif`` (see :func:`figures_dir`) by updating the artists of one figure, frame by frame.

    ``update(frame)`` changes the data of existing artists (``set_offsets``, ``set_ydata``, ``set_text``...) and
    returns the artists it changed, as ``FuncAnimation(blit=True)`` expects; those are then redrawn over a cached
    background, so a frame costs a few milliseconds. If it returns None, the whole figure is redrawn each frame.
    ``frames``: an int (0..n-1) or an iterable of values passed to ``update``.

    Every frame is mapped to one palette of ``colors - 1`` colours, computed by median cut from the first, middle and
    last frames without dithering, and pixels unchanged since the previous frame are stored as transparent, so the
    file is small and identical on every run. Returns the path.
    """
    from PIL import Image

    frames = list(range(frames)) if isinstance(frames, int) else list(frames)
    if not frames:
        raise ValueError("frames must contain at least one frame")
    if not 2 <= colors <= 256:
        raise ValueError(f"colors must be in [2, 256], got {colors}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    path = _target(name, ".gif", folder)

    with style():
        images = _render_frames(fig, update, frames, dpi)

    # One palette for all frames, so colours do not flicker and the file is reproducible; the last index is kept free
    # to mark "unchanged since the previous frame" (transparent over an undisposed frame), which turns the static
    # parts of every frame into long runs that LZW compresses to almost nothing.
    sample = np.concatenate([images[0], images[len(images) // 2], images[-1]], axis=0)
    palette = Image.fromarray(sample).quantize(
        colors=colors - 1, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
    )
    indexed = np.stack(
        [np.asarray(Image.fromarray(im).quantize(palette=palette, dither=Image.Dither.NONE)) for im in images]
    )
    keep = colors - 1
    delta = indexed.copy()
    delta[1:][indexed[1:] == indexed[:-1]] = keep
    rgb = list(palette.getpalette()[: 3 * (colors - 1)]) + [255, 0, 255]  # the "unchanged" entry is never shown
    pil_frames = []
    for frame in delta:
        im = Image.fromarray(frame, mode="P")
        im.putpalette(rgb)
        pil_frames.append(im)
    # Pillow directly (imageio would hand it a palette to remap to, which scrambles the reserved index). GIF delays
    # are in centiseconds, so the frame time is rounded to 10 ms.
    pil_frames[0].save(
        path,
        format="GIF",
        save_all=True,
        append_images=pil_frames[1:],
        loop=loop,
        duration=10 * max(1, round(100 / fps)),
        disposal=1,
        transparency=keep,
        optimize=False,
    )
    return path


def _render_frames(fig, update, frames: list, dpi: int) -> list[np.ndarray]:
    """RGB [H, W, 3] uint8 per frame; blitting when ``update`` returns the artists it changed."""
    old_dpi, old_canvas = fig.dpi, fig.canvas
    canvas = old_canvas if isinstance(old_canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    images = []
    animated: list = []
    try:
        changed = update(frames[0])
        blit = changed is not None
        changed = list(changed) if blit else None
        if blit:
            animated = [a for a in changed if not a.get_animated()]
            for a in animated:
                a.set_animated(True)
        canvas.draw()  # the static background (animated artists are skipped by a full draw)
        background = canvas.copy_from_bbox(fig.bbox) if blit else None
        renderer = canvas.get_renderer()
        inset_backgrounds = (
            {inset: canvas.copy_from_bbox(inset.get_tightbbox(renderer)) for ax in fig.axes for inset in ax.child_axes}
            if blit
            else {}
        )
        for i, frame in enumerate(frames):
            changed = changed if i == 0 else update(frame)
            if blit:
                canvas.restore_region(background)
                _draw_changed(fig, canvas, changed, inset_backgrounds)
            else:
                canvas.draw()
            images.append(np.asarray(canvas.buffer_rgba())[..., :3].copy())
    finally:
        for a in animated:
            a.set_animated(False)
        fig.set_dpi(old_dpi)
        if canvas is not old_canvas:
            fig.set_canvas(old_canvas)
    return images
