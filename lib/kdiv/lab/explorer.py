r"""An interactive explorer of the toy fits: pick a teacher, divergences, a learning rate and a step count, then
slide through the steps and watch each student approach the teacher.

The controls (ipywidgets) re-run :func:`kdiv.lab.toy.fit` when the teacher, the divergences, the learning rate or the
number of steps change; the step slider only moves the drawing: it updates the data of the figure's artists
(``set_ydata``), as the GIF writer of :mod:`kdiv.lab.plotting` does, and shows the figure again. Everything a widget
does is also a plain method (:meth:`Explorer.refit`, :meth:`Explorer.show_step`), so the explorer runs headless,
e.g. under nbval, and the numbers it draws can be printed and checked.

The figure is a :class:`matplotlib.figure.Figure` made without pyplot, so a notebook does not display it twice
and nothing is written to ``figures/``.

    from kdiv.lab.explorer import Explorer
    ex = Explorer()
    ex.ui                      # the widgets, in a notebook
    ex.refit(teacher="long_tail", divergences=["forward_kl", "akl"], lr=0.2, steps=300)
    ex.show_step(10)

Every view names things alike: teachers by :data:`TEACHER_LABELS`, divergences by their specs' labels
(``kdiv.spec(name).label``: "FKL", "AKL", ...), the learning rate with :data:`LR_FORMAT` (the slider's readout too).
Code takes the keys ("long_tail", "forward_kl").
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..core.registry import DIVERGENCES, spec
from . import plotting, toy
from .zoo import ZOO

__all__ = ["TEACHERS", "TEACHER_LABELS", "LR_FORMAT", "Explorer"]

# The paper's three teachers (Wu et al., arXiv 2404.02657, Figures 2 and 3), keyed as in the other notebooks' tables.
TEACHERS = {
    "bimodal": toy.bimodal_teacher,
    "unimodal": toy.unimodal_teacher,
    "long_tail": lambda: toy.long_tail_teacher(seed=0),
}
TEACHER_LABELS = {"bimodal": "bimodal", "unimodal": "unimodal", "long_tail": "long tail"}

# The learning rate as the title prints it and the slider reads it out (a log slider's values are 10**k, k in
# steps of 0.1: 0.630957... reads 0.631 in both).
LR_FORMAT = ".3g"

# One explorer per id: a fixed widget model id keeps a stored notebook's output identical from run to run.
_ids = itertools.count()


class Explorer:
    """Toy fits under chosen divergences, with a step slider that redraws the students.

    Arguments are the initial choices: ``teacher`` (a key of :data:`TEACHERS`: "bimodal", "unimodal", "long_tail"),
    ``divergences`` (registry names; each is fitted with the hyper-parameters of :data:`kdiv.lab.zoo.ZOO`), ``lr``
    (Adam), ``steps``, ``seed`` (the shared initial logits, :func:`kdiv.lab.toy.init_logits`), ``mu`` (the head /
    tail split of the error panel).

    Attributes: ``result`` (the current :class:`kdiv.lab.toy.FitResult`), ``step`` (the step drawn), ``fig``,
    and ``ui`` (the widgets; built on first access, so the class works without ipywidgets installed). Once ``ui``
    exists, ``controls`` (dict of the teacher / lr / steps widgets), ``divergence_boxes`` (one checkbox per
    registered divergence, labelled with its spec's label) and ``step_slider`` can also be set from code: setting
    their ``value`` does what moving or ticking them does; :meth:`select` ticks a whole set at once.
    """

    def __init__(
        self,
        teacher: str = "bimodal",
        divergences=("forward_kl", "reverse_kl"),
        lr: float = 0.1,
        steps: int = 100,
        *,
        seed: int = 0,
        mu: float = 0.5,
    ):
        self.seed, self.mu = seed, mu
        self._ui = None
        self._artists: dict = {}
        self.fig = Figure(figsize=(9.0, 3.4), dpi=100, layout="constrained")
        self.refit(teacher=teacher, divergences=divergences, lr=lr, steps=steps)

    # ---- computation ------------------------------------------------------------------------------------------

    def refit(
        self, *, teacher: str | None = None, divergences=None, lr: float | None = None, steps: int | None = None
    ) -> toy.FitResult:
        """Fit again with the given choices (the others unchanged) and redraw at the last step."""
        teacher = self.teacher_name if teacher is None else teacher
        divergences = self.divergences if divergences is None else tuple(divergences)
        lr = self.lr if lr is None else float(lr)
        steps = self.steps if steps is None else int(steps)
        if teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {list(TEACHERS)}, got {teacher!r}")
        if not divergences or any(d not in DIVERGENCES for d in divergences):
            raise ValueError(f"divergences must be a non-empty selection of {sorted(DIVERGENCES)}, got {divergences}")
        if not (lr > 0 and np.isfinite(lr)):
            raise ValueError(f"lr must be a positive number, got {lr}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.teacher_name, self.divergences, self.lr, self.steps = teacher, tuple(divergences), lr, steps
        self.teacher = TEACHERS[teacher]()
        hyper = dict(ZOO)
        specs = [(name, hyper[name]) if hyper.get(name) else name for name in self.divergences]
        self.result = toy.fit(self.teacher, specs, steps=steps, lr=lr, seeds=self.seed)
        self.head_error, self.tail_error = (e[:, 0, 0] for e in self.result.head_tail_error(self.mu))  # [D, R]
        self._draw_axes()
        self.show_step(steps)
        return self.result

    def student(self, divergence: str, step: int) -> torch.Tensor:
        """The student distribution [V] of ``divergence`` (a name in :attr:`divergences`) after ``step`` steps."""
        if divergence not in self.divergences:
            raise ValueError(f"divergence must be one of {self.divergences}, got {divergence!r}")
        return self.result.probs[self.divergences.index(divergence), 0, 0, step]

    # ---- drawing ----------------------------------------------------------------------------------------------

    def _draw_axes(self) -> None:
        """Build the two panels for the current fit (the artists that show_step then updates)."""
        fig = self.fig
        fig.clear()
        with plotting.style():
            ax_fit, ax_err = fig.subplots(1, 2)
            x = self.teacher.x
            plotting.plot_distribution(ax_fit, x, self.teacher.probs, "teacher")
            self._artists = {"students": {}}
            steps = self.result.steps.numpy()
            for d, name in enumerate(self.divergences):
                self._artists["students"][name] = plotting.plot_distribution(ax_fit, x, self.student(name, 0), name)
                ax_err.plot(steps, self.head_error[d], "-", color=plotting.color(name), label=plotting.label(name))
                ax_err.plot(steps, self.tail_error[d], "--", color=plotting.color(name))
            ax_fit.set_xlabel("x (token)")
            ax_fit.set_ylabel("probability")
            top = float(max(self.teacher.probs.max(), self.result.probs.max()))
            ax_fit.set_ylim(0, 1.05 * top)
            self._artists["title"] = ax_fit.set_title("")
            ax_err.set_yscale("log")
            ax_err.set_xlabel("Adam step")
            ax_err.set_ylabel("error")
            ax_err.set_title(f"head and tail error (AKL split, mu = {self.mu:g})")
            self._artists["marker"] = ax_err.axvline(0, color=plotting.color("teacher"), linewidth=0.8, linestyle=":")
            ax_fit.legend(loc="upper right", fontsize=7.5)
            # the colours are the left panel's; this legend says which line is which error. Outside the axes: the
            # curves start high on the left and may end anywhere on the right.
            styles = [
                Line2D([], [], color=plotting.color("teacher"), linestyle="-", label="head error"),
                Line2D([], [], color=plotting.color("teacher"), linestyle="--", label="tail error"),
                Line2D([], [], color=plotting.color("teacher"), linestyle=":", linewidth=0.8, label="step shown"),
            ]
            ax_err.legend(handles=styles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7.5)

    def show_step(self, step: int) -> None:
        """Draw every student after ``step`` updates: only artist data change (no re-plot)."""
        step = int(step)
        if not 0 <= step <= self.steps:
            raise ValueError(f"step must be in [0, {self.steps}], got {step}")
        self.step = step
        for name, artist in self._artists["students"].items():
            artist.set_ydata(self.student(name, step).numpy())
        self._artists["marker"].set_xdata([step, step])
        self._artists["title"].set_text(self.title())
        self._refresh()

    def title(self) -> str:
        """The left panel's title: teacher, step and learning rate, as the controls show them."""
        return f"{TEACHER_LABELS[self.teacher_name]} teacher, step {self.step} (Adam lr {self.lr:{LR_FORMAT}})"

    def drawn(self, divergence: str) -> np.ndarray:
        """The y data currently drawn for ``divergence``'s student (to check the drawing against the fit)."""
        return np.asarray(self._artists["students"][divergence].get_ydata(), dtype=float)

    # ---- widgets ----------------------------------------------------------------------------------------------

    @property
    def ui(self):
        """The control panel and the figure as one ipywidgets box (built on first access)."""
        if self._ui is None:
            self._build_ui()
        return self._ui

    def _build_ui(self) -> None:
        import ipywidgets as w

        n = next(_ids)
        teachers = [(TEACHER_LABELS[k], k) for k in TEACHERS]
        self.controls = {
            "teacher": w.Dropdown(options=teachers, value=self.teacher_name, description="teacher"),
            "lr": w.FloatLogSlider(
                value=self.lr, base=10, min=-2, max=0, step=0.1, description="Adam lr", readout_format=LR_FORMAT
            ),
            "steps": w.IntSlider(value=self.steps, min=10, max=400, step=10, description="steps"),
        }
        # One checkbox per divergence, all visible: a click adds or removes one divergence (a multiple-selection
        # list would replace the whole selection on a plain click and hide rows below its fold).
        self.divergence_boxes = {
            name: w.Checkbox(
                value=name in self.divergences,
                description=spec(name).label,
                indent=False,
                layout=w.Layout(width="7em"),
            )
            for name in DIVERGENCES
        }
        self.step_slider = w.IntSlider(
            value=self.step, min=0, max=self.steps, description="step", continuous_update=True
        )
        # An Image widget, not an Output widget: updating its bytes needs no captured display/clear_output, which
        # headless runners (nbclient) have to emulate and can stall on.
        self._image = w.Image(format="png")
        self._holding = False
        for control in (*self.controls.values(), *self.divergence_boxes.values()):
            control.observe(self._on_choice, names="value")
        self.step_slider.observe(lambda change: self.show_step(change["new"]), names="value")
        boxes = w.GridBox(
            list(self.divergence_boxes.values()),
            layout=w.Layout(grid_template_columns="repeat(4, 7em)", margin="0 0 0 1em"),
        )
        left = w.VBox([self.controls["teacher"], w.Label("divergences (each at its paper's defaults):"), boxes])
        right = w.VBox([self.controls["lr"], self.controls["steps"], self.step_slider])
        self._ui = w.VBox([w.HBox([left, right]), self._image], model_id=f"kdiv-explorer-{n}")
        self._refresh()

    def select(self, divergences) -> None:
        """Tick exactly ``divergences`` (registry names) in the widgets and fit once, as ticking them one by one
        would end up doing."""
        divergences = set(divergences)
        unknown = sorted(divergences - set(DIVERGENCES))
        if unknown:
            raise ValueError(f"divergences must be registry names of {sorted(DIVERGENCES)}, got {unknown}")
        _ = self.ui  # the widgets must exist
        self._holding = True
        try:
            for name, box in self.divergence_boxes.items():
                box.value = name in divergences
        finally:
            self._holding = False
        self._on_choice(None)

    def _chosen(self) -> tuple[str, ...]:
        return tuple(name for name, box in self.divergence_boxes.items() if box.value)

    def _on_choice(self, _change) -> None:
        if self._holding:
            return
        chosen = {k: c.value for k, c in self.controls.items()}
        chosen["divergences"] = self._chosen()
        if not chosen["divergences"]:
            return  # nothing ticked while the user is choosing: keep the last fit
        self.refit(**chosen)
        self.step_slider.max = self.steps
        self.step_slider.value = self.steps

    def _refresh(self) -> None:
        """Show the figure again in the image widget (if the widgets exist)."""
        if self._ui is None:
            return
        # a PNG of our own: a Figure made without pyplot has no inline formatter
        buffer = io.BytesIO()
        self.fig.savefig(buffer, format="png", dpi=self.fig.dpi)
        self._image.value = buffer.getvalue()
