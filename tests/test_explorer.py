"""kdiv.lab.explorer: the interactive explorer works headless and draws what it fitted."""

import kdiv
import numpy as np
import pytest
import torch
from kdiv.lab import toy
from kdiv.lab.explorer import TEACHER_LABELS, Explorer


@pytest.fixture(scope="module")
def explorer():
    return Explorer(teacher="unimodal", divergences=("forward_kl", "js"), lr=0.1, steps=20)


def test_fit_matches_a_direct_toy_fit(explorer):
    direct = toy.fit(toy.unimodal_teacher(), ["forward_kl", ("js", {"beta": 0.5})], steps=20, lr=0.1, seeds=0)
    torch.testing.assert_close(explorer.result.probs, direct.probs)


def test_step_slider_redraws_the_recorded_student(explorer):
    explorer.show_step(7)
    for name in explorer.divergences:
        np.testing.assert_array_equal(explorer.drawn(name), explorer.student(name, 7).numpy())
    with pytest.raises(ValueError, match="step"):
        explorer.show_step(21)


def test_widgets_drive_the_fit():
    ex = Explorer(divergences=("forward_kl",), steps=10)
    ui = ex.ui
    assert ui.model_id.startswith("kdiv-explorer-")
    ex.controls["steps"].value = 30
    assert ex.steps == 30 and ex.step_slider.max == 30 and ex.step == 30
    ex.select(["akl", "tvd"])  # ticked in registry order
    assert ex.result.keys == ("tvd", "akl(mu=0.5)")
    ex.divergence_boxes["forward_kl"].value = True  # a click adds one divergence and keeps the others
    assert ex.divergences == ("forward_kl", "tvd", "akl")
    ex.select([])  # nothing ticked keeps the last fit
    assert ex.divergences == ("forward_kl", "tvd", "akl")
    ex.select(["tvd", "akl"])
    ex.step_slider.value = 4
    np.testing.assert_array_equal(ex.drawn("akl"), ex.student("akl", 4).numpy())
    with pytest.raises(ValueError, match="divergences"):
        ex.select(["nope"])


def test_every_view_names_things_alike():
    ex = Explorer(teacher="long_tail", divergences=("forward_kl", "skew_reverse_kl"), steps=10)
    ui = ex.ui
    assert all(box.description == kdiv.spec(name).label for name, box in ex.divergence_boxes.items())
    assert [box.value for box in ex.divergence_boxes.values()] == [n in ex.divergences for n in kdiv.DIVERGENCES]
    assert ex.controls["teacher"].label == TEACHER_LABELS["long_tail"]
    legend = [t.get_text() for t in ex.fig.axes[0].get_legend().get_texts()]
    assert legend == ["Teacher", "FKL", "SRKL"]
    assert ex.fig.axes[1].get_legend() is not None  # the error panel says which line is which
    ex.controls["lr"].value = 10**-0.2  # the log slider's 0.630957...
    readout = f"{ex.controls['lr'].value:{ex.controls['lr'].readout_format}}"
    assert readout == "0.631" and f"lr {readout})" in ex.title()
    assert ui is ex.ui


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"teacher": "trimodal"}, "teacher"),
        ({"divergences": ["nope"]}, "divergences"),
        ({"divergences": []}, "divergences"),
        ({"lr": 0.0}, "lr"),
        ({"steps": 0}, "steps"),
    ],
)
def test_bad_choices(explorer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        explorer.refit(**kwargs)
