"""kdiv.lab.explorer: the interactive explorer works headless and draws what it fitted."""

import numpy as np
import pytest
import torch
from kdiv.lab import toy
from kdiv.lab.explorer import Explorer


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
    ex.controls["divergences"].value = ("tvd", "akl")
    assert ex.result.keys == ("tvd", "akl(mu=0.5)")
    ex.controls["divergences"].value = ()  # an empty selection keeps the last fit
    assert ex.divergences == ("tvd", "akl")
    ex.step_slider.value = 4
    np.testing.assert_array_equal(ex.drawn("akl"), ex.student("akl", 4).numpy())


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
