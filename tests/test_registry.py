"""The registry is read off one spec per divergence, and every test parametrised over divergences covers all of
them: adding a divergence (kernel, spec, float64 reference) is enough for the whole suite to test it."""

from __future__ import annotations

import kdiv
import pytest
import reference
from conftest import NAMES_BY_TEST


def test_every_parametrised_test_covers_every_divergence(request):
    registered = set(kdiv.SPECS)
    expected = {
        "all": registered,
        "with_hyper": {name for name, s in kdiv.SPECS.items() if s.hyper},
        "prob_form": set(reference.PROB_FORMS),
    }
    missing, checked = {}, 0
    for test, (kind, names) in request.config.stash[NAMES_BY_TEST].items():
        # a test whose names include no divergence uses "name" for something else (teachers, transport losses)
        if kind == "chosen" or not names & registered:
            continue
        assert kind in expected, f"{test}: unknown @pytest.mark.divergences kind {kind!r}"
        checked += 1
        if expected[kind] - names:
            missing[test] = sorted(expected[kind] - names)
    assert not missing, f"tests parametrised over divergences that miss some: {missing}"
    if len(request.session.items) > 100:  # the whole suite was collected, not this file alone
        assert checked >= 20


def test_every_divergence_has_a_float64_reference():
    assert set(reference.DIVERGENCES) == set(kdiv.SPECS)
    with_coefficient = {name for name, s in kdiv.SPECS.items() if s.prob_gradient is not None and name != "akl"}
    assert with_coefficient <= set(reference.PROB_FORMS)


def test_specs_are_consistent():
    from kdiv.lab import plotting
    from kdiv.testing import plain

    for name, s in kdiv.SPECS.items():
        assert s.fn.spec is s and s.fn.__name__ == name
        assert callable(s.plain) and plain.DIVERGENCES[name].__name__ == name
        assert plotting.color(name) == s.color and plotting.MARKERS[name] == s.marker
        assert plotting.label(name) == s.label
        for alias in s.aliases:
            assert plotting.color(alias) == s.color
        for h in s.hyper:
            assert h.contains(h.default) and all(h.contains(v) for v in h.examples)
    colors = [s.color for s in kdiv.SPECS.values()]
    assert len(set(colors)) == len(colors)


def test_a_spec_whose_signature_disagrees_is_refused():
    from kdiv.core.kernels import forward_kl_rows
    from kdiv.core.spec import Hyper, divergence

    with pytest.raises(ValueError, match="do not match"):

        @divergence(
            kernel=forward_kl_rows, plain=None, label="X", color="#000000", marker=("o", 4), hyper=[Hyper("a", 0.5)]
        )
        def made_up(
            student_logits, teacher_logits, *, a=0.2, temperature=1.0, mask=None, reduction="mean", chunk_size=None
        ):
            """Not registered: its default for a disagrees with its spec."""

    assert "made_up" not in kdiv.SPECS
    with pytest.raises(ValueError, match="outside its own range"):
        Hyper("a", 2.0)
