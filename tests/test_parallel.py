"""kdiv.parallel: vocab-parallel divergences on gloo ranks started by the test itself (2 and 3 ranks, uneven
shards), against the unsharded result; bad input on one rank raises on every rank; a rank that fails before its
call makes the others fail, not hang. One process group runs many cases (starting ranks costs seconds)."""

from __future__ import annotations

import math

import kdiv
import parallel_cases
import pytest
import torch
import torch.distributed as dist
from kdiv.testing.distributed import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _all(rank, world):
    """Everything one 3-rank group checks: every divergence on the 3 ranks and on a group of 2 of them, AKL's head
    on 3 ranks, the bad inputs; then the last rank leaves and the others' next call must fail."""
    import time

    out, times = {}, {}
    for part, run in [
        ("three", lambda: parallel_cases.divergences(rank, world, [13, 40, 7], None)),
        ("two", lambda: parallel_cases.divergences(rank, world, [29, 34], [0, 2], chunk_size=4)),
        ("heads", lambda: parallel_cases.heads(rank, world, [170, 37, 293])),
        ("bad", lambda: parallel_cases.bad_inputs(rank, world)),
        ("leave", lambda: parallel_cases.leave(rank, world)),
    ]:
        start = time.perf_counter()
        out[part] = run()
        times[part] = time.perf_counter() - start
    out["times"] = times
    return out


@pytest.fixture(scope="module")
def outcomes():
    # the group's timeout bounds how long a rank waits for one that left
    return run_ranks(_all, 3, timeout=240.0, collective_timeout=30.0)


def _values(outcomes):
    for rank, (status, value) in enumerate(outcomes):
        assert status == "ok", f"rank {rank}: {status}: {value[2] if value else ''}"
    return [value for _, value in outcomes]


@pytest.mark.parametrize("part", ["three", "two", "heads"])
def test_matches_the_unsharded_result(outcomes, part):
    for rank, value in enumerate(_values(outcomes)):
        assert value[part] == [], f"rank {rank}: " + "\n".join(value[part][:10])


def test_bad_input_on_one_rank_raises_on_every_rank(outcomes):
    values = _values(outcomes)
    scenarios = [s for s, _ in values[0]["bad"]]
    for i, scenario in enumerate(scenarios[:-1]):
        messages = [v["bad"][i][1] for v in values]
        assert all(m is not None for m in messages), f"{scenario}: {messages}"
        # every rank raises the same error, which names the argument and the rank
        assert len(set(messages)) == 1, f"{scenario}: {messages}"
    text = {s: values[0]["bad"][i][1] for i, s in enumerate(scenarios)}
    assert "temperature" in text["temperature on the last rank"] and "rank 2" in text["temperature on the last rank"]
    assert "beta" in text["hyper-parameter on rank 0"] and "rank 0" in text["hyper-parameter on rank 0"]
    assert "gamma" in text["unknown keyword on rank 0"]
    assert "disagree on the mask" in text["mask differs"]
    assert "disagree on the divergence" in text["divergence differs"]
    assert "NaN" in text["NaN on the last rank"]
    assert "all -inf" in text["teacher all -inf"]
    assert "kdiv.TopK teacher, which cannot be vocab-sharded" in text["top-k teacher"]
    usable = [v["bad"][-1][1] for v in values]
    assert len(set(usable)) == 1 and math.isfinite(usable[0])


def test_a_rank_that_leaves_makes_the_others_fail_not_hang(outcomes):
    values = _values(outcomes)
    assert values[-1]["leave"] is None
    for rank, value in enumerate(values[:-1]):
        assert value["leave"][0] != "no error", f"rank {rank} returned although a rank of its group had left"


def test_needs_a_process_group():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(ValueError, match="not initialised"):
        kdiv.forward_kl(s, t, vocab_group=object())
